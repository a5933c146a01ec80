// store: the hierarchical KV store. DRAM (host_arena) over SSD (ssd_space + a
// block_device), indexed by session (cache_index), verified end to end.
//
// The implementation lives in src/store/ (one file per concern: read path, save path,
// placement and eviction, background work, recovery and the on-disk format); this
// header is the surface an engine compiles against.
//
// Threading: every member is thread-safe. Operations on one session serialize on that
// session's record; operations on different sessions run in parallel.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnstore/format/block_header.hpp"
#include "attnstore/index/cache_index.hpp"
#include "attnstore/io/block_device.hpp"
#include "attnstore/log.hpp"
#include "attnstore/policy/eviction_policy.hpp"
#include "attnstore/remote_tier.hpp"
#include "attnstore/status.hpp"
#include "attnstore/tier/ssd_space.hpp"
#include "attnstore/truncate.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

/// Which block I/O backend the SSD tier uses.
enum class io_backend : std::uint8_t {
  automatic,  ///< io_uring, else pread/pwrite (the reason is logged)
  io_uring,   ///< io_uring or fail at construction
  posix,      ///< pread/pwrite thread pool
};

/// A tenant's caps on one store, in bytes per tier (0: no cap). Bytes count whole slots
/// (block plus header), as store_stats' tier bytes do.
struct tenant_quota {
  std::string tenant;  ///< the id engines pass as session_key::tenant
  std::uint64_t dram_bytes = 0, ssd_bytes = 0;
};

/// Which sessions hold one copy of the blocks they have in common (docs/design.md,
/// "Shared prefixes"). Blocks are shared by chain hash, which covers the model, every
/// token from the start of the history and the request keys (LoRA adapter, media, cache
/// salt), so sessions share exactly the blocks whose KV is the same.
enum class prefix_sharing : std::uint8_t {
  off,             ///< every session stores its own copy of every block
  within_tenant,   ///< sessions of one tenant share (the default)
  across_tenants,  ///< any sessions share; only a cache salt keeps two tenants apart
};

struct store_config {
  // ---- identity: every field here is part of the model_id (model_descriptor), which the
  // MANIFEST records; a directory written under another one is refused at open.
  kv_geometry geometry;       ///< validated by the store; tokens_per_block 0 = auto
  std::string model_name;     ///< with geometry etc. forms the model_id
  std::string rope = "none";  ///< positional-encoding spec (part of the model_id)
  bool keys_pre_rope = false;
  std::uint32_t tp_rank = 0, tp_size = 1;
  std::string weights_revision;            ///< revision, commit or checksum of the weights
  std::string tokenizer;                   ///< tokenizer name and revision (or a hash of its files)
  std::uint32_t pp_rank = 0, pp_size = 1;  ///< pipeline-parallel stage: pp_rank < pp_size
  std::uint32_t layout_version = 0;        ///< the engine's own KV layout version

  std::uint64_t dram_bytes = 0;  ///< DRAM tier capacity; at least one block
  std::string ssd_directory;     ///< empty: no SSD tier (DRAM eviction drops)
  std::uint64_t ssd_bytes = 0;   ///< SSD tier capacity; at least one block if a directory is set

  io_backend backend = io_backend::automatic;
  unsigned queue_depth = 32;          ///< I/O pieces in flight per batch, 1..1024
  unsigned posix_threads = 8;         ///< workers of the pread/pwrite backend
  bool direct_io = true;              ///< O_DIRECT on the SSD files
  bool require_direct_io = true;      ///< refuse a file system without O_DIRECT
  bool write_through = false;         ///< put() returns only once the blocks are durable on SSD
  bool verify_dram_reads = true;      ///< re-check payload checksums when serving from DRAM (get and acquire)
  bool pin_host_memory = true;        ///< cudaHostAlloc / mlock the DRAM tier (best effort)
  std::uint32_t max_sessions = 4096;  ///< live sessions indexed at once
  std::uint32_t queue_window = 1024;  ///< entries of the engine queue set_queue() keeps
  unsigned staging_blocks = 0;        ///< SSD read staging slots (0: 4 x queue_depth)
  /// Whole blocks with equal chain hashes are stored once per tier and reference-counted;
  /// a new session finds the blocks other sessions hold of its prompt.
  prefix_sharing share_prefixes = prefix_sharing::within_tenant;
  /// A tier other stores share (include/attnstore/remote_tier.hpp; a Redis Cluster:
  /// attnstore::shared::store_remote). A session this store holds nothing of is fetched
  /// from it on its lookup or load and promoted into DRAM; after each save the session's
  /// new blocks and its manifest are written behind. Null: none.
  std::shared_ptr<remote_tier> remote;
  /// Session blocks indexed at once, all tiers (each holds a slot, or shares one). 0:
  /// twice the DRAM slots plus the SSD slots, times 4 with prefix sharing (blocks that
  /// share a slot need entries of their own: an entry is its block_meta and
  /// tokens_per_block token ids, next to a whole slot for a block of its own).
  std::uint64_t max_blocks = 0;

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

