// return_model: when (and whether) an idle session comes back, learned online from the
// turns a store sees.
//
// An idle period starts when a turn ends (the session's KV was saved) and ends when the
// session returns (its next request arrives), or is censored: the session was dropped
// while idle, or is still idle. An engine hint (the user is composing the next turn, or
// left) ends the period of the phase it was in (a hint to compose as a return, a hint
// that the user left as an end) and starts one in the hint's phase, whose returns are
// learned apart: what "typing" or "gone" is worth is measured, not assumed. The model
// keeps, per session class (phase x turns so far x history size x tokens the last turn
// added) and per age bin (log-spaced: 0.5 s, then x1.5 per bin, the last bin from
// ~5.3 hours on), decayed counts of returns and censorings, and estimates the hazard of
// returning in each bin with the actuarial (life-table) form of Kaplan-Meier, so that
// censoring by the cache's own evictions does not bias it. Decay is by the time a period
// started (weight 2^(-(now - start) / half-life)), for ended and ongoing periods alike:
// weighting ended periods by their end instead would let the long-idle sessions of old
// cohorts outweigh their cohorts' returns, and bias the return probability down. "Never returns" is the mass
// the survival keeps after the last bin: sessions known to be over (closed by their
// owner) count as censored there. The survival S(a) = P(no return by idle age a) gives
// both distributions the policy needs:
//   continuation  P(the session has another turn) = 1 - S(inf), per turns-so-far class;
//   think time    P(T <= a | it returns) = (1 - S(a)) / (1 - S(inf)).
// Memory is fixed (classes x bins counters); an observation is O(1); refit() is
// O(classes x bins) and allocates nothing. Estimates shrink toward a prior (pooled over
// classes, and a generic lognormal think time with 80% continuation) where data is thin.
//
// Times are in seconds here; policy::predictive converts its caller's clock.
// Threading: not thread-safe (used under the policy's mutex).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>

namespace attnstore::policy {

class return_model {
 public:
  static constexpr std::uint32_t bins = 28;
  static constexpr std::uint32_t turn_classes = 4;  ///< turns so far: 1, 2, 3-4, 5+
  static constexpr std::uint32_t size_classes = 4;  ///< history: < 512, < 1536, < 3072, more tokens
  /// Tokens the last turn added (its prompt and reply): < 256, < 640, more. A long reply
  /// takes long to read.
  static constexpr std::uint32_t growth_classes = 3;
  /// Since the turn end: no hint (0), the user is composing (1), the user left (2).
  static constexpr std::uint32_t phases = 3;
  static constexpr std::uint32_t groups = phases * turn_classes;  ///< phase x turns: the classes' shrinkage targets
  static constexpr std::uint32_t classes = groups * size_classes * growth_classes;
  static constexpr double first_edge_s = 0.5;  ///< upper edge of bin 0
  static constexpr double bin_ratio = 1.5;     ///< each later bin is this much wider

  /// `half_life_s`: seconds after which the evidence of a period weighs half (by its
  /// start). `prior_weight`: pseudo-observations at risk per bin for the prior (pooled
  /// and turn-class estimates); `class_weight`: the same for a class's estimate toward
  /// its turn class (classes compete for the same space: a class that differs from its
  /// turn class only by noise should not displace older sessions of another).
  explicit return_model(double half_life_s = 3600, double prior_weight = 8, double class_weight = 32) noexcept
      : half_life_(half_life_s > 1 ? half_life_s : 1),
        prior_weight_(prior_weight > 0 ? prior_weight : 0),
        class_weight_(class_weight > 0 ? class_weight : 0) {
    prior_hazards();
    refit({}, 0);
  }

  // ---- bins and classes

