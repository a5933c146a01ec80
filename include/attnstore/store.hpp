// store: the hierarchical KV store. DRAM (host_arena) over SSD (ssd_space + a
// block_device), indexed by session (cache_index), verified end to end.
//
// Threading: every member is thread-safe. Operations on one session serialize on that
// session's record; operations on different sessions run in parallel.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/format/block_header.hpp"
#include "attnstore/index/cache_index.hpp"
#include "attnstore/io/block_device.hpp"
#include "attnstore/log.hpp"
#include "attnstore/policy/eviction_policy.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/policy/prefetcher.hpp"
#include "attnstore/policy/watermark.hpp"
#include "attnstore/status.hpp"
#include "attnstore/tier/host_arena.hpp"
#include "attnstore/tier/ssd_space.hpp"
#include "attnstore/truncate.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

namespace detail {
/// Blocks at consecutive positions written by one put (see store::write_ssd_blocks).
struct put_group {
  std::uint64_t first_sequence = 0;
  std::uint32_t first_block = 0, blocks = 0;
};
}  // namespace detail

/// Which block I/O backend the SSD tier uses.
enum class io_backend : std::uint8_t {
  automatic,  ///< io_uring, else pread/pwrite (the reason is logged)
  io_uring,   ///< io_uring or fail at construction
  posix,      ///< pread/pwrite thread pool
};

struct store_config {
  kv_geometry geometry;       ///< validated by the store; tokens_per_block 0 = auto
  std::string model_name;     ///< with geometry etc. forms the model_id
  std::string rope = "none";  ///< positional-encoding spec (part of the model_id)
  bool keys_pre_rope = false;
  std::uint32_t tp_rank = 0, tp_size = 1;

  std::uint64_t dram_bytes = 0;  ///< DRAM tier capacity; at least one block
  std::string ssd_directory;     ///< empty: no SSD tier (DRAM eviction drops)
  std::uint64_t ssd_bytes = 0;   ///< SSD tier capacity; at least one block if a directory is set

  io_backend backend = io_backend::automatic;
  unsigned queue_depth = 32;          ///< I/O pieces in flight per batch, 1..1024
  unsigned posix_threads = 8;         ///< workers of the pread/pwrite backend
  bool direct_io = true;              ///< O_DIRECT on the SSD files
  bool require_direct_io = true;      ///< refuse a file system without O_DIRECT
  bool write_through = false;         ///< put() returns only once the blocks are durable on SSD
  bool verify_dram_reads = true;      ///< re-check payload checksums when serving from DRAM
  bool pin_host_memory = true;        ///< cudaHostAlloc / mlock the DRAM tier (best effort)
  std::uint32_t max_sessions = 4096;  ///< live sessions indexed at once
  std::uint32_t queue_window = 1024;  ///< entries of the engine queue set_queue() keeps
  unsigned staging_blocks = 0;        ///< SSD read staging slots (0: 4 x queue_depth)

  // ---- policies (include/attnstore/policy/; docs/design.md "Policies")
  /// Which session gives up DRAM (to SSD) or SSD (dropped) first: "scheduler_aware" (the
  /// paper's: sessions in the eviction window over the engine queue are kept), "lru", or
  /// "predictive" (also ranks idle sessions by their learned chance of returning, and
  /// prefetches likely returners into free DRAM). Ignored when make_policy is set.
  std::string eviction_policy = "scheduler_aware";
  /// An embedder's own policy, made once with the store's max_sessions.
  std::function<std::unique_ptr<policy::eviction_policy>(std::uint32_t max_sessions)> make_policy;
  /// Queued sessions protected from eviction. 0: the paper's rule, (DRAM + SSD bytes) /
  /// mean stored session size, recomputed at each set_queue().
  std::uint32_t eviction_window = 0;
  /// Scheduler-aware prefetch: SSD -> DRAM promotion of the sessions at the front of the
  /// queue, on a background thread. Needs an SSD tier.
  bool prefetch = true;
  /// Bound on bytes being promoted at once. 0: max(64 MiB, 4 blocks).
  std::uint64_t prefetch_bytes_in_flight = 0;
  /// Queued sessions the prefetcher looks at. 0: the paper's rule, dram_for_prefetch /
  /// mean stored session size.
  std::uint32_t prefetch_window = 0;
  /// DRAM the paper's prefetch-window rule counts on. 0: a quarter of dram_bytes.
  std::uint64_t dram_for_prefetch_bytes = 0;
  /// Background DRAM -> SSD demotion starts when free DRAM falls below the low fraction
  /// and runs until the high one is free, so saves find room without waiting. Needs an
  /// SSD tier; low 0 disables it.
  double demote_low_watermark = 0.05, demote_high_watermark = 0.10;
  /// Sessions idle (not used, not queued) this long are dropped. 0: never.
  std::uint64_t session_ttl_ms = 0;
  /// Runs prefetch, watermark demotion and the TTL on a store thread. Off: the embedder
  /// calls run_background() itself (tests, single-threaded engines).
  bool background_thread = true;
  /// Clock for recency and the TTL, in nanoseconds; tests may set it. Default: steady_clock.
  std::function<std::uint64_t()> clock;

