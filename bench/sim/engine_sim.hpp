// engine_sim: a discrete-event simulation of an inference engine serving multi-turn
// conversations over a tiered_cache (the real index, policies and prefetcher).
//
// Engine model (continuous batching, no chunked prefill):
//   - requests wait in a FIFO queue; the head is admitted when a batch slot is free and
//     its KV fits in HBM (history + prompt + reply tokens <= hbm_kv_tokens in total);
//   - an admitted request is prefilled alone; the running batch does not decode
//     meanwhile. Prefill time = max(compute, load): compute for the tokens not found in
//     the cache, load of the cached ones (DRAM over PCIe; SSD through the SSD read
//     channel, then PCIe), overlapped layer by layer (the paper's pre-loading);
//   - then every running request gains one token per decode step; a step takes
//     decode_step_s + decode_s_per_ctx_token * (context tokens in the batch);
//   - when its reply is complete the session's KV is saved (asynchronously, off the
//     critical path) and its next turn arrives `think` seconds later (closed loop), or
//     at its logged timestamp but not before (open loop).
//   - context overflow: when history + prompt + reply exceeds context_tokens, the oldest
//     truncation_ratio of the history (whole blocks) is dropped; the cache keeps the
//     rest valid (decoupled positional encoding, the paper's mechanism 6). A session
//     that starts with a system prompt keeps the blocks holding it and drops the oldest
//     blocks after them, unless the prompt itself must go to make room.
//   - system prompts (trace::request::prefix): turn 0's prompt is the system prompt,
//     then the user's message; the system prompt is context a cache may already hold,
//     so it counts as history (the turn's lookup covers it). With prefix_sharing the
//     cache stores its whole blocks once for all sessions (tiered_cache, "Shared
//     prefixes"); without, every session stores its own copy.
// The SSD read channel is shared by prefetches and demand loads; demand reads go first
// (they wait for one prefetch block at most; the prefetch reads they overtake are not
// delayed in the model, a small optimism while demand reads are a fraction of the
// bandwidth). Writes (demotion) go to a separate channel, off the critical path.
//
// Several nodes (cluster_config; docs/sim.md, "Several nodes"): N such engines, each with
// its own queue, batch, HBM, PCIe, SSD channels and tiered_cache (DRAM and SSD of
// tier_config each), driven by one event loop. A router sends each turn to a node
// (sticky, round-robin or random: route_ is drawn once, so every policy sees the same
// routes). A session's conversation is global; its KV is wherever nodes saved it. With a
// shared tier (shared_tier.hpp: content-addressed blocks, LRU over bytes), a turn whose
// node does not hold the whole history locally continues the lookup there by the
// session's manifest (the names of its blocks; a missing block ends the reusable
// prefix), and reads those blocks over the node's link
// to the shared tier, a demand channel planned like the SSD's; after each turn the node
// publishes the blocks the tier lacks (write-behind on the link's other direction,
// visible when the write completes, bounded bytes in flight per node). Each node's state
// advances only at its own events, so with sticky routing and no shared tier a node
// behaves exactly as a one-node engine_sim given its sessions alone.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <queue>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "shared_tier.hpp"
#include "tiered_cache.hpp"
#include "trace.hpp"

