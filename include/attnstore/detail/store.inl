// store bodies. Every record lock taken while another is held is a try_lock (through
// cache_index::try_open_record), so no two operations can wait on each other.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "attnstore/io/posix_device.hpp"
#include "attnstore/io/uring_device.hpp"
#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/policy/scheduler_aware.hpp"

namespace attnstore {

#define ATTNSTORE_STORE_COUNTERS(X)                                                                                   \
  X(lookups)                                                                                                          \
  X(lookup_hits)                                                                                                      \
  X(lookup_misses)                                                                                                    \
  X(tokens_reusable)                                                                                                  \
  X(puts)                                                                                                             \
  X(put_blocks)                                                                                                       \
  X(put_rejected)                                                                                                     \
  X(put_failed)                                                                                                       \
  X(gets)                                                                                                             \
  X(blocks_served_dram)                                                                                               \
  X(blocks_served_ssd)                                                                                                \
  X(miss_not_found)                                                                                                   \
  X(miss_prefix_mismatch) X(miss_checksum) X(miss_io_error) X(checksum_failures) X(io_errors) X(no_space)             \
      X(demoted_blocks) X(promoted_blocks) X(evicted_sessions) X(evicted_blocks) X(dropped_sessions)                  \
          X(ssd_bytes_written) X(ssd_bytes_read) X(recovered_sessions) X(recovered_blocks) X(recovery_dropped_blocks) \
              X(quarantined_slots) X(prefetch_started) X(prefetch_completed) X(prefetch_cancelled)                    \
                  X(prefetched_blocks) X(watermark_demoted_blocks) X(expired_sessions)

struct store::counters {
#define ATTNSTORE_X(name) std::atomic<std::uint64_t> name{0};
  ATTNSTORE_STORE_COUNTERS(ATTNSTORE_X)
#undef ATTNSTORE_X
};

namespace detail {
inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
  c.fetch_add(n, std::memory_order_relaxed);
}
inline std::string hex128(const hash128& h) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64 "%016" PRIx64, h.hi, h.lo);
  return buf;
}
}  // namespace detail

inline store::store(store_config c) : config_(std::move(c)) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("store_config: " + m); };
  geometry_ = config_.geometry.validated();
  if (config_.model_name.empty()) fail("model_name is empty; give the model name or its weights checksum");
  if (config_.tp_size == 0 || config_.tp_rank >= config_.tp_size)
    fail("tp_rank is " + std::to_string(config_.tp_rank) + " with tp_size " + std::to_string(config_.tp_size) +
         "; need tp_size >= 1 and tp_rank < tp_size");
  if (config_.queue_depth == 0 || config_.queue_depth > 1024)
    fail("queue_depth is " + std::to_string(config_.queue_depth) + ", allowed 1..1024");
  if (config_.max_sessions == 0) fail("max_sessions is 0, must be at least 1");
  model_ = make_model_id(
      {config_.model_name, geometry_, config_.rope, config_.keys_pre_rope, config_.tp_rank, config_.tp_size});
  header_bytes_ = format::header_bytes(geometry_.tokens_per_block);
  slot_bytes_ = format::slot_bytes(geometry_);
  if (config_.dram_bytes < slot_bytes_)
    fail("dram_bytes is " + std::to_string(config_.dram_bytes) + ", must hold at least one block (" +
         std::to_string(slot_bytes_) + " bytes with its header)");
  if (config_.ssd_directory.empty() && config_.ssd_bytes > 0) fail("ssd_bytes is set but ssd_directory is empty");
  if (!config_.ssd_directory.empty() && config_.ssd_bytes < slot_bytes_)
    fail("ssd_bytes is " + std::to_string(config_.ssd_bytes) + ", must hold at least one block (" +
         std::to_string(slot_bytes_) + " bytes with its header)");

  const bool pin = config_.pin_host_memory;
  dram_ = std::make_unique<host_arena>(host_arena_options{slot_bytes_, config_.dram_bytes, format::sector,
                                                          std::size_t(1) << 30, pin, pin, false, config_.log});
  std::uint32_t ssd_slots = 0;
  if (!config_.ssd_directory.empty()) {
    const unsigned staging = config_.staging_blocks ? config_.staging_blocks : 4 * config_.queue_depth;
    staging_ = std::make_unique<host_arena>(host_arena_options{slot_bytes_, std::size_t(staging) * slot_bytes_,
                                                               format::sector, std::size_t(1) << 30, pin, pin, false,
                                                               attnstore::logger{&logger::quiet, nullptr}});
    ssd_ = std::make_unique<ssd_space>(ssd_space_options{config_.ssd_directory, slot_bytes_, config_.ssd_bytes,
                                                         std::uint64_t(16) << 30, config_.direct_io,
                                                         config_.require_direct_io, true, 2000, config_.log});
    ssd_slots = ssd_->capacity();
    std::string why;
    if (config_.backend != io_backend::posix) {
      device_ =
          make_uring_device(ssd_->fds(), uring_options{std::max(config_.queue_depth, 8u), true, true, 4096}, &why);
      if (!device_) {
        if (config_.backend == io_backend::io_uring)
          throw std::runtime_error("store: io_uring requested but unavailable: " + why);
        config_.log(log_level::warning, "store: io_uring unavailable (" + why + "); using pread/pwrite");
      }
    }
    if (!device_)
      device_ = make_posix_device(ssd_->fds(), posix_options{config_.posix_threads, config_.queue_depth, 4096});
    if (config_.wrap_device) device_ = config_.wrap_device(std::move(device_), *ssd_);
    std::vector<iovec> regions(dram_->regions().begin(), dram_->regions().end());
    staging_buffer_base_ = std::int32_t(regions.size());
    regions.insert(regions.end(), staging_->regions().begin(), staging_->regions().end());
    if (!device_->register_buffers(regions, &why)) config_.log(log_level::info, "store: " + why);
  }
  if (config_.queue_window == 0 || config_.queue_window > (1u << 20))
    fail("queue_window is " + std::to_string(config_.queue_window) + ", allowed 1..1048576");
  if (!(config_.demote_low_watermark >= 0 && config_.demote_low_watermark <= config_.demote_high_watermark &&
        config_.demote_high_watermark < 1))
    fail("demote_low_watermark " + std::to_string(config_.demote_low_watermark) + " and demote_high_watermark " +
         std::to_string(config_.demote_high_watermark) + ": need 0 <= low <= high < 1");
  if (config_.prefetch_bytes_in_flight && config_.prefetch_bytes_in_flight < geometry_.block_bytes())
    fail("prefetch_bytes_in_flight is " + std::to_string(config_.prefetch_bytes_in_flight) +
         ", must be 0 (automatic) or at least one block (" + std::to_string(geometry_.block_bytes()) + " bytes)");
  if (config_.make_policy) {
    policy_ = config_.make_policy(config_.max_sessions);
    if (!policy_) fail("make_policy returned no policy");
    if (policy_->max_sessions() < config_.max_sessions)
      fail("make_policy made a policy for " + std::to_string(policy_->max_sessions()) + " sessions, need " +
           std::to_string(config_.max_sessions));
  } else {
    // The window is set at each set_queue(): fixed, or the paper's rule from the sizes
    // stored then.
    const std::uint64_t capacity_blocks = std::uint64_t(dram_->capacity()) + ssd_slots;
    if (config_.eviction_policy == "scheduler_aware") {
      policy_ = std::make_unique<policy::scheduler_aware>(
          policy::scheduler_aware_options{config_.max_sessions, config_.eviction_window, capacity_blocks});
    } else if (config_.eviction_policy == "lru") {
      policy_ = std::make_unique<policy::lru>(config_.max_sessions);
    } else if (config_.eviction_policy == "predictive") {
      policy::predictive_options po;
      po.max_sessions = config_.max_sessions;
      po.eviction_window = config_.eviction_window;
      po.capacity_blocks = capacity_blocks;
      po.ticks_per_second = 1e9;  // now() is in nanoseconds
      po.tokens_per_block = geometry_.tokens_per_block;
      auto p = std::make_unique<policy::predictive>(po);
      predictive_ = p.get();
      policy_ = std::move(p);
    } else {
      fail("eviction_policy is \"" + config_.eviction_policy +
           "\"; known: scheduler_aware, lru, predictive (or set make_policy)");
    }
  }
  held_.assign(config_.max_sessions, 0);
  queue_records_.assign(config_.queue_window, policy::no_record);
  queue_hashes_.resize(config_.queue_window);
  zero_page_holder_.reset(std::aligned_alloc(format::sector, format::sector));
  zero_page_ = zero_page_holder_.get();
  if (!zero_page_) throw std::bad_alloc();
  std::memset(zero_page_, 0, format::sector);
  counters_ = std::make_unique<counters>();
  // A block always holds a slot; the extra DRAM-sized share covers blocks being
  // replaced (old and new both exist until the new ones are published).
  const std::uint64_t max_blocks = std::uint64_t(dram_->capacity()) * 2 + ssd_slots + 64;
  if (max_blocks >= no_slot) fail("dram_bytes and ssd_bytes hold too many blocks (max 2^31)");
  index_ = std::make_unique<cache_index>(
      cache_index_options{config_.max_sessions, std::uint32_t(max_blocks), geometry_.tokens_per_block, 64});
  if (ssd_) {
    write_or_check_manifest();
    recover();
    if (config_.prefetch) {
      const std::uint64_t bound =
          config_.prefetch_bytes_in_flight
              ? config_.prefetch_bytes_in_flight
              : std::max<std::uint64_t>(64ull << 20, 4 * std::uint64_t(geometry_.block_bytes()));
      const std::uint64_t for_prefetch =
          config_.dram_for_prefetch_bytes ? config_.dram_for_prefetch_bytes : config_.dram_bytes / 4;
      prefetcher_ = std::make_unique<policy::prefetcher>(
          policy::prefetcher_options{config_.max_sessions, geometry_.block_bytes(), bound, config_.prefetch_window,
                                     std::max<std::uint64_t>(1, for_prefetch)});
      jobs_.resize(config_.max_sessions);
    }
    watermark_ = {std::uint32_t(config_.demote_low_watermark * dram_->capacity()),
                  std::uint32_t(config_.demote_high_watermark * dram_->capacity())};
  }
  const bool work = prefetcher_ || watermark_.low > 0 || config_.session_ttl_ms > 0;
  if (config_.background_thread && work) worker_ = std::thread([this] { background_loop(); });
}