  /// Lower edge of bin j in seconds (edge(bins) is +inf).
  static double edge(std::uint32_t j) noexcept {
    if (j == 0) return 0;
    if (j >= bins) return HUGE_VAL;
    return first_edge_s * std::pow(bin_ratio, double(j - 1));
  }
  /// A representative age in bin j (geometric middle; half the first edge in bin 0).
  static double middle(std::uint32_t j) noexcept {
    if (j == 0) return first_edge_s / 2;
    return edge(j) * std::sqrt(j + 1 < bins ? bin_ratio : bin_ratio * bin_ratio);
  }
  static std::uint32_t bin_of(double seconds) noexcept {
    if (!(seconds >= first_edge_s)) return 0;
    const double k = std::floor(std::log(seconds / first_edge_s) / std::log(bin_ratio));
    return k >= double(bins - 2) ? bins - 1 : std::uint32_t(k) + 1;
  }
  static std::uint32_t turn_class(std::uint32_t turns) noexcept {
    return turns <= 1 ? 0 : turns == 2 ? 1 : turns <= 4 ? 2 : 3;
  }
  static std::uint32_t size_class(std::uint64_t tokens) noexcept {
    return tokens < 512 ? 0 : tokens < 1536 ? 1 : tokens < 3072 ? 2 : 3;
  }
  /// Typical history tokens of a size class (for the prefill work a hit saves).
  static double size_tokens(std::uint32_t z) noexcept {
    constexpr double t[size_classes] = {256, 1024, 2304, 3584};
    return t[z < size_classes ? z : size_classes - 1];
  }
  static std::uint32_t growth_class(std::uint64_t tokens) noexcept { return tokens < 256 ? 0 : tokens < 640 ? 1 : 2; }
  /// The class of a session after `turns` turns, holding `tokens` of history, the last
  /// turn having added `added` tokens, in `phase` (0: no hint since the turn end).
  static std::uint32_t class_of(std::uint32_t turns, std::uint64_t tokens, std::uint64_t added,
                                std::uint32_t phase = 0) noexcept {
    const std::uint32_t group = (phase < phases ? phase : 0) * turn_classes + turn_class(turns);
    return (group * size_classes + size_class(tokens)) * growth_classes + growth_class(added);
  }
  static std::uint32_t group_of_class(std::uint32_t cls) noexcept { return cls / (size_classes * growth_classes); }
  static std::uint32_t phase_of_class(std::uint32_t cls) noexcept { return group_of_class(cls) / turn_classes; }
  static std::uint32_t size_of_class(std::uint32_t cls) noexcept { return cls / growth_classes % size_classes; }

  // ---- observations, O(1)

  /// The session returned `gap_s` seconds after its turn ended.
  void add_return(std::uint32_t cls, double gap_s) noexcept {
    ret_[cls][bin_of(gap_s)] += weight(gap_s);
    ++pending_;
    ++periods_;
    ++returns_;
  }
  /// The session left the cache `age_s` seconds into an idle period (not known to be over).
  void add_censored(std::uint32_t cls, double age_s) noexcept {
    cens_[cls][bin_of(age_s)] += weight(age_s);
    ++pending_;
    ++periods_;
  }
  /// The session is over (closed by its owner `age_s` seconds into an idle period): it
  /// would never have returned.
  void add_ended(std::uint32_t cls, double age_s) noexcept {
    ended_[cls] += weight(age_s);
    ++pending_;
    ++periods_;
  }
  /// Weight now of a period that started `age_s` ago.
  double weight(double age_s) const noexcept { return std::exp2(-std::max(0.0, age_s) / half_life_); }
  /// Idle periods ended since the last refit.
  std::uint64_t pending() const noexcept { return pending_; }
  /// Returns observed in all (not decayed).
  std::uint64_t returns_seen() const noexcept { return returns_; }
  /// Idle periods ended in all (returns, censorings, ends; not decayed).
  std::uint64_t periods_seen() const noexcept { return periods_; }

  /// Decays the counts by the `elapsed_s` seconds since the last refit and re-estimates
  /// the hazards. `idle` (classes x bins, or empty) counts the sessions idle now, by the
  /// bin of their idle age: censored observations that are not kept. O(classes x bins).
  void refit(std::span<const std::uint32_t> idle, double elapsed_s) noexcept {
    const double f = weight(elapsed_s);
    pending_ = 0;
    for (std::uint32_t c = 0; c < classes; ++c) {
      for (std::uint32_t j = 0; j < bins; ++j) {
        ret_[c][j] *= f;
        cens_[c][j] *= f;
      }
      ended_[c] *= f;
    }
    auto idle_at = [&](std::uint32_t c, std::uint32_t j) {
      return idle.size() >= classes * bins ? double(idle[c * bins + j]) * weight(middle(j)) : 0.0;
    };
    // Pooled over each phase's classes (shrunk to the prior), per phase and turn class
    // (shrunk to the phase's pool), per class (shrunk to its phase and turn class).
    row all[phases]{}, group[groups]{};
    for (std::uint32_t c = 0; c < classes; ++c) {
      row one{};
      for (std::uint32_t j = 0; j < bins; ++j) {
        one.ret[j] = ret_[c][j];
        one.cens[j] = cens_[c][j] + idle_at(c, j);
      }
      one.ended = ended_[c];
      class_rows_[c] = one;
      all[phase_of_class(c)].add(one);
      group[group_of_class(c)].add(one);
    }
    for (std::uint32_t f = 0; f < phases; ++f) {
      fit(all[f], prior_h_.data(), prior_weight_, pooled_h_[f].data());
      survival(pooled_h_[f].data(), pooled_s_[f].data());
    }
    for (std::uint32_t g = 0; g < groups; ++g) {
      fit(group[g], pooled_h_[g / turn_classes].data(), prior_weight_, group_h_[g].data());
      survival(group_h_[g].data(), group_s_[g].data());
    }
    for (std::uint32_t c = 0; c < classes; ++c) {
      fit(class_rows_[c], group_h_[group_of_class(c)].data(), class_weight_, h_[c].data());
      survival(h_[c].data(), s_[c].data());
      // cum_[c][j]: expected seconds idle before age edge(j), S falling geometrically
      // inside each bin: the integral of S over bin j is S_j x width x h / -ln(1 - h).
      cum_[c][0] = 0;
      for (std::uint32_t j = 0; j + 1 < bins; ++j) {
        const double hj = std::min(h_[c][j], 1 - 1e-12);
        const double shape = hj > 1e-12 ? hj / -std::log1p(-hj) : 1;
        cum_[c][j + 1] = cum_[c][j] + s_[c][j] * (edge(j + 1) - edge(j)) * shape;
      }
    }
  }