namespace attnstore::sim {

/// Which node a turn goes to (cluster_config::route). A session's home node is its
/// number mod N (sessions are numbered by arrival, so new sessions are spread evenly).
enum class routing : std::uint8_t {
  sticky,       ///< every turn to the session's home node
  round_robin,  ///< turn k to node (home + k) mod N: never the node of the turn before (N > 1)
  random,       ///< every turn to a node drawn uniformly (route_seed)
};

inline std::string_view to_string(routing r) noexcept {
  switch (r) {
    case routing::sticky:
      return "sticky";
    case routing::round_robin:
      return "round-robin";
    case routing::random:
      return "random";
  }
  return "?";
}

/// routing from its name (sticky, round-robin, random); nullopt for another name.
inline std::optional<routing> parse_routing(std::string_view s) noexcept {
  if (s == "sticky") return routing::sticky;
  if (s == "round-robin" || s == "round_robin" || s == "rr") return routing::round_robin;
  if (s == "random") return routing::random;
  return std::nullopt;
}

/// Several engines and a tier they share (issue 15). The defaults are one node, no
/// shared tier: the one-engine simulation, figures unchanged.
struct cluster_config {
  std::uint32_t nodes = 1;  ///< engines, each with the tier_config DRAM and SSD
  routing route = routing::sticky;
  std::uint64_t route_seed = 1;  ///< routing::random's draws
  /// Bytes the shared tier stores (LRU beyond them, as allkeys-lru); 0: no shared tier.
  double shared_tier_bytes = 0;
  /// Each node's link to the shared tier, per direction (reads and writes do not
  /// compete): 12.5 GB/s, a 100 Gb/s NIC.
  double shared_tier_bytes_per_s = 12.5e9;
  double shared_tier_latency_s = 200e-6;  ///< per request (one pipelined batch of blocks)
  /// Write-behind: a node sends at most this many bytes ahead of its link; blocks of a
  /// publish beyond it are skipped (counted in bytes_shared_skipped).
  double shared_write_bytes_in_flight = 8e9;
  /// Which sessions are published: every one after each turn (false), or those the
  /// node's eviction policy finds worth it (eviction_policy::worth_sharing, as the store
  /// asks), and a declined one again when its user is seen typing.
  bool share_by_policy = false;
};

/// What passes through the shared tier, for tests (function pointers and a context; any
/// may be null).
struct cluster_observer {
  void* context = nullptr;
  /// A node's write completed at `at`: `keys` (blocks of the session's history at its
  /// save) are in the shared tier from now on, those that fit.
  void (*published)(void* context, double at, std::uint32_t node, std::uint32_t session,
                    std::span<const hash128> keys) = nullptr;
  /// A turn starting at `at` on `node` found `keys` (blocks first_block.. of its history)
  /// in the shared tier.
  void (*served)(void* context, double at, std::uint32_t node, std::uint32_t session, std::uint32_t first_block,
                 std::span<const hash128> keys) = nullptr;
  /// The shared tier evicted `key`.
  void (*evicted)(void* context, const hash128& key) = nullptr;
  /// Turn `turn` (0-based) of `session` started on `node` at `at` with a history of
  /// `history` tokens, of which the node's own tiers found `local` and the shared tier the
  /// next `shared`.
  void (*admitted)(void* context, double at, std::uint32_t node, std::uint32_t session, std::uint32_t turn,
                   std::uint64_t history, std::uint64_t local, std::uint64_t shared) = nullptr;
};

struct model_config {
  std::string name = "llama-13b";
  double kv_bytes_per_token = 819200;  ///< 2 (K,V) x 40 layers x 5120 x 2 bytes = 0.78 MiB
};

struct engine_config {
  std::uint32_t max_batch = 256;            ///< running requests
  std::uint64_t hbm_kv_tokens = 330000;     ///< KV tokens HBM holds (4 x 80 GB - weights - activations)
  double prefill_s_per_token = 33e-6;       ///< linear layers (~26 GFLOP/token at ~0.8 PFLOP/s)
  double prefill_s_per_token_ctx = 1.3e-9;  ///< attention, per (new token x context token)
  double prefill_overhead_s = 0.004;
  double decode_step_s = 0.010;             ///< weights read + launch, per step
  double decode_s_per_ctx_token = 0.14e-6;  ///< KV read per context token per step
  std::uint32_t context_tokens = 4096;
  double truncation_ratio = 0.5;
};

struct tier_config {
  double dram_bytes = 128e9;
  double ssd_bytes = 10e12;
  double pcie_bytes_per_s = 4 * 26e9;  ///< 4 GPUs x 26 GB/s: each TP rank loads its shard
  double ssd_read_bytes_per_s = 5e9;
  double ssd_write_bytes_per_s = 4e9;
  std::uint32_t tokens_per_block = 64;
  double watermark = 0.02;
  std::uint32_t eviction_window = 0;      ///< 0: (DRAM + SSD) / mean session KV (paper)
  std::uint32_t prefetch_window = 0;      ///< 0: prefetch DRAM / mean session KV (paper)
  double prefetch_dram_fraction = 0.75;   ///< DRAM the prefetch window is sized for
  double prefetch_bytes_in_flight = 4e9;  ///< and at most 1/32 of DRAM
  bool prefetch = true;
  double ttl_s = 0;  ///< 0: no TTL
  /// The engine tells the cache only about the first this many waiting requests (its
  /// look-ahead); 0: every waiting request. With eviction_window 0 the eviction window is
  /// this many sessions.
  std::uint32_t queue_window = 0;
  policy::predictive_options predictive{};  ///< predictive's options (sizes filled in)
  std::uint32_t prefetch_likely = 16;       ///< predictive: candidates beyond the queue per plan
};

struct sim_config {
  model_config model;
  engine_config engine;
  tier_config tiers;
  /// Steady-state window: statistics count the turns that start between this fraction
  /// of the session-arrival span and its end (the warm-up with an empty cache and the
  /// drain after the last new session are simulated but not counted).
  double warmup_fraction = 0.2;
  bool close_on_last = false;  ///< the engine closes a session after its last turn
  /// Engine hints (store::hint): the share of turns whose user is seen to start typing
  /// (a composing hint when typing starts: trace::request::typing before the arrival),
  /// and of sessions whose user is seen to leave (a left hint at trace::request::leave
  /// after the last reply). Traces without those times give no hints.
  double hint_composing = 0, hint_left = 0;
  bool check = false;  ///< verify the cache's invariants every 1000 events (slow)
  /// Sessions that start with the same system prompt share its whole blocks in the cache
  /// (stored once per tier, reference-counted); false: each stores its own copy.
  bool prefix_sharing = true;
  cluster_config cluster;  ///< nodes, routing and the shared tier (default: one node)
};

/// Runs with all history hits from DRAM and no capacity limit, to measure the working set.
enum class run_mode : std::uint8_t { normal, ideal };

struct sim_result {
  policy_kind kind = policy_kind::none;
  std::uint64_t requests = 0, sessions = 0;
  std::uint64_t measured_requests = 0;  ///< turns inside the steady-state window
  std::uint64_t history_tokens = 0, input_tokens = 0, output_tokens = 0;
  std::uint64_t hit_tokens = 0, dram_hit_tokens = 0, ssd_hit_tokens = 0;
  std::uint64_t reused_tokens = 0;   ///< hits the engine loaded rather than recomputed
  std::uint64_t prefill_tokens = 0;  ///< tokens computed in prefill
  /// Prefill compute (linear + attention) spent, and what recomputing every history
  /// would have spent: the work a policy saves is 1 - spent / full.
  double prefill_work_s = 0, prefill_work_full_s = 0;
  std::uint64_t truncations = 0;
  std::uint64_t prefix_cuts = 0;  ///< of which dropped the session's system prompt (it did not fit)
  double ttft_mean = 0, ttft_p50 = 0, ttft_p90 = 0, ttft_p99 = 0;
  double bytes_hbm_to_dram = 0, bytes_dram_to_hbm = 0, bytes_ssd_to_hbm = 0;
  double bytes_ssd_to_dram = 0, bytes_dram_to_ssd = 0, bytes_dropped = 0;
  double sim_seconds = 0, wall_seconds = 0;
  double mean_queue = 0, max_queue = 0, busy_prefill = 0;
  double working_set_bytes = 0;  ///< time average of the KV of sessions between turns
  double dram_bytes = 0, ssd_bytes = 0;
  std::uint64_t prefetch_started = 0, prefetch_cancelled = 0, prefetch_waits = 0;
  double prefetch_peak_bytes = 0, prefetch_bound_bytes = 0;
  std::uint64_t evicted_sessions = 0, bypassed_blocks = 0, rejected_blocks = 0, expired_sessions = 0;
  /// Storage over the steady-state window: bytes of blocks holding data in DRAM and on
  /// SSD (each copy of a shared block once; DRAM reserved for reads in flight excluded),
  /// time-averaged, per tier, and the most at any time; `referenced`: the time average of
  /// what the stored sessions hold with a shared block counted once per holder (= the
  /// bytes stored when no block is shared).
  double bytes_stored = 0, bytes_stored_peak = 0, bytes_stored_dram = 0, bytes_stored_ssd = 0;
  double bytes_referenced = 0;
  std::uint64_t shared_hit_tokens = 0;  ///< hit_tokens found in shared prefix blocks
  double bytes_dedup = 0;               ///< saves of shared blocks found in DRAM: bytes not written
  bool prefix_sharing = false;          ///< sharing was on and the trace has system prompts
  /// predictive: what it has learned at checkpoints through the run (its last refit).
  struct learned_point {
    double at_s = 0;             ///< simulated time
    std::uint64_t requests = 0;  ///< turns started by then
    std::uint64_t returns = 0;   ///< returns the policy has observed
    double think_median_s = 0, think_mean_s = 0, think_p90_s = 0;
    double mean_turns = 0, continuation_1 = 0, continuation_5 = 0;
    double horizon_dram_s = 0, horizon_ssd_s = 0;
    bool learned = false;
  };
  std::vector<learned_point> learned;
  /// Several nodes (cluster_config). hit_tokens = dram_hit_tokens + ssd_hit_tokens (the
  /// node's own tiers) + shared_tier_hit_tokens. dram_bytes and ssd_bytes are per node.
  std::uint32_t nodes = 1;
  routing route = routing::sticky;
  double shared_tier_bytes = 0;
  std::uint64_t shared_tier_hit_tokens = 0;  ///< history found in the shared tier after the local prefix
  /// Turns after a session's first, and those routed to the node that served its turn
  /// before (their history and what the node's own tiers found of it).
  std::uint64_t later_turns = 0, same_node_turns = 0;
  std::uint64_t same_node_history_tokens = 0, same_node_local_hit_tokens = 0;
  double bytes_to_shared = 0;                ///< published (written to the shared tier)
  double bytes_from_shared = 0;              ///< read from the shared tier into HBM
  double bytes_shared_skipped = 0;           ///< not published: over the bound on bytes in flight
  double bytes_shared_touched = 0;           ///< already there when published: refreshed, not sent
  bool share_by_policy = false;              ///< cluster_config::share_by_policy
  std::uint64_t publishes_declined = 0;      ///< saves the policy did not publish (share_by_policy)
  std::uint64_t publishes_after_hint = 0;    ///< declined ones published when their user was seen typing
  double shared_tier_stored_bytes = 0;       ///< time average over the window
  double shared_tier_evicted_bytes = 0;      ///< evicted by LRU over the window
  std::vector<std::uint64_t> node_requests;  ///< measured turns per node
  bool invariants_ok = true;
  std::string invariant_error;

