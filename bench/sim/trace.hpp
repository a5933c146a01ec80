// Workload traces of multi-turn conversations: a generator with presets that match the
// ShareGPT statistics the CachedAttention paper reports, and an importer for JSON-lines
// conversation logs. The trace simulator (bench/sim) replays them; docs/traces.md
// describes both.
//
// A trace is a list of sessions, each a list of turns: tokens of the new prompt, tokens
// of the reply, when the prompt was sent. Replay modes:
//   closed loop  turn k+1 is sent `think` seconds after turn k's reply is complete (the
//                generator's default: a user reads the reply, then answers).
//   open loop    turn k+1 is sent at its `arrival` timestamp, but never before turn k's
//                reply is complete (imported logs).
// Cold path code: it allocates and may throw (std::invalid_argument for bad options).
#pragma once

#include <cstdint>
#include <istream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnstore/status.hpp"

namespace attnstore::trace {

/// request::prefix of a session without a shared system prompt.
inline constexpr std::uint32_t no_prefix = ~0u;

/// One turn of one session.
struct request {
  std::uint32_t session = 0;        ///< dense session number (0..sessions-1)
  std::uint32_t turn = 0;           ///< 0-based turn number within the session
  std::uint32_t input_tokens = 0;   ///< new prompt tokens of this turn (history excluded)
  std::uint32_t output_tokens = 0;  ///< reply tokens
  double arrival = 0;               ///< seconds from the trace start when the prompt is sent
  double think = 0;                 ///< seconds from the previous reply's end (0 for turn 0)
  /// The part of `think` the user spent typing this prompt (the rest: reading the last
  /// reply); 0: not known (presets without a reading model, imported logs). The
  /// simulator's typing indicator (a composing hint) fires when typing starts.
  double typing = 0;
  /// Last turn of a session only: seconds after its reply when the user left (the
  /// simulator's "left" hint); 0: not known (as for typing), or not the last turn.
  double leave = 0;
  /// The shared system prompt the session starts with (every turn of the session carries
  /// the same two values): an id that the sessions using the same prompt share, 0 ..
  /// workload::prefixes - 1, or no_prefix; and its length in tokens, which are the first
  /// prefix_tokens of turn 0's input_tokens (turn 0's prompt is the system prompt
  /// followed by the user's first message). The simulator stores a prompt's blocks once
  /// for all the sessions that hold it (docs/sim.md, "Shared prefixes").
  std::uint32_t prefix = no_prefix;
  std::uint32_t prefix_tokens = 0;
};

/// Sessions, each a contiguous run of requests in turn order; sessions are ordered by
/// the arrival of their first turn.
struct workload {
  std::string name;
  std::vector<request> requests;
  std::vector<std::uint32_t> first;  ///< session s is requests[first[s], first[s+1])
  bool open_loop = false;            ///< replay by `arrival` (imported logs) or by `think`
  std::uint32_t prefixes = 0;        ///< distinct system prompts (request::prefix ids)