inline store::~store() {
  if (worker_.joinable()) {
    {
      std::lock_guard lock(work_mutex_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    worker_.join();
  }
}

inline std::string_view store::io_backend_name() const noexcept { return device_ ? device_->name() : "none"; }

inline store_stats store::stats() const noexcept {
  store_stats s;
#define ATTNSTORE_X(name) s.name = counters_->name.load(std::memory_order_relaxed);
  ATTNSTORE_STORE_COUNTERS(ATTNSTORE_X)
#undef ATTNSTORE_X
  s.dram_used_bytes = std::uint64_t(dram_->used()) * slot_bytes_;
  s.dram_capacity_bytes = std::uint64_t(dram_->capacity()) * slot_bytes_;
  if (ssd_) {
    s.ssd_used_bytes = std::uint64_t(ssd_->used()) * slot_bytes_;
    s.ssd_capacity_bytes = std::uint64_t(ssd_->capacity()) * slot_bytes_;
  }
  s.sessions = index_->live_sessions();
  return s;
}

// ---------------------------------------------------------------- lookup

inline lookup_result store::lookup(const session_key& key, std::span<const token_id> prompt,
                                   std::span<block_location> out) noexcept {
  detail::bump(counters_->lookups);
  lookup_result r;
  const session_hash h = hash_session(key);
  if (locked_session s = index_->open(h, false)) {
    r = index_->lookup(s, model_, prompt, out);
    note(s, true, prompt.size());
  } else {
    note_miss(h);
  }
  if (r.tokens > 0) {
    detail::bump(counters_->lookup_hits);
    detail::bump(counters_->tokens_reusable, r.tokens);
  } else {
    detail::bump(counters_->lookup_misses);
  }
  return r;
}

// ---------------------------------------------------------------- eviction helpers

template <class Outcome>
void store::erase_headers(std::span<const std::uint32_t> slots, Outcome&& outcome) noexcept {
  for (std::size_t base = 0; base < slots.size(); base += batch_max) {
    io_request reqs[batch_max];
    const std::size_t n = std::min<std::size_t>(batch_max, slots.size() - base);
    for (std::size_t i = 0; i < n; ++i)
      reqs[i] = io_request{io_op::write,
                           ssd_->file_of(slots[base + i]),
                           ssd_->offset_of(slots[base + i]),
                           zero_page_,
                           std::uint32_t(format::sector),
                           -1,
                           0};
    if (device_->execute(std::span(reqs, n), config_.queue_depth) != errc::ok)
      for (std::size_t i = 0; i < n; ++i)
        if (reqs[i].result != std::int32_t(format::sector)) (void)device_->execute(std::span(&reqs[i], 1));
    for (std::size_t i = 0; i < n; ++i) outcome(slots[base + i], reqs[i].result == std::int32_t(format::sector));
  }
}

inline errc store::invalidate_ssd(std::span<const std::uint32_t> slots) noexcept {
  // Zero the header sector first so a restart cannot bring the block back. A slot whose
  // header cannot be erased (after one retry) is quarantined, not reused: reusing it
  // would let a later partial write pair its old header with new data.
  errc status = errc::ok;
  erase_headers(slots, [&](std::uint32_t slot, bool erased) {
    if (erased) {
      ssd_->release(slot);
    } else {
      detail::bump(counters_->io_errors);
      detail::bump(counters_->quarantined_slots);
      status = errc::device_error;
    }
  });
  return status;
}

inline errc store::release_chain(std::uint32_t first) noexcept {
  // The blocks are detached from their session (or never were in one).
  std::uint32_t ssd_slots[batch_max];
  std::size_t n = 0;
  errc status = errc::ok;
  for (std::uint32_t b = first; b != no_slot;) {
    block_meta& m = index_->block(b);
    const std::uint32_t next = m.next;
    if (m.dram_slot != no_slot) dram_->release(m.dram_slot);
    if (m.ssd_slot != no_slot) {
      ssd_slots[n++] = m.ssd_slot;
      if (n == batch_max) {
        if (invalidate_ssd(std::span(ssd_slots, n)) != errc::ok) status = errc::device_error;
        n = 0;
      }
    }
    index_->release_block(b);
    b = next;
  }
  if (n && invalidate_ssd(std::span(ssd_slots, n)) != errc::ok) status = errc::device_error;
  return status;
}

inline errc store::drop_locked(locked_session& s) noexcept {
  errc e = release_chain(s.truncate(0));
  erase_record(s);
  return e;
}

inline bool store::evict_some_ssd_victim(std::uint32_t exclude_a, std::uint32_t exclude_b) noexcept {
  locked_session victim = pick_victim(
      policy::level::ssd, [](locked_session& h) { return h.ssd_blocks() > 0; }, exclude_a, exclude_b);
  if (!victim) return false;
  detail::bump(counters_->evicted_sessions);
  detail::bump(counters_->evicted_blocks, victim.block_count());
  drop_locked(victim);
  return true;
}

template <class Want>
locked_session store::pick_victim(policy::level where, Want&& want, std::uint32_t exclude_a,
                                  std::uint32_t exclude_b) noexcept {
  locked_session victim;
  std::lock_guard lock(policy_mutex_);
  policy_->pick_victim(where, [&](std::uint32_t rec) noexcept {
    if (rec == exclude_a || rec == exclude_b) return false;
    locked_session h = index_->try_open_record(rec);  // never waits: we hold the policy mutex
    if (!h || h.pins() > 0 || !want(h)) return false;
    victim = std::move(h);
    return true;
  });
  return victim;
}

// ---------------------------------------------------------------- policy events

// What the prefetcher drives: the store's promotions run on the background thread.
struct store::prefetch_target {
  store* self;
  bool beyond_queue = false;  // planning likely returners (after the queue window)
  // Every published block has a DRAM or an SSD slot: the rest of the session is SSD-only.
  std::uint32_t ssd_only_blocks(std::uint32_t rec) const noexcept {
    return self->held_[rec] - self->policy_->blocks(rec, policy::level::dram);
  }
  // Queues the promotion; the DRAM is taken when it runs (only free DRAM, or DRAM of
  // sessions that are not queued), so a full queue of jobs is the only refusal here.
  std::uint32_t start_promotion(std::uint32_t rec, std::uint32_t max_blocks, std::uint64_t ticket) noexcept {
    if (!beyond_queue && self->no_room_until_ && self->now() < self->no_room_until_) return 0;
    if (beyond_queue) {  // only free DRAM above what the watermark keeps for saves
      const std::uint32_t free = self->dram_->capacity() - self->dram_->used();
      if (free <= self->watermark_.high) return 0;
      max_blocks = std::min(max_blocks, free - self->watermark_.high);
    }
    std::lock_guard lock(self->work_mutex_);
    if (self->job_count_ == self->jobs_.size()) return 0;
    self->jobs_[(self->job_head_ + self->job_count_++) % self->jobs_.size()] = {rec, max_blocks, ticket, beyond_queue};
    detail::bump(self->counters_->prefetch_started);
    return max_blocks;
  }
  // Nothing is reserved before the job runs, and a job whose ticket is stale does nothing.
  void abort_promotion(std::uint32_t, std::uint64_t) noexcept {}
};

inline std::uint64_t store::now() const noexcept {
  if (config_.clock) return config_.clock();
  return std::uint64_t(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

inline void store::note(locked_session& s, bool accessed, std::size_t prompt_tokens) noexcept {
  const std::uint32_t rec = s.record_id();
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  if (!policy_->live(rec)) policy_->on_insert(rec, t, identity_of(s.key()));
  // Blocks first, then the access: a policy that learns reads "an access after which the
  // session holds more blocks" as a turn's end, and one without new blocks as a return.
  policy_->on_blocks(rec, policy::level::dram, s.dram_blocks());
  policy_->on_blocks(rec, policy::level::ssd, s.ssd_blocks());
  if (accessed) policy_->on_access(rec, t);
  if (prompt_tokens > 0) policy_->on_prompt(rec, prompt_tokens);
  set_held_locked(rec, s.block_count());
}

inline void store::note_miss(const session_hash& key) noexcept {
  // Only a learning policy (predictive, or an embedder's own) does anything with a miss:
  // spare the built-in ones the clock read and the policy lock.
  if (!predictive_ && !config_.make_policy) return;
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  policy_->on_miss(identity_of(key), t);
}

inline void store::erase_record(locked_session& s) noexcept {
  {
    std::lock_guard lock(policy_mutex_);
    const std::uint32_t rec = s.record_id();
    if (prefetcher_) {
      prefetch_target target{this};
      if (prefetcher_->cancel(rec, target)) detail::bump(counters_->prefetch_cancelled);
    }
    policy_->on_erase(rec);
    set_held_locked(rec, 0);
  }
  s.erase();
}

// ---------------------------------------------------------------- the engine queue and prefetch

inline void store::plan_prefetch_locked(bool likely) noexcept {
  if (!prefetcher_) return;
  prefetch_target target{this};
  std::uint32_t started;
  if (likely && predictive_) {
    // After the queue window, sessions likely to return soon (into free DRAM only).
    started = prefetcher_->plan(*policy_, target, [&](auto&& visit) {
      target.beyond_queue = true;
      predictive_->for_each_likely(likely_per_plan, visit);
    });
  } else {
    started = prefetcher_->plan(*policy_, target);
  }
  if (started > 0) wake_background();
}

inline void store::set_held_locked(std::uint32_t rec, std::uint32_t blocks) noexcept {
  held_sessions_ += (blocks > 0) - (held_[rec] > 0);
  held_total_ += blocks;
  held_total_ -= held_[rec];
  held_[rec] = blocks;
}

inline void store::size_windows_locked(std::size_t queued) noexcept {
  // The paper's rules divide capacities by the mean session size: distinct blocks per
  // stored session (a block with a DRAM and an SSD copy counts once).
  const std::uint64_t mean = held_sessions_ ? std::max<std::uint64_t>(1, held_total_ / held_sessions_) : 0;
  // An embedder's own policy keeps its own window unless one is configured.
  if (config_.eviction_window) {
    policy_->set_window(config_.eviction_window);
  } else if (!config_.make_policy) {
    const std::uint64_t ssd_blocks = ssd_ ? ssd_->capacity() : 0;
    policy_->set_window(mean ? policy::paper_eviction_window(dram_->capacity(), ssd_blocks, mean)
                             : std::uint32_t(queued));
  }
  if (prefetcher_ && config_.prefetch_window == 0 && mean) {
    const std::uint64_t for_prefetch =
        config_.dram_for_prefetch_bytes ? config_.dram_for_prefetch_bytes : config_.dram_bytes / 4;
    prefetcher_->set_window(policy::paper_prefetch_window(for_prefetch, mean * geometry_.block_bytes()));
  }
}

inline void store::set_queue(std::span<const session_key> waiting) noexcept {
  const std::size_t n = std::min<std::size_t>(waiting.size(), config_.queue_window);
  std::lock_guard queue_lock(queue_mutex_);  // hashing happens outside the policy mutex
  for (std::size_t k = 0; k < n; ++k) queue_hashes_[k] = hash_session(waiting[k]);
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  for (std::size_t k = 0; k < n; ++k) {
    queue_records_[k] = index_->find(queue_hashes_[k]);
    // A queued session that is not stored has come back: a policy that evicted it learns
    // its idle time (a ghost is counted once; later calls find it counted).
    if (queue_records_[k] == no_slot) policy_->on_miss(identity_of(queue_hashes_[k]), t);
  }
  // A record found here but erased before the policy hears of it is not live in the
  // policy, which skips it.
  policy_->set_queue(std::span<const std::uint32_t>(queue_records_.data(), n), t);
  size_windows_locked(n);
  plan_prefetch_locked(false);
}

inline errc store::hint(const session_key& key, policy::session_hint hint) noexcept {
  const session_hash h = hash_session(key);  // outside the policy mutex
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  const std::uint32_t rec = index_->find(h);
  if (rec == no_slot || !policy_->live(rec)) return errc::not_found;
  policy_->on_hint(rec, hint, t);
  // A user about to send may be worth bringing up from SSD now.
  if (hint == policy::session_hint::composing) plan_prefetch_locked(true);
  return errc::ok;
}

inline std::uint32_t store::alloc_ssd(std::uint32_t exclude_a, std::uint32_t exclude_b, bool may_evict) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::uint32_t slot = ssd_->allocate();
    if (slot != no_slot) return slot;
    if (!may_evict || !evict_some_ssd_victim(exclude_a, exclude_b)) break;
  }
  return no_slot;
}

inline errc store::write_ssd_blocks(locked_session& s, std::span<const std::uint32_t> blocks,
                                    std::span<const std::uint32_t> positions, std::span<const std::uint32_t> ssd_slots,
                                    std::span<std::int32_t> results, const put_group& group) noexcept {
  errc first = errc::ok;
  for (std::size_t base = 0; base < blocks.size(); base += batch_max) {
    io_request reqs[batch_max];
    std::uint64_t seqs[batch_max];
    const std::size_t n = std::min<std::size_t>(batch_max, blocks.size() - base);
    for (std::size_t i = 0; i < n; ++i) {
      block_meta& m = s.meta(blocks[base + i]);
      const std::uint32_t pos = positions[base + i];
      format::block_header h{};
      if (group.first_sequence) {
        seqs[i] = group.first_sequence + (pos - group.first_block);
        h.put_first_block = group.first_block;
        h.put_blocks = group.blocks;
      } else {
        seqs[i] = sequence_.fetch_add(1, std::memory_order_relaxed);
        h.put_first_block = pos;
        h.put_blocks = 1;
      }
      h.header_bytes = std::uint32_t(header_bytes_);
      h.model = model_.value;
      h.session = s.key().value;
      h.block_index = positions[base + i];
      h.chain = m.chain;
      h.payload_bytes = std::uint32_t(geometry_.block_bytes());
      h.payload_checksum = m.checksum;
      h.sequence = seqs[i];
      h.tokens_per_block = geometry_.tokens_per_block;
      format::write_header(dram_->data(m.dram_slot), h, s.tokens_of(blocks[base + i]));
      const std::uint32_t ss = ssd_slots[base + i];
      reqs[i] = io_request{io_op::write,
                           ssd_->file_of(ss),
                           ssd_->offset_of(ss),
                           dram_->data(m.dram_slot),
                           std::uint32_t(slot_bytes_),
                           dram_->region_of(m.dram_slot),
                           0};
    }
    errc e = device_->execute(std::span(reqs, n), config_.queue_depth);
    if (e != errc::ok && first == errc::ok) first = e;
    for (std::size_t i = 0; i < n; ++i) {
      results[base + i] = reqs[i].result;
      if (reqs[i].result == std::int32_t(slot_bytes_)) {
        s.meta(blocks[base + i]).sequence = seqs[i];
        detail::bump(counters_->ssd_bytes_written, slot_bytes_);
      } else {
        detail::bump(counters_->io_errors);
      }
    }
  }
  return first;
}

inline errc store::demote_locked(locked_session& s, std::uint32_t until_position, std::uint32_t exclude,
                                 bool may_evict) noexcept {
  if (!ssd_) return errc::unsupported;
  std::uint32_t blocks[batch_max], positions[batch_max], slots[batch_max];
  std::int32_t results[batch_max];
  errc status = errc::ok;
  std::uint32_t pos = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot && pos < until_position && status == errc::ok;) {
    // Gather up to batch_max DRAM-only blocks, then write them as one batch.
    std::size_t n = 0;
    for (; b != no_slot && pos < until_position && n < batch_max; b = s.meta(b).next, ++pos) {
      block_meta& m = s.meta(b);
      if (m.dram_slot == no_slot) continue;
      if (m.ssd_slot != no_slot) {  // already durable: the DRAM copy just goes
        dram_->release(m.dram_slot);
        m.dram_slot = no_slot;
        detail::bump(counters_->demoted_blocks);
        continue;
      }
      std::uint32_t ss = alloc_ssd(s.record_id(), exclude, may_evict);
      if (ss == no_slot) {
        status = errc::no_space;
        break;
      }
      blocks[n] = b;
      positions[n] = std::uint32_t(m.saved_pos / geometry_.tokens_per_block);  // the header's block_index
      slots[n] = ss;
      ++n;
    }
    if (n == 0) continue;
    errc e =
        write_ssd_blocks(s, std::span(blocks, n), std::span(positions, n), std::span(slots, n), std::span(results, n));
    for (std::size_t i = 0; i < n; ++i) {
      block_meta& m = s.meta(blocks[i]);
      if (results[i] == std::int32_t(slot_bytes_)) {
        m.ssd_slot = slots[i];
        dram_->release(m.dram_slot);
        m.dram_slot = no_slot;
        detail::bump(counters_->demoted_blocks);
      } else {
        invalidate_ssd(std::span(&slots[i], 1));  // the DRAM copy stays: nothing is lost
      }
    }
    if (e != errc::ok) status = e;
  }
  s.count_tiers();
  note(s, false);
  return status;
}

inline std::uint32_t store::demote_some_victim(std::uint32_t exclude, bool background) noexcept {
  // `want` runs under the policy mutex, so it may ask the policy.
  locked_session victim = pick_victim(
      policy::level::dram,
      [&](locked_session& h) { return h.dram_blocks() > 0 && !(background && policy_->queued(h.record_id())); },
      exclude, no_slot);
  if (!victim) return 0;
  const std::uint32_t before = victim.dram_blocks();
  // Background work takes only free SSD slots: it must not drop data to make room.
  const errc e = demote_locked(victim, no_slot, exclude, !background);
  if (background) return before - victim.dram_blocks();
  if (e != errc::ok && victim.dram_blocks() > 0) {
    // No SSD tier, SSD full of protected data, or an I/O error: the cache gives the
    // least recently used session up rather than refusing the new one.
    detail::bump(counters_->evicted_sessions);
    detail::bump(counters_->evicted_blocks, victim.block_count());
    drop_locked(victim);
    return before;
  }
  return before - victim.dram_blocks();
}

inline std::uint32_t store::alloc_dram(locked_session& self, std::uint32_t self_keep_from) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::uint32_t slot = dram_->allocate();
    if (slot != no_slot) return slot;
    if (demote_some_victim(self ? self.record_id() : no_slot)) continue;
    // Nobody else to demote: move this session's own older blocks down.
    if (self && self_keep_from > 0 && self.dram_blocks() > 0 && ssd_) {
      const std::uint32_t before = dram_->used();
      (void)demote_locked(self, self_keep_from, no_slot);
      if (dram_->used() < before) continue;
    }
    break;
  }
  return no_slot;
}