  double hit_rate() const { return history_tokens ? double(hit_tokens) / double(history_tokens) : 0; }
  double dram_hit_rate() const { return history_tokens ? double(dram_hit_tokens) / double(history_tokens) : 0; }
  double ssd_hit_rate() const { return history_tokens ? double(ssd_hit_tokens) / double(history_tokens) : 0; }
  double reuse_rate() const { return history_tokens ? double(reused_tokens) / double(history_tokens) : 0; }
  double shared_hit_rate() const { return history_tokens ? double(shared_hit_tokens) / double(history_tokens) : 0; }
  /// History found in the serving node's own DRAM and SSD / history.
  double hit_rate_local() const {
    return history_tokens ? double(dram_hit_tokens + ssd_hit_tokens) / double(history_tokens) : 0;
  }
  /// History found in the shared tier (after the local prefix) / history.
  double hit_rate_shared() const {
    return history_tokens ? double(shared_tier_hit_tokens) / double(history_tokens) : 0;
  }
  /// Turns after a session's first that went to the node that served its turn before.
  double same_node_rate() const { return later_turns ? double(same_node_turns) / double(later_turns) : 0; }
  double work_saved() const { return prefill_work_full_s > 0 ? 1 - prefill_work_s / prefill_work_full_s : 0; }
  double bytes_moved() const {
    return bytes_hbm_to_dram + bytes_dram_to_hbm + bytes_ssd_to_hbm + bytes_ssd_to_dram + bytes_dram_to_ssd +
           bytes_to_shared + bytes_from_shared;
  }
};

class engine_sim {
 public:
  engine_sim(const trace::workload& w, policy_kind kind, const sim_config& c, run_mode mode = run_mode::normal)
      : w_(w), kind_(kind), c_(c), mode_(mode) {
    const auto& t = c.tiers;
    const auto& k = c.cluster;
    if (k.nodes == 0) throw std::invalid_argument("engine_sim: cluster.nodes must be at least 1");
    if (k.shared_tier_bytes > 0 && (k.shared_tier_bytes_per_s <= 0 || k.shared_tier_latency_s < 0))
      throw std::invalid_argument("engine_sim: cluster.shared_tier_bytes_per_s must be > 0 and latency >= 0");
    tpb_ = t.tokens_per_block;
    block_bytes_ = double(tpb_) * c.model.kv_bytes_per_token;
    max_session_blocks_ = c.engine.context_tokens / tpb_ + 2;
    for (std::uint32_t i = 0; i < k.nodes; ++i) {
      nodes_.push_back(std::make_unique<node>());
      node& n = *nodes_.back();
      n.sim = this;
      n.id = i;
      if (kind != policy_kind::none && mode == run_mode::normal) {
        cache_options o;
        o.kind = kind;
        o.tokens_per_block = tpb_;
        o.dram_blocks = std::uint32_t(t.dram_bytes / block_bytes_);
        o.ssd_blocks = std::uint32_t(t.ssd_bytes / block_bytes_);
        o.max_session_blocks = max_session_blocks_;
        o.block_bytes = std::uint64_t(block_bytes_);
        o.watermark = t.watermark;
        o.eviction_window = t.eviction_window;
        o.prefetch = t.prefetch;
        o.prefetch_window = t.prefetch_window;
        o.prefetch_dram_fraction = t.prefetch_dram_fraction;
        // DRAM reserved for reads in flight holds no data until they land: bound it by a
        // small share of DRAM too (1/32: the default 4 GB at the paper's 128 GB).
        o.prefetch_bytes_in_flight = std::max<std::uint64_t>(
            std::uint64_t(std::min(t.prefetch_bytes_in_flight, t.dram_bytes / 32)), o.block_bytes);
        if (o.eviction_window == 0) o.eviction_window = t.queue_window;
        o.predictive = t.predictive;
        o.prefetch_likely = t.prefetch_likely;
        n.cache.emplace(o, io_hook{&n, &engine_sim::on_read});
        n.flight_done.assign(n.cache->policy().max_sessions(), 0.0);
      }
    }
    if (k.shared_tier_bytes > 0 && kind != policy_kind::none && mode == run_mode::normal) {
      shared_.emplace(k.shared_tier_bytes, shared_tier::observer{this, &engine_sim::on_shared_evicted});
      model_ = make_model_id({"attnstore-sim", kv_geometry{1, 1, 1, dtype::f16, tpb_}.validated()});
    }
    rt_.resize(w.sessions());
    req_rt_.resize(w.requests.size());
    route_.assign(w.requests.size(), 0);
    if (k.nodes > 1) {
      std::mt19937_64 rng(k.route_seed);
      for (std::uint32_t s = 0; s < w.sessions(); ++s)
        for (std::uint32_t q = w.first[s]; q < w.first[s + 1]; ++q) {
          const std::uint32_t home = s % k.nodes, turn = q - w.first[s];
          route_[q] = k.route == routing::sticky        ? home
                      : k.route == routing::round_robin ? (home + turn) % k.nodes
                                                        : std::uint32_t(rng() % k.nodes);
        }
    }
    if (w.sessions()) {
      window_end_ = w.requests[w.first[w.sessions() - 1]].arrival;
      window_start_ = c.warmup_fraction * window_end_;
    }
    for (double f : {0.02, 0.05, 0.1, 0.2, 0.5, 1.0}) checkpoints_.push_back(f * window_end_);
  }

  /// Tells `o` what passes through the shared tier (call before run()).
  void observe(const cluster_observer& o) noexcept { obs_ = o; }

  sim_result run() {
    const auto wall0 = std::chrono::steady_clock::now();
    std::uint32_t next_session = 0;  // next first-turn arrival (sessions sorted by it)
    std::uint64_t events = 0;
    for (;;) {
      const double t_first = next_session < w_.sessions() ? w_.requests[w_.first[next_session]].arrival : inf;
      const double t_next = arrivals_.empty() ? inf : arrivals_.top().time;
      const double t_arrival = std::min(t_first, t_next);
      const double t_hint = hints_.empty() ? inf : hints_.top().time;
      const double t_pub = publishes_.empty() ? inf : publishes_.top().time;
      // The earliest I/O completion and engine step of any node (the first node on a tie).
      double t_io = inf, t_engine = inf;
      node *io_node = nullptr, *engine_node = nullptr;
      for (auto& np : nodes_) {
        node& n = *np;
        if (!n.io.empty() && n.io.top().time < t_io) {
          t_io = n.io.top().time;
          io_node = &n;
        }
        const double te = engine_time(n);
        if (te < t_engine) {
          t_engine = te;
          engine_node = &n;
        }
      }
      const double t = std::min({t_arrival, t_io, t_engine, t_hint, t_pub});
      if (t == inf) break;
      advance(t);
      ++events;
      if (c_.check && events % 1000 == 0) verify();
      node* touched = nullptr;
      if (t_pub <= t_io && t_pub <= t_arrival && t_pub <= t_engine && t_pub <= t_hint) {
        complete_publish();
      } else if (t_hint < t_io && t_hint < t_arrival && t_hint < t_engine) {
        const hint_event ev = hints_.top();
        hints_.pop();
        touched = nodes_[rt_[ev.session].node].get();
        advance_node(*touched, t);
        touched->cache->hint(sim_session_hash(ev.session), ev.hint, us(now_));
        session_rt& hs = rt_[ev.session];
        if (shared_ && hs.declined && ev.hint == policy::session_hint::composing &&
            touched->cache->worth_sharing(sim_session_hash(ev.session))) {
          hs.declined = false;
          if (measuring()) ++result_.publishes_after_hint;
          publish(*touched, ev.session);
        }
      } else if (t_io <= t_arrival && t_io <= t_engine) {
        touched = io_node;
        advance_node(*touched, t);
        const io_event ev = touched->io.top();
        touched->io.pop();
        touched->cache->io_complete(ev.record, ev.ticket);
      } else if (t_arrival <= t_engine) {
        std::uint32_t qi;
        if (t_first <= t_next) {
          qi = w_.first[next_session++];
          rt_[w_.requests[qi].session].arrival = w_.requests[qi].arrival;
        } else {
          qi = arrivals_.top().request;
          arrivals_.pop();
        }
        touched = nodes_[route_[qi]].get();
        advance_node(*touched, t);
        arrive(*touched, qi);
      } else {
        node& n = *(touched = engine_node);
        advance_node(n, t);
        if (n.prefilling != none_idx) {
          const std::uint32_t qi = n.prefilling;
          n.prefilling = none_idx;
          n.running.push({n.v + double(clipped(w_.requests[qi]).output_tokens), qi});
        } else {
          while (!n.running.empty() && n.running.top().finish <= n.v + 1e-6) {
            const std::uint32_t qi = n.running.top().request;
            n.running.pop();
            finish(n, qi);
          }
        }
      }
      if (touched) {
        try_admit(*touched);
        if (touched->cache) touched->cache->plan_prefetch();
      }
    }
    if (c_.check) verify();
    return results(wall0);
  }