  attnstore::logger log{};
  /// Tests and embedders may wrap or replace the SSD device (fault injection, an
  /// in-memory device). Called once at construction with the real device.
  std::function<std::unique_ptr<block_device>(std::unique_ptr<block_device>, const ssd_space&)> wrap_device;
};

/// Counters since construction (snapshot).
struct store_stats {
  std::uint64_t lookups = 0, lookup_hits = 0, lookup_misses = 0, tokens_reusable = 0;
  std::uint64_t puts = 0, put_blocks = 0, put_rejected = 0, put_failed = 0;
  std::uint64_t gets = 0, blocks_served_dram = 0, blocks_served_ssd = 0;
  std::uint64_t miss_not_found = 0, miss_prefix_mismatch = 0, miss_checksum = 0, miss_io_error = 0;
  std::uint64_t checksum_failures = 0, io_errors = 0, no_space = 0;
  std::uint64_t demoted_blocks = 0, promoted_blocks = 0, evicted_sessions = 0, evicted_blocks = 0;
  std::uint64_t dropped_sessions = 0;
  std::uint64_t ssd_bytes_written = 0, ssd_bytes_read = 0;
  std::uint64_t recovered_sessions = 0, recovered_blocks = 0, recovery_dropped_blocks = 0;
  std::uint64_t quarantined_slots = 0;  ///< SSD slots not reused: their header could not be erased
  std::uint64_t prefetch_started = 0, prefetch_completed = 0, prefetch_cancelled = 0, prefetched_blocks = 0;
  std::uint64_t watermark_demoted_blocks = 0, expired_sessions = 0;
  std::uint64_t dram_used_bytes = 0, dram_capacity_bytes = 0, ssd_used_bytes = 0, ssd_capacity_bytes = 0;
  std::uint64_t sessions = 0;
};

/// An open layer-wise save: DRAM blocks reserved for a session, filled by the caller
/// (or its copy engine), then committed or aborted. Movable value; see store::reserve.
struct save_reservation {
  session_hash key{};
  std::uint32_t first_block = 0;
  std::uint32_t blocks = 0;
  std::uint32_t head = no_slot;  ///< first reserved block (block table index)
  hash128 prev_chain{};          ///< chain hash of the entry before the first replaced one
  std::uint32_t from_entry = 0;  ///< index of the first replaced entry in the session's view
  explicit operator bool() const noexcept { return head != no_slot; }
};

/// A block made resident in DRAM by store::acquire: its payload in the layer-major
/// block layout, and how many of its tokens match the prompt.
struct block_view {
  const std::byte* payload = nullptr;
  std::uint32_t tokens = 0;    ///< tokens of the block used, from `first` on
  std::uint32_t first = 0;     ///< first of them inside the block (non-zero only in a truncated view)
  std::uint64_t position = 0;  ///< view position of the first of them
  std::int64_t shift = 0;      ///< view position - position it was saved at (keys need R(shift))
};