inline locked_session store::open_or_evict(const session_hash& key) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    locked_session s = index_->open(key, true);
    if (s) return s;
    // Every record is live: drop the policy's first victim, from SSD, else from DRAM,
    // else any idle session that holds no blocks (the policy ranks only those with some).
    auto any = [](locked_session&) { return true; };
    locked_session victim = pick_victim(policy::level::ssd, any, no_slot, no_slot);
    if (!victim) victim = pick_victim(policy::level::dram, any, no_slot, no_slot);
    for (std::uint32_t rec = 0; !victim && rec < index_->max_sessions(); ++rec) {
      locked_session h = index_->try_open_record(rec);
      if (h && h.pins() == 0 && h.block_count() == 0) victim = std::move(h);
    }
    if (!victim) return {};
    detail::bump(counters_->evicted_sessions);
    detail::bump(counters_->evicted_blocks, victim.block_count());
    drop_locked(victim);
  }
  return {};
}

// ---------------------------------------------------------------- save: reserve, commit, abort

inline errc store::reserve_locked(locked_session& s, std::span<const token_id> tokens, std::uint32_t first_block,
                                  save_reservation& r) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  if (tokens.empty() || first_block >= total) {
    config_.log(log_level::error, "store: save of " + std::to_string(tokens.size()) + " tokens (" +
                                      std::to_string(total) + " blocks) from first_block " +
                                      std::to_string(first_block) + "; need tokens and first_block < blocks");
    return errc::invalid_argument;
  }
  // The stored view up to position first_block x tokens_per_block must be these
  // tokens: chain hashes for untruncated blocks, token ids in a truncated view.
  const std::uint64_t boundary = std::uint64_t(first_block) * tpb;
  hash128 prev{};
  std::uint64_t pos = 0;
  std::uint32_t from = 0;
  std::uint32_t b = s.first_block();
  for (; b != no_slot && pos < boundary; b = s.meta(b).next, ++from) {
    const block_meta& m = s.meta(b);
    if (pos + m.view_count > boundary || pos + m.view_count > tokens.size()) return errc::rejected;
    const auto want = tokens.subspan(pos, m.view_count);
    if (s.truncated()) {
      const auto have = s.tokens_of(b).subspan(m.view_first, m.view_count);
      if (!std::equal(have.begin(), have.end(), want.begin())) return errc::rejected;
    } else if (!(m.chain == chain_hash(prev, model_, want))) {
      return errc::rejected;
    }
    prev = m.chain;
    pos += m.view_count;
  }
  if (pos != boundary) return errc::rejected;
  // The blocks this save replaces stay published until commit. Those already on SSD
  // give their DRAM copy up now, so a session that fills most of DRAM can still be
  // replaced; nothing is lost if the save fails.
  for (std::uint32_t o = b; o != no_slot; o = s.meta(o).next) {
    block_meta& m = s.meta(o);
    if (m.dram_slot != no_slot && m.ssd_slot != no_slot) {
      dram_->release(m.dram_slot);
      m.dram_slot = no_slot;
    }
  }
  s.count_tiers();
  note(s, false);
  r = save_reservation{};
  r.key = s.key();
  r.first_block = first_block;
  r.blocks = total - first_block;
  r.prev_chain = prev;
  r.from_entry = from;
  std::uint32_t tail = no_slot;
  for (std::uint32_t i = first_block; i < total; ++i) {
    const std::size_t begin = std::size_t(i) * tpb;
    const auto toks = tokens.subspan(begin, std::min<std::size_t>(tpb, tokens.size() - begin));
    std::uint32_t nb = s.new_block(toks);
    if (nb != no_slot) {
      if (tail == no_slot)
        r.head = nb;
      else
        s.meta(tail).next = nb;
      tail = nb;
      block_meta& m = s.meta(nb);
      m.saved_pos = begin;
      m.chain = prev = chain_hash(prev, model_, toks);
      m.dram_slot = alloc_dram(s, no_slot);  // may demote any of this session's published blocks
    }
    if (nb == no_slot || s.meta(nb).dram_slot == no_slot) {
      release_chain(r.head);
      r = save_reservation{};
      return errc::no_space;
    }
  }
  s.pin();  // the session cannot be evicted under an open save
  return errc::ok;
}