  /// Node 0's cache (the only one without cluster_config), or nullptr for `none`.
  tiered_cache* cache() { return nodes_[0]->cache ? &*nodes_[0]->cache : nullptr; }
  /// The shared tier, or nullptr when there is none.
  const shared_tier* shared() const { return shared_ ? &*shared_ : nullptr; }

 private:
  static constexpr double inf = 1e300;
  static constexpr std::uint32_t none_idx = ~0u;

  struct timed {
    double time;
    std::uint32_t request;
    bool operator>(const timed& o) const { return time > o.time || (time == o.time && request > o.request); }
  };
  struct hint_event {
    double time;
    std::uint32_t session;
    policy::session_hint hint;
    bool operator>(const hint_event& o) const { return time > o.time || (time == o.time && session > o.session); }
  };
  struct running_entry {
    double finish;  // decode step count at which the reply is complete
    std::uint32_t request;
    bool operator>(const running_entry& o) const {
      return finish > o.finish || (finish == o.finish && request > o.request);
    }
  };
  struct io_event {
    double time;
    std::uint32_t record;
    std::uint64_t ticket;
    bool operator>(const io_event& o) const { return time > o.time || (time == o.time && ticket > o.ticket); }
  };
  /// A node's write to the shared tier, visible when it completes.
  struct publish_event {
    double time;
    std::uint64_t seq;
    std::uint32_t slot;  // in publish_data_
    bool operator>(const publish_event& o) const { return time > o.time || (time == o.time && seq > o.seq); }
  };
  struct publish_data {
    std::uint32_t node = 0, session = 0;
    std::vector<hash128> keys;
    std::vector<std::uint64_t> bytes;
  };
  struct session_rt {
    std::vector<token_id> tokens;  // current history (after truncations)
    std::uint64_t start = 0;       // absolute position of tokens[0]
    std::uint64_t live = 0;        // tokens counted in the working set
    double arrival = 0;            // arrival of the turn in progress
    std::uint32_t prefix = 0;      // system prompt tokens at the front of tokens (0: none, or cut)
    std::uint32_t node = 0;        // the node that served its latest turn
    std::vector<hash128> keys;     // shared tier: its manifest, the names of its blocks
    std::uint64_t named = 0;       // tokens of `tokens` that `keys` names
    bool declined = false;         // its latest save was not published (share_by_policy)
  };
  struct request_rt {
    std::uint64_t ctx = 0;               // context tokens for the decode cost
    std::uint64_t hbm = 0;               // HBM tokens reserved
    std::uint64_t seq = 0;               // arrival order (queue position key)
    std::uint32_t prefix_in_prompt = 0;  // turn 0: system prompt tokens moved to the history
  };
  /// One engine with its own tiers. Its clock (`now`, and `v`, decode steps done) moves
  /// only at its own events, so other nodes' events do not change its arithmetic.
  struct node {
    engine_sim* sim = nullptr;
    std::uint32_t id = 0;
    std::optional<tiered_cache> cache;
    std::vector<double> flight_done;  // by record: when its promotion's reads land
    std::priority_queue<running_entry, std::vector<running_entry>, std::greater<>> running;
    std::priority_queue<io_event, std::vector<io_event>, std::greater<>> io;
    std::deque<std::uint32_t> queue;
    std::uint64_t queue_seq = 0;
    double now = 0, v = 0, busy_until = 0;
    double ssd_read_free = 0;   // demand reads scheduled until
    double prefetch_free = 0;   // prefetch reads scheduled until
    double net_read_free = 0;   // shared-tier reads: the link is busy until
    double net_write_free = 0;  // shared-tier writes: the link is busy until
    std::uint32_t prefilling = none_idx;
    std::uint64_t running_ctx = 0, hbm_used = 0;
    bool snap_start = false, snap_end = false;
    cache_counters c0{}, c1{};
    std::uint64_t measured = 0;
  };

  /// Token ids only need to be distinct per (session, position): the index compares
  /// them and hashes them into chain hashes.
  static token_id token_of(std::uint32_t session, std::uint64_t pos) noexcept {
    return token_id((std::uint64_t(session) * 0x9e3779b1u + pos * 0x85ebca6bu) & 0x7fffffff);
  }
  /// Tokens of system prompt `prefix`: the same for every session that uses it.
  static token_id prefix_token(std::uint32_t prefix, std::uint64_t pos) noexcept {
    return token_id(((std::uint64_t(prefix) + 1) * 0xc2b2ae3du + pos * 0x27d4eb2fu + 0x165667b1u) & 0x7fffffff);
  }
  static std::uint64_t us(double seconds) noexcept { return std::uint64_t(seconds * 1e6); }
  /// Whole blocks of the session's history that the cache may share with other sessions.
  std::uint32_t shared_blocks_of(const session_rt& s) const noexcept { return c_.prefix_sharing ? s.prefix / tpb_ : 0; }

  double step_time(const node& n) const noexcept {
    return c_.engine.decode_step_s + c_.engine.decode_s_per_ctx_token * double(n.running_ctx);
  }
  /// When the node's next engine event happens: its prefill ends, or a decode step
  /// completes a reply.
  double engine_time(const node& n) const noexcept {
    if (n.prefilling != none_idx) return n.busy_until;
    if (!n.running.empty()) return n.now + std::max(0.0, n.running.top().finish - n.v) * step_time(n);
    return inf;
  }

  /// Moves the node's clock to t (its decode steps progress while it is not prefilling).
  void advance_node(node& n, double t) {
    const double dt = t - n.now;
    if (dt > 0) {
      if (n.prefilling == none_idx && !n.running.empty()) n.v += dt / step_time(n);
      n.now = t;
    }
  }

  /// Moves the cluster's clock to t: time averages over the window, counter snapshots.
  void advance(double t) {
    const double dt = t - now_;
    if (dt > 0) {
      // Time inside the measurement window.
      const double in = std::max(0.0, std::min(t, window_end_) - std::max(now_, window_start_));
      if (in > 0) {
        double queued = 0, prefilling = 0, d = 0, sd = 0, referenced = 0;
        for (auto& np : nodes_) {
          const node& n = *np;
          prefilling += n.prefilling != none_idx;
          queued += double(n.queue.size());
          if (n.cache) {
            d += n.cache->stored_dram_blocks();
            sd += n.cache->stored_ssd_blocks();
            referenced += double(n.cache->referenced_blocks());
          }
        }
        prefill_busy_ += in * prefilling;
        queue_area_ += in * queued;
        ws_area_ += in * double(live_tokens_);
        if (nodes_[0]->cache) {
          stored_dram_area_ += in * d;
          stored_ssd_area_ += in * sd;
          referenced_area_ += in * referenced;
          stored_peak_ = std::max(stored_peak_, d + sd);
        }
        if (shared_) shared_area_ += in * double(shared_->stored_bytes());
      }
      for (auto& np : nodes_) {
        node& n = *np;
        if (n.cache && !n.snap_start && t >= window_start_) {
          n.snap_start = true;
          n.c0 = n.cache->counters();
        }
        if (n.cache && !n.snap_end && t >= window_end_) {
          n.snap_end = true;
          n.c1 = n.cache->counters();
        }
      }
      if (shared_ && !shared_snap_start_ && t >= window_start_) {
        shared_snap_start_ = true;
        shared_evicted0_ = shared_->evicted_bytes();
      }
      if (shared_ && !shared_snap_end_ && t >= window_end_) {
        shared_snap_end_ = true;
        shared_evicted1_ = shared_->evicted_bytes();
      }
      while (next_checkpoint_ < checkpoints_.size() && t >= checkpoints_[next_checkpoint_])
        record_learned(checkpoints_[next_checkpoint_++]);
      now_ = t;
    }
  }
  bool measuring() const noexcept { return now_ >= window_start_ && now_ <= window_end_; }