  std::uint32_t sessions() const noexcept { return first.empty() ? 0 : std::uint32_t(first.size() - 1); }
  std::span<const request> session(std::uint32_t s) const noexcept {
    return {requests.data() + first[s], requests.data() + first[s + 1]};
  }
};

/// A log-normal distribution given by its median and shape, clipped to [min, max].
/// Mean = median * exp(sigma^2 / 2) before clipping.
struct lognormal {
  double median = 1;
  double sigma = 0;
  double min = 0;
  double max = 1e300;
};

struct generator_options {
  std::string name = "custom";
  std::uint64_t seed = 1;
  /// Trace length: sessions are generated until this many requests exist (the last
  /// session is cut), or until `sessions` sessions when requests is 0.
  std::uint64_t requests = 0;
  std::uint32_t sessions = 0;
  double session_rate = 1.0;  ///< new sessions per second (Poisson)
  /// Turns per session: single-turn with this probability, else 2 + a geometric number
  /// chosen so that the mean over all sessions is mean_turns; at most max_turns.
  double single_turn_fraction = 0.27;
  double mean_turns = 5.75;
  std::uint32_t max_turns = 64;
  lognormal first_input{};  ///< prompt tokens of turn 0 (system prompt + question)
  lognormal input{};        ///< prompt tokens of later turns
  lognormal output{};       ///< reply tokens
  lognormal think{};        ///< seconds between a reply and the next prompt (typing, when reading is on)
  /// Reading time, added to `think`: the previous reply's tokens x this many seconds per
  /// token, drawn per turn. Off when its median is 0 (the default).
  lognormal read_per_token{0, 0, 0, 0};
  /// Abandonment while idle: before each later turn the user has a patience (seconds,
  /// drawn per turn); when the think time would exceed it the user leaves instead and the
  /// session ends there. Off when its median is 0 (the default).
  lognormal patience{0, 0, 0, 0};
  /// Load over a simulated day: new sessions arrive at session_rate x (1 + diurnal_amplitude
  /// x sin(2 pi t / day_seconds - pi / 2)) per second (lowest at t = 0, highest at half a
  /// day). 0 (the default): constant rate. In [0, 1).
  double diurnal_amplitude = 0;
  double day_seconds = 86400;
  /// Open-loop timestamps: arrival of turn k+1 = arrival of turn k + output tokens of
  /// turn k * this + think. Used only for open-loop replay.
  double nominal_seconds_per_output_token = 0.03;
  /// Shared system prompts. `apps` applications (0, the default: none), each with a
  /// number of prompts drawn uniformly from [prompts_per_app_min, prompts_per_app_max],
  /// each prompt `system_prompt` tokens long (drawn once per prompt). A session belongs
  /// to app k (0-based) with probability proportional to 1 / (k + 1)^app_skew (Zipf: a
  /// few popular apps, a long tail) and uses one of its app's prompts, chosen uniformly;
  /// its first prompt is that system prompt followed by the user's message (first_input
  /// tokens). These draws use their own generator, so the conversations (turns, tokens,
  /// times) are those of the same options without apps.
  std::uint32_t apps = 0;
  std::uint32_t prompts_per_app_min = 2, prompts_per_app_max = 4;
  lognormal system_prompt{1800, 0.4, 1000, 4000};
  double app_skew = 1.0;
};

/// Preset names: "paper" (ShareGPT-like, the paper's setup), "light" (the same
/// conversations at half the arrival rate), "heavy" (1.1x the rate: the simulated engine
/// saturates and its queue grows), "long" (fewer, longer turns: pasted documents),
/// "think" (the paper's conversations with a user who reads each reply and types the next
/// prompt: reading time grows with the reply, log-normal typing time with a heavy tail,
/// and users who leave when a turn would take longer than their patience), "diurnal"
/// (think's conversations, arrival rate following a 24-hour day), "shared-prompt" (20
/// applications with 2-4 system prompts of 1K-4K tokens each; every session starts with
/// one of its app's prompts, then converses as in "paper").
std::span<const std::string_view> preset_names() noexcept;
/// Options of a preset. Throws std::invalid_argument naming the allowed presets.
generator_options preset(std::string_view name);
/// Generates a trace. Deterministic for given options (own PRNG and samplers, the same
/// on every platform). Throws std::invalid_argument naming a bad field.
workload generate(const generator_options& options);

/// Reads a JSON-lines conversation log: one object per line with
///   "session"        string, or integer within +-2^53 (required)
///   "turn"           integer 0..2^53 (optional; a session's turns are ordered by it when
///                    every line of the session has one, else by timestamp)
///   "input_tokens"   integer 0..4e9 (required): new prompt tokens of the turn
///   "output_tokens"  integer 0..4e9 (required): reply tokens
///   "timestamp"      number, seconds within +-1e15 (required): when the prompt was sent
///   "prefix"         string, or integer within +-2^53 (optional): the shared system
///                    prompt the session starts with; sessions with equal values share it
///   "prefix_tokens"  integer 0..4e9 (with "prefix"): its length, part of the first turn's
///                    input_tokens (at most those)
/// Other keys (any JSON value nested up to 64 deep) are ignored; blank lines and lines
/// starting with '#' are skipped. The result replays open loop; think = gap between
/// consecutive prompts of a session. Memory is linear in the input.
/// Returns invalid_argument on a malformed line, with "line N: what" in *error.
result<workload> read_jsonl(std::istream& in, std::string* error = nullptr);
/// Writes a trace in the same format (session as an integer, turn, tokens, timestamp, and
/// prefix and prefix_tokens for sessions with a system prompt).
void write_jsonl(const workload& w, std::ostream& out);

/// Summary statistics (the checks against PAPER.md). Session tokens = sum of input and
/// output tokens over its turns, before any truncation.
struct workload_stats {
  std::uint64_t sessions = 0, requests = 0;
  double mean_turns = 0, multi_turn_fraction = 0;
  double mean_input = 0, mean_output = 0, mean_think = 0;
  double mean_session_tokens = 0;
  double sessions_over_2k = 0, sessions_over_4k = 0;  ///< fractions of sessions
  double duration = 0;                                ///< seconds to the last session's arrival
  std::uint64_t prefixes = 0;                         ///< distinct system prompts the sessions use
  double sessions_with_prefix = 0;                    ///< fraction of sessions with a system prompt
  double mean_prefix_tokens = 0;                      ///< over those sessions
  /// System-prompt tokens of the sessions that use a prompt some earlier session used /
  /// all their system-prompt tokens: what sharing could save at most.
  double repeated_prefix_fraction = 0;
};
workload_stats describe(const workload& w);

}  // namespace attnstore::trace

#include "trace.inl"