  /// close() (and the destructor) write DRAM-only blocks to SSD so a clean restart
  /// keeps them, for at most this long; what is left after it is lost (logged). 0: no
  /// flush at close.
  std::uint64_t close_flush_ms = 30000;

  // ---- tenants (docs/operations.md "Tenants")
  /// Per-tenant caps. A save that would take its tenant past its DRAM cap first makes
  /// room from that tenant's own sessions; a tenant past a cap after a save, a
  /// demotion or a load that promoted blocks is trimmed back at once (its other
  /// sessions demoted from DRAM, dropped from SSD, in the policy's order); and when the
  /// store needs room, sessions of tenants past their caps go before anyone else's. So a tenant that floods the store
  /// pushes out its own sessions, not another tenant's within its share. One session larger than a cap is not split: it
  /// stays, demoted to SSD when it passes the DRAM cap.
  std::vector<tenant_quota> tenant_quotas;
  /// The caps of every tenant not listed in tenant_quotas (0: none).
  std::uint64_t tenant_dram_bytes = 0, tenant_ssd_bytes = 0;

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
  std::uint64_t quarantined_slots = 0;  ///< SSD slots not reused: unreadable, or their header could not be erased
  /// DRAM or staging slots never reused: an I/O into them failed with the transfer's
  /// fate unknown (a broken channel), so it might still land.
  std::uint64_t quarantined_buffers = 0;
  std::uint64_t deferred_frees = 0;        ///< DRAM slots whose free waited for a read lease to end
  std::uint64_t close_flushed_blocks = 0;  ///< DRAM-only blocks written to SSD by close()
  std::uint64_t recovery_ns = 0;           ///< time the opening recovery took (scan, index, cleanup)
  std::uint64_t prefetch_started = 0, prefetch_completed = 0, prefetch_cancelled = 0, prefetched_blocks = 0;
  std::uint64_t watermark_demoted_blocks = 0, expired_sessions = 0;
  std::uint64_t dram_used_bytes = 0, dram_capacity_bytes = 0, ssd_used_bytes = 0, ssd_capacity_bytes = 0;
  std::uint64_t sessions = 0;
  /// Shared prefixes: slots held by more than one session block (DRAM, SSD), and the
  /// blocks that point at such a slot beyond its first holder (copies not stored).
  std::uint64_t shared_dram_slots = 0, shared_ssd_slots = 0, dedup_dram_blocks = 0, dedup_ssd_blocks = 0;
  std::uint64_t adopted_blocks = 0;  ///< blocks a session took from others' shared prefixes
  /// The remote tier: fetches of sessions held nowhere here, blocks they brought into
  /// DRAM, fetches that found nothing usable, write-behinds queued and skipped (the
  /// tier over its bound or failing), saves not published because the eviction policy
  /// judged a return unlikely (policy::eviction_policy::worth_sharing).
  std::uint64_t remote_fetches = 0, remote_blocks_fetched = 0, remote_misses = 0;
  std::uint64_t remote_publishes = 0, remote_publishes_skipped = 0, remote_publishes_declined = 0;
  /// Write-behinds that carried the session's DRAM blocks again: the tier had lost some
  /// of what it was given (remote_tier::incomplete).
  std::uint64_t remote_resends = 0;
  std::uint64_t remote_prefetches = 0;  ///< queued sessions fetched from the remote tier ahead of their turn
  /// Remote jobs (a queued session's prefetch, a typing user's declined save) not taken:
  /// 64 were waiting for the background already.
  std::uint64_t remote_jobs_dropped = 0;
};

/// One tenant's share of a store (store::tenant_usage).
struct tenant_stats {
  hash128 tenant{};  ///< hash_tenant(id, the store's secret): how files and metrics name it
  std::uint32_t sessions = 0;
  std::uint64_t dram_bytes = 0, ssd_bytes = 0;              ///< slots held (a block on both tiers counts on both)
  std::uint64_t dram_quota_bytes = 0, ssd_quota_bytes = 0;  ///< 0: no cap
  std::uint64_t quota_demoted_blocks = 0;    ///< DRAM blocks of its own demoted because it was at its cap
  std::uint64_t quota_evicted_sessions = 0;  ///< its own sessions dropped because it was at a cap
};

