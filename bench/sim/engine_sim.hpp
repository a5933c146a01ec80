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
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <optional>
#include <queue>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "tiered_cache.hpp"
#include "trace.hpp"

namespace attnstore::sim {

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
  bool invariants_ok = true;
  std::string invariant_error;

  double hit_rate() const { return history_tokens ? double(hit_tokens) / double(history_tokens) : 0; }
  double dram_hit_rate() const { return history_tokens ? double(dram_hit_tokens) / double(history_tokens) : 0; }
  double ssd_hit_rate() const { return history_tokens ? double(ssd_hit_tokens) / double(history_tokens) : 0; }
  double reuse_rate() const { return history_tokens ? double(reused_tokens) / double(history_tokens) : 0; }
  double shared_hit_rate() const { return history_tokens ? double(shared_hit_tokens) / double(history_tokens) : 0; }
  double work_saved() const { return prefill_work_full_s > 0 ? 1 - prefill_work_s / prefill_work_full_s : 0; }
  double bytes_moved() const {
    return bytes_hbm_to_dram + bytes_dram_to_hbm + bytes_ssd_to_hbm + bytes_ssd_to_dram + bytes_dram_to_ssd;
  }
};

class engine_sim {
 public:
  engine_sim(const trace::workload& w, policy_kind kind, const sim_config& c, run_mode mode = run_mode::normal)
      : w_(w), kind_(kind), c_(c), mode_(mode) {
    const auto& t = c.tiers;
    tpb_ = t.tokens_per_block;
    block_bytes_ = double(tpb_) * c.model.kv_bytes_per_token;
    max_session_blocks_ = c.engine.context_tokens / tpb_ + 2;
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
      cache_.emplace(o, io_hook{this, &engine_sim::on_read});
      flight_done_.assign(cache_->policy().max_sessions(), 0.0);
    }
    rt_.resize(w.sessions());
    req_rt_.resize(w.requests.size());
    if (w.sessions()) {
      window_end_ = w.requests[w.first[w.sessions() - 1]].arrival;
      window_start_ = c.warmup_fraction * window_end_;
    }
    for (double f : {0.02, 0.05, 0.1, 0.2, 0.5, 1.0}) checkpoints_.push_back(f * window_end_);
  }

  sim_result run() {
    const auto wall0 = std::chrono::steady_clock::now();
    std::uint32_t next_session = 0;  // next first-turn arrival (sessions sorted by it)
    std::uint64_t events = 0;
    for (;;) {
      const double t_first = next_session < w_.sessions() ? w_.requests[w_.first[next_session]].arrival : inf;
      const double t_next = arrivals_.empty() ? inf : arrivals_.top().time;
      const double t_arrival = std::min(t_first, t_next);
      const double t_io = io_.empty() ? inf : io_.top().time;
      const double t_hint = hints_.empty() ? inf : hints_.top().time;
      double t_engine = inf;
      const double tau = step_time();
      if (prefilling_ != none_idx)
        t_engine = busy_until_;
      else if (!running_.empty())
        t_engine = now_ + std::max(0.0, running_.top().finish - v_) * tau;
      const double t = std::min({t_arrival, t_io, t_engine, t_hint});
      if (t == inf) break;
      advance(t, tau);
      ++events;
      if (c_.check && cache_ && events % 1000 == 0) verify();
      if (t_hint < t_io && t_hint < t_arrival && t_hint < t_engine) {
        const hint_event ev = hints_.top();
        hints_.pop();
        cache_->hint(sim_session_hash(ev.session), ev.hint, us(now_));
      } else if (t_io <= t_arrival && t_io <= t_engine) {
        const io_event ev = io_.top();
        io_.pop();
        cache_->io_complete(ev.record, ev.ticket);
      } else if (t_arrival <= t_engine) {
        std::uint32_t qi;
        if (t_first <= t_next) {
          qi = w_.first[next_session++];
          rt_[w_.requests[qi].session].arrival = w_.requests[qi].arrival;
        } else {
          qi = arrivals_.top().request;
          arrivals_.pop();
        }
        arrive(qi);
      } else if (prefilling_ != none_idx) {
        const std::uint32_t qi = prefilling_;
        prefilling_ = none_idx;
        running_.push({v_ + double(clipped(w_.requests[qi]).output_tokens), qi});
      } else {
        while (!running_.empty() && running_.top().finish <= v_ + 1e-6) {
          const std::uint32_t qi = running_.top().request;
          running_.pop();
          finish(qi);
        }
      }
      try_admit();
      if (cache_) cache_->plan_prefetch();
    }
    if (c_.check && cache_) verify();
    result_.kind = kind_;
    result_.sim_seconds = now_;
    result_.sessions = w_.sessions();
    const double span = window_end_ - window_start_;
    result_.mean_queue = span > 0 ? queue_area_ / span : 0;
    result_.busy_prefill = span > 0 ? prefill_busy_ / span : 0;
    result_.working_set_bytes = span > 0 ? ws_area_ / span * c_.model.kv_bytes_per_token : 0;
    result_.prefix_sharing = c_.prefix_sharing && w_.prefixes > 0;
    if (span > 0) {
      result_.bytes_stored_dram = stored_dram_area_ / span * block_bytes_;
      result_.bytes_stored_ssd = stored_ssd_area_ / span * block_bytes_;
      result_.bytes_stored = result_.bytes_stored_dram + result_.bytes_stored_ssd;
      result_.bytes_referenced = referenced_area_ / span * block_bytes_;
    }
    result_.bytes_stored_peak = stored_peak_ * block_bytes_;
    result_.dram_bytes = c_.tiers.dram_bytes;
    result_.ssd_bytes = c_.tiers.ssd_bytes;
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
    if (cache_) {
      if (!snap_start_) c0_ = cache_->counters();
      if (!snap_end_) c1_ = cache_->counters();
      cache_counters k = c1_;  // counters over the window
      k.saved_blocks -= c0_.saved_blocks;
      k.prefetched_blocks -= c0_.prefetched_blocks;
      k.demoted_blocks -= c0_.demoted_blocks;
      k.dropped_blocks -= c0_.dropped_blocks;
      k.dropped_sessions -= c0_.dropped_sessions;
      k.bypassed_blocks -= c0_.bypassed_blocks;
      k.rejected_blocks -= c0_.rejected_blocks;
      k.expired_sessions -= c0_.expired_sessions;
      k.prefetch_waits -= c0_.prefetch_waits;
      k.dedup_blocks -= c0_.dedup_blocks;
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
      if (auto* pf = cache_->prefetcher()) {
        result_.prefetch_started = pf->started();
        result_.prefetch_cancelled = pf->cancelled();
        result_.prefetch_peak_bytes = double(pf->peak_bytes_in_flight());
        result_.prefetch_bound_bytes = double(pf->max_bytes_in_flight());
      }
    }
    result_.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    return result_;
  }

  tiered_cache* cache() { return cache_ ? &*cache_ : nullptr; }

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
  struct session_rt {
    std::vector<token_id> tokens;  // current history (after truncations)
    std::uint64_t start = 0;       // absolute position of tokens[0]
    std::uint64_t live = 0;        // tokens counted in the working set
    double arrival = 0;            // arrival of the turn in progress
    std::uint32_t prefix = 0;      // system prompt tokens at the front of tokens (0: none, or cut)
  };
  struct request_rt {
    std::uint64_t ctx = 0;               // context tokens for the decode cost
    std::uint64_t hbm = 0;               // HBM tokens reserved
    std::uint64_t seq = 0;               // arrival order (queue position key)
    std::uint32_t prefix_in_prompt = 0;  // turn 0: system prompt tokens moved to the history
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

  double step_time() const noexcept {
    return c_.engine.decode_step_s + c_.engine.decode_s_per_ctx_token * double(running_ctx_);
  }

  void advance(double t, double tau) {
    const double dt = t - now_;
    if (dt > 0) {
      if (prefilling_ == none_idx && !running_.empty()) v_ += dt / tau;
      // Time inside the measurement window.
      const double in = std::max(0.0, std::min(t, window_end_) - std::max(now_, window_start_));
      if (in > 0) {
        if (prefilling_ != none_idx) prefill_busy_ += in;
        queue_area_ += in * double(queue_.size());
        ws_area_ += in * double(live_tokens_);
        if (cache_) {
          const double d = cache_->stored_dram_blocks(), sd = cache_->stored_ssd_blocks();
          stored_dram_area_ += in * d;
          stored_ssd_area_ += in * sd;
          referenced_area_ += in * double(cache_->referenced_blocks());
          stored_peak_ = std::max(stored_peak_, d + sd);
        }
      }
      if (cache_ && !snap_start_ && t >= window_start_) {
        snap_start_ = true;
        c0_ = cache_->counters();
      }
      if (cache_ && !snap_end_ && t >= window_end_) {
        snap_end_ = true;
        c1_ = cache_->counters();
      }
      while (next_checkpoint_ < checkpoints_.size() && t >= checkpoints_[next_checkpoint_])
        record_learned(checkpoints_[next_checkpoint_++]);
      now_ = t;
    }
  }
  bool measuring() const noexcept { return now_ >= window_start_ && now_ <= window_end_; }

  request_rt& running_rt(std::uint32_t qi) { return req_rt_[qi]; }

  static void on_read(void* self, std::uint32_t record, std::uint32_t blocks, std::uint64_t ticket) {
    auto* s = static_cast<engine_sim*>(self);
    // Prefetch reads queue behind every read already scheduled (FIFO among themselves).
    const double start = std::max({s->now_, s->ssd_read_free_, s->prefetch_free_});
    const double done = start + double(blocks) * s->block_bytes_ / s->c_.tiers.ssd_read_bytes_per_s;
    s->prefetch_free_ = done;
    s->flight_done_[record] = done;
    s->io_.push({done, record, ticket});
  }

  void arrive(std::uint32_t qi) {
    const trace::request& r = w_.requests[qi];
    rt_[r.session].arrival = now_;
    queue_.push_back(qi);
    req_rt_[qi].seq = ++queue_seq_;
    result_.max_queue = std::max(result_.max_queue, double(queue_.size()));
    if (cache_) {
      if (c_.tiers.ttl_s > 0) cache_->expire(us(now_), us(c_.tiers.ttl_s));
      if (!c_.tiers.queue_window || queue_.size() <= c_.tiers.queue_window) show(qi);
    }
  }

  /// The engine tells the cache that request qi waits (it entered the look-ahead).
  void show(std::uint32_t qi) { cache_->enqueue(sim_session_hash(w_.requests[qi].session), req_rt_[qi].seq, us(now_)); }

  void record_learned(double at) {
    if (!cache_ || !cache_->predictive()) return;
    const policy::predictive& p = *cache_->predictive();
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

  void try_admit() {
    const auto& e = c_.engine;
    while (prefilling_ == none_idx && !queue_.empty()) {
      const std::uint32_t qi = queue_.front();
      trace::request r = clipped(w_.requests[qi]);
      session_rt& s = rt_[r.session];
      std::uint64_t hist = s.tokens.size();
      const std::uint64_t need = std::min<std::uint64_t>(hist + r.input_tokens + r.output_tokens, e.context_tokens);
      if (!running_.empty() && (running_.size() >= e.max_batch || hbm_used_ + need > e.hbm_kv_tokens)) return;
      queue_.pop_front();
      if (cache_ && c_.tiers.queue_window && queue_.size() >= c_.tiers.queue_window)
        show(queue_[c_.tiers.queue_window - 1]);  // the next one enters the look-ahead
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
          if (cache_) cache_->truncate(key, std::uint32_t(head / tpb_), std::uint32_t(drop / tpb_), s.tokens);
        }
      }
      std::uint64_t hit = 0, dram = 0, ssd = 0, flying = 0;
      sim::hit h;
      double flight_wait = 0;
      if (mode_ == run_mode::ideal) {
        hit = dram = hist;
      } else if (cache_) {
        h = cache_->admit(key, s.tokens, us(now_), hist + r.input_tokens, shared_blocks_of(s));  // dequeues the session
        hit = h.tokens;
        dram = h.dram_tokens;
        ssd = h.ssd_tokens;
        flying = h.inflight_tokens;
        if (h.waited_ticket && h.record < flight_done_.size())
          flight_wait = std::max(0.0, flight_done_[h.record] - now_);
      }
      // Prefill: DRAM hits load over PCIe layer by layer, hidden behind compute; SSD hits
      // whose promotion is in flight are ready when it completes; other SSD hits are read
      // on demand through the SSD read channel. The engine picks the fastest plan: use or
      // recompute the in-flight part, read as many other SSD hits as arrive within the
      // compute time of the rest, and never do worse than recomputing everything.
      const double kvb = c_.model.kv_bytes_per_token;
      auto compute_s = [&](double n, double ctx) {
        return n * (e.prefill_s_per_token + e.prefill_s_per_token_ctx * (ctx + n / 2));
      };
      const double per_token = e.prefill_s_per_token + e.prefill_s_per_token_ctx * double(hist) / 2;
      // Demand reads go ahead of queued prefetch reads: they wait for other demand reads
      // and at most the one prefetch block being read.
      const double ssd_wait = std::max(0.0, ssd_read_free_ - now_) +
                              (prefetch_free_ > now_ ? block_bytes_ / c_.tiers.ssd_read_bytes_per_s : 0.0);
      const double ssd_per_token = kvb / c_.tiers.ssd_read_bytes_per_s;
      struct plan {
        double time;
        std::uint64_t reused, ssd_read;
      };
      auto make_plan = [&](bool use_flying) {
        // Without waiting for the promotion, its blocks can be read on demand like the rest.
        const std::uint64_t base = dram + (use_flying ? flying : 0);
        const std::uint64_t demand_ssd = ssd - (use_flying ? flying : 0);
        const double recompute = double(hist - base + r.input_tokens);  // before demand SSD reads
        double x = demand_ssd ? (per_token * recompute - ssd_wait) / (per_token + ssd_per_token) : 0;
        const std::uint64_t read = std::uint64_t(std::clamp(x, 0.0, double(demand_ssd)));
        const std::uint64_t reused = base + read;
        double load = double(reused) * kvb / c_.tiers.pcie_bytes_per_s;
        if (use_flying && flying) load = std::max(load, flight_wait);
        if (read) load = std::max(load, ssd_wait + double(read) * ssd_per_token);
        return plan{std::max(compute_s(double(hist - reused + r.input_tokens), double(reused)), load), reused, read};
      };
      plan best{compute_s(double(hist + r.input_tokens), 0), 0, 0};  // recompute everything
      for (bool f : {true, false}) {
        const plan q = make_plan(f);
        if (q.time < best.time) best = q;
        if (!flying) break;
      }
      const std::uint64_t reused = best.reused, ssd_used = best.ssd_read;
      if (ssd_used) ssd_read_free_ = now_ + ssd_wait + double(ssd_used) * ssd_per_token;
      const double p = best.time + e.prefill_overhead_s;
      ++result_.requests;
      if (measuring()) {
        ttft_.push_back(float(now_ + p - s.arrival));
        ++result_.measured_requests;
        result_.history_tokens += hist;
        result_.input_tokens += r.input_tokens;
        result_.output_tokens += r.output_tokens;
        result_.hit_tokens += hit;
        result_.shared_hit_tokens += h.shared_tokens;
        result_.dram_hit_tokens += dram;
        result_.ssd_hit_tokens += ssd;
        result_.reused_tokens += reused;
        result_.prefill_tokens += hist - reused + r.input_tokens;
        result_.prefill_work_s += compute_s(double(hist - reused + r.input_tokens), double(reused));
        result_.prefill_work_full_s += compute_s(double(hist + r.input_tokens), 0);
        if (reused) result_.bytes_dram_to_hbm += double(dram) * kvb;
        result_.bytes_ssd_to_hbm += double(ssd_used) * kvb;
      }
      // The request now runs: prefill, then decode.
      request_rt& rr = running_rt(qi);
      rr.ctx = hist + r.input_tokens + r.output_tokens / 2;
      rr.hbm = need;
      running_ctx_ += rr.ctx;
      hbm_used_ += rr.hbm;
      prefilling_ = qi;
      busy_until_ = now_ + p;
      if (cache_ && kind_ == policy_kind::opt) {
        // OPT's estimate of this session's next use: after this turn and the think time.
        const double end = busy_until_ + double(r.output_tokens) * step_time();
        cache_->set_next_use(h.record, next_use_after(qi, end));
      }
    }
  }

  /// When request `next` arrives if the turn before it completes at `end` (seconds):
  /// at its timestamp (open loop, never before `end`), or its think time after `end`.
  double arrival_after(const trace::request& next, double end) const {
    return w_.open_loop ? std::max(end, next.arrival) : end + next.think;
  }

  /// When the session's next turn arrives if this turn (qi) completes at `end`.
  std::uint64_t next_use_after(std::uint32_t qi, double end) const {
    const trace::request& r = w_.requests[qi];
    if (qi + 1 >= w_.first[r.session + 1]) return policy::belady::never;
    return us(arrival_after(w_.requests[qi + 1], end));
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

  void finish(std::uint32_t qi) {
    const trace::request r = clipped(w_.requests[qi]);
    session_rt& s = rt_[r.session];
    request_rt& rr = running_rt(qi);
    running_ctx_ -= rr.ctx;
    hbm_used_ -= rr.hbm;
    const std::size_t old_size = s.tokens.size();
    if (s.tokens.capacity() < c_.engine.context_tokens + tpb_) s.tokens.reserve(c_.engine.context_tokens + tpb_);
    s.tokens.resize(old_size + r.input_tokens - rr.prefix_in_prompt + r.output_tokens);
    for (std::size_t i = old_size; i < s.tokens.size(); ++i) s.tokens[i] = token_of(r.session, s.start + i);
    const session_hash key = sim_session_hash(r.session);
    const bool last = qi + 1 >= w_.first[r.session + 1];
    if (cache_) {
      cache_->save(key, s.tokens, us(now_), next_use_after(qi, now_), shared_blocks_of(s));
      if (last && c_.close_on_last) cache_->close(key);
      schedule_hint(qi, last);
    }
    if (last) {
      std::vector<token_id>().swap(s.tokens);
      return;
    }
    s.live = s.tokens.size();
    live_tokens_ += s.live;
    const trace::request& n = w_.requests[qi + 1];
    arrivals_.push({arrival_after(n, now_), qi + 1});
  }

  /// What the front end would see next of this session's user, if it is seen at all.
  void schedule_hint(std::uint32_t qi, bool last) {
    if (last) {
      const double leave = w_.requests[qi].leave;
      if (leave > 0 && c_.hint_left > 0 && hint_draw_(hint_rng_) < c_.hint_left)
        hints_.push({now_ + leave, w_.requests[qi].session, policy::session_hint::left});
      return;
    }
    const trace::request& n = w_.requests[qi + 1];
    if (n.typing > 0 && c_.hint_composing > 0 && hint_draw_(hint_rng_) < c_.hint_composing) {
      const double arrival = arrival_after(n, now_);
      hints_.push({std::max(now_, arrival - n.typing), n.session, policy::session_hint::composing});
    }
  }

  void verify() {
    std::string why;
    if (!cache_->check(&why) && result_.invariants_ok) {
      result_.invariants_ok = false;
      result_.invariant_error = why + " (at t=" + std::to_string(now_) + ")";
    }
  }

  const trace::workload& w_;
  policy_kind kind_;
  sim_config c_;
  run_mode mode_;
  std::uint32_t tpb_ = 64;
  double block_bytes_ = 0;
  std::uint32_t max_session_blocks_ = 0;
  std::optional<tiered_cache> cache_;
  std::vector<double> flight_done_;
  std::vector<session_rt> rt_;
  std::vector<request_rt> req_rt_;
  std::priority_queue<timed, std::vector<timed>, std::greater<>> arrivals_;
  std::priority_queue<running_entry, std::vector<running_entry>, std::greater<>> running_;
  std::priority_queue<io_event, std::vector<io_event>, std::greater<>> io_;
  std::priority_queue<hint_event, std::vector<hint_event>, std::greater<>> hints_;
  std::mt19937_64 hint_rng_{0x68696e74};  // which turns and sessions the front end sees
  std::uniform_real_distribution<double> hint_draw_{0.0, 1.0};
  std::deque<std::uint32_t> queue_;
  std::uint64_t queue_seq_ = 0;
  std::vector<double> checkpoints_;  // simulated times at which predictive's estimates are recorded
  std::size_t next_checkpoint_ = 0;
  double now_ = 0, v_ = 0, busy_until_ = 0;
  double ssd_read_free_ = 0;  // demand reads scheduled until
  double prefetch_free_ = 0;  // prefetch reads scheduled until
  std::uint32_t prefilling_ = none_idx;
  std::uint64_t running_ctx_ = 0, hbm_used_ = 0, live_tokens_ = 0;
  double queue_area_ = 0, ws_area_ = 0, prefill_busy_ = 0;
  double stored_dram_area_ = 0, stored_ssd_area_ = 0, referenced_area_ = 0, stored_peak_ = 0;  // blocks (x s)
  double window_start_ = 0, window_end_ = 0;
  bool snap_start_ = false, snap_end_ = false;
  cache_counters c0_{}, c1_{};
  std::vector<float> ttft_;
  sim_result result_;
};

}  // namespace attnstore::sim
