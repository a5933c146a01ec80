// fluid_bound: how much history any eviction policy could keep on a trace if it knew
// each session's class and the true distribution of return times, but not when this
// user will return. The referee for the predictive policy (issue 6): its gap to OPT is
// either a weakness of the policy or information no store has; this says which.
//
// Fluid model, per save (a turn end): the session's history (tokens, clipped to the
// context) and the gap until its next turn (the trace's think time; none after the last
// turn). Holding a save for t seconds costs tokens x t token-seconds; it is a hit when
// its user returns within t. Capacity: ratio x the working set, the time average of the
// history of sessions between turns (as the simulator measures it), as token-seconds
// over the trace. Three policies:
//   hold_all   every save is held for the same time A, chosen to fill the capacity: what
//              LRU does in this model (every session stays as long as the others).
//   class_age  the best policy that sees only each save's class and its age: an upper
//              bound by Lagrangian relaxation, for four classings (what a policy knows):
//                age      nothing but the age (one class);
//                store    what a store sees, policy::return_model's classes: turns so
//                         far, history size, tokens the last turn added;
//                store_reply  the same with the reply's tokens for the tokens added
//                         (what the store sees when the engine tells each turn's prompt:
//                         lookup and load do);
//                reply    the store's classes x the reply length (8 quantiles): both. With a price per
//                         token-second, the
//              best causal rule for a save of known class is to hold it up to some age A
//              and then drop it (a dropped session does not come back), and for each
//              class the best A is at one of its saves' return times: evaluated exactly
//              at every one. The dual, minimized over the price, bounds every policy
//              that decides by class and age, also those that keep or drop parts of
//              sessions, and the capacity is met only on average (a relaxation): a real
//              cache does no better.
//   opt        the saves that return soonest, until the capacity is full (knows every
//              return time: the fluid form of OPT).
// Not modelled: the engine's timing (service time between a turn's arrival and its
// save), tiers and their bandwidth, hints. The three are comparable with each other, not
// with the simulator's figures.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attnstore/policy/return_model.hpp"
#include "trace.hpp"

namespace attnstore::sim {

/// What a policy knows of a save besides its age (see above).
enum class knowledge : std::uint8_t { age = 0, store = 1, store_reply = 2, reply = 3 };
inline constexpr std::uint32_t knowledge_count = 4;

struct fluid_result {
  double hold_all = 0;                     ///< hit rate (share of returning history kept), one hold time for all
  double class_age[knowledge_count] = {};  ///< upper bounds for policies that know class and age
  double opt = 0;                          ///< knows every return time
  double hold_s = 0;                       ///< hold_all's hold time in seconds
  /// A bound's share of the gap from hold_all to opt (0 when there is no gap).
  double gap_closed(knowledge k) const noexcept {
    return opt > hold_all ? (class_age[std::size_t(k)] - hold_all) / (opt - hold_all) : 0;
  }
};

class fluid_bound {
 public:
  static constexpr std::uint32_t reply_buckets = 8;  ///< reply length quantiles (the class's reading time)

  fluid_bound(const trace::workload& w, std::uint32_t context_tokens) {
    // Reply-length buckets: quantiles over all turns.
    std::vector<std::uint32_t> replies;
    replies.reserve(w.requests.size());
    for (const auto& r : w.requests) replies.push_back(r.output_tokens);
    std::sort(replies.begin(), replies.end());
    for (std::uint32_t b = 0; b + 1 < reply_buckets; ++b)
      reply_edge_[b] = replies.empty() ? 0 : replies[replies.size() * (b + 1) / reply_buckets];
    by_class_[0].resize(1);
    by_class_[1].resize(policy::return_model::classes);
    by_class_[2].resize(policy::return_model::classes);
    by_class_[3].resize(policy::return_model::classes * reply_buckets);
    for (std::uint32_t s = 0; s < w.sessions(); ++s) {
      auto turns = w.session(s);
      double history = 0;
      for (std::size_t k = 0; k < turns.size(); ++k) {
        history = std::min<double>(history + turns[k].input_tokens + turns[k].output_tokens, context_tokens);
        const bool returns = k + 1 < turns.size();
        const double gap = returns ? turns[k + 1].think : inf;
        const std::uint32_t cls = policy::return_model::class_of(std::uint32_t(k + 1), std::uint64_t(history),
                                                                 turns[k].input_tokens + turns[k].output_tokens);
        by_class_[0][0].push_back({history, gap});
        by_class_[1][cls].push_back({history, gap});
        by_class_[2]
                 [policy::return_model::class_of(std::uint32_t(k + 1), std::uint64_t(history), turns[k].output_tokens)]
                     .push_back({history, gap});
        by_class_[3][cls * reply_buckets + reply_bucket(turns[k].output_tokens)].push_back({history, gap});
        if (returns) {
          returning_tokens_ += history;
          working_set_ += history * gap;
        }
      }
    }
    for (auto& level : by_class_)
      for (auto& v : level) std::sort(v.begin(), v.end(), [](const save& a, const save& b) { return a.gap < b.gap; });
  }