  request_rt& running_rt(std::uint32_t qi) { return req_rt_[qi]; }

  static void on_read(void* context, std::uint32_t record, std::uint32_t blocks, std::uint64_t ticket) {
    auto* n = static_cast<node*>(context);
    const engine_sim* s = n->sim;
    // Prefetch reads queue behind every read already scheduled (FIFO among themselves).
    const double start = std::max({s->now_, n->ssd_read_free, n->prefetch_free});
    const double done = start + double(blocks) * s->block_bytes_ / s->c_.tiers.ssd_read_bytes_per_s;
    n->prefetch_free = done;
    n->flight_done[record] = done;
    n->io.push({done, record, ticket});
  }

  static void on_shared_evicted(void* context, const hash128& key) {
    auto* s = static_cast<engine_sim*>(context);
    if (s->obs_.evicted) s->obs_.evicted(s->obs_.context, key);
  }

  void arrive(node& n, std::uint32_t qi) {
    const trace::request& r = w_.requests[qi];
    rt_[r.session].arrival = now_;
    n.queue.push_back(qi);
    req_rt_[qi].seq = ++n.queue_seq;
    result_.max_queue = std::max(result_.max_queue, double(n.queue.size()));
    if (n.cache) {
      if (c_.tiers.ttl_s > 0) n.cache->expire(us(now_), us(c_.tiers.ttl_s));
      if (!c_.tiers.queue_window || n.queue.size() <= c_.tiers.queue_window) show(n, qi);
    }
  }

  /// The engine tells the cache that request qi waits (it entered the look-ahead).
  void show(node& n, std::uint32_t qi) {
    n.cache->enqueue(sim_session_hash(w_.requests[qi].session), req_rt_[qi].seq, us(now_));
  }

  void record_learned(double at) {
    node& n0 = *nodes_[0];
    if (!n0.cache || !n0.cache->predictive()) return;
    const policy::predictive& p = *n0.cache->predictive();
    const policy::return_model& m = p.model();
    sim_result::learned_point x;
    x.at_s = at;
    x.requests = result_.requests;
    x.returns = m.returns_seen();
    x.think_median_s = m.think_quantile(0.5);
    x.think_p90_s = m.think_quantile(0.9);
    x.think_mean_s = m.think_mean();
    x.mean_turns = m.mean_turns();
    x.continuation_1 = m.continuation(1);
    x.continuation_5 = m.continuation(5);
    x.horizon_dram_s = p.horizon(policy::level::dram);
    x.horizon_ssd_s = p.horizon(policy::level::ssd);
    x.learned = p.learned();
    result_.learned.push_back(x);
  }

  /// The session's manifest: s.keys[i] names block i of its history in the shared tier
  /// (the last block may be partial). A block is named when first written: the chain hash
  /// of its tokens after the block before it, so until a truncation the names are content
  /// addresses from the start of the history (sessions that start alike share them); a
  /// truncation drops the names of the blocks it drops and keeps the others (the blocks
  /// are immutable; the manifest's view changes), and later blocks chain on from them.
  void name_blocks(session_rt& s) {
    const std::size_t whole = s.named / tpb_;
    s.keys.resize(whole);  // a partial last block gets a new name once it has grown
    hash128 prev = whole ? s.keys.back() : hash128{};
    for (std::size_t at = whole * tpb_; at < s.tokens.size(); at += tpb_)
      s.keys.push_back(prev = chain_hash(prev, model_,
                                         std::span<const token_id>(s.tokens).subspan(
                                             at, std::min<std::size_t>(tpb_, s.tokens.size() - at))));
    s.named = s.tokens.size();
  }

  /// The history tokens after the first `local` that the shared tier holds, by the
  /// session's manifest: its blocks from the one holding token `local` on, up to the first
  /// the tier lacks (each hit refreshes the block, as a GET does under allkeys-lru).
  std::uint64_t shared_lookup(const node& n, std::uint32_t session, std::uint64_t local) {
    session_rt& s = rt_[session];
    if (!shared_ || local >= s.tokens.size()) return 0;
    name_blocks(s);
    const std::uint32_t b0 = std::uint32_t(local / tpb_);
    std::uint64_t end = local;
    std::uint32_t b = b0;
    for (; b < s.keys.size() && shared_->get(s.keys[b]); ++b)
      end = std::max<std::uint64_t>(end, std::min<std::uint64_t>(s.tokens.size(), std::uint64_t(b + 1) * tpb_));
    if (b > b0 && obs_.served)
      obs_.served(obs_.context, now_, n.id, session, b0, std::span<const hash128>(s.keys).subspan(b0, b - b0));
    return end - local;
  }

  /// A truncation dropped blocks [first, first + count) of the session's history: the
  /// manifest drops their names and keeps the others (whole blocks: alignment is kept).
  void forget_names(session_rt& s, std::uint64_t first, std::uint64_t count) const {
    if (first + count <= s.keys.size() && s.named >= (first + count) * tpb_) {
      s.keys.erase(s.keys.begin() + std::ptrdiff_t(first), s.keys.begin() + std::ptrdiff_t(first + count));
      s.named -= count * tpb_;
    } else {  // the names end inside the cut: those before it stay
      s.keys.resize(std::min<std::size_t>(s.keys.size(), first));
      s.named = s.keys.size() * tpb_;
    }
  }

  /// Write-behind after a save: the node sends the blocks of the session's history that
  /// the shared tier lacks (those it has are refreshed, as SET NX does), as far as its
  /// bound on bytes in flight allows; they become visible when the write completes.
  void publish(node& n, std::uint32_t session) {
    const auto& k = c_.cluster;
    session_rt& s = rt_[session];
    name_blocks(s);
    const std::span<const token_id> history = s.tokens;
    const double kvb = c_.model.kv_bytes_per_token;
    const double in_flight = std::max(0.0, n.net_write_free - now_) * k.shared_tier_bytes_per_s;
    double room = std::max(0.0, k.shared_write_bytes_in_flight - in_flight);
    std::uint32_t slot;
    if (!free_publish_.empty()) {
      slot = free_publish_.back();
      free_publish_.pop_back();
    } else {
      slot = std::uint32_t(publish_data_.size());
      publish_data_.emplace_back();
    }
    publish_data& p = publish_data_[slot];
    p.node = n.id;
    p.session = session;
    p.keys.clear();
    p.bytes.clear();
    double sent = 0, skipped = 0, touched = 0;
    bool gap = false;  // a block before was skipped: the blocks after it are unreachable
    for (std::uint32_t b = 0; b < s.keys.size(); ++b) {
      const double bytes = double(std::min<std::size_t>(tpb_, history.size() - std::size_t(b) * tpb_)) * kvb;
      if (shared_->touch(s.keys[b])) {  // stored already: refreshed, nothing sent
        touched += bytes;
        continue;
      }
      if (gap || bytes > room) {
        skipped += bytes;
        gap = true;
        continue;
      }
      p.keys.push_back(s.keys[b]);
      p.bytes.push_back(std::uint64_t(bytes));
      room -= bytes;
      sent += bytes;
    }
    if (measuring()) {
      result_.bytes_to_shared += sent;
      result_.bytes_shared_skipped += skipped;
      result_.bytes_shared_touched += touched;
    }
    if (p.keys.empty()) {
      free_publish_.push_back(slot);
      return;
    }
    n.net_write_free = std::max(now_, n.net_write_free) + sent / k.shared_tier_bytes_per_s;
    publishes_.push({n.net_write_free + k.shared_tier_latency_s, ++publish_seq_, slot});
  }