class store;

/// The model id a store opened with `config` has (what store::model() returns): for an
/// embedder that needs it before the store exists (a remote tier's configuration).
/// Throws std::invalid_argument for an invalid geometry.
model_id store_model_id(const store_config& config);

/// An open layer-wise save: DRAM blocks reserved for a session, filled by the caller
/// (or its copy engine), then committed or aborted. Move-only; a reservation that is
/// destroyed while open is aborted. It names the session's record incarnation, so a
/// commit after the session was dropped (and perhaps re-created) is refused, never
/// applied to the new session.
class save_reservation {
 public:
  save_reservation() = default;
  save_reservation(save_reservation&& o) noexcept { *this = std::move(o); }
  save_reservation& operator=(save_reservation&& o) noexcept;
  save_reservation(const save_reservation&) = delete;
  save_reservation& operator=(const save_reservation&) = delete;
  ~save_reservation();
  explicit operator bool() const noexcept { return head_ != no_slot; }
  std::uint32_t first_block() const noexcept { return first_block_; }
  std::uint32_t blocks() const noexcept { return blocks_; }

 private:
  friend class store;
  store* owner_ = nullptr;
  std::uint32_t record_ = no_slot, generation_ = 0;
  std::uint32_t first_block_ = 0;
  std::uint32_t blocks_ = 0;
  std::uint32_t head_ = no_slot;  // first reserved block (block table index)
  hash128 prev_chain_{};          // chain hash of the entry before the first replaced one
  std::uint32_t from_entry_ = 0;  // index of the first replaced entry in the session's view
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

/// What acquire() handed out: the DRAM slots behind its block_views stay exactly as
/// they were verified until the lease ends, whatever happens to the session meanwhile
/// (a save replacing the blocks, a demotion, a drop: their frees wait for the lease).
/// Move-only; ends in its destructor or release(). Capacity is fixed at construction
/// (the only allocation), so acquire() allocates nothing.
class read_lease {
 public:
  read_lease() = default;
  explicit read_lease(std::uint32_t capacity) : slots_(capacity) {}
  read_lease(read_lease&& o) noexcept { *this = std::move(o); }
  read_lease& operator=(read_lease&& o) noexcept;
  read_lease(const read_lease&) = delete;
  read_lease& operator=(const read_lease&) = delete;
  ~read_lease() { release(); }
  /// Ends the lease: the blocks' DRAM slots may be freed and reused from now on.
  void release() noexcept;
  explicit operator bool() const noexcept { return owner_ != nullptr; }
  std::uint32_t capacity() const noexcept { return std::uint32_t(slots_.size()); }
  std::uint32_t blocks() const noexcept { return count_; }

 private:
  friend class store;
  store* owner_ = nullptr;
  std::uint32_t record_ = no_slot, generation_ = 0;
  std::vector<std::uint32_t> slots_;
  std::uint32_t count_ = 0;
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
  /// recovered from its block headers (payloads are verified when first read); see
  /// docs/format.md "Recovery". Throws std::invalid_argument (a field out of range,
  /// named) or std::runtime_error (directory unusable, O_DIRECT missing, or the
  /// directory was written with another geometry, model, capacity or format: the
  /// message names both values).
  explicit store(store_config config);
  /// close(), then frees everything.
  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  /// The session's index key: hash_session keyed by this store's secret (kept in the
  /// MANIFEST, so it is the same after a restart). What hbm_victim() reports.
  session_hash session_of(const session_key& key) const noexcept;

  /// Longest reusable prefix of `prompt` for the session. Allocation-free.
  /// Fills up to out.size() block locations.
  lookup_result lookup(const session_key& key, std::span<const token_id> prompt,
                       std::span<block_location> out = {}) noexcept;
  /// lookup() of a request with keys (LoRA adapter, cache salt, media hashes at their
  /// token positions): only blocks saved with the same keys where they apply
  /// (block_keys) are reusable. Keys that fail validate_request_keys reuse nothing
  /// (logged). The overloads without keys are these with `keys` = {}.
  lookup_result lookup(const session_key& key, std::span<const token_id> prompt, std::span<block_location> out,
                       const request_keys& keys) noexcept;

