// prefetcher: scheduler-aware fetching (CachedAttention section 3.3). Sessions in the
// look-ahead prefetch window over the engine's queue get their KV promoted from SSD to
// DRAM before they are scheduled, so that their turn loads from DRAM. Bytes in flight
// are bounded; a promotion is cancelled cleanly (its reserved DRAM given back, its late
// completion ignored) when the session is evicted, demoted, changed or closed.
// Optionally, after the window, candidates from another source are promoted the same way
// (predictive::for_each_likely: sessions not queued yet but likely to return soon).
//
// The prefetcher decides; the store moves data. It drives a Target (the store, or the
// simulator's stand-in) that provides:
//   std::uint32_t ssd_only_blocks(std::uint32_t record) noexcept;
//       blocks of the session held only on SSD, that a promotion would move.
//   std::uint32_t start_promotion(std::uint32_t record, std::uint32_t max_blocks,
//                                 std::uint64_t ticket) noexcept;
//       reserves DRAM for up to max_blocks of them (making room only by demoting
//       sessions less urgent than this one), submits the reads, and returns how many
//       it started (0: no room, nothing started). Later calls complete(record, ticket).
//   void abort_promotion(std::uint32_t record, std::uint64_t ticket) noexcept;
//       the promotion is cancelled: release its reserved DRAM; the reads' completion,
//       if it still arrives, is ignored (complete() returns 0 for a stale ticket).
//
// Threading: not thread-safe; call it under the same mutex as the eviction policy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/policy/eviction_policy.hpp"

namespace attnstore::policy {

struct prefetcher_options {
  std::uint32_t max_sessions = 0;         ///< record ids are < max_sessions; at least 1
  std::uint64_t block_bytes = 0;          ///< bytes of one block; at least 1
  std::uint64_t max_bytes_in_flight = 0;  ///< bound on bytes being read; at least block_bytes
  /// Prefetch window in queued sessions. 0: the paper's rule, dram_for_prefetch_bytes /
  /// mean session KV size (the mean of the stored sessions, from the policy).
  std::uint32_t window = 0;
  std::uint64_t dram_for_prefetch_bytes = 0;  ///< C_mem of the paper's rule (window 0)
};

class prefetcher {
 public:
  /// Throws std::invalid_argument naming a bad field.
  explicit prefetcher(const prefetcher_options& o) : o_(o), flight_(o.max_sessions) {
    auto fail = [](const std::string& m) { throw std::invalid_argument("prefetcher_options: " + m); };
    if (o.max_sessions == 0) fail("max_sessions is 0, must be at least 1");
    if (o.block_bytes == 0) fail("block_bytes is 0, must be at least 1");
    if (o.max_bytes_in_flight < o.block_bytes)
      fail("max_bytes_in_flight is " + std::to_string(o.max_bytes_in_flight) + ", must be at least block_bytes (" +
           std::to_string(o.block_bytes) + ")");
    if (o.window == 0 && o.dram_for_prefetch_bytes == 0)
      fail("dram_for_prefetch_bytes is 0 with window 0 (automatic); set one of them");
  }

  /// Fixes the window (0: back to the paper's rule from the policy's mean session size).
  void set_window(std::uint32_t sessions) noexcept { o_.window = sessions; }
  /// Sessions the window covers now (the fixed window, or the paper's rule).
  std::uint32_t window(const eviction_policy& p) const noexcept {
    if (o_.window) return o_.window;
    const double mean = p.mean_session_blocks();
    if (mean <= 0) return 0;
    return paper_prefetch_window(o_.dram_for_prefetch_bytes,
                                 std::max<std::uint64_t>(1, std::uint64_t(mean * double(o_.block_bytes))));
  }

