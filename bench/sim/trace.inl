// Trace generator, presets, JSON-lines importer and statistics.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <ostream>
#include <stdexcept>
#include <unordered_map>

namespace attnstore::trace {

namespace detail {

/// xoshiro256** seeded by splitmix64: fast, and the same stream on every platform
/// (std:: distributions are not specified bit for bit).
class rng {
 public:
  explicit rng(std::uint64_t seed) {
    for (auto& w : s_) {
      seed += 0x9e3779b97f4a7c15ull;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      w = z ^ (z >> 31);
    }
  }
  std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  /// Uniform in (0, 1).
  double uniform() noexcept { return (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  double normal() noexcept {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    const double u = uniform(), v = uniform();
    const double r = std::sqrt(-2.0 * std::log(u));
    spare_ = r * std::sin(6.283185307179586 * v);
    have_spare_ = true;
    return r * std::cos(6.283185307179586 * v);
  }
  double exponential(double mean) noexcept { return -mean * std::log(uniform()); }
  double sample(const lognormal& d) noexcept {
    const double x = d.median * std::exp(d.sigma * normal());
    return std::clamp(x, d.min, d.max);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  std::array<std::uint64_t, 4> s_{};
  double spare_ = 0;
  bool have_spare_ = false;
};

inline void check_lognormal(const lognormal& d, const char* field) {
  if (!(d.median > 0) || !(d.sigma >= 0) || !(d.min <= d.max))
    throw std::invalid_argument(std::string("generator_options: ") + field +
                                " needs median > 0, sigma >= 0, min <= max");
}

}  // namespace detail

inline std::span<const std::string_view> preset_names() noexcept {
  static constexpr std::string_view names[] = {"paper", "light", "heavy", "long", "think", "diurnal", "shared-prompt"};
  return names;
}

inline generator_options preset(std::string_view name) {
  generator_options o;
  o.name = std::string(name);
  // ShareGPT-like conversations (PAPER.md: 73% multi-turn, mean 5.75 turns, ~30% of
  // conversations beyond 4K tokens, most beyond 2K). Per turn: a short follow-up prompt
  // with a heavy tail (pasted text), a reply of a few hundred tokens.
  o.session_rate = 1.0;
  o.single_turn_fraction = 0.27;
  o.mean_turns = 5.75;
  o.max_turns = 64;
  o.first_input = {200, 1.0, 4, 3000};
  o.input = {100, 1.2, 1, 2000};
  o.output = {250, 0.7, 8, 1500};
  // Think time is not published; ours: median 1 min, mean ~3 min, up to 2 h (log-normal).
  o.think = {60, 1.5, 2, 7200};
  if (name == "paper") return o;
  if (name == "shared-prompt") {
    // Applications that put a system prompt (instructions, persona, tool schemas, few-shot
    // examples) in front of every conversation: 20 apps, each with 2-4 prompts (versions,
    // languages, tiers), 1K-4K tokens each (median 1,800), app popularity Zipf(1). After
    // the prompt, the user converses as in "paper" (first_input is the user's first
    // message). The histories are ~1,800 tokens longer than paper's, so the arrival rate
    // is lower (0.6 sessions/s, as think's) to keep the simulated engine stable.
    o.apps = 20;
    o.prompts_per_app_min = 2;
    o.prompts_per_app_max = 4;
    o.system_prompt = {1800, 0.4, 1000, 4000};
    o.app_skew = 1.0;
    o.session_rate = 0.6;
    return o;
  }
  if (name == "light") {
    o.session_rate = 0.5;
    return o;
  }
  if (name == "heavy") {  // the engine saturates: queues form, prefetching matters
    o.session_rate = 1.1;
    return o;
  }
  if (name == "long") {
    // Document Q&A: fewer turns, a long first prompt, short follow-ups.
    o.single_turn_fraction = 0.2;
    o.mean_turns = 4.0;
    o.first_input = {1500, 0.6, 200, 3000};
    o.input = {40, 1.0, 1, 1000};
    o.output = {250, 0.6, 8, 1200};
    o.session_rate = 0.8;
    return o;
  }
  if (name == "think" || name == "diurnal") {
    // A user who reads the reply, then types: reading ~0.08 s per reply token (a 250-token
    // reply: 20 s; skimming to careful reading), typing median 10 s with a heavy tail
    // (minutes for a long question or a break). Median think ~35 s, mean ~60 s; 1 in 20
    // turns take over 3 minutes. A user whose turn would take longer than their patience
    // (median 10 min) leaves: the conversation ends there (abandoned while idle), on top
    // of the paper's turn count (abandoned after a turn). 0.6 sessions/s keeps the
    // simulated engine stable even when it recomputes every history, so what separates
    // the policies is who returns when, not queueing.
    o.session_rate = 0.6;
    o.think = {10, 1.2, 1, 3600};
    o.read_per_token = {0.08, 0.6, 0.01, 1.0};
    o.patience = {600, 1.0, 30, 1e9};
    if (name == "diurnal") {  // the same users over a day: 0.15 to 1.05 sessions/s
      o.diurnal_amplitude = 0.75;
      o.day_seconds = 86400;
    }
    return o;
  }
  std::string all;
  for (auto n : preset_names()) all += (all.empty() ? "" : ", ") + std::string(n);
  throw std::invalid_argument("trace preset '" + std::string(name) + "' is unknown; presets: " + all);
}

inline workload generate(const generator_options& o) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("generator_options: " + m); };
  if (o.requests == 0 && o.sessions == 0) fail("requests and sessions are both 0; set one");
  if (!(o.session_rate > 0)) fail("session_rate must be > 0");
  if (!(o.single_turn_fraction >= 0 && o.single_turn_fraction < 1)) fail("single_turn_fraction must be in [0, 1)");
  if (o.max_turns < 2) fail("max_turns must be at least 2");
  const double multi_mean = (o.mean_turns - o.single_turn_fraction) / (1 - o.single_turn_fraction);
  if (!(multi_mean >= 2)) fail("mean_turns too small for single_turn_fraction (multi-turn sessions need >= 2 turns)");
  detail::check_lognormal(o.first_input, "first_input");
  detail::check_lognormal(o.input, "input");
  detail::check_lognormal(o.output, "output");
  detail::check_lognormal(o.think, "think");
  if (o.read_per_token.median != 0) detail::check_lognormal(o.read_per_token, "read_per_token");
  if (o.patience.median != 0) detail::check_lognormal(o.patience, "patience");
  if (!(o.diurnal_amplitude >= 0 && o.diurnal_amplitude < 1)) fail("diurnal_amplitude must be in [0, 1)");
  if (o.diurnal_amplitude > 0 && !(o.day_seconds > 0)) fail("day_seconds must be > 0");
  if (o.apps > 0) {
    if (o.apps > 1000000) fail("apps must be at most 1000000");
    if (o.prompts_per_app_min < 1 || o.prompts_per_app_min > o.prompts_per_app_max || o.prompts_per_app_max > 1000)
      fail("prompts_per_app needs 1 <= min <= max <= 1000");
    detail::check_lognormal(o.system_prompt, "system_prompt");
    if (!(o.system_prompt.max + o.first_input.max < 4e9))
      fail("system_prompt.max + first_input.max must be below 4e9 tokens");
    if (!(o.app_skew >= 0 && o.app_skew <= 10)) fail("app_skew must be in [0, 10]");
  }
  // Extra turns beyond 2 are geometric on {0, 1, ...} with mean multi_mean - 2.
  const double extra_mean = multi_mean - 2;
  const double p_stop = 1.0 / (extra_mean + 1.0);