  /// The time integral of the history held between turns (token-seconds): capacity 1x.
  double working_set() const noexcept { return working_set_; }

  fluid_result at(double ratio) const {
    fluid_result r;
    if (returning_tokens_ <= 0) return r;
    const double cap = ratio * working_set_;
    r.opt = opt(cap) / returning_tokens_;
    r.hold_all = hold_all(cap, r.hold_s) / returning_tokens_;
    for (std::uint32_t k = 0; k < knowledge_count; ++k)
      r.class_age[k] = class_age(by_class_[k], cap) / returning_tokens_;
    return r;
  }

 private:
  static constexpr double inf = std::numeric_limits<double>::infinity();
  struct save {
    double tokens, gap;  // gap: inf when the session does not return
  };

  using classes = std::vector<std::vector<save>>;  // per class, sorted by gap

  std::uint32_t reply_bucket(std::uint32_t reply) const noexcept {
    std::uint32_t b = 0;
    while (b + 1 < reply_buckets && reply >= reply_edge_[b]) ++b;
    return b;
  }

  /// Saves returning soonest first, the last one in part, until `cap` is spent.
  double opt(double cap) const {
    const std::vector<save>& all = by_class_[0][0];  // sorted by gap, those that never return last
    double hits = 0;
    for (const save& x : all) {
      if (x.gap == inf) break;
      const double cost = x.tokens * x.gap;
      if (cost <= cap) {
        cap -= cost;
        hits += x.tokens;
      } else {
        hits += x.tokens * (x.gap > 0 ? cap / cost : 1);
        break;
      }
    }
    return hits;
  }

  /// Token-seconds and hits when every save is held up to `a` seconds.
  std::array<double, 2> hold(double a) const {
    double cost = 0, hits = 0;
    for (const save& x : by_class_[0][0]) {
      cost += x.tokens * std::min(x.gap, a);
      if (x.gap <= a) hits += x.tokens;
    }
    return {cost, hits};
  }
  double hold_all(double cap, double& hold_s) const {
    double lo = 0, hi = 1e7;
    if (const auto all = hold(hi); all[0] <= cap) {
      hold_s = hi;
      return all[1];
    }
    for (int i = 0; i < 100; ++i) {
      const double mid = (lo + hi) / 2;
      (hold(mid)[0] <= cap ? lo : hi) = mid;
    }
    hold_s = lo;
    return hold(lo)[1];
  }

  /// For price `lambda` per token-second: each class's best hold time (at one of its
  /// returns, or 0). Returns {token-seconds, hits} of that choice.
  static std::array<double, 2> best_response(const classes& by_class, double lambda) {
    double cost = 0, hits = 0;
    for (const auto& v : by_class) {
      // Prefix sums over saves sorted by gap: holding up to v[i].gap costs the returned
      // ones their gap and the rest v[i].gap each.
      double total = 0;
      for (const save& x : v) total += x.tokens;
      double best = 0, best_cost = 0, best_hits = 0, held_cost = 0, got = 0;  // got: tokens of saves returned by then
      for (const save& x : v) {
        if (x.gap == inf) break;
        held_cost += x.tokens * x.gap;
        got += x.tokens;
        const double c = held_cost + x.gap * (total - got);
        if (got - lambda * c > best) {
          best = got - lambda * c;
          best_cost = c;
          best_hits = got;
        }
      }
      cost += best_cost;
      hits += best_hits;
    }
    return {cost, hits};
  }
  /// min over lambda >= 0 of  sum over classes of max_A (hits - lambda x cost) + lambda x cap.
  static double class_age(const classes& by_class, double cap) {
    auto best_response = [&](double lambda) { return fluid_bound::best_response(by_class, lambda); };
    auto dual = [&](double lambda) {
      const auto br = best_response(lambda);
      return br[1] - lambda * br[0] + lambda * cap;
    };
    if (const auto all = best_response(0); all[0] <= cap) return all[1];  // everything that returns fits
    // The dual is convex in lambda; its subgradient is cap - cost(lambda). Bracket, then
    // narrow geometrically (lambda spans orders of magnitude).
    double lo = 1e-12, hi = 1.0;
    while (best_response(hi)[0] > cap && hi < 1e12) hi *= 4;
    for (int i = 0; i < 200 && hi / lo > 1 + 1e-9; ++i) {
      const double mid = std::sqrt(lo * hi);
      (best_response(mid)[0] > cap ? lo : hi) = mid;
    }
    return std::min(dual(lo), dual(hi));
  }

  std::array<std::uint32_t, reply_buckets - 1> reply_edge_{};
  classes by_class_[knowledge_count];
  double returning_tokens_ = 0, working_set_ = 0;
};

}  // namespace attnstore::sim