  /// Starts promotions for the sessions in the window, front first, while the byte
  /// bound allows. One promotion per session at a time (a session larger than the bound
  /// is promoted in pieces, each started when the previous one completes). Stops at the
  /// first session the target has no room for: those behind it are less urgent.
  /// Returns the promotions started. O(window).
  template <class Target>
  std::uint32_t plan(const eviction_policy& p, Target& target) noexcept {
    return plan(p, target, [](auto&&) noexcept {});
  }
  /// The same, then candidates beyond the queue while the bound allows: `more(visit)`
  /// calls `visit(record)` for each candidate, most urgent first, until it returns true
  /// (predictive::for_each_likely: sessions likely to return soon). The same rules as
  /// for the window: a session in flight is skipped, the first one without room stops
  /// the plan. O(window + candidates visited).
  template <class Target, class More>
  std::uint32_t plan(const eviction_policy& p, Target& target, More&& more) noexcept {
    std::uint32_t started = 0;
    bool stopped = false;
    auto visit = [&](std::uint32_t r) noexcept {
      if (r >= flight_.size() || flight_[r].blocks) return false;
      const std::uint64_t budget = (o_.max_bytes_in_flight - bytes_in_flight_) / o_.block_bytes;
      if (budget == 0) return stopped = true;
      const std::uint32_t missing = target.ssd_only_blocks(r);
      if (missing == 0) return false;
      const std::uint32_t ask = std::uint32_t(std::min<std::uint64_t>(missing, budget));
      const std::uint64_t ticket = ++tickets_;
      const std::uint32_t got = std::min(target.start_promotion(r, ask, ticket), ask);
      if (got == 0) return stopped = true;
      flight_[r] = {ticket, got};
      bytes_in_flight_ += std::uint64_t(got) * o_.block_bytes;
      peak_bytes_in_flight_ = std::max(peak_bytes_in_flight_, bytes_in_flight_);
      ++started_;
      ++started;
      return false;
    };
    p.for_each_queued(window(p), visit);
    if (!stopped) more(visit);
    return started;
  }

  /// The reads of `ticket` finished. Returns the blocks promoted (the caller moves them
  /// into the DRAM it reserved), or 0 when the ticket is stale (the promotion was
  /// cancelled: its DRAM is already released).
  std::uint32_t complete(std::uint32_t r, std::uint64_t ticket) noexcept {
    if (r >= flight_.size() || flight_[r].blocks == 0 || flight_[r].ticket != ticket) return 0;
    const std::uint32_t n = flight_[r].blocks;
    bytes_in_flight_ -= std::uint64_t(n) * o_.block_bytes;
    flight_[r] = {};
    ++completed_;
    return n;
  }

  /// Cancels the session's promotion, if any: target.abort_promotion() releases its
  /// DRAM. Call it before the session is evicted, demoted, truncated, saved or closed.
  /// Returns the blocks that were in flight.
  template <class Target>
  std::uint32_t cancel(std::uint32_t r, Target& target) noexcept {
    if (r >= flight_.size() || flight_[r].blocks == 0) return 0;
    const flight f = flight_[r];
    flight_[r] = {};
    bytes_in_flight_ -= std::uint64_t(f.blocks) * o_.block_bytes;
    ++cancelled_;
    target.abort_promotion(r, f.ticket);
    return f.blocks;
  }

  bool in_flight(std::uint32_t r) const noexcept { return r < flight_.size() && flight_[r].blocks; }
  std::uint32_t blocks_in_flight(std::uint32_t r) const noexcept { return in_flight(r) ? flight_[r].blocks : 0; }
  std::uint64_t ticket(std::uint32_t r) const noexcept { return in_flight(r) ? flight_[r].ticket : 0; }
  std::uint64_t bytes_in_flight() const noexcept { return bytes_in_flight_; }
  std::uint64_t peak_bytes_in_flight() const noexcept { return peak_bytes_in_flight_; }
  std::uint64_t max_bytes_in_flight() const noexcept { return o_.max_bytes_in_flight; }
  std::uint64_t started() const noexcept { return started_; }
  std::uint64_t completed() const noexcept { return completed_; }
  std::uint64_t cancelled() const noexcept { return cancelled_; }
  const prefetcher_options& options() const noexcept { return o_; }

 private:
  struct flight {
    std::uint64_t ticket = 0;
    std::uint32_t blocks = 0;
  };
  prefetcher_options o_;
  std::vector<flight> flight_;
  std::uint64_t tickets_ = 0;
  std::uint64_t bytes_in_flight_ = 0, peak_bytes_in_flight_ = 0;
  std::uint64_t started_ = 0, completed_ = 0, cancelled_ = 0;
};

}  // namespace attnstore::policy