inline errc store::commit_locked(locked_session& s, save_reservation& r, bool checksums_known) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  const std::size_t bb = geometry_.block_bytes();
  auto fail = [&](errc e) {
    release_chain(r.head);
    s.unpin();
    erase_if_empty(s);
    if (e == errc::no_space) detail::bump(counters_->no_space);
    if (e == errc::rejected)
      detail::bump(counters_->put_rejected);
    else
      detail::bump(counters_->put_failed);
    r = save_reservation{};
    return e;
  };
  // The prefix the reservation extends may have changed since (an edit, a drop, a
  // truncation).
  if (r.from_entry > 0) {
    std::uint32_t b = s.block_at(r.from_entry - 1);
    if (b == no_slot || !(s.meta(b).chain == r.prev_chain) ||
        s.meta(b).saved_pos + s.meta(b).view_first + s.meta(b).view_count + s.meta(b).shift !=
            std::uint64_t(r.first_block) * tpb)
      return fail(errc::rejected);
  }
  if (!checksums_known)
    for (std::uint32_t b = r.head; b != no_slot; b = s.meta(b).next)
      s.meta(b).checksum = checksum64(dram_payload(s.meta(b).dram_slot), bb);
  if (config_.write_through && ssd_) {
    std::uint32_t bl[batch_max], pos[batch_max], slots[batch_max];
    std::int32_t results[batch_max];
    std::uint32_t i = r.first_block;
    // The whole put is one group: after a crash either all its blocks count or none,
    // so a replaced history is never cut down to the new version's first blocks.
    const put_group group{sequence_.fetch_add(r.blocks, std::memory_order_relaxed), r.first_block, r.blocks};
    for (std::uint32_t b = r.head; b != no_slot;) {
      std::size_t n = 0;
      for (; b != no_slot && n < batch_max; b = s.meta(b).next, ++i, ++n) {
        slots[n] = alloc_ssd(s.record_id(), no_slot);
        if (slots[n] == no_slot) {
          invalidate_ssd(std::span(slots, n));
          return fail(errc::no_space);
        }
        bl[n] = b;
        pos[n] = i;
      }
      errc e =
          write_ssd_blocks(s, std::span(bl, n), std::span(pos, n), std::span(slots, n), std::span(results, n), group);
      for (std::size_t k = 0; k < n; ++k) {
        if (results[k] == std::int32_t(slot_bytes_))
          s.meta(bl[k]).ssd_slot = slots[k];
        else
          invalidate_ssd(std::span(&slots[k], 1));
      }
      if (e != errc::ok) return fail(e);
    }
    if (errc e = device_->sync(); e != errc::ok) return fail(e);
  }
  release_chain(s.publish(r.from_entry, r.head, r.blocks));
  if (r.from_entry == 0) s.set_truncated(false);  // the whole view is new
  detail::bump(counters_->put_blocks, r.blocks);
  s.unpin();
  note(s, true);
  r = save_reservation{};
  // Demote ahead of need, so the next saves find free DRAM without waiting.
  if (watermark_.should_start(dram_->capacity() - dram_->used())) {
    {
      std::lock_guard lock(work_mutex_);
      demotion_wanted_ = true;
    }
    wake_background();
  }
  return errc::ok;
}

inline errc store::reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                           std::span<std::byte*> payloads, save_reservation& r) noexcept {
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  if (first_block < total && payloads.size() < total - first_block) {
    config_.log(log_level::error, "store::reserve: payloads has " + std::to_string(payloads.size()) +
                                      " entries, need " + std::to_string(total - first_block));
    return errc::invalid_argument;
  }
  locked_session s = open_or_evict(hash_session(key));
  if (!s) return errc::no_space;
  errc e = reserve_locked(s, tokens, first_block, r);
  if (e != errc::ok) {
    erase_if_empty(s);
    return e;
  }
  std::size_t i = 0;
  for (std::uint32_t b = r.head; b != no_slot; b = s.meta(b).next) payloads[i++] = dram_payload(s.meta(b).dram_slot);
  return errc::ok;
}