  /// The earliest write to the shared tier completes: its blocks are stored.
  void complete_publish() {
    const publish_event ev = publishes_.top();
    publishes_.pop();
    publish_data& p = publish_data_[ev.slot];
    for (std::size_t i = 0; i < p.keys.size(); ++i)
      if (shared_->put(p.keys[i], p.bytes[i], p.node) && obs_.published)
        obs_.published(obs_.context, now_, p.node, p.session, std::span<const hash128>(&p.keys[i], 1));
    free_publish_.push_back(ev.slot);
  }

  void try_admit(node& n) {
    const auto& e = c_.engine;
    while (n.prefilling == none_idx && !n.queue.empty()) {
      const std::uint32_t qi = n.queue.front();
      trace::request r = clipped(w_.requests[qi]);
      session_rt& s = rt_[r.session];
      std::uint64_t hist = s.tokens.size();
      const std::uint64_t need = std::min<std::uint64_t>(hist + r.input_tokens + r.output_tokens, e.context_tokens);
      if (!n.running.empty() && (n.running.size() >= e.max_batch || n.hbm_used + need > e.hbm_kv_tokens)) return;
      n.queue.pop_front();
      if (n.cache && c_.tiers.queue_window && n.queue.size() >= c_.tiers.queue_window)
        show(n, n.queue[c_.tiers.queue_window - 1]);  // the next one enters the look-ahead
      const session_hash key = sim_session_hash(r.session);
      if (s.live) {
        live_tokens_ -= s.live;
        s.live = 0;
      }
      // Turn 0 of a session with a system prompt: the prompt is the system prompt (cut to
      // the clipped prompt, from the end), then the user's message. The system prompt is
      // context the cache may hold, so it moves to the history.
      if (r.turn == 0 && r.prefix != trace::no_prefix && r.prefix_tokens > 0 && hist == 0) {
        const std::uint32_t pe = std::min(r.prefix_tokens, r.input_tokens);
        if (s.tokens.capacity() < c_.engine.context_tokens + tpb_) s.tokens.reserve(c_.engine.context_tokens + tpb_);
        s.tokens.resize(pe);
        for (std::uint32_t i = 0; i < pe; ++i) s.tokens[i] = prefix_token(r.prefix, i);
        s.prefix = pe;
        r.input_tokens -= pe;
        hist = pe;
        req_rt_[qi].prefix_in_prompt = pe;
      }
      // Context overflow: drop the oldest truncation_ratio of the history, whole blocks;
      // the blocks holding a system prompt stay (their share of the history does not
      // count) when the blocks after them make room, else the prompt goes too.
      if (hist > 0 && hist + r.input_tokens + r.output_tokens > e.context_tokens) {
        const std::uint64_t over = hist + r.input_tokens + r.output_tokens - e.context_tokens;
        std::uint64_t head =
            s.prefix ? std::min<std::uint64_t>((s.prefix + tpb_ - 1) / tpb_ * tpb_, hist / tpb_ * tpb_) : 0;
        const std::uint64_t body = hist - head;
        std::uint64_t drop = std::max<std::uint64_t>(std::uint64_t(e.truncation_ratio * double(body)), over);
        drop = std::min<std::uint64_t>((drop + tpb_ - 1) / tpb_ * tpb_, body / tpb_ * tpb_);
        if (head > 0 && drop < over) {  // the system prompt cannot stay: it goes first
          drop = std::max<std::uint64_t>(
              {std::uint64_t(e.truncation_ratio * double(hist)), over, std::uint64_t(s.prefix) / tpb_ * tpb_});
          drop = std::min<std::uint64_t>((drop + tpb_ - 1) / tpb_ * tpb_, hist / tpb_ * tpb_);
          head = 0;
          s.prefix = 0;
          if (measuring()) ++result_.prefix_cuts;
        }
        if (drop > 0) {
          s.tokens.erase(s.tokens.begin() + std::ptrdiff_t(head), s.tokens.begin() + std::ptrdiff_t(head + drop));
          s.start += drop;
          hist -= drop;
          if (measuring()) ++result_.truncations;
          if (n.cache) n.cache->truncate(key, std::uint32_t(head / tpb_), std::uint32_t(drop / tpb_), s.tokens);
          if (shared_) forget_names(s, head / tpb_, drop / tpb_);
        }
      }
      std::uint64_t hit = 0, dram = 0, ssd = 0, flying = 0, net = 0;
      sim::hit h;
      double flight_wait = 0;
      if (mode_ == run_mode::ideal) {
        hit = dram = hist;
      } else if (n.cache) {
        h = n.cache->admit(key, s.tokens, us(now_), hist + r.input_tokens,
                           shared_blocks_of(s));  // dequeues the session
        hit = h.tokens;
        dram = h.dram_tokens;
        ssd = h.ssd_tokens;
        flying = h.inflight_tokens;
        if (h.waited_ticket && h.record < n.flight_done.size())
          flight_wait = std::max(0.0, n.flight_done[h.record] - now_);
        // What the node's own tiers lack, the shared tier may hold (by chain hash).
        net = shared_lookup(n, r.session, hit);
      }
      // Prefill: DRAM hits load over PCIe layer by layer, hidden behind compute; SSD hits
      // whose promotion is in flight are ready when it completes; other SSD hits are read
      // on demand through the SSD read channel, and shared-tier hits through the node's
      // link to it. The engine picks the fastest plan: use or recompute the in-flight
      // part, read as many other hits as arrive within the compute time of the rest, and
      // never do worse than recomputing everything.
      const double kvb = c_.model.kv_bytes_per_token;
      auto compute_s = [&](double m, double ctx) {
        return m * (e.prefill_s_per_token + e.prefill_s_per_token_ctx * (ctx + m / 2));
      };
      const double per_token = e.prefill_s_per_token + e.prefill_s_per_token_ctx * double(hist) / 2;
      // Demand reads go ahead of queued prefetch reads: they wait for other demand reads
      // and at most the one prefetch block being read.
      const double ssd_wait = std::max(0.0, n.ssd_read_free - now_) +
                              (n.prefetch_free > now_ ? block_bytes_ / c_.tiers.ssd_read_bytes_per_s : 0.0);
      const double ssd_per_token = kvb / c_.tiers.ssd_read_bytes_per_s;
      // Shared-tier reads wait for the node's earlier ones, then the request's latency.
      const double net_queue = net ? std::max(0.0, n.net_read_free - now_) : 0.0;
      const double net_wait = net ? net_queue + c_.cluster.shared_tier_latency_s : 0.0;
      const double net_per_token = net ? kvb / c_.cluster.shared_tier_bytes_per_s : 0.0;
      struct plan {
        double time;
        std::uint64_t reused, ssd_read, net_read;
      };
      auto make_plan = [&](bool use_flying) {
        // Without waiting for the promotion, its blocks can be read on demand like the rest.
        const std::uint64_t base = dram + (use_flying ? flying : 0);
        const std::uint64_t demand_ssd = ssd - (use_flying ? flying : 0);
        const double recompute = double(hist - base + r.input_tokens);  // before demand reads
        // Tokens of `avail` one channel can deliver while the rest (recompute - other) is
        // computed: where its finish time meets the compute time.
        auto one = [&](double other, double wait, double per, std::uint64_t avail) {
          const double x = (per_token * (recompute - other) - wait) / (per_token + per);
          return std::uint64_t(std::clamp(x, 0.0, double(avail)));
        };
        std::uint64_t read = 0, nread = 0;
        if (!net) {
          double x = demand_ssd ? (per_token * recompute - ssd_wait) / (per_token + ssd_per_token) : 0;
          read = std::uint64_t(std::clamp(x, 0.0, double(demand_ssd)));
        } else if (!demand_ssd) {
          nread = one(0, net_wait, net_per_token, net);
        } else {
          // Both channels finish when compute does: T = per_token (recompute - x - y),
          // x = (T - ssd_wait) / ssd_per_token, y = (T - net_wait) / net_per_token.
          const double T = per_token * (recompute + ssd_wait / ssd_per_token + net_wait / net_per_token) /
                           (1 + per_token / ssd_per_token + per_token / net_per_token);
          const double x = (T - ssd_wait) / ssd_per_token, y = (T - net_wait) / net_per_token;
          if (x < 0 || x > double(demand_ssd)) {
            read = std::uint64_t(std::clamp(x, 0.0, double(demand_ssd)));
            nread = one(double(read), net_wait, net_per_token, net);
          } else if (y < 0 || y > double(net)) {
            nread = std::uint64_t(std::clamp(y, 0.0, double(net)));
            read = one(double(nread), ssd_wait, ssd_per_token, demand_ssd);
          } else {
            read = std::uint64_t(x);
            nread = std::uint64_t(y);
          }
        }
        const std::uint64_t reused = base + read + nread;
        double load = double(reused) * kvb / c_.tiers.pcie_bytes_per_s;
        if (use_flying && flying) load = std::max(load, flight_wait);
        if (read) load = std::max(load, ssd_wait + double(read) * ssd_per_token);
        if (nread) load = std::max(load, net_wait + double(nread) * net_per_token);
        return plan{std::max(compute_s(double(hist - reused + r.input_tokens), double(reused)), load), reused, read,
                    nread};
      };
      plan best{compute_s(double(hist + r.input_tokens), 0), 0, 0, 0};  // recompute everything
      for (bool f : {true, false}) {
        const plan q = make_plan(f);
        if (q.time < best.time) best = q;
        if (!flying) break;
      }
      if (obs_.admitted) obs_.admitted(obs_.context, now_, n.id, r.session, qi - w_.first[r.session], hist, hit, net);
      const std::uint64_t reused = best.reused, ssd_used = best.ssd_read, net_used = best.net_read;
      if (ssd_used) n.ssd_read_free = now_ + ssd_wait + double(ssd_used) * ssd_per_token;
      if (net_used) n.net_read_free = now_ + net_queue + double(net_used) * net_per_token;
      const double p = best.time + e.prefill_overhead_s;
      ++result_.requests;
      const bool same_node = s.node == n.id;
      s.node = n.id;
      if (measuring()) {
        ttft_.push_back(float(now_ + p - s.arrival));
        ++result_.measured_requests;
        ++n.measured;
        result_.history_tokens += hist;
        result_.input_tokens += r.input_tokens;
        result_.output_tokens += r.output_tokens;
        result_.hit_tokens += hit + net;
        result_.shared_hit_tokens += h.shared_tokens;
        result_.dram_hit_tokens += dram;
        result_.ssd_hit_tokens += ssd;
        result_.shared_tier_hit_tokens += net;
        result_.reused_tokens += reused;
        result_.prefill_tokens += hist - reused + r.input_tokens;
        result_.prefill_work_s += compute_s(double(hist - reused + r.input_tokens), double(reused));
        result_.prefill_work_full_s += compute_s(double(hist + r.input_tokens), 0);
        if (reused) result_.bytes_dram_to_hbm += double(dram) * kvb;
        result_.bytes_ssd_to_hbm += double(ssd_used) * kvb;
        result_.bytes_from_shared += double(net_used) * kvb;
        if (qi > w_.first[r.session]) {
          ++result_.later_turns;
          if (same_node) {
            ++result_.same_node_turns;
            result_.same_node_history_tokens += hist;
            result_.same_node_local_hit_tokens += hit;
          }
        }
      }
      // The request now runs: prefill, then decode.
      request_rt& rr = running_rt(qi);
      rr.ctx = hist + r.input_tokens + r.output_tokens / 2;
      rr.hbm = need;
      n.running_ctx += rr.ctx;
      n.hbm_used += rr.hbm;
      n.prefilling = qi;
      n.busy_until = now_ + p;
      if (n.cache && kind_ == policy_kind::opt) {
        // OPT's estimate of this session's next use: after this turn and the think time.
        const double end = n.busy_until + double(r.output_tokens) * step_time(n);
        n.cache->set_next_use(h.record, next_use_after(qi, end));
      }
    }
  }