  // ---- estimates (as of the last refit)

  /// P(no return by idle age a) for class cls, including "never"; 1 at age 0.
  double survival(std::uint32_t cls, double age_s) const noexcept { return at(h_[cls].data(), s_[cls].data(), age_s); }
  /// P(the session returns within `horizon_s` | idle for `age_s` with no return yet).
  double p_return_within(std::uint32_t cls, double age_s, double horizon_s) const noexcept {
    const double sa = survival(cls, age_s);
    if (sa <= 1e-12) return 0;
    return std::clamp((sa - survival(cls, age_s + horizon_s)) / sa, 0.0, 1.0);
  }
  /// Expected seconds of the next `horizon_s` the session stays idle (it occupies the
  /// cache until it returns), given idle for `age_s`. In (0, horizon_s].
  double expected_idle_within(std::uint32_t cls, double age_s, double horizon_s) const noexcept {
    const double sa = survival(cls, age_s);
    if (sa <= 1e-12) return horizon_s;
    constexpr int steps = 8;  // trapezoids: S is smooth on this scale
    double sum = 0, prev = 1;
    for (int i = 1; i <= steps; ++i) {
      const double x = survival(cls, age_s + horizon_s * i / steps) / sa;
      sum += (prev + x) / 2;
      prev = x;
    }
    return std::max(horizon_s * sum / steps, horizon_s * 1e-3);
  }
  /// Expected returns per second of idle time a session idle for `age_s` brings if it is
  /// kept until it returns or until the best cut-off age A (a Gittins-style index):
  ///   max over A > age of  P(returns in (age, A] | idle at age) / E[seconds idle in (age, A] | age].
  /// It needs no horizon, and it counts the reading time a young session still has to
  /// sit through. O(bins).
  double index(std::uint32_t cls, double age_s) const noexcept {
    const double* h = h_[cls].data();
    const double* s = s_[cls].data();
    const double sa = at(h, s, age_s);
    if (sa <= 1e-12) return 0;
    const std::uint32_t b = bin_of(age_s);
    if (b + 1 >= bins) return 0;  // past the last edge: no cut-off left to aim for
    // Seconds idle from age to the next edge (S is smooth inside a bin: trapezoid).
    const double idle0 = (sa + s[b + 1]) / 2 * std::max(edge(b + 1) - age_s, 0.0);
    double best = 0;
    for (std::uint32_t k = b + 1; k < bins; ++k) {
      const double idle = idle0 + (cum_[cls][k] - cum_[cls][b + 1]);
      if (idle > 0) best = std::max(best, (sa - s[k]) / idle);
    }
    return best;
  }
  /// P(another turn | the session has had `turns` turns), pooled over history sizes
  /// (with hints: P(a return or a hint to compose before any hint that the user left)).
  double continuation(std::uint32_t turns) const noexcept { return 1 - group_s_[turn_class(turns)][bins]; }
  /// Mean turns per session implied by the continuation probabilities (turn 1 and on).
  double mean_turns() const noexcept {
    const double q0 = continuation(1), q1 = continuation(2), q2 = continuation(3),
                 q3 = std::min(continuation(5), 0.999);
    return 1 + q0 + q0 * q1 + q0 * q1 * q2 + q0 * q1 * q2 * q2 / (1 - q3);
  }
  /// Quantile p of the think time of sessions that return (pooled, no hint), in seconds.
  double think_quantile(double p) const noexcept {
    const auto& s0 = pooled_s_[0];
    const double q = 1 - s0[bins];
    if (q <= 0) return 0;
    const double target = 1 - p * q;  // S(a) at the quantile
    for (std::uint32_t j = 0; j + 1 < bins; ++j) {
      if (s0[j + 1] <= target) {
        // S falls geometrically inside the bin: invert that.
        const double lo = s0[j], hi = s0[j + 1];
        const double frac = lo > hi && hi > 0 ? std::log(lo / target) / std::log(lo / hi) : 1;
        return edge(j) + std::clamp(frac, 0.0, 1.0) * (edge(j + 1) - edge(j));
      }
    }
    return edge(bins - 1);
  }
  /// Mean think time of sessions that return (pooled, no hint; the last bin counts at its
  /// middle).
  double think_mean() const noexcept {
    const auto& s0 = pooled_s_[0];
    const double q = 1 - s0[bins];
    if (q <= 0) return 0;
    double m = 0;
    for (std::uint32_t j = 0; j < bins; ++j) m += (s0[j] - s0[j + 1]) * middle(j);
    return m / q;
  }