inline errc store::commit(save_reservation& r) noexcept {
  if (!r) return errc::bad_state;
  detail::bump(counters_->puts);
  locked_session s = index_->open(r.key, false);
  if (!s) {  // dropped meanwhile: the reserved blocks go
    release_chain(r.head);
    r = save_reservation{};
    return errc::not_found;
  }
  return commit_locked(s, r, false);
}

inline void store::abort(save_reservation& r) noexcept {
  if (!r) return;
  locked_session s = index_->open(r.key, false);
  release_chain(r.head);
  if (s) {
    s.unpin();
    erase_if_empty(s);
  }
  r = save_reservation{};
}

// ---------------------------------------------------------------- put

inline errc store::put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                       std::span<const std::byte> blocks) noexcept {
  detail::bump(counters_->puts);
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  const std::size_t bb = geometry_.block_bytes();
  if (tokens.empty() || first_block >= total || blocks.size() != std::size_t(total - first_block) * bb) {
    config_.log(log_level::error,
                "store::put: got " + std::to_string(tokens.size()) + " tokens (" + std::to_string(total) +
                    " blocks), first_block " + std::to_string(first_block) + " and " + std::to_string(blocks.size()) +
                    " bytes; need tokens non-empty, first_block < blocks and (blocks - first_block) x " +
                    std::to_string(bb) + " bytes");
    detail::bump(counters_->put_failed);
    return errc::invalid_argument;
  }
  locked_session s = open_or_evict(hash_session(key));
  if (!s) {
    detail::bump(counters_->no_space);
    detail::bump(counters_->put_failed);
    return errc::no_space;
  }
  save_reservation r;
  if (errc e = reserve_locked(s, tokens, first_block, r); e != errc::ok) {
    erase_if_empty(s);
    detail::bump(e == errc::rejected ? counters_->put_rejected : counters_->put_failed);
    if (e == errc::no_space) detail::bump(counters_->no_space);
    return e;
  }
  const std::byte* src = blocks.data();
  for (std::uint32_t b = r.head; b != no_slot; b = s.meta(b).next, src += bb)
    s.meta(b).checksum = copy_with_checksum(dram_payload(s.meta(b).dram_slot), src, bb);  // one pass: copy + hash
  return commit_locked(s, r, true);
}

// ---------------------------------------------------------------- get and acquire

inline get_result store::get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                             std::uint32_t block_count, std::span<std::byte> out) noexcept {
  detail::bump(counters_->gets);
  const std::size_t bb = geometry_.block_bytes();
  if (out.size() != std::size_t(block_count) * bb || block_count == 0) {
    config_.log(log_level::error,
                "store::get: out is " + std::to_string(out.size()) + " bytes for " + std::to_string(block_count) +
                    " blocks; need block_count >= 1 and block_count x " + std::to_string(bb) + " bytes");
    return {errc::invalid_argument, 0, 0};
  }
  const session_hash h = hash_session(key);
  locked_session s = index_->open(h, false);
  if (!s) {
    detail::bump(counters_->miss_not_found);
    note_miss(h);
    return {errc::not_found, 0, 0};
  }
  // A truncated view is not whole blocks at block-aligned positions: it is loaded
  // through acquire() (the hooks), which places and re-rotates each kept range.
  if (s.truncated()) return {errc::unsupported, 0, 0};
  return serve_locked(s, prompt, first_block, block_count, out, {});
}

inline get_result store::acquire(const session_key& key, std::span<const token_id> prompt,
                                 std::span<block_view> views) noexcept {
  detail::bump(counters_->gets);
  const session_hash h = hash_session(key);
  locked_session s = index_->open(h, false);
  if (!s) {
    detail::bump(counters_->miss_not_found);
    note_miss(h);
    return {errc::not_found, 0, 0};
  }
  get_result res = serve_locked(s, prompt, 0, std::uint32_t(views.size()), {}, views);
  if (res.status == errc::not_found) res.status = errc::ok;  // fewer blocks than views is normal here
  if (res.blocks > 0) s.pin();
  return res;
}

inline void store::release(const session_hash& key) noexcept {
  locked_session s = index_->open(key, false);
  if (s) s.unpin();
}

// One batch of SSD reads. A buffer slot is in the DRAM tier (promoted: the block stays
// there) or in the staging arena (read only to be copied out).
struct store::ssd_read_batch {
  struct pending_read {
    std::uint32_t block, position, buffer_slot;  // position: entry index in the view
    bool promoted;
    std::uint32_t matched;
    errc verdict;
    std::uint32_t first;          // first used token inside the block
    std::uint64_t view_position;  // view position of that token
  };
  ssd_read_batch(locked_session* s, std::byte* copy_to, std::uint32_t first) noexcept
      : session(s), out(copy_to), first_block(first) {}
  locked_session* session;
  std::byte* out;  // copy each verified payload to out + (position - first_block) blocks; null: no copy
  std::uint32_t first_block;
  std::size_t count = 0;
  store* self = nullptr;
  pending_read pending[batch_max];
  io_request reqs[batch_max];
};

inline void store::read_ssd_batch(ssd_read_batch& rb) noexcept {
  rb.self = this;
  for (std::size_t i = 0; i < rb.count; ++i) {
    const ssd_read_batch::pending_read& p = rb.pending[i];
    const block_meta& m = rb.session->meta(p.block);
    host_arena& arena = p.promoted ? *dram_ : *staging_;
    const std::int32_t region =
        p.promoted ? dram_->region_of(p.buffer_slot) : staging_buffer_base_ + staging_->region_of(p.buffer_slot);
    rb.reqs[i] = io_request{io_op::read,
                            ssd_->file_of(m.ssd_slot),
                            ssd_->offset_of(m.ssd_slot),
                            arena.data(p.buffer_slot),
                            std::uint32_t(slot_bytes_),
                            region,
                            0};
  }
  auto verify_one = [](void* ctx, std::size_t i) noexcept {
    auto& b = *static_cast<ssd_read_batch*>(ctx);
    store& st = *b.self;
    ssd_read_batch::pending_read& p = b.pending[i];
    const block_meta& m = b.session->meta(p.block);
    if (b.reqs[i].result != std::int32_t(st.slot_bytes_)) {
      p.verdict = errc::device_error;
      return;
    }
    const std::byte* area = static_cast<const std::byte*>(b.reqs[i].buffer);
    const std::size_t bytes = st.geometry_.block_bytes();
    std::uint64_t cs = b.out ? copy_with_checksum(b.out + std::size_t(p.position - b.first_block) * bytes,
                                                  area + st.header_bytes_, bytes)
                             : checksum64(area + st.header_bytes_, bytes);
    format::block_header h;
    bool ok =
        format::read_header(area, st.header_bytes_, st.geometry_.tokens_per_block, &h) == format::header_status::ok &&
        h.model == st.model_.value && h.session == b.session->key().value &&
        h.block_index == std::uint32_t(m.saved_pos / st.geometry_.tokens_per_block) && h.sequence == m.sequence &&
        h.chain == m.chain && h.payload_checksum == m.checksum && cs == m.checksum;
    p.verdict = ok ? errc::ok : errc::checksum_error;
  };
  (void)device_->execute(std::span(rb.reqs, rb.count), config_.queue_depth, verify_one, &rb);
  for (std::size_t i = 0; i < rb.count; ++i) {
    if (rb.pending[i].verdict != errc::device_error)
      detail::bump(counters_->ssd_bytes_read, slot_bytes_);
    else
      detail::bump(counters_->io_errors);
  }
}