  /// When request `next` arrives if the turn before it completes at `end` (seconds):
  /// at its timestamp (open loop, never before `end`), or its think time after `end`.
  double arrival_after(const trace::request& next, double end) const {
    return w_.open_loop ? std::max(end, next.arrival) : end + next.think;
  }

  /// When the session next comes to the node of turn qi if qi completes at `end`. With
  /// several nodes, the turns in between run elsewhere: their think times count, their
  /// service times are not known in advance and do not (OPT's future is then an estimate).
  std::uint64_t next_use_after(std::uint32_t qi, double end) const {
    const trace::request& r = w_.requests[qi];
    const std::uint32_t last = w_.first[r.session + 1];
    if (qi + 1 >= last) return policy::belady::never;
    if (nodes_.size() == 1) return us(arrival_after(w_.requests[qi + 1], end));
    double t = end;
    for (std::uint32_t j = qi + 1; j < last; ++j) {
      t = arrival_after(w_.requests[j], t);
      if (route_[j] == route_[qi]) return us(t);
    }
    return policy::belady::never;
  }

  /// A turn whose prompt and reply alone exceed the context is clipped (the reply is
  /// cut, then the prompt), as an engine would.
  trace::request clipped(const trace::request& in) const noexcept {
    trace::request r = in;
    const std::uint32_t room = c_.engine.context_tokens - tpb_;
    if (r.output_tokens > room / 2 && r.input_tokens + r.output_tokens > room)
      r.output_tokens = std::max(room / 2, room - std::min(r.input_tokens, room));
    if (r.input_tokens + r.output_tokens > room) r.input_tokens = room - r.output_tokens;
    return r;
  }

  void finish(node& n, std::uint32_t qi) {
    const trace::request r = clipped(w_.requests[qi]);
    session_rt& s = rt_[r.session];
    request_rt& rr = running_rt(qi);
    n.running_ctx -= rr.ctx;
    n.hbm_used -= rr.hbm;
    const std::size_t old_size = s.tokens.size();
    if (s.tokens.capacity() < c_.engine.context_tokens + tpb_) s.tokens.reserve(c_.engine.context_tokens + tpb_);
    s.tokens.resize(old_size + r.input_tokens - rr.prefix_in_prompt + r.output_tokens);
    for (std::size_t i = old_size; i < s.tokens.size(); ++i) s.tokens[i] = token_of(r.session, s.start + i);
    const session_hash key = sim_session_hash(r.session);
    const bool last = qi + 1 >= w_.first[r.session + 1];
    if (n.cache) {
      n.cache->save(key, s.tokens, us(now_), next_use_after(qi, now_), shared_blocks_of(s));
      if (last && c_.close_on_last) n.cache->close(key);
      s.declined = false;
      if (shared_ && !(last && c_.close_on_last)) {
        if (!c_.cluster.share_by_policy || n.cache->worth_sharing(key)) {
          publish(n, r.session);
        } else {
          s.declined = true;
          if (measuring()) ++result_.publishes_declined;
        }
      }
      schedule_hint(qi, last);
    }
    if (last) {
      std::vector<token_id>().swap(s.tokens);
      std::vector<hash128>().swap(s.keys);
      s.named = 0;
      return;
    }
    s.live = s.tokens.size();
    live_tokens_ += s.live;
    const trace::request& nx = w_.requests[qi + 1];
    arrivals_.push({arrival_after(nx, now_), qi + 1});
  }

  /// What the front end would see next of this session's user, if it is seen at all.
  void schedule_hint(std::uint32_t qi, bool last) {
    if (last) {
      const double leave = w_.requests[qi].leave;
      if (leave > 0 && c_.hint_left > 0 && hint_draw_(hint_rng_) < c_.hint_left)
        hints_.push({now_ + leave, w_.requests[qi].session, policy::session_hint::left});
      return;
    }
    const trace::request& nx = w_.requests[qi + 1];
    if (nx.typing > 0 && c_.hint_composing > 0 && hint_draw_(hint_rng_) < c_.hint_composing) {
      const double arrival = arrival_after(nx, now_);
      hints_.push({std::max(now_, arrival - nx.typing), nx.session, policy::session_hint::composing});
    }
  }