/// What get() delivered.
struct get_result {
  /// ok, not_found, checksum_error, device_error, invalid_argument, no_space, or retry
  /// (every SSD staging buffer is in use by other readers and DRAM is full: try again).
  errc status = errc::ok;
  std::uint32_t blocks = 0;  ///< blocks written to the output, from first_block on
  std::uint64_t tokens = 0;  ///< tokens they hold that match the prompt
};

class store {
 public:
  /// Opens (or creates) a store. With an SSD directory, an existing store there is
  /// recovered: every committed, verified block is indexed again; torn ones are
  /// dropped. Throws std::invalid_argument (a field out of range, named) or
  /// std::runtime_error (directory unusable, O_DIRECT missing, geometry or model
  /// differs from what the directory holds).
  explicit store(store_config config);
  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  /// Longest reusable prefix of `prompt` for the session. Allocation-free.
  /// Fills up to out.size() block locations.
  lookup_result lookup(const session_key& key, std::span<const token_id> prompt,
                       std::span<block_location> out = {}) noexcept;

  /// Stores KV for the session whose history is `tokens`. `blocks` holds blocks
  /// [first_block, blocks_for(tokens.size())) back to back, block_bytes() each, in the
  /// layer-major block layout; blocks before first_block must already be stored for
  /// these tokens (an incremental save passes only the new and the partial last block).
  /// Stored blocks from first_block on are replaced. The new blocks become visible
  /// together, once all are written (and, in write-through mode, durable).
  /// Returns ok, invalid_argument (sizes; logged), rejected (blocks before first_block
  /// are not stored for these tokens), no_space (nothing evictable), device_error.
  [[nodiscard]] errc put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                         std::span<const std::byte> blocks) noexcept;

  /// Copies blocks [first_block, first_block + block_count) of the session into `out`
  /// (block_bytes() each), after checking that they belong to `prompt` (chain hashes)
  /// and verifying their payload checksums. Delivers a verified prefix of the range:
  /// a block that fails verification is dropped from the store and ends the copy.
  get_result get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                 std::uint32_t block_count, std::span<std::byte> out) noexcept;

  /// Makes the blocks of the session that match `prompt` resident in DRAM (reading SSD
  /// blocks, demoting other sessions for room), pins the session so they stay there,
  /// and describes up to views.size() of them. For layer-wise loads that copy straight
  /// from the DRAM tier. Returns ok (result.blocks may be 0), not_found (no session),
  /// checksum_error or device_error (result.blocks is the verified prefix), no_space.
  /// When result.blocks > 0 the caller must call release() once done with the views.
  get_result acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views) noexcept;
  /// Ends an acquire(): unpins the session.
  void release(const session_key& key) noexcept { release(hash_session(key)); }
  void release(const session_hash& key) noexcept;

  /// Starts a save whose payloads the caller fills itself (layer by layer, by DMA...):
  /// reserves DRAM blocks [first_block, blocks_for(tokens.size())) and writes their
  /// payload addresses to `payloads`. Nothing is visible until commit(). The session
  /// is pinned meanwhile. Returns ok, invalid_argument, rejected (the stored prefix is
  /// not these tokens), no_space.
  [[nodiscard]] errc reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                             std::span<std::byte*> payloads, save_reservation& reservation) noexcept;
  /// Checksums the filled blocks, writes them through to SSD if configured, and
  /// publishes them. Returns ok, rejected (the prefix changed meanwhile), not_found
  /// (the session was dropped), no_space, device_error, bad_state (empty reservation).
  /// The reservation is empty afterwards, whatever the outcome.
  [[nodiscard]] errc commit(save_reservation& reservation) noexcept;
  /// Gives reserved blocks back unpublished.
  void abort(save_reservation& reservation) noexcept;

  /// Removes a session from every tier. Returns ok or not_found; device_error when an
  /// SSD copy could not be erased and the tombstone that keeps it from coming back
  /// after a restart could not be written either (the session is no longer served).
  errc drop(const session_key& key) noexcept;
  /// Pinned sessions are never demoted or evicted. Returns ok or not_found.
  errc pin(const session_key& key) noexcept;
  errc unpin(const session_key& key) noexcept;
  /// Applies a truncation plan (plan_truncation) to the session's view: positions
  /// [sink, sink + drop) go (blocks entirely inside are freed), later tokens move back
  /// by drop. `history` must be the session's current view (its token ids are checked
  /// against the plan's range, so a stale plan cannot cut the wrong tokens).
  /// Truncated views are not persisted: after a restart the session recovers only up
  /// to its first dropped block. Returns ok, not_found, invalid_argument (plan or
  /// history does not match the view), rejected (the session is pinned: a load or
  /// save is using it).
  [[nodiscard]] errc truncate(const session_key& key, std::span<const token_id> history,
                              const truncation_plan& plan) noexcept;

  /// The engine's waiting queue, first to run first; replaces the previous queue. The
  /// eviction policy protects the sessions in its window; the prefetcher starts
  /// promoting the first ones from SSD to DRAM. Past queue_window entries the rest of
  /// the queue is ignored. Sessions not stored yet are skipped.
  void set_queue(std::span<const session_key> waiting) noexcept;
  /// What the engine's front end knows about an idle session's user: typing its next
  /// turn (policy::session_hint::composing), or gone (left). The "predictive" policy
  /// learns what each hint is followed by and keeps, drops and prefetches by it (a
  /// composing user's session is promoted from SSD ahead of its turn); the other
  /// policies ignore hints. Returns ok, or not_found when the session is not stored.
  errc hint(const session_key& key, policy::session_hint hint) noexcept;

  /// Spare HBM lent by the engine: after a turn the engine may keep `blocks` blocks of the
  /// session's KV in its own GPU pages (the store keeps its saved copy as well), so the
  /// next turn needs no load at all. 0: it keeps none any more. Returns ok or not_found.
  errc keep_in_hbm(const session_key& key, std::uint32_t blocks) noexcept {
    return keep_in_hbm(hash_session(key), blocks);
  }
  errc keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept;
  /// When the engine needs its HBM back: the session whose HBM copy goes first in the
  /// eviction policy's order (never a pinned or busy one). Writes its hash to `out`
  /// and returns true; false when no session is kept in HBM. The engine frees the pages
  /// and calls keep_in_hbm(key, 0). The store only ranks: when it drops a session (TTL,
  /// eviction, drop) it forgets the session's HBM count, so the engine keeps its own
  /// list of what it holds.
  bool hbm_victim(session_hash& out) noexcept;

  /// Does the background work that is due: promotions the prefetcher planned, demotion
  /// down to the watermark, and the TTL. The store's thread calls it; without one
  /// (background_thread false) the embedder does. Returns the work items done.
  std::uint32_t run_background() noexcept;
  /// Waits until the background thread is idle: no promotion queued or running, no
  /// demotion wanted. While other threads keep saving or queueing, that includes their
  /// work too. Returns at once without a thread.
  void drain() noexcept;
  /// Drops the sessions idle longer than session_ttl_ms now; returns how many.
  std::uint32_t expire_idle() noexcept;
  /// The eviction policy's name ("scheduler_aware", "lru", ...).
  std::string_view policy_name() const noexcept { return policy_->name(); }

  /// Moves a session's DRAM blocks to SSD now. Returns ok, not_found, unsupported (no
  /// SSD tier), no_space, device_error.
  errc demote(const session_key& key) noexcept;
  /// Makes every SSD write so far durable. Returns ok, device_error, unsupported.
  errc flush() noexcept;

  store_stats stats() const noexcept;
  const kv_geometry& geometry() const noexcept { return geometry_; }
  const model_id& model() const noexcept { return model_; }
  std::size_t block_bytes() const noexcept { return geometry_.block_bytes(); }
  /// "io_uring", "posix", ... or "none" without an SSD tier.
  std::string_view io_backend_name() const noexcept;
  /// "cuda_pinned", "locked" or "unlocked".
  std::string_view dram_pinning() const noexcept { return dram_->pinning(); }
  bool has_ssd() const noexcept { return ssd_ != nullptr; }

 private:
  struct counters;
  static constexpr unsigned batch_max = 256;  // I/O requests per device batch
  // Blocks per promotion batch: a turn's own SSD read waits behind at most one, and
  // background reads still keep the device busy (4 hid less: docs/benchmarks.md).
  static constexpr unsigned promote_batch = 16;
  static constexpr std::uint32_t likely_per_plan = 64;  // likely returners looked at per prefetch plan

  std::byte* dram_payload(std::uint32_t slot) const noexcept { return dram_->data(slot) + header_bytes_; }
  std::uint32_t alloc_dram(locked_session& self, std::uint32_t self_keep_from) noexcept;
  /// A free SSD slot, evicting SSD victims for one unless `may_evict` is false.
  std::uint32_t alloc_ssd(std::uint32_t exclude_a, std::uint32_t exclude_b, bool may_evict = true) noexcept;
  errc demote_locked(locked_session& s, std::uint32_t until_position, std::uint32_t exclude,
                     bool may_evict = true) noexcept;
  errc reserve_locked(locked_session& s, std::span<const token_id> tokens, std::uint32_t first_block,
                      save_reservation& r) noexcept;
  errc commit_locked(locked_session& s, save_reservation& r, bool checksums_known) noexcept;
  get_result serve_locked(locked_session& s, std::span<const token_id> prompt, std::uint32_t first_block,
                          std::uint32_t block_count, std::span<std::byte> out, std::span<block_view> views) noexcept;
  /// Demotes the policy's first DRAM victim; returns the DRAM blocks it freed (0: no
  /// victim or nothing freed). On the allocation path (`background` false) a victim
  /// that cannot be demoted is dropped; background work (prefetch room, the watermark)
  /// only demotes, into free SSD slots (it evicts nobody), and never a queued session.
  std::uint32_t demote_some_victim(std::uint32_t exclude, bool background = false) noexcept;
  bool evict_some_ssd_victim(std::uint32_t exclude_a, std::uint32_t exclude_b) noexcept;
  errc release_chain(std::uint32_t first) noexcept;
  errc drop_locked(locked_session& s) noexcept;
  errc invalidate_ssd(std::span<const std::uint32_t> slots) noexcept;
  /// Zeroes the header sectors of `slots` in batches (a failed write is retried once);
  /// calls outcome(slot, erased) for each. Releases nothing.
  template <class Outcome>
  void erase_headers(std::span<const std::uint32_t> slots, Outcome&& outcome) noexcept;
  /// Writes blocks to SSD. A put group (first_sequence != 0) is blocks at consecutive
  /// positions written by one put: recovery accepts its blocks only if all of them
  /// arrived. Without one, each block is its own group.
  using put_group = detail::put_group;
  errc write_ssd_blocks(locked_session& s, std::span<const std::uint32_t> blocks,
                        std::span<const std::uint32_t> positions, std::span<const std::uint32_t> ssd_slots,
                        std::span<std::int32_t> results, const put_group& group = {}) noexcept;
  void recover();
  bool write_tombstone(const session_hash& key) noexcept;
  void write_or_check_manifest();
  locked_session open_or_evict(const session_hash& key) noexcept;
  /// The first session in the policy's victim order for `where` that is unpinned, not
  /// busy (try-lock) and accepted by `want`, locked. Never one of the two excluded records.
  template <class Want>
  locked_session pick_victim(policy::level where, Want&& want, std::uint32_t exclude_a,
                             std::uint32_t exclude_b) noexcept;
  std::uint64_t now() const noexcept;
  /// Tells the policy the session's tier counts (and, when `accessed`, that it was used).
  /// `prompt_tokens` > 0: a turn starts with a prompt that long (policy::on_prompt).
  void note(locked_session& s, bool accessed, std::size_t prompt_tokens = 0) noexcept;
  // Tells the policy a session that is not stored was asked for (it may be one it evicted).
  void note_miss(const session_hash& key) noexcept;
  /// Removes the session from the index, the policy and the prefetcher.
  void erase_record(locked_session& s) noexcept;
  /// Erases the session when a failed save left it empty and unused.
  void erase_if_empty(locked_session& s) noexcept {
    if (s.block_count() == 0 && s.pins() == 0) erase_record(s);
  }
  /// Reads up to `max_blocks` of the session's SSD-only blocks into DRAM, making room only
  /// from sessions that are not queued. Returns the blocks promoted.
  std::uint32_t promote_locked(locked_session& s, std::uint32_t max_blocks, bool may_demote) noexcept;
  /// Plans promotions for the queue window (and, with `likely`, the predictive policy's
  /// likely returners). Policy mutex held.
  void plan_prefetch_locked(bool likely) noexcept;
  /// Sets the windows of the paper's rules from the mean distinct blocks per session.
  void size_windows_locked(std::size_t queued) noexcept;
  void set_held_locked(std::uint32_t record, std::uint32_t blocks) noexcept;  // policy mutex held
  void wake_background() noexcept;
  void background_loop() noexcept;
  struct prefetch_target;
  struct ssd_read_batch;
  /// Reads a batch of SSD blocks into their buffers, verifying each (header, chain,
  /// checksum; copying it out when the batch has an output) as it completes.
  void read_ssd_batch(ssd_read_batch& rb) noexcept;
  struct promotion_job {
    std::uint32_t record;
    std::uint32_t blocks;
    std::uint64_t ticket;
    bool beyond_queue;  // a likely returner, not a queued session: free DRAM only
  };
  void run_promotion(const promotion_job& job) noexcept;

  store_config config_;
  kv_geometry geometry_;
  model_id model_;
  std::size_t header_bytes_ = 0;
  std::size_t slot_bytes_ = 0;
  std::unique_ptr<host_arena> dram_;
  std::unique_ptr<host_arena> staging_;
  std::unique_ptr<ssd_space> ssd_;
  std::unique_ptr<block_device> device_;
  std::unique_ptr<cache_index> index_;
  std::int32_t staging_buffer_base_ = 0;  // registered-buffer index of staging region 0
  std::atomic<std::uint64_t> sequence_{1};
  std::unique_ptr<counters> counters_;
  struct free_deleter {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, free_deleter> zero_page_holder_;  // freed even if the constructor throws
  void* zero_page_ = nullptr;

  // Policies. Lock order: record -> policy_mutex_ -> shard -> work_mutex_. Under the
  // policy mutex, records are only try-locked (victim choice).
  std::mutex policy_mutex_;
  std::unique_ptr<policy::eviction_policy> policy_;
  policy::predictive* predictive_ = nullptr;  // policy_ when it is the predictive one
  std::unique_ptr<policy::prefetcher> prefetcher_;
  policy::demotion_watermark watermark_{};
  std::vector<std::uint32_t> held_;           // per record: distinct blocks (all tiers)
  std::uint64_t held_total_ = 0;              // sum of held_
  std::uint32_t held_sessions_ = 0;           // records with held_ > 0
  std::uint64_t no_room_until_ = 0;           // queued promotions found no DRAM: none until then
  std::vector<std::uint32_t> queue_records_;  // set_queue scratch (policy mutex)
  std::mutex queue_mutex_;                    // set_queue's hashing scratch; taken before the policy mutex
  std::vector<session_hash> queue_hashes_;

  // Background work: promotions the prefetcher started, demotion, TTL.
  std::mutex work_mutex_;
  std::condition_variable work_cv_, idle_cv_;
  std::vector<promotion_job> jobs_;  // ring, capacity max_sessions
  std::size_t job_head_ = 0, job_count_ = 0;
  bool demotion_wanted_ = false, stopping_ = false, busy_ = false;
  std::atomic<std::uint64_t> next_ttl_check_{0};
  std::atomic<std::uint64_t> next_plan_{0};     // periodic prefetch plan
  std::atomic<std::uint32_t> demand_reads_{0};  // SSD reads a request is waiting on
  std::thread worker_;
};

}  // namespace attnstore

#include "attnstore/detail/store.inl"