inline get_result store::serve_locked(locked_session& s, std::span<const token_id> prompt, std::uint32_t first_block,
                                      std::uint32_t block_count, std::span<std::byte> out,
                                      std::span<block_view> views) noexcept {
  // Two modes: copy blocks into `out` (get), or make them resident in DRAM and describe
  // them in `views` (acquire, for layer-wise loads straight from the DRAM tier).
  const bool resident = out.empty();
  const std::size_t bb = geometry_.block_bytes();
  get_result res;
  const std::uint32_t end = first_block + block_count;

  // SSD blocks are read in batches; each block is verified (and, when copying, copied
  // out) by the completion callback while the device still works on the rest.
  ssd_read_batch rb{&s, out.data(), first_block};
  bool failed = false;  // a block failed: the verified prefix ends there

  auto fail_at = [&](std::uint32_t position, errc why) {
    if (failed) return;
    failed = true;
    res.status = why;
    res.blocks = position - first_block;
    // Every block before the failing one matched whole, and only a session's last
    // block can be partial, so those blocks hold exactly tokens_per_block tokens each.
    res.tokens = std::uint64_t(res.blocks) * geometry_.tokens_per_block;
    if (why == errc::checksum_error) {
      detail::bump(counters_->checksum_failures);
      detail::bump(counters_->miss_checksum);
      release_chain(s.truncate(position));  // never served, never kept
    } else if (why == errc::device_error) {
      detail::bump(counters_->miss_io_error);
    }
  };
  auto flush = [&] {
    if (rb.count == 0) return;
    // A demand read: background promotions wait for it (they would share the device).
    demand_reads_.fetch_add(1, std::memory_order_relaxed);
    read_ssd_batch(rb);
    demand_reads_.fetch_sub(1, std::memory_order_relaxed);
    // Blocks complete in any order; outcomes are applied in position order.
    for (std::size_t i = 0; i < rb.count; ++i) {
      const ssd_read_batch::pending_read& p = rb.pending[i];
      host_arena& arena = p.promoted ? *dram_ : *staging_;
      bool keep = false;
      if (!failed) {
        if (p.verdict != errc::ok) {
          fail_at(p.position, p.verdict);
        } else {
          detail::bump(counters_->blocks_served_ssd);
          res.tokens += p.matched;
          if (p.promoted) {
            s.meta(p.block).dram_slot = p.buffer_slot;
            detail::bump(counters_->promoted_blocks);
            keep = true;
            if (resident)
              views[p.position - first_block] = {dram_payload(p.buffer_slot), p.matched, p.first, p.view_position,
                                                 s.meta(p.block).shift};
          }
        }
      }
      if (!keep) arena.release(p.buffer_slot);
    }
    rb.count = 0;
  };

  std::uint32_t i = 0;  // entries walked
  index_->match_prompt(s, model_, prompt, [&](const block_match& bm) {
    if (bm.index >= end || failed) return false;
    i = bm.index + 1;
    if (bm.index < first_block) return true;
    block_meta& m = s.meta(bm.block);
    const std::uint32_t matched = bm.tokens;
    if (m.dram_slot != no_slot) {
      bool ok = true;
      if (resident) {
        views[bm.index - first_block] = {dram_payload(m.dram_slot), matched, bm.first, bm.position, m.shift};
      } else {
        std::byte* dst = out.data() + std::size_t(bm.index - first_block) * bb;
        if (config_.verify_dram_reads)
          ok = copy_with_checksum(dst, dram_payload(m.dram_slot), bb) == m.checksum;
        else
          std::memcpy(dst, dram_payload(m.dram_slot), bb);
      }
      if (!ok) {
        flush();
        fail_at(bm.index, errc::checksum_error);
        return false;
      }
      detail::bump(counters_->blocks_served_dram);
      res.tokens += matched;
      return true;
    }
    // Reading for a copy promotes only into free DRAM; making a block resident may
    // demote other sessions for room (never this one's).
    std::uint32_t buf = resident ? alloc_dram(s, 0) : dram_->allocate();
    const bool promoted = buf != no_slot;
    if (!promoted && !resident) {
      buf = staging_->allocate();
      if (buf == no_slot) {
        flush();
        buf = staging_->allocate();
      }
    }
    if (buf == no_slot) {
      flush();
      fail_at(bm.index, resident ? errc::no_space : errc::retry);
      return false;
    }
    rb.pending[rb.count++] = {bm.block, bm.index, buf, promoted, matched, errc::ok, bm.first, bm.position};
    if (rb.count == batch_max) flush();
    return true;
  });
  flush();
  if (!failed) {
    res.blocks = (i > first_block ? i : first_block) - first_block;
    if (res.blocks < block_count) res.status = errc::not_found;
    if (res.blocks == 0) detail::bump(counters_->miss_prefix_mismatch);
  }
  s.count_tiers();
  note(s, true, prompt.size());
  erase_if_empty(s);  // a corrupt first block left nothing
  return res;
}

// ---------------------------------------------------------------- background work

inline std::uint32_t store::promote_locked(locked_session& s, std::uint32_t max_blocks, bool may_demote) noexcept {
  if (!ssd_) return 0;
  ssd_read_batch rb{&s, nullptr, 0};
  std::uint32_t promoted = 0, asked = 0, batches = 0;
  bool stop = false;
  auto flush = [&] {
    // A request reading from SSD goes first: after the first batch, yield to it (the
    // session's lock too); the prefetcher plans the rest again.
    if (batches++ > 0 && demand_reads_.load(std::memory_order_relaxed) > 0) {
      for (std::size_t i = 0; i < rb.count; ++i) dram_->release(rb.pending[i].buffer_slot);
      asked -= std::uint32_t(rb.count);
      rb.count = 0;
      stop = true;
      return;
    }
    read_ssd_batch(rb);
    for (std::size_t i = 0; i < rb.count; ++i) {  // in view order
      const ssd_read_batch::pending_read& p = rb.pending[i];
      if (!stop && p.verdict == errc::ok) {
        s.meta(p.block).dram_slot = p.buffer_slot;
        ++promoted;
        continue;
      }
      dram_->release(p.buffer_slot);
      if (!stop && p.verdict == errc::checksum_error) {
        detail::bump(counters_->checksum_failures);
        release_chain(s.truncate(p.position));  // a corrupt block and all after it go
      }
      stop = true;
    }
    rb.count = 0;
  };
  std::uint32_t pos = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot && asked < max_blocks && !stop; b = s.meta(b).next, ++pos) {
    const block_meta& m = s.meta(b);
    if (m.dram_slot != no_slot || m.ssd_slot == no_slot) continue;
    // Likely returners (no demotion) take only the DRAM above what the watermark keeps
    // for saves.
    if (!may_demote && dram_->capacity() - dram_->used() <= watermark_.high) break;
    std::uint32_t buf = dram_->allocate();
    for (int attempt = 0; buf == no_slot && may_demote && attempt < 16; ++attempt) {
      if (!demote_some_victim(s.record_id(), true)) break;
      buf = dram_->allocate();
    }
    if (buf == no_slot) break;
    rb.pending[rb.count++] = {b, pos, buf, true, 0, errc::ok, 0, 0};
    ++asked;
    if (rb.count == promote_batch) flush();
  }
  if (rb.count) flush();
  if (asked) {
    s.count_tiers();
    note(s, false);
    detail::bump(counters_->promoted_blocks, promoted);
    detail::bump(counters_->prefetched_blocks, promoted);
    erase_if_empty(s);  // a corrupt first block left nothing
  }
  return promoted;
}

inline void store::run_promotion(const promotion_job& job) noexcept {
  // Requests reading from SSD go first; wait for them before taking the session's lock
  // (a request for this very session must not find it held by a waiting prefetch).
  for (int waited = 0; demand_reads_.load(std::memory_order_relaxed) > 0 && waited < 20000; ++waited)
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  // A busy session is being loaded or saved right now: prefetching it is moot (the
  // periodic plan comes back to it if it is still waiting).
  locked_session s = index_->try_open_record(job.record);
  bool current = false;
  if (s) {
    std::lock_guard lock(policy_mutex_);
    current = prefetcher_->ticket(job.record) == job.ticket;  // not cancelled meanwhile
  }
  const std::uint32_t got = current ? promote_locked(s, job.blocks, !job.beyond_queue) : 0;
  std::lock_guard lock(policy_mutex_);
  if (prefetcher_->complete(job.record, job.ticket)) detail::bump(counters_->prefetch_completed);
  if (got > 0) {
    plan_prefetch_locked(false);  // the bytes in flight went down: start the next ones
  } else if (current && !job.beyond_queue) {
    // No DRAM could be freed for it (or its reads failed): queued promotions pause
    // briefly rather than retrying at every set_queue.
    no_room_until_ = now() + 100000000ull;
  }
}

inline std::uint32_t store::expire_idle() noexcept {
  if (config_.session_ttl_ms == 0) return 0;
  const std::uint64_t ttl = config_.session_ttl_ms * 1000000ull;
  const std::uint64_t t = now();
  std::uint32_t dropped = 0;
  for (;;) {
    locked_session victim;
    {
      std::lock_guard lock(policy_mutex_);
      const std::uint32_t rec = policy_->next_expired(t, ttl);
      if (rec == policy::no_record) break;
      victim = index_->try_open_record(rec);
      if (!victim || victim.pins() > 0) {  // busy or pinned: in use, so not idle
        victim.reset();
        policy_->refresh_idle(rec, t);
        continue;
      }
    }
    drop_locked(victim);
    detail::bump(counters_->expired_sessions);
    ++dropped;
  }
  return dropped;
}

inline std::uint32_t store::run_background() noexcept {
  std::uint32_t done = 0;
  for (;;) {
    promotion_job job;
    {
      std::lock_guard lock(work_mutex_);
      if (job_count_ == 0) break;
      job = jobs_[job_head_];
      job_head_ = (job_head_ + 1) % jobs_.size();
      --job_count_;
    }
    run_promotion(job);
    ++done;
  }
  if (prefetcher_) {
    // Once a second: sessions skipped while busy, and (predictive) sessions that became
    // likely returners as they aged.
    const std::uint64_t t = now();
    std::uint64_t due = next_plan_.load(std::memory_order_relaxed);
    if (t >= due && next_plan_.compare_exchange_strong(due, t + 1000000000ull)) {
      std::lock_guard lock(policy_mutex_);
      plan_prefetch_locked(true);
    }
  }
  bool demote;
  {
    std::lock_guard lock(work_mutex_);
    demote = demotion_wanted_;
    demotion_wanted_ = false;
  }
  // Loads and promotions fill DRAM too, not only saves.
  demote = demote || watermark_.should_start(dram_->capacity() - dram_->used());
  if (demote) {
    std::uint64_t demoted = 0;
    while (dram_->capacity() - dram_->used() < watermark_.high) {
      const std::uint32_t n = demote_some_victim(no_slot, true);
      if (n == 0) break;
      demoted += n;
      ++done;
    }
    if (demoted) detail::bump(counters_->watermark_demoted_blocks, demoted);
  }
  if (config_.session_ttl_ms) {
    const std::uint64_t t = now();
    std::uint64_t due = next_ttl_check_.load(std::memory_order_relaxed);
    if (t >= due && next_ttl_check_.compare_exchange_strong(due, t + config_.session_ttl_ms * 250000ull))
      done += expire_idle();  // checked every quarter of the TTL
  }
  return done;
}