  void verify() {
    for (auto& np : nodes_) {
      if (!np->cache) continue;
      std::string why;
      if (!np->cache->check(&why) && result_.invariants_ok) {
        result_.invariants_ok = false;
        result_.invariant_error = (nodes_.size() > 1 ? "node " + std::to_string(np->id) + ": " : std::string()) + why +
                                  " (at t=" + std::to_string(now_) + ")";
      }
    }
    if (shared_ && !shared_->check() && result_.invariants_ok) {
      result_.invariants_ok = false;
      result_.invariant_error = "shared tier: LRU list, map and bytes disagree (at t=" + std::to_string(now_) + ")";
    }
  }

  sim_result results(std::chrono::steady_clock::time_point wall0) {
    const double N = double(nodes_.size());
    result_.kind = kind_;
    result_.sim_seconds = now_;
    result_.sessions = w_.sessions();
    const double span = window_end_ - window_start_;
    // Queue and prefill busy time: per node, averaged over the nodes.
    result_.mean_queue = span > 0 ? queue_area_ / span / N : 0;
    result_.busy_prefill = span > 0 ? prefill_busy_ / span / N : 0;
    result_.working_set_bytes = span > 0 ? ws_area_ / span * c_.model.kv_bytes_per_token : 0;
    result_.prefix_sharing = c_.prefix_sharing && w_.prefixes > 0;
    if (span > 0) {
      result_.bytes_stored_dram = stored_dram_area_ / span * block_bytes_;
      result_.bytes_stored_ssd = stored_ssd_area_ / span * block_bytes_;
      result_.bytes_stored = result_.bytes_stored_dram + result_.bytes_stored_ssd;
      result_.bytes_referenced = referenced_area_ / span * block_bytes_;
      result_.shared_tier_stored_bytes = shared_area_ / span;
    }
    result_.bytes_stored_peak = stored_peak_ * block_bytes_;
    result_.dram_bytes = c_.tiers.dram_bytes;
    result_.ssd_bytes = c_.tiers.ssd_bytes;
    result_.nodes = std::uint32_t(nodes_.size());
    result_.route = c_.cluster.route;
    result_.shared_tier_bytes = shared_ ? c_.cluster.shared_tier_bytes : 0;
    result_.share_by_policy = c_.cluster.share_by_policy;
    if (shared_) {
      if (!shared_snap_start_) shared_evicted0_ = shared_->evicted_bytes();
      if (!shared_snap_end_) shared_evicted1_ = shared_->evicted_bytes();
      result_.shared_tier_evicted_bytes = double(shared_evicted1_ - shared_evicted0_);
    }
    for (auto& np : nodes_) result_.node_requests.push_back(np->measured);
    if (!ttft_.empty()) {
      double sum = 0;
      for (float x : ttft_) sum += x;
      result_.ttft_mean = sum / double(ttft_.size());
      auto pct = [&](double p) {
        const std::size_t k = std::min(ttft_.size() - 1, std::size_t(p * double(ttft_.size())));
        std::nth_element(ttft_.begin(), ttft_.begin() + std::ptrdiff_t(k), ttft_.end());
        return double(ttft_[k]);
      };
      result_.ttft_p50 = pct(0.5);
      result_.ttft_p90 = pct(0.9);
      result_.ttft_p99 = pct(0.99);
    }
    if (nodes_[0]->cache) {
      cache_counters k{};  // counters over the window, all nodes
      for (auto& np : nodes_) {
        node& n = *np;
        if (!n.snap_start) n.c0 = n.cache->counters();
        if (!n.snap_end) n.c1 = n.cache->counters();
        k.saved_blocks += n.c1.saved_blocks - n.c0.saved_blocks;
        k.prefetched_blocks += n.c1.prefetched_blocks - n.c0.prefetched_blocks;
        k.demoted_blocks += n.c1.demoted_blocks - n.c0.demoted_blocks;
        k.dropped_blocks += n.c1.dropped_blocks - n.c0.dropped_blocks;
        k.dropped_sessions += n.c1.dropped_sessions - n.c0.dropped_sessions;
        k.bypassed_blocks += n.c1.bypassed_blocks - n.c0.bypassed_blocks;
        k.rejected_blocks += n.c1.rejected_blocks - n.c0.rejected_blocks;
        k.expired_sessions += n.c1.expired_sessions - n.c0.expired_sessions;
        k.prefetch_waits += n.c1.prefetch_waits - n.c0.prefetch_waits;
        k.dedup_blocks += n.c1.dedup_blocks - n.c0.dedup_blocks;
        if (auto* pf = n.cache->prefetcher()) {
          result_.prefetch_started += pf->started();
          result_.prefetch_cancelled += pf->cancelled();
          result_.prefetch_peak_bytes = std::max(result_.prefetch_peak_bytes, double(pf->peak_bytes_in_flight()));
          result_.prefetch_bound_bytes = double(pf->max_bytes_in_flight());
        }
      }
      result_.bytes_hbm_to_dram = double(k.saved_blocks) * block_bytes_;
      result_.bytes_ssd_to_dram = double(k.prefetched_blocks) * block_bytes_;
      result_.bytes_dram_to_ssd = double(k.demoted_blocks) * block_bytes_;
      result_.bytes_dropped = double(k.dropped_blocks) * block_bytes_;
      result_.evicted_sessions = k.dropped_sessions;
      result_.bypassed_blocks = k.bypassed_blocks;
      result_.rejected_blocks = k.rejected_blocks;
      result_.expired_sessions = k.expired_sessions;
      result_.prefetch_waits = k.prefetch_waits;
      result_.bytes_dedup = double(k.dedup_blocks) * block_bytes_;
    }
    result_.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    return result_;
  }

  const trace::workload& w_;
  policy_kind kind_;
  sim_config c_;
  run_mode mode_;
  std::uint32_t tpb_ = 64;
  double block_bytes_ = 0;
  std::uint32_t max_session_blocks_ = 0;
  std::vector<std::unique_ptr<node>> nodes_;  // stable addresses: each cache's io_hook points at its node
  std::vector<std::uint32_t> route_;          // by request: its node
  std::vector<session_rt> rt_;
  std::vector<request_rt> req_rt_;
  std::priority_queue<timed, std::vector<timed>, std::greater<>> arrivals_;
  std::priority_queue<hint_event, std::vector<hint_event>, std::greater<>> hints_;
  std::mt19937_64 hint_rng_{0x68696e74};  // which turns and sessions the front end sees
  std::uniform_real_distribution<double> hint_draw_{0.0, 1.0};
  std::vector<double> checkpoints_;  // simulated times at which predictive's estimates are recorded
  std::size_t next_checkpoint_ = 0;
  double now_ = 0;
  std::uint64_t live_tokens_ = 0;
  double queue_area_ = 0, ws_area_ = 0, prefill_busy_ = 0;
  double stored_dram_area_ = 0, stored_ssd_area_ = 0, referenced_area_ = 0, stored_peak_ = 0;  // blocks (x s)
  double window_start_ = 0, window_end_ = 0;
  // The shared tier: its contents, the writes in flight, and what the window saw.
  std::optional<shared_tier> shared_;
  model_id model_{};
  std::priority_queue<publish_event, std::vector<publish_event>, std::greater<>> publishes_;
  std::vector<publish_data> publish_data_;
  std::vector<std::uint32_t> free_publish_;
  std::uint64_t publish_seq_ = 0;
  double shared_area_ = 0;  // bytes x s
  bool shared_snap_start_ = false, shared_snap_end_ = false;
  std::uint64_t shared_evicted0_ = 0, shared_evicted1_ = 0;
  cluster_observer obs_{};
  std::vector<float> ttft_;
  sim_result result_;
};

}  // namespace attnstore::sim