 private:
  struct row {
    std::array<double, bins> ret{}, cens{};
    double ended = 0;
    void add(const row& o) noexcept {
      for (std::uint32_t j = 0; j < bins; ++j) {
        ret[j] += o.ret[j];
        cens[j] += o.cens[j];
      }
      ended += o.ended;
    }
  };

  /// Life-table hazards: at risk at the start of bin j = every period that reached it;
  /// censorings inside the bin count half. Shrunk toward `prior` with weight `w`.
  static void fit(const row& x, const double* prior, double w, double* h) noexcept {
    double at_risk = x.ended;
    for (std::uint32_t j = 0; j < bins; ++j) at_risk += x.ret[j] + x.cens[j];
    for (std::uint32_t j = 0; j < bins; ++j) {
      const double exposed = std::max(0.0, at_risk - x.cens[j] / 2);
      h[j] = std::clamp((x.ret[j] + w * prior[j]) / (exposed + w), 0.0, 1.0);
      at_risk -= x.ret[j] + x.cens[j];
    }
  }
  static void survival(const double* h, double* s) noexcept {
    s[0] = 1;
    for (std::uint32_t j = 0; j < bins; ++j) s[j + 1] = s[j] * (1 - h[j]);
  }
  /// S(a): geometric inside a bin (a constant hazard rate); the last bin spans one more
  /// ratio step, then stays flat.
  static double at(const double* h, const double* s, double a) noexcept {
    const std::uint32_t j = bin_of(a);
    const double lo = edge(j), hi = j + 1 < bins ? edge(j + 1) : edge(j) * bin_ratio;
    const double frac = std::clamp((a - lo) / (hi - lo), 0.0, 1.0);
    return s[j] * std::pow(1 - std::min(h[j], 1 - 1e-12), frac);
  }
  /// The prior: 80% of turns are followed by another, after a lognormal think time
  /// (median 60 s, sigma 1.5): hazard per bin = returns in the bin / still waiting.
  void prior_hazards() noexcept {
    constexpr double q = 0.8, median = 60, sigma = 1.5;
    auto cdf = [&](double a) {
      if (!(a > 0)) return 0.0;
      if (a == HUGE_VAL) return 1.0;
      return 0.5 * std::erfc(-std::log(a / median) / (sigma * std::sqrt(2.0)));
    };
    for (std::uint32_t j = 0; j < bins; ++j) {
      const double s_lo = 1 - q * cdf(edge(j)), s_hi = 1 - q * cdf(edge(j + 1));
      prior_h_[j] = s_lo > 0 ? (s_lo - s_hi) / s_lo : 0;
    }
  }

  double half_life_, prior_weight_, class_weight_;
  std::uint64_t pending_ = 0, returns_ = 0, periods_ = 0;
  double ret_[classes][bins] = {}, cens_[classes][bins] = {}, ended_[classes] = {};
  row class_rows_[classes]{};
  std::array<double, bins> prior_h_{}, pooled_h_[phases]{};
  std::array<double, bins + 1> pooled_s_[phases]{};
  std::array<double, bins> group_h_[groups]{};
  std::array<double, bins + 1> group_s_[groups]{};
  std::array<double, bins> h_[classes]{};
  std::array<double, bins + 1> s_[classes]{};
  std::array<double, bins> cum_[classes]{};
};

}  // namespace attnstore::policy