inline void store::wake_background() noexcept { work_cv_.notify_one(); }

inline void store::drain() noexcept {
  if (!worker_.joinable()) return;
  std::unique_lock lock(work_mutex_);
  idle_cv_.wait(lock, [&] { return stopping_ || (job_count_ == 0 && !demotion_wanted_ && !busy_); });
}

inline void store::background_loop() noexcept {
  const auto period = std::chrono::milliseconds(
      config_.session_ttl_ms ? std::clamp<std::uint64_t>(config_.session_ttl_ms / 4, 10, 1000) : 1000);
  std::unique_lock lock(work_mutex_);
  while (!stopping_) {
    work_cv_.wait_for(lock, period, [&] { return stopping_ || job_count_ > 0 || demotion_wanted_; });
    if (stopping_) break;
    busy_ = true;
    lock.unlock();
    (void)run_background();
    lock.lock();
    busy_ = false;
    idle_cv_.notify_all();
  }
  idle_cv_.notify_all();
}

// ---------------------------------------------------------------- drop, pin, demote, flush

inline errc store::drop(const session_key& key) noexcept {
  const session_hash h = hash_session(key);
  locked_session s = index_->open(h, false);
  if (!s) return errc::not_found;
  errc e = drop_locked(s);
  detail::bump(counters_->dropped_sessions);
  // A header that could not be zeroed would bring the session back at the next
  // restart: a tombstone (session, sequence bound) tells recovery to ignore it.
  if (e != errc::ok) e = write_tombstone(h) ? errc::ok : errc::device_error;
  // In write-through mode a drop is durable too: the zeroed headers reach the disk.
  if (config_.write_through && ssd_ && device_->sync() != errc::ok) {
    detail::bump(counters_->io_errors);
    e = errc::device_error;
  }
  return e;
}

inline errc store::truncate(const session_key& key, std::span<const token_id> history,
                            const truncation_plan& plan) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  if (!plan.needed || plan.drop == 0 || plan.drop % tpb || plan.sink + plan.drop > plan.history)
    return errc::invalid_argument;
  locked_session s = index_->open(hash_session(key), false);
  if (!s) return errc::not_found;
  if (s.pins() > 0) return errc::rejected;
  if (s.token_count() != plan.history || history.size() < plan.history) return errc::invalid_argument;
  // The view must be `history` (token by token) before any of it is cut.
  {
    std::uint64_t pos = 0;
    for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next) {
      const block_meta& m = s.meta(b);
      const auto have = s.tokens_of(b).subspan(m.view_first, m.view_count);
      if (!std::equal(have.begin(), have.end(), history.begin() + std::ptrdiff_t(pos))) return errc::invalid_argument;
      pos += m.view_count;
    }
  }
  const std::uint64_t cut_begin = plan.sink, cut_end = plan.sink + plan.drop;
  std::uint32_t kept_head = no_slot, kept_tail = no_slot, gone_head = no_slot, gone_tail = no_slot;
  auto append = [&](std::uint32_t& head, std::uint32_t& tail, std::uint32_t b) {
    s.meta(b).next = no_slot;
    if (tail == no_slot)
      head = b;
    else
      s.meta(tail).next = b;
    tail = b;
  };
  std::uint64_t pos = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot;) {
    block_meta& m = s.meta(b);
    const std::uint32_t next = m.next;
    const std::uint64_t vs = pos, ve = pos + m.view_count;
    pos = ve;
    if (ve <= cut_begin) {
      append(kept_head, kept_tail, b);  // inside the sink
    } else if (vs >= cut_end) {
      m.shift -= std::int64_t(plan.drop);  // after the cut: moves back
      append(kept_head, kept_tail, b);
    } else if (vs >= cut_begin && ve <= cut_end) {
      append(gone_head, gone_tail, b);  // entirely cut
    } else if (vs < cut_begin) {
      m.view_count = std::uint32_t(cut_begin - vs);  // the sink's boundary block keeps its head
      append(kept_head, kept_tail, b);
    } else {
      const std::uint32_t skip = std::uint32_t(cut_end - vs);  // keeps its tail, moved back
      m.view_first += skip;
      m.view_count -= skip;
      m.shift -= std::int64_t(plan.drop);
      append(kept_head, kept_tail, b);
    }
    b = next;
  }
  s.relink(kept_head);
  s.set_truncated(true);
  (void)release_chain(gone_head);
  note(s, true);
  return errc::ok;
}

inline errc store::pin(const session_key& key) noexcept {
  locked_session s = index_->open(hash_session(key), false);
  if (!s) return errc::not_found;
  s.pin();
  return errc::ok;
}

inline errc store::unpin(const session_key& key) noexcept {
  locked_session s = index_->open(hash_session(key), false);
  if (!s) return errc::not_found;
  s.unpin();
  return errc::ok;
}

inline errc store::keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept {
  locked_session s = index_->open(key, false);
  if (!s) return errc::not_found;
  note(s, false);  // makes sure the policy knows the session
  std::lock_guard lock(policy_mutex_);
  policy_->on_blocks(s.record_id(), policy::level::hbm, blocks);
  return errc::ok;
}

inline bool store::hbm_victim(session_hash& out) noexcept {
  locked_session victim = pick_victim(
      policy::level::hbm, [](locked_session&) { return true; }, no_slot, no_slot);
  if (!victim) return false;
  out = victim.key();
  return true;
}

inline errc store::demote(const session_key& key) noexcept {
  if (!ssd_) return errc::unsupported;
  locked_session s = index_->open(hash_session(key), false);
  if (!s) return errc::not_found;
  return demote_locked(s, no_slot, no_slot);
}

inline bool store::write_tombstone(const session_hash& key) noexcept {
  const std::string path = config_.ssd_directory + "/TOMBSTONES";
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  const std::uint64_t rec[3] = {key.value.lo, key.value.hi, sequence_.load()};
  const bool ok = ::write(fd, rec, sizeof(rec)) == ssize_t(sizeof(rec)) && ::fdatasync(fd) == 0;
  ::close(fd);
  return ok;
}

inline errc store::flush() noexcept { return device_ ? device_->sync() : errc::unsupported; }

// ---------------------------------------------------------------- manifest and recovery