  workload w;
  w.name = o.name;
  w.open_loop = false;
  detail::rng g(o.seed);
  // When users leave (trace::request::leave) is drawn apart, so that the other draws,
  // and every trace made before it existed, stay the same.
  detail::rng leave_g(o.seed ^ 0x6c656176655f6174ull);
  const std::uint64_t limit = o.requests ? o.requests : ~0ull;
  if (o.requests) w.requests.reserve(o.requests);
  // System prompts (apps > 0) are drawn apart too: the conversations stay those of the
  // same options without apps. App a's prompts are ids [prompt_first[a], prompt_first[a+1]).
  detail::rng prompt_g(o.seed ^ 0x73797374656d5f70ull);
  std::vector<std::uint32_t> prompt_first, prompt_tokens;
  std::vector<double> app_cdf;
  if (o.apps > 0) {
    double sum = 0;
    for (std::uint32_t a = 0; a < o.apps; ++a) {
      prompt_first.push_back(std::uint32_t(prompt_tokens.size()));
      const std::uint32_t span = o.prompts_per_app_max - o.prompts_per_app_min + 1;
      const std::uint32_t n =
          o.prompts_per_app_min + std::min(span - 1, std::uint32_t(prompt_g.uniform() * double(span)));
      for (std::uint32_t k = 0; k < n; ++k)
        prompt_tokens.push_back(std::uint32_t(std::lround(prompt_g.sample(o.system_prompt))));
      sum += 1.0 / std::pow(double(a + 1), o.app_skew);
      app_cdf.push_back(sum);
    }
    prompt_first.push_back(std::uint32_t(prompt_tokens.size()));
    for (double& c : app_cdf) c /= sum;
    w.prefixes = std::uint32_t(prompt_tokens.size());
  }
  double t = 0;
  for (std::uint32_t s = 0; o.sessions == 0 || s < o.sessions; ++s) {
    if (w.requests.size() >= limit) break;
    if (o.diurnal_amplitude > 0) {
      // Thinning: candidates at the peak rate, each kept with rate(t) / peak.
      const double peak = o.session_rate * (1 + o.diurnal_amplitude);
      for (;;) {
        t += g.exponential(1.0 / peak);
        const double phase = 6.283185307179586 * t / o.day_seconds - 1.5707963267948966;
        if (g.uniform() * peak <= o.session_rate * (1 + o.diurnal_amplitude * std::sin(phase))) break;
      }
    } else {
      t += g.exponential(1.0 / o.session_rate);
    }
    std::uint32_t turns = 1;
    if (g.uniform() >= o.single_turn_fraction) {
      turns = 2;
      while (turns < o.max_turns && g.uniform() >= p_stop) ++turns;
    }
    w.first.push_back(std::uint32_t(w.requests.size()));
    std::uint32_t prefix = no_prefix, prefix_tokens = 0;
    if (o.apps > 0) {
      const double u = prompt_g.uniform();
      const std::uint32_t a = std::min<std::uint32_t>(
          o.apps - 1, std::uint32_t(std::lower_bound(app_cdf.begin(), app_cdf.end(), u) - app_cdf.begin()));
      const std::uint32_t n = prompt_first[a + 1] - prompt_first[a];
      prefix = prompt_first[a] + std::min(n - 1, std::uint32_t(prompt_g.uniform() * double(n)));
      prefix_tokens = prompt_tokens[prefix];
    }
    double arrival = t;
    for (std::uint32_t k = 0; k < turns && w.requests.size() < limit; ++k) {
      request r;
      r.session = s;
      r.turn = k;
      r.input_tokens = std::uint32_t(std::lround(g.sample(k == 0 ? o.first_input : o.input)));
      r.prefix = prefix;
      r.prefix_tokens = prefix_tokens;
      if (k == 0) r.input_tokens += prefix_tokens;
      r.output_tokens = std::uint32_t(std::lround(g.sample(o.output)));
      if (k > 0) {
        r.think = g.sample(o.think);
        const std::uint32_t prev_output = w.requests.back().output_tokens;
        if (o.read_per_token.median != 0) {  // typing, after reading the reply
          r.typing = r.think;
          r.think += prev_output * g.sample(o.read_per_token);
        }
        if (o.patience.median != 0) {
          const double patience = g.sample(o.patience);
          if (r.think > patience) {  // the user left, out of patience
            w.requests.back().leave = patience;
            break;
          }
        }
        arrival += prev_output * o.nominal_seconds_per_output_token + r.think;
      }
      r.arrival = arrival;
      w.requests.push_back(r);
      if (k + 1 == turns && o.read_per_token.median != 0) {
        // The conversation is over: the user reads the last reply, then leaves.
        request& last = w.requests.back();
        last.leave = 1 + last.output_tokens * leave_g.sample(o.read_per_token);
      }
    }
  }
  w.first.push_back(std::uint32_t(w.requests.size()));
  return w;
}

// ---- JSON lines

namespace detail {

struct json_cursor {
  std::string_view s;
  std::size_t i = 0;
  void ws() noexcept {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) ++i;
  }
  bool eat(char c) noexcept {
    ws();
    if (i < s.size() && s[i] == c) {
      ++i;
      return true;
    }
    return false;
  }
  bool string(std::string& out) {
    ws();
    if (i >= s.size() || s[i] != '"') return false;
    ++i;
    out.clear();
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') {
        if (++i >= s.size()) return false;
        switch (s[i]) {
          case 'n':
            out += '\n';
            break;
          case 't':
            out += '\t';
            break;
          case 'r':
            out += '\r';
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'u':  // keep the escape as text: ids only need to be distinct
            out += "\\u";
            break;
          default:
            out += s[i];
        }
        ++i;
        continue;
      }
      out += s[i++];
    }
    if (i >= s.size()) return false;
    ++i;
    return true;
  }
  /// A finite number. from_chars: no copy, and the same in every locale (strtod reads
  /// "1,5" in a German one); out of double's range is not a number.
  bool number(double& out) {
    ws();
    const char* b = s.data() + i;
    const auto [e, ec] = std::from_chars(b, s.data() + s.size(), out);
    if (ec != std::errc() || e == b) return false;
    i += std::size_t(e - b);
    return std::isfinite(out);
  }
  /// A number that is an integer in [lo, hi].
  bool integer(double& out, double lo, double hi) {
    return number(out) && out == std::floor(out) && out >= lo && out <= hi;
  }
  /// Arrays and objects nested deeper than this in an ignored value are refused: skip()
  /// recurses, and a line of '[' would otherwise overflow the stack.
  static constexpr int max_depth = 64;
  /// Skips any JSON value (for ignored keys).
  bool skip(int depth = 0) {
    ws();
    if (i >= s.size()) return false;
    const char c = s[i];
    if (c == '"') {
      std::string tmp;
      return string(tmp);
    }
    if (c == '{' || c == '[') {
      if (depth >= max_depth) return false;
      const char close = c == '{' ? '}' : ']';
      ++i;
      if (eat(close)) return true;
      for (;;) {
        if (c == '{') {
          std::string k;
          if (!string(k) || !eat(':')) return false;
        }
        if (!skip(depth + 1)) return false;
        if (eat(close)) return true;
        if (!eat(',')) return false;
      }
    }
    for (std::string_view lit : {"true", "false", "null"}) {
      if (s.substr(i, lit.size()) == lit) {
        i += lit.size();
        return true;
      }
    }
    double d;
    return number(d);
  }
};

}  // namespace detail