  /// Stores KV for the session whose history is `tokens`. `blocks` holds blocks
  /// [first_block, blocks_for(tokens.size())) back to back, block_bytes() each, in the
  /// layer-major block layout; blocks before first_block must already be stored for
  /// these tokens (an incremental save passes only the new and the partial last block).
  /// Stored blocks from first_block on are replaced. The new blocks become visible
  /// together, once all are written (and, in write-through mode, durable).
  /// Returns ok, invalid_argument (sizes; logged), rejected (blocks before first_block
  /// are not stored for these tokens), no_space (nothing evictable, or the index has no
  /// room for a new session), device_error, bad_state (the store is closed).
  [[nodiscard]] errc put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                         std::span<const std::byte> blocks) noexcept;
  /// put() of a request with keys: the blocks' chain hashes (and their headers) carry
  /// block_keys() of `keys`, and the stored prefix before first_block must have been
  /// saved with the same keys (else rejected). invalid_argument when `keys` fail
  /// validate_request_keys against `tokens` (logged; nothing stored).
  [[nodiscard]] errc put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                         std::span<const std::byte> blocks, const request_keys& keys) noexcept;

  /// Copies blocks [first_block, first_block + block_count) of the session into `out`
  /// (block_bytes() each), after checking that they belong to `prompt` (chain hashes)
  /// and verifying their payload checksums. Delivers a verified prefix of the range:
  /// a block that fails verification is dropped from the store and ends the copy; an
  /// I/O error ends it too (the block stays). `tokens` counts exactly the tokens of the
  /// delivered blocks that match the prompt.
  get_result get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                 std::uint32_t block_count, std::span<std::byte> out) noexcept;
  /// get() of a request with keys: blocks match only under the same keys (as lookup).
  /// invalid_argument when `keys` fail validate_request_keys against `prompt`.
  get_result get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                 std::uint32_t block_count, std::span<std::byte> out, const request_keys& keys) noexcept;

  /// Makes the blocks of the session that match `prompt` resident in DRAM (reading SSD
  /// blocks, demoting other sessions for room), verifies them as get() does, and
  /// describes up to views.size() of them. For layer-wise loads that copy straight
  /// from the DRAM tier. `lease` (capacity >= views.size(); a lease still held from an
  /// earlier call is released first) keeps the described payloads valid and unchanged
  /// until it ends, and keeps the session from being chosen for eviction meanwhile.
  /// Returns ok (result.blocks may be 0: no lease is taken), not_found (no session),
  /// checksum_error or device_error (result.blocks is the verified prefix, leased),
  /// no_space, invalid_argument (lease capacity below views.size()).
  get_result acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                     read_lease& lease) noexcept;
  /// acquire() of a request with keys: blocks match only under the same keys (as
  /// lookup). invalid_argument when `keys` fail validate_request_keys against `prompt`.
  get_result acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                     read_lease& lease, const request_keys& keys) noexcept;

  /// Starts a save whose payloads the caller fills itself (layer by layer, by DMA...):
  /// reserves DRAM blocks [first_block, blocks_for(tokens.size())) and writes their
  /// payload addresses to `payloads`. The bytes of a partial last block past the last
  /// token are zeroed here, so nothing of a slot's previous occupant is stored. Nothing
  /// is visible until commit(). Returns ok, invalid_argument, rejected (the stored
  /// prefix is not these tokens), no_space, bad_state (closed).
  [[nodiscard]] errc reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                             std::span<std::byte*> payloads, save_reservation& reservation) noexcept;
  /// reserve() of a request with keys, as put() with keys: the reserved blocks carry
  /// block_keys() of `keys`; invalid_argument when they fail validate_request_keys.
  [[nodiscard]] errc reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                             std::span<std::byte*> payloads, save_reservation& reservation,
                             const request_keys& keys) noexcept;
  /// Checksums the filled blocks, writes them through to SSD if configured, and
  /// publishes them. Returns ok, rejected (the prefix changed meanwhile), not_found
  /// (the session was dropped since reserve, even if re-created), no_space,
  /// device_error, bad_state (empty reservation). The reservation is empty afterwards,
  /// whatever the outcome.
  [[nodiscard]] errc commit(save_reservation& reservation) noexcept;
  /// commit() with the payload checksums already computed by the caller (one per
  /// reserved block, in order: checksum64 of its block_bytes(), e.g. hashed layer by
  /// layer as the copies landed), so the commit does not read the blocks again. A
  /// wrong checksum only makes that block fail verification when read (it is then
  /// dropped, never served). invalid_argument (the reservation is aborted) when the
  /// span does not hold exactly reservation.blocks() values.
  [[nodiscard]] errc commit(save_reservation& reservation, std::span<const std::uint64_t> payload_checksums) noexcept;
  /// Gives reserved blocks back unpublished.
  void abort(save_reservation& reservation) noexcept;

  /// Removes a session from every tier: its SSD slots are zeroed whole (KV and token
  /// ids) and the erasure is made durable before this returns. DRAM slots still read by
  /// a lease are freed when the lease ends. Returns ok or not_found; device_error when
  /// an SSD copy could not be erased and the tombstone that keeps it from coming back
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
  /// policies ignore hints. With a remote tier, a composing user's session whose last
  /// save the policy did not publish is asked about again by the background work
  /// (run_background), since the turn may land on another node. Never waits for the
  /// session. Returns ok, or not_found when the session is not stored.
  errc hint(const session_key& key, policy::session_hint hint) noexcept;

  /// Spare HBM lent by the engine: after a turn the engine may keep `blocks` blocks of the
  /// session's KV in its own GPU pages (the store keeps its saved copy as well), so the
  /// next turn needs no load at all. 0: it keeps none any more. Returns ok or not_found.
  errc keep_in_hbm(const session_key& key, std::uint32_t blocks) noexcept {
    return keep_in_hbm(session_of(key), blocks);
  }
  errc keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept;
  /// When the engine needs its HBM back: the session whose HBM copy goes first in the
  /// eviction policy's order (never a pinned or busy one). Writes its session_of() hash
  /// to `out` and returns true; false when no session is kept in HBM. The engine frees
  /// the pages and calls keep_in_hbm(key, 0). The store only ranks: when it drops a
  /// session (TTL, eviction, drop) it forgets the session's HBM count, so the engine
  /// keeps its own list of what it holds.
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
  std::string_view policy_name() const noexcept;

  /// Moves a session's DRAM blocks to SSD now. Returns ok, not_found, unsupported (no
  /// SSD tier), no_space, device_error.
  errc demote(const session_key& key) noexcept;
  /// Makes every SSD write so far durable. Returns ok, device_error, unsupported.
  errc flush() noexcept;
  /// Stops background work, writes DRAM-only blocks to SSD (for at most
  /// close_flush_ms) and makes everything durable, so a clean restart finds every
  /// session. Later calls that save return bad_state; reads still work. Idempotent.
  /// Returns ok, device_error (some blocks could not be written: logged), unsupported
  /// (no SSD tier: nothing to keep), retry (the time bound ran out first).
  errc close() noexcept;

  store_stats stats() const noexcept;

  /// A tenant id as this store names it everywhere (block headers, metrics labels,
  /// `attnstore purge`): hash_tenant keyed by the store's secret.
  hash128 tenant_of(std::string_view tenant) const noexcept;
  /// What the tenant holds and its caps (zero usage when it holds nothing).
  tenant_stats tenant_usage(std::string_view tenant) const noexcept;
  /// Sets (replaces) a tenant's caps, in bytes per tier, 0 for none; the tenant is
  /// trimmed to them at its next save. Returns ok, or no_space when 64 tenants beyond
  /// those in tenant_quotas already have caps set this way.
  errc set_tenant_quota(std::string_view tenant, std::uint64_t dram_bytes, std::uint64_t ssd_bytes) noexcept;
  /// Drops every session of the tenant, as drop() does each (SSD slots zeroed whole and
  /// synced; leased DRAM freed when the leases end; saves in flight fail at commit).
  /// Sessions the tenant creates while this runs may survive it. Writes the sessions
  /// dropped to `dropped`. Returns ok, not_found (the tenant holds nothing), or
  /// device_error (a session's erasure and its tombstone both failed: logged).
  errc purge(std::string_view tenant, std::uint32_t* dropped = nullptr) noexcept;

  /// Appends the store's metrics in the Prometheus text exposition format (0.0.4):
  /// every stats() counter as attnstore_<name>_total, gauges (bytes per tier, sessions,
  /// reads in flight), latency histograms in seconds (lookup, load by source tier, save,
  /// SSD read and write batches, prefetch lead time). No HTTP inside: serve the text
  /// from the engine's own endpoint. docs/operations.md lists every metric.
  void metrics(std::string& out) const;
  const kv_geometry& geometry() const noexcept;
  const model_id& model() const noexcept;
  std::size_t block_bytes() const noexcept { return geometry().block_bytes(); }
  /// "io_uring", "posix", ... or "none" without an SSD tier.
  std::string_view io_backend_name() const noexcept;
  /// "cuda_pinned", "locked" or "unlocked".
  std::string_view dram_pinning() const noexcept;
  bool has_ssd() const noexcept;

 private:
  struct impl;  // src/store/store_impl.hpp
  friend class read_lease;
  friend class save_reservation;
  void end_lease(read_lease& lease) noexcept;
  std::unique_ptr<impl> impl_;
};

}  // namespace attnstore
