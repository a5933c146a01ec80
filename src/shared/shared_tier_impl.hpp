// shared_tier's private state (include/attnstore/shared/shared_tier.hpp), shared by
// shared_tier.cpp (construction, stats), shared_tier_read.cpp (fetches) and
// shared_tier_write.cpp (publish and the writer thread).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "attnstore/shared/shared_tier.hpp"

namespace attnstore::shared {

namespace detail {

inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
  c.fetch_add(n, std::memory_order_relaxed);
}

/// shared_miss_counts as atomics.
struct miss_counters {
  std::atomic<std::uint64_t> not_found{0}, verify_failed{0}, timeout{0}, node_down{0}, oom{0}, auth_error{0}, other{0};
  void add(shared_status s) noexcept {
    switch (s) {
      case shared_status::not_found:
        bump(not_found);
        break;
      case shared_status::verify_failed:
        bump(verify_failed);
        break;
      case shared_status::timeout:
        bump(timeout);
        break;
      case shared_status::node_down:
        bump(node_down);
        break;
      case shared_status::oom:
        bump(oom);
        break;
      case shared_status::auth_error:
        bump(auth_error);
        break;
      default:
        bump(other);
        break;
    }
  }
  shared_miss_counts snapshot() const noexcept {
    auto v = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    return {v(not_found), v(verify_failed), v(timeout), v(node_down), v(oom), v(auth_error), v(other)};
  }
};

/// One queued publish: everything the writer sends, owned.
struct write_job {
  shared_session session;
  session_manifest manifest;                          // blocks (chains) computed
  std::vector<std::uint32_t> upload;                  // block indexes with a record to send
  std::vector<std::unique_ptr<std::byte[]>> records;  // one per upload: header area + payload
  std::vector<std::byte> manifest_record;             // encoded
  std::size_t bytes = 0;                              // reserved against max_bytes_in_flight
};

}  // namespace detail

struct shared_tier::impl {
  explicit impl(shared_tier_config c);

  shared_tier_config cfg;
  record_shape shape;
  std::size_t blocks_per_batch = 1;  // block records per pipelined batch
  redis_cluster reader;              // fetches, in the callers' threads
  redis_cluster writer;              // the writer thread's uploads

  struct counters {
    std::atomic<std::uint64_t> manifest_hits{0}, block_hits{0}, blocks_skipped{0}, publishes{0}, publishes_refused{0},
        publishes_dropped{0}, blocks_written{0}, blocks_present{0}, manifests_written{0}, manifests_truncated{0},
        manifests_superseded{0}, bytes_read{0}, bytes_written{0};
    detail::miss_counters manifest_misses, block_misses, write_failures;
  } st;
  std::atomic<std::uint64_t> in_flight{0};

  // The writer: a queue of jobs drained by one thread.
  std::mutex mu;
  std::condition_variable work_cv;  // a job arrived, or stop
  std::condition_variable idle_cv;  // the queue emptied and the writer is idle
  std::deque<std::unique_ptr<detail::write_job>> queue;
  bool working = false;
  bool stopping = false;
  std::thread thread;

  manifest_expectation expectation(const shared_session& s) const noexcept {
    return manifest_expectation{cfg.model, s.session, s.tenant, cfg.tokens_per_block, cfg.limits};
  }
  /// Reserves `bytes` of max_bytes_in_flight; false when they do not fit.
  bool reserve(std::size_t bytes) noexcept;
  void release(std::size_t bytes) noexcept { in_flight.fetch_sub(bytes, std::memory_order_acq_rel); }

  // Record buffers of finished publishes, kept for the next ones: a fresh 1 MiB buffer
  // costs 256 page faults (zeroed pages) on every publish otherwise. Never more than
  // max_bytes_in_flight of them exist, so the pool is bounded by it too.
  std::mutex pool_mu;
  std::vector<std::unique_ptr<std::byte[]>> pool;
  std::unique_ptr<std::byte[]> take_record();
  void give_back(std::vector<std::unique_ptr<std::byte[]>>& records) noexcept;

  void run_writer() noexcept;
  void write(detail::write_job& job) noexcept;
  /// Uploads the job's block records; returns the first block index (in block order) whose
  /// upload failed, or the block count, and that failure's reason in *why.
  std::size_t write_blocks(detail::write_job& job, shared_status* why);
  /// The versioned manifest write (SET ... GET, newer ones put back).
  void write_manifest(const detail::write_job& job, std::span<const std::byte> record);

  /// Sessions whose last publish did not land whole, as bits by session hash: bounded
  /// whatever ids clients choose. Two sessions may share a bit: a false "incomplete"
  /// costs a store one resend; a false "complete" a shorter manifest (a miss, never wrong KV).
  struct session_bits {
    static constexpr std::size_t words = 1024;  // 65,536 bits, 8 KiB
    std::unique_ptr<std::atomic<std::uint64_t>[]> w { new std::atomic<std::uint64_t>[ words ]() };
    static std::size_t bit(const session_hash& s) noexcept { return std::size_t(s.value.lo % (words * 64)); }
    void set(const session_hash& s, bool on) noexcept {
      const std::uint64_t mask = std::uint64_t(1) << (bit(s) % 64);
      if (on)
        w[bit(s) / 64].fetch_or(mask, std::memory_order_relaxed);
      else
        w[bit(s) / 64].fetch_and(~mask, std::memory_order_relaxed);
    }
    bool test(const session_hash& s) const noexcept {
      return (w[bit(s) / 64].load(std::memory_order_relaxed) >> (bit(s) % 64)) & 1;
    }
  } incomplete;
};

}  // namespace attnstore::shared