inline result<workload> read_jsonl(std::istream& in, std::string* error) {
  struct row {
    std::string session;
    std::string prefix;  // empty: none
    double turn = -1;
    double input = -1, output = -1, ts = 0, prefix_tokens = -1;
    bool has_ts = false;
    std::uint64_t line = 0;
  };
  // Bounds that keep every value exact and every difference finite: 2^53, and
  // timestamps within +-1e15 s (30 million years: any epoch, even milliseconds given as
  // seconds), whose differences write_jsonl's "%.3f" prints in full.
  constexpr double max_exact = 9007199254740992.0;
  constexpr double max_timestamp = 1e15;
  auto bad = [&](std::uint64_t line, const std::string& what) -> result<workload> {
    if (error) *error = "line " + std::to_string(line) + ": " + what;
    return errc::invalid_argument;
  };
  std::vector<row> rows;
  std::string text, key, sval;
  std::uint64_t line_no = 0;
  while (std::getline(in, text)) {
    ++line_no;
    detail::json_cursor c{text};
    c.ws();
    if (c.i == text.size() || text[c.i] == '#') continue;
    if (!c.eat('{')) return bad(line_no, "expected a JSON object");
    row r;
    r.line = line_no;
    bool has_session = false;
    if (!c.eat('}')) {
      for (;;) {
        if (!c.string(key) || !c.eat(':')) return bad(line_no, "expected \"key\":");
        if (key == "session") {
          c.ws();
          if (c.i < text.size() && text[c.i] == '"') {
            if (!c.string(sval)) return bad(line_no, "bad string for \"session\"");
            r.session = "s:" + sval;
          } else {
            // Within +-2^53: every such integer is exact in a double and fits int64.
            double d;
            if (!c.integer(d, -max_exact, max_exact))
              return bad(line_no, "\"session\" must be a string or an integer within +-2^53");
            r.session = "n:" + std::to_string(std::int64_t(d));
          }
          has_session = true;
        } else if (key == "turn") {
          if (!c.integer(r.turn, 0, max_exact)) return bad(line_no, "\"turn\" must be an integer 0..2^53");
        } else if (key == "input_tokens") {
          if (!c.integer(r.input, 0, 4e9)) return bad(line_no, "\"input_tokens\" must be an integer 0..4e9");
        } else if (key == "output_tokens") {
          if (!c.integer(r.output, 0, 4e9)) return bad(line_no, "\"output_tokens\" must be an integer 0..4e9");
        } else if (key == "prefix") {
          c.ws();
          if (c.i < text.size() && text[c.i] == '"') {
            if (!c.string(sval)) return bad(line_no, "bad string for \"prefix\"");
            r.prefix = "s:" + sval;
          } else {
            double d;
            if (!c.integer(d, -max_exact, max_exact))
              return bad(line_no, "\"prefix\" must be a string or an integer within +-2^53");
            r.prefix = "n:" + std::to_string(std::int64_t(d));
          }
        } else if (key == "prefix_tokens") {
          if (!c.integer(r.prefix_tokens, 0, 4e9)) return bad(line_no, "\"prefix_tokens\" must be an integer 0..4e9");
        } else if (key == "timestamp") {
          if (!c.number(r.ts) || !(std::fabs(r.ts) <= max_timestamp))
            return bad(line_no, "\"timestamp\" must be a number of seconds within +-1e15");
          r.has_ts = true;
        } else if (!c.skip()) {
          return bad(line_no, "bad value for \"" + key + "\" (or nested deeper than 64)");
        }
        if (c.eat('}')) break;
        if (!c.eat(',')) return bad(line_no, "expected ',' or '}'");
      }
    }
    c.ws();
    if (c.i != text.size()) return bad(line_no, "text after the object");
    if (!has_session) return bad(line_no, "missing \"session\"");
    if (r.input < 0) return bad(line_no, "missing \"input_tokens\"");
    if (r.output < 0) return bad(line_no, "missing \"output_tokens\"");
    if (!r.has_ts) return bad(line_no, "missing \"timestamp\"");
    if (r.prefix.empty() != (r.prefix_tokens < 0)) return bad(line_no, "\"prefix\" and \"prefix_tokens\" go together");
    // Rows and sessions are numbered with 32 bits.
    if (rows.size() >= std::numeric_limits<std::uint32_t>::max() - 1) return bad(line_no, "more than 2^32-2 turns");
    rows.push_back(std::move(r));
  }
  // Group by session; order turns by turn number (when every line has one) then
  // timestamp; order sessions by their first prompt.
  std::unordered_map<std::string, std::uint32_t> ids;
  std::vector<std::vector<std::uint32_t>> by_session;
  for (std::uint32_t i = 0; i < rows.size(); ++i) {
    auto [it, fresh] = ids.try_emplace(rows[i].session, std::uint32_t(by_session.size()));
    if (fresh) by_session.emplace_back();
    by_session[it->second].push_back(i);
  }
  double t0 = 0;
  bool any = false;
  for (auto& turns : by_session) {
    // By turn number (then timestamp) when every line of the session has one, else by
    // timestamp alone. Comparing by turn only where both lines have one would not be a
    // strict weak order when some lines lack it (a cycle: turn 0 at 10 s, no turn at
    // 5 s, turn 1 at 1 s), and sorting with such a comparator is undefined behaviour.
    const bool numbered = std::all_of(turns.begin(), turns.end(), [&](std::uint32_t k) { return rows[k].turn >= 0; });
    std::stable_sort(turns.begin(), turns.end(), [&](std::uint32_t a, std::uint32_t b) {
      if (numbered && rows[a].turn != rows[b].turn) return rows[a].turn < rows[b].turn;
      return rows[a].ts < rows[b].ts;
    });
    for (std::size_t k = 1; k < turns.size(); ++k) {
      if (rows[turns[k]].ts < rows[turns[k - 1]].ts)
        return bad(rows[turns[k]].line, "timestamp goes back in time within its session");
    }
    // The system prompt is the session's: the lines that name one agree, and it fits in
    // the first turn's prompt.
    const row* named = nullptr;
    for (std::uint32_t k : turns) {
      if (rows[k].prefix.empty()) continue;
      if (named && (rows[k].prefix != named->prefix || rows[k].prefix_tokens != named->prefix_tokens))
        return bad(rows[k].line, "\"prefix\" or \"prefix_tokens\" differs within its session");
      if (!named) named = &rows[k];
    }
    if (named && named->prefix_tokens > rows[turns.front()].input)
      return bad(named->line, "\"prefix_tokens\" exceeds the first turn's input_tokens");
    const double first_ts = rows[turns.front()].ts;
    if (!any || first_ts < t0) t0 = first_ts;
    any = true;
  }
  std::vector<std::uint32_t> order(by_session.size());
  for (std::uint32_t s = 0; s < order.size(); ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
    return rows[by_session[a].front()].ts < rows[by_session[b].front()].ts;
  });
  workload w;
  w.name = "imported";
  w.open_loop = true;
  w.requests.reserve(rows.size());
  std::unordered_map<std::string, std::uint32_t> prefix_ids;  // dense, by first session
  for (std::uint32_t s = 0; s < order.size(); ++s) {
    w.first.push_back(std::uint32_t(w.requests.size()));
    const auto& turns = by_session[order[s]];
    std::uint32_t prefix = no_prefix, prefix_tokens = 0;
    for (std::uint32_t k : turns) {
      if (rows[k].prefix.empty()) continue;
      prefix = prefix_ids.try_emplace(rows[k].prefix, std::uint32_t(prefix_ids.size())).first->second;
      prefix_tokens = std::uint32_t(rows[k].prefix_tokens);
      break;
    }
    for (std::uint32_t k = 0; k < turns.size(); ++k) {
      const row& r = rows[turns[k]];
      request q;
      q.session = s;
      q.turn = k;
      q.input_tokens = std::uint32_t(r.input);
      q.output_tokens = std::uint32_t(r.output);
      q.arrival = r.ts - t0;
      q.think = k ? r.ts - rows[turns[k - 1]].ts : 0;
      q.prefix = prefix;
      q.prefix_tokens = prefix_tokens;
      w.requests.push_back(q);
    }
  }
  w.prefixes = std::uint32_t(prefix_ids.size());
  w.first.push_back(std::uint32_t(w.requests.size()));
  return w;
}