inline void store::write_or_check_manifest() {
  const std::string path = config_.ssd_directory + "/MANIFEST";
  // Checked in this order: geometry first (the clearer message), the model id last.
  const std::vector<std::pair<std::string, std::string>> want{
      {"format_version", std::to_string(format::format_version)},
      {"num_layers", std::to_string(geometry_.num_layers)},
      {"num_kv_heads", std::to_string(geometry_.num_kv_heads)},
      {"head_dim", std::to_string(geometry_.head_dim)},
      {"dtype", std::string(to_string(geometry_.dtype))},
      {"tokens_per_block", std::to_string(geometry_.tokens_per_block)},
      {"slot_bytes", std::to_string(slot_bytes_)},
      {"model_id", detail::hex128(model_.value)},
  };
  std::ifstream in(path);
  if (in) {
    std::map<std::string, std::string> have;
    std::string line;
    while (std::getline(in, line)) {
      auto eq = line.find('=');
      if (eq != std::string::npos) have[line.substr(0, eq)] = line.substr(eq + 1);
    }
    for (const auto& [k, v] : want) {
      auto it = have.find(k);
      const std::string got = it == have.end() ? "(missing)" : it->second;
      if (got == v) continue;
      if (k == "model_id")
        throw std::runtime_error("store: " + config_.ssd_directory + " holds KV of another model (model_id " + got +
                                 ", this store's is " + v +
                                 "): model name, RoPE spec, keys_pre_rope or tensor-parallel rank differ. Use "
                                 "another directory or remove this one.");
      throw std::runtime_error("store: " + config_.ssd_directory + " was written with " + k + "=" + got +
                               " but this store is configured with " + k + "=" + v +
                               ". Use another directory or remove this one.");
    }
    return;
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "# attnstore store manifest: do not edit\n";
    for (const auto& [k, v] : want) out << k << '=' << v << '\n';
    if (!out) throw std::runtime_error("store: cannot write " + tmp);
  }
  int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  ::chmod(tmp.c_str(), 0600);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("store: cannot create " + path);
  fd = ::open(config_.ssd_directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

inline void store::recover() {
  struct candidate {
    hash128 session;
    std::uint32_t index;
    std::uint64_t sequence;
    std::uint32_t slot;
    hash128 chain;
    std::uint64_t checksum;
    std::size_t token_offset;
    std::uint32_t token_count;
    std::uint32_t put_first_block, put_blocks;
    std::uint64_t put_id() const noexcept { return sequence - (index - put_first_block); }
  };
  std::vector<candidate> cands;
  std::vector<token_id> token_store;
  std::vector<std::uint32_t> stale;  // slots with a header that will not be indexed
  const std::uint32_t slots = ssd_->capacity();
  std::uint64_t max_sequence = 0;

  std::vector<std::uint32_t> buffers;
  for (std::uint32_t b; (b = staging_->allocate()) != no_slot;) buffers.push_back(b);
  const std::uint32_t batch = std::min<std::uint32_t>(std::uint32_t(buffers.size()), batch_max);
  for (std::uint32_t base = 0; base < slots; base += batch) {
    const std::uint32_t n = std::min(batch, slots - base);
    io_request reqs[batch_max];
    for (std::uint32_t i = 0; i < n; ++i)
      reqs[i] = io_request{io_op::read,
                           ssd_->file_of(base + i),
                           ssd_->offset_of(base + i),
                           staging_->data(buffers[i]),
                           std::uint32_t(slot_bytes_),
                           staging_buffer_base_ + staging_->region_of(buffers[i]),
                           0};
    (void)device_->execute(std::span(reqs, n), config_.queue_depth);
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::byte* area = staging_->data(buffers[i]);
      format::block_header h;
      if (reqs[i].result != std::int32_t(slot_bytes_)) {
        detail::bump(counters_->io_errors);
        stale.push_back(base + i);
        continue;
      }
      auto st = format::read_header(area, header_bytes_, geometry_.tokens_per_block, &h);
      if (st == format::header_status::empty) continue;
      if (st != format::header_status::ok || !(h.model == model_.value) || h.payload_bytes != geometry_.block_bytes() ||
          checksum64(area + header_bytes_, h.payload_bytes) != h.payload_checksum) {
        detail::bump(counters_->recovery_dropped_blocks);  // torn or foreign: never served
        stale.push_back(base + i);
        continue;
      }
      max_sequence = std::max(max_sequence, h.sequence);
      const auto* toks = reinterpret_cast<const token_id*>(area + format::fixed_header_bytes);
      cands.push_back({h.session, h.block_index, h.sequence, base + i, h.chain, h.payload_checksum, token_store.size(),
                       h.token_count, h.put_first_block, h.put_blocks});
      token_store.insert(token_store.end(), toks, toks + h.token_count);
    }
  }
  for (auto b : buffers) staging_->release(b);

  // Sessions dropped while their headers could not be erased: blocks older than the
  // tombstone's sequence bound are gone.
  const std::string tomb_path = config_.ssd_directory + "/TOMBSTONES";
  {
    std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t> tombs;
    if (std::FILE* f = std::fopen(tomb_path.c_str(), "rb")) {
      std::uint64_t rec[3];
      while (std::fread(rec, sizeof(rec), 1, f) == 1) {
        auto& bound = tombs[{rec[1], rec[0]}];
        bound = std::max(bound, rec[2]);
      }
      std::fclose(f);
    }
    if (!tombs.empty()) {
      std::vector<candidate> kept;
      for (const auto& c : cands) {
        auto t = tombs.find({c.session.hi, c.session.lo});
        if (t != tombs.end() && c.sequence < t->second) {
          stale.push_back(c.slot);
          detail::bump(counters_->recovery_dropped_blocks);
        } else {
          kept.push_back(c);
        }
      }
      cands.swap(kept);
    }
  }
  // A put's blocks count only if the whole put arrived. A member may be missing
  // legitimately: a later, valid put replaced that block and its old slot was erased.
  // So a put is valid when each of its positions holds either its own block or a newer
  // block of a valid put. Puts are judged newest first (sequence ranges are disjoint
  // and increase, so every put that can supersede one is judged before it); a put that
  // fails (a crash mid-write) leaves the previous version of those blocks in place.
  {
    using skey = std::pair<std::uint64_t, std::uint64_t>;
    struct put_info {
      skey session;
      std::uint32_t first, blocks;
      std::vector<std::uint8_t> present;
      bool valid = false;
    };
    std::map<std::pair<skey, std::uint64_t>, put_info> puts;  // (session, put id)
    for (const auto& c : cands) {
      auto& p = puts[{{c.session.hi, c.session.lo}, c.put_id()}];
      if (p.present.empty()) {
        p = put_info{
            {c.session.hi, c.session.lo}, c.put_first_block, c.put_blocks, std::vector<std::uint8_t>(c.put_blocks, 0)};
      }
      if (c.put_first_block == p.first && c.put_blocks == p.blocks) p.present[c.index - p.first] = 1;
    }
    std::map<std::pair<skey, std::uint32_t>, std::uint64_t> newest;  // (session, index) -> newest valid sequence
    for (auto it = puts.rbegin(); it != puts.rend(); ++it) {
      put_info& p = it->second;
      const std::uint64_t id = it->first.second;
      p.valid = true;
      for (std::uint32_t i = 0; i < p.blocks && p.valid; ++i) {
        if (p.present[i]) continue;
        auto n = newest.find({p.session, p.first + i});
        p.valid = n != newest.end() && n->second > id + i;
      }
      if (!p.valid) continue;
      for (std::uint32_t i = 0; i < p.blocks; ++i)
        if (p.present[i]) {
          auto& v = newest[{p.session, p.first + i}];
          v = std::max(v, id + i);
        }
    }
    std::vector<candidate> kept;
    for (const auto& c : cands) {
      const put_info& p = puts[{{c.session.hi, c.session.lo}, c.put_id()}];
      if (p.valid && c.put_first_block == p.first && c.put_blocks == p.blocks) {
        kept.push_back(c);
      } else {
        stale.push_back(c.slot);
        detail::bump(counters_->recovery_dropped_blocks);
      }
    }
    cands.swap(kept);
  }
  std::sort(cands.begin(), cands.end(), [](const candidate& a, const candidate& b) {
    if (!(a.session == b.session))
      return a.session.hi != b.session.hi ? a.session.hi < b.session.hi : a.session.lo < b.session.lo;
    if (a.index != b.index) return a.index < b.index;
    return a.sequence > b.sequence;  // newest version of a block first
  });
  std::vector<std::uint8_t> used(slots, 0);
  for (std::size_t g = 0; g < cands.size();) {
    std::size_t end = g;
    while (end < cands.size() && cands[end].session == cands[g].session) ++end;
    // Walk indices 0,1,2...: take the newest version whose chain hash verifies.
    std::vector<const candidate*> chosen;
    hash128 prev{};
    std::size_t k = g;
    for (std::uint32_t index = 0; k < end && cands[k].index == index; ++index) {
      const candidate* pick = nullptr;
      for (; k < end && cands[k].index == index; ++k) {
        const candidate& c = cands[k];
        std::span<const token_id> toks(token_store.data() + c.token_offset, c.token_count);
        if (!pick && c.chain == chain_hash(prev, model_, toks)) pick = &c;
      }
      if (!pick) break;
      chosen.push_back(pick);
      prev = pick->chain;
      if (pick->token_count < geometry_.tokens_per_block) break;  // a partial block ends the session
    }
    locked_session s = chosen.empty() ? locked_session{} : index_->open(session_hash{cands[g].session}, true);
    std::uint32_t head = no_slot, tail = no_slot, count = 0;
    if (s) {
      for (const candidate* c : chosen) {
        std::uint32_t b = s.new_block(std::span<const token_id>(token_store.data() + c->token_offset, c->token_count));
        if (b == no_slot) break;
        block_meta& m = s.meta(b);
        m.chain = c->chain;
        m.checksum = c->checksum;
        m.sequence = c->sequence;
        m.ssd_slot = c->slot;
        m.saved_pos = std::uint64_t(c->index) * geometry_.tokens_per_block;
        used[c->slot] = 1;
        if (tail == no_slot)
          head = b;
        else
          s.meta(tail).next = b;
        tail = b;
        ++count;
      }
      s.publish(0, head, count);
      note(s, false);
      detail::bump(counters_->recovered_sessions);
      detail::bump(counters_->recovered_blocks, count);
    }
    for (std::size_t i = g; i < end; ++i)
      if (!used[cands[i].slot]) {
        stale.push_back(cands[i].slot);
        detail::bump(counters_->recovery_dropped_blocks);
      }
    g = end;
  }
  sequence_.store(max_sequence + 1);
  ssd_->rebuild(used);
  // Stale headers are zeroed so a later restart cannot mistake them for live blocks.
  // (The slots are not released here: ssd_space::rebuild already left them free.)
  bool erased_all = true;
  erase_headers(stale, [&](std::uint32_t, bool erased) {
    if (erased) return;
    detail::bump(counters_->io_errors);
    erased_all = false;
  });
  if (!stale.empty() && device_->sync() != errc::ok) erased_all = false;
  // Every block a tombstone covered is erased now; the tombstones can go.
  if (erased_all) std::remove(tomb_path.c_str());
  if (counters_->recovered_blocks.load() || counters_->recovery_dropped_blocks.load())
    config_.log(log_level::info, "store: recovered " + std::to_string(counters_->recovered_blocks.load()) +
                                     " blocks of " + std::to_string(counters_->recovered_sessions.load()) +
                                     " sessions from " + config_.ssd_directory + "; dropped " +
                                     std::to_string(counters_->recovery_dropped_blocks.load()) + " torn or stale");
}

#undef ATTNSTORE_STORE_COUNTERS

}  // namespace attnstore