inline void write_jsonl(const workload& w, std::ostream& out) {
  char buf[256];
  for (const request& r : w.requests) {
    if (r.prefix == no_prefix)
      std::snprintf(
          buf, sizeof buf,
          "{\"session\": %u, \"turn\": %u, \"input_tokens\": %u, \"output_tokens\": %u, \"timestamp\": %.3f}\n",
          r.session, r.turn, r.input_tokens, r.output_tokens, r.arrival);
    else
      std::snprintf(buf, sizeof buf,
                    "{\"session\": %u, \"turn\": %u, \"input_tokens\": %u, \"output_tokens\": %u, \"timestamp\": %.3f, "
                    "\"prefix\": %u, \"prefix_tokens\": %u}\n",
                    r.session, r.turn, r.input_tokens, r.output_tokens, r.arrival, r.prefix, r.prefix_tokens);
    out << buf;
  }
}

inline workload_stats describe(const workload& w) {
  workload_stats st;
  st.sessions = w.sessions();
  st.requests = w.requests.size();
  if (!st.sessions) return st;
  double in = 0, outp = 0, think = 0, think_n = 0, tokens = 0, multi = 0, over2 = 0, over4 = 0;
  double with_prefix = 0, prefix_tokens = 0, repeated = 0;
  std::vector<std::uint8_t> seen;  // by prefix id
  for (std::uint32_t s = 0; s < st.sessions; ++s) {
    auto turns = w.session(s);
    double sum = 0;
    for (const request& r : turns) {
      sum += r.input_tokens + r.output_tokens;
      in += r.input_tokens;
      outp += r.output_tokens;
      if (r.turn > 0) {
        think += r.think;
        think_n += 1;
      }
    }
    tokens += sum;
    if (!turns.empty() && turns.front().prefix != no_prefix) {
      const request& f = turns.front();
      with_prefix += 1;
      prefix_tokens += f.prefix_tokens;
      if (f.prefix >= seen.size()) seen.resize(std::size_t(f.prefix) + 1, 0);
      if (seen[f.prefix]) repeated += f.prefix_tokens;
      seen[f.prefix] = 1;
    }
    if (turns.size() > 1) multi += 1;
    if (sum > 2048) over2 += 1;
    if (sum > 4096) over4 += 1;
    st.duration = std::max(st.duration, turns.empty() ? 0.0 : turns.front().arrival);
  }
  const double n = double(st.sessions);
  st.mean_turns = double(st.requests) / n;
  st.multi_turn_fraction = multi / n;
  st.mean_input = st.requests ? in / double(st.requests) : 0;
  st.mean_output = st.requests ? outp / double(st.requests) : 0;
  st.mean_think = think_n ? think / think_n : 0;
  st.mean_session_tokens = tokens / n;
  st.sessions_over_2k = over2 / n;
  st.sessions_over_4k = over4 / n;
  st.prefixes = std::uint64_t(std::count(seen.begin(), seen.end(), std::uint8_t(1)));
  st.sessions_with_prefix = with_prefix / n;
  st.mean_prefix_tokens = with_prefix ? prefix_tokens / with_prefix : 0;
  st.repeated_prefix_fraction = prefix_tokens ? repeated / prefix_tokens : 0;
  return st;
}

}  // namespace attnstore::trace
