// store::impl: the store's state and the routines its public members are made of.
// Private to src/store/; each .cpp defines the part its name says:
//   store_open.cpp        construction, MANIFEST, recovery, close, stats
//   store_read.cpp        lookup, get, acquire and read leases, SSD read batches
//   store_write.cpp       put, reserve, commit, abort, SSD write batches
//   store_placement.cpp   DRAM/SSD allocation, demotion, victims, drop, truncate, pins
//   store_background.cpp  the engine queue, prefetch, promotion, watermark, TTL
//
// Ownership rules (the reason for most of the code's shape):
// - A published block's DRAM payload never changes. Its slot is freed only through
//   free_dram(), which waits for every read lease on the slot to end (deferred free).
// - A buffer an I/O may still write into (io_in_doubt) is never freed: quarantined.
// - A read's verdict starts failed; only a completed, verified transfer makes it ok.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/detail/latency_histogram.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/policy/prefetcher.hpp"
#include "attnstore/policy/watermark.hpp"
#include "attnstore/store.hpp"
#include "attnstore/tier/host_arena.hpp"
#include "content_table.hpp"
#include "link_log.hpp"
#include "tenant_table.hpp"

namespace attnstore {

// (clang-format does not settle on this macro)
// clang-format off
#define ATTNSTORE_STORE_COUNTERS(X) \
  X(lookups) X(lookup_hits) X(lookup_misses) X(tokens_reusable) X(puts) X(put_blocks) X(put_rejected)  \
  X(put_failed) X(gets) X(blocks_served_dram) X(blocks_served_ssd) X(miss_not_found)                   \
  X(miss_prefix_mismatch) X(miss_checksum) X(miss_io_error) X(checksum_failures) X(io_errors)          \
  X(no_space) X(demoted_blocks) X(promoted_blocks) X(evicted_sessions) X(evicted_blocks)               \
  X(dropped_sessions) X(ssd_bytes_written) X(ssd_bytes_read) X(recovered_sessions) X(recovered_blocks) \
  X(recovery_dropped_blocks) X(quarantined_slots) X(quarantined_buffers) X(deferred_frees)             \
  X(close_flushed_blocks) X(recovery_ns) X(prefetch_started) X(prefetch_completed)                     \
  X(prefetch_cancelled) X(prefetched_blocks) X(watermark_demoted_blocks) X(expired_sessions)           \
  X(adopted_blocks) X(remote_fetches) X(remote_blocks_fetched) X(remote_misses) X(remote_publishes)  \
  X(remote_publishes_skipped) X(remote_publishes_declined) X(remote_resends) X(remote_prefetches) X(remote_jobs_dropped)
// clang-format on

namespace detail {
inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
  c.fetch_add(n, std::memory_order_relaxed);
}
/// SSD read batches this thread has run: store.cpp tells a load served from SSD from
/// one served from DRAM by whether it moved.
inline thread_local std::uint64_t ssd_read_batches = 0;
std::string hex128(const hash128& h);
}  // namespace detail

struct store::impl {
  struct counters {
#define ATTNSTORE_X(name) std::atomic<std::uint64_t> name{0};
    ATTNSTORE_STORE_COUNTERS(ATTNSTORE_X)
#undef ATTNSTORE_X
  };

  impl(store& owner, store_config config);
  ~impl();

  // ---- the public members (store.cpp forwards to these)
  // (`keys`: the request's keys, validated here; the public overloads without them
  // pass none.)
  lookup_result lookup(const session_key& key, std::span<const token_id> prompt, std::span<block_location> out,
                       const request_keys& keys = {}) noexcept;
  errc put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
           std::span<const std::byte> blocks, const request_keys& keys = {}) noexcept;
  get_result get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                 std::uint32_t block_count, std::span<std::byte> out, const request_keys& keys = {}) noexcept;
  get_result acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                     read_lease& lease, const request_keys& keys = {}) noexcept;
  void end_lease(read_lease& lease) noexcept;
  errc reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
               std::span<std::byte*> payloads, save_reservation& r, const request_keys& keys = {}) noexcept;
  /// ok, or invalid_argument (logged, naming `what` and the fault) when `keys` fail
  /// validate_request_keys against `tokens` tokens.
  errc check_keys(const request_keys& keys, std::size_t tokens, const char* what) const noexcept;
  errc commit(save_reservation& r, std::span<const std::uint64_t> checksums, bool checksums_given) noexcept;
  void abort(save_reservation& r) noexcept;
  errc drop(const session_key& key) noexcept;
  errc pin(const session_key& key) noexcept;
  errc unpin(const session_key& key) noexcept;
  errc truncate(const session_key& key, std::span<const token_id> history, const truncation_plan& plan) noexcept;
  void set_queue(std::span<const session_key> waiting) noexcept;
  errc hint(const session_key& key, policy::session_hint hint) noexcept;
  errc keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept;
  bool hbm_victim(session_hash& out) noexcept;
  std::uint32_t run_background() noexcept;
  void drain() noexcept;
  std::uint32_t expire_idle() noexcept;
  errc demote(const session_key& key) noexcept;
  errc flush() noexcept;
  errc close() noexcept;
  store_stats stats() const noexcept;
  session_hash session_of(const session_key& key) const noexcept { return hash_session(key, secret_); }
  hash128 tenant_of(std::string_view tenant) const noexcept { return hash_tenant(tenant, secret_); }
  tenant_stats tenant_usage(std::string_view tenant) const noexcept;
  errc set_tenant_quota(std::string_view tenant, std::uint64_t dram_bytes, std::uint64_t ssd_bytes) noexcept;
  errc purge(std::string_view tenant, std::uint32_t* dropped) noexcept;

  // ---- tenants (store_tenants.cpp). Everything here is guarded by policy_mutex_;
  // record_tenant_ is also only written with the record locked.
  /// Names the tenant of a session record just opened for a save. no_space when the
  /// tenant table is full.
  errc assign_tenant(locked_session& s, const hash128& tenant) noexcept;
  /// The policy was told the record's tier counts: the tenant's usage follows (locked).
  void account_locked(std::uint32_t record, std::uint32_t dram_blocks, std::uint32_t ssd_blocks) noexcept;
  /// The record's tenant is past its cap at `where` (locked).
  bool over_cap_locked(std::uint32_t record, policy::level where) const noexcept;
  /// The tenant hash of a session record (zero if none): what its block headers carry.
  hash128 tenant_hash_of(std::uint32_t record) noexcept;
  /// The tenant of `s` back under its caps: its own other sessions are demoted from
  /// DRAM (`dram`) and dropped from SSD, in the policy's order; `s` and `other` are
  /// never touched (both may be locked by this thread). With `self_too`, s's own DRAM
  /// blocks go to SSD when the others were not enough.
  void trim_tenant(locked_session& s, std::uint32_t other, bool dram, bool self_too) noexcept;
  std::uint64_t cap_blocks(std::uint64_t bytes) const noexcept {
    return bytes ? std::max<std::uint64_t>(1, bytes / slot_bytes_) : 0;
  }

  // ---- DRAM slot ownership (store_read.cpp)
  static constexpr std::uint32_t free_pending = 1u << 31;  // in dram_leases_: free when the last lease ends
  void lease_dram(std::uint32_t slot) noexcept;
  void unlease_dram(std::uint32_t slot) noexcept;
  /// Lets go of a DRAM-tier slot: a slot other blocks still hold (a shared prefix)
  /// stays; otherwise it is freed now, or when the last read lease on it ends. True
  /// when the slot left the tier's use (freed or pending).
  bool free_dram(std::uint32_t slot) noexcept;

  // ---- shared prefixes (store_shared.cpp; content_table.hpp). A whole block's slot in
  // either tier may be held by several sessions' blocks; content_ counts them.
  /// Whether blocks like `m` are shared: sharing on and the block whole.
  bool shareable(const block_meta& m) const noexcept { return sharing_ && m.tokens == geometry_.tokens_per_block; }
  /// The content key of block `index` with chain `chain` for a session of `tenant`.
  detail::content_table::key content_key(const hash128& chain, std::uint64_t index,
                                         const hash128& tenant) const noexcept {
    return {chain, config_.share_prefixes == prefix_sharing::across_tenants ? hash128{} : tenant, index};
  }
  detail::content_table::key content_key(const block_meta& m, const hash128& tenant) const noexcept {
    return content_key(m.chain, m.saved_pos / geometry_.tokens_per_block, tenant);
  }
  /// The LINKS record of block `m` of `owner` (tenant: the owner's, for a link).
  format::link_record link_of(const session_hash& owner, const hash128& tenant, const block_meta& m) const noexcept;
  /// Records that block `b` of `s` holds a slot another block's save wrote (LINKS).
  errc link_borrowed(locked_session& s, std::uint32_t b, const hash128& tenant) noexcept;
  /// Gives block `b` (no SSD copy) its content's SSD copy, when there is one: no write
  /// needed. True when it did (ssd_slot set, borrowed, linked).
  bool take_ssd_copy(locked_session& s, std::uint32_t b, const hash128& tenant) noexcept;
  /// Gives a block with no DRAM copy its content's DRAM copy, when there is one: no
  /// read needed. True when it did.
  bool take_dram_copy(block_meta& m, const hash128& tenant) noexcept;
  /// A copy just made (a verified read, a written slot) becomes its content's copy in
  /// that tier, when the content has none there yet.
  void offer_copy(const block_meta& m, const hash128& tenant, tier t) noexcept {
    if (shareable(m))
      (void)content_->offer(content_key(m, tenant), t, t == tier::ssd ? m.ssd_slot : m.dram_slot, m.checksum);
  }
  /// How many whole blocks at the start of `prompt` (at most max_blocks) the shared
  /// copies hold, for a session of `tenant`; fills `out` like cache_index::lookup.
  lookup_result match_shared(std::span<const token_id> prompt, const request_keys& keys, const hash128& tenant,
                             std::uint32_t max_blocks, std::span<block_location> out = {}) noexcept;
  /// A session that holds nothing takes the shared blocks its prompt starts with (up to
  /// max_blocks), as blocks of its own holding the shared copies. Returns how many.
  std::uint32_t adopt_shared_locked(locked_session& s, std::span<const token_id> prompt, const request_keys& keys,
                                    std::uint32_t max_blocks) noexcept;
  /// Opens `h` for a load: when it holds nothing (or does not exist) and the prompt
  /// starts with shared blocks, creates it and adopts them. Empty when there is nothing.
  locked_session open_for_load(const session_key& key, const session_hash& h, std::span<const token_id> prompt,
                               const request_keys& keys, std::uint32_t max_blocks) noexcept;
  // ---- the remote tier (store_remote.cpp; remote_tier.hpp)
  /// Notes how the remote tier names the session of record `s` (a call that has its key).
  void remember_remote(locked_session& s, const session_key& key) noexcept {
    if (config_.remote) remote_ids_[s.record_id()] = config_.remote->identify(key);
  }
  /// A session that holds nothing takes the leading blocks of its history that the
  /// remote tier has and `prompt` starts with (at most max_blocks), into DRAM. Returns
  /// how many.
  /// An empty prompt takes the whole history (a prefetch: the request's keys are checked
  /// when it comes). `may_demote`: when no DRAM is free, a few blocks' room is made.
  /// `keys_known` false: the caller has no request keys (a truncation); keys digests are
  /// then taken as the tier gives them, and checked when a request comes (match_prompt).
  std::uint32_t fill_from_remote_locked(locked_session& s, std::span<const token_id> prompt, const request_keys& keys,
                                        std::uint32_t max_blocks, bool may_demote = true,
                                        bool keys_known = true) noexcept;
  /// The background's remote work for a session the engine will serve soon (queued, or
  /// its user typing): held nowhere here, its history is fetched into free DRAM; held
  /// here with its last save declined by the policy, it is published if the policy now
  /// finds it worth it.
  void run_remote_job(const session_key& key) noexcept;
  struct remote_job {
    std::string tenant, session;
  };
  static constexpr std::size_t max_remote_jobs = 64;
  /// Queues a remote job unless it is queued already or the queue is full; the caller
  /// holds work_mutex_ and notifies the thread when this returns true.
  bool queue_remote_job_locked(const session_key& key);
  /// Write-behind of the session's history after a save (whole blocks and a partial
  /// last one, up to the first that is neither in DRAM nor published before).
  void publish_remote_locked(locked_session& s) noexcept;

  /// Makes the LINKS file durable with the SSD writes (after device_->sync()).
  errc sync_links() noexcept { return links_ ? links_->sync() : errc::ok; }
  /// A buffer an I/O may still write into: never reused.
  void quarantine_buffer() noexcept { detail::bump(counters_->quarantined_buffers); }
  std::byte* dram_payload(std::uint32_t slot) const noexcept { return dram_->data(slot) + header_bytes_; }

  // ---- placement (store_placement.cpp)
  static constexpr unsigned batch_max = 256;  // I/O requests per device batch
  std::uint32_t alloc_dram(locked_session& self, std::uint32_t self_keep_from) noexcept;
  /// A free SSD slot, evicting SSD victims for one unless `may_evict` is false.
  std::uint32_t alloc_ssd(std::uint32_t exclude_a, std::uint32_t exclude_b, bool may_evict = true) noexcept;
  /// Demotes DRAM blocks at view positions < until_position to SSD. Returns ok,
  /// unsupported (no SSD), no_space (no SSD slot), device_error (the DRAM copies stay).
  /// `freed` (when given) counts the DRAM slots that left use (a shared slot other
  /// blocks still hold stays).
  errc demote_locked(locked_session& s, std::uint32_t until_position, std::uint32_t exclude, bool may_evict = true,
                     std::uint32_t* freed = nullptr) noexcept;
  /// Demotes the policy's first DRAM victim; returns the DRAM blocks it freed (0: no
  /// victim or nothing freed). On the allocation path (`background` false) a victim
  /// that cannot be demoted for want of room (no SSD tier, SSD full of protected data)
  /// is dropped; one that hit an I/O error keeps its blocks. Background work (prefetch
  /// room, the watermark) only demotes, into free SSD slots (it evicts nobody), and
  /// never a queued session.
  /// `only_tenant`: victims of that tenant only (a cap being enforced).
  /// `moved` (when given) says whether a victim let go of DRAM blocks, freeing slots
  /// or not (blocks of a shared prefix others hold free none).
  std::uint32_t demote_some_victim(std::uint32_t exclude, bool background = false, const hash128* only_tenant = nullptr,
                                   bool* moved = nullptr) noexcept;
  /// Demotes a locked victim whole (drops it where it cannot be demoted for want of
  /// room, on the allocation path: then *dropped is set); returns the DRAM blocks freed.
  std::uint32_t demote_victim(locked_session& victim, std::uint32_t exclude, bool background, bool* dropped) noexcept;
  /// Frees DRAM for `blocks` blocks before a request locks its session, so the
  /// demotions it takes are not done under that session's lock. A tenant that would
  /// pass its DRAM cap makes the room from its own sessions first.
  void make_room(std::uint32_t blocks, const session_hash& for_session, const hash128* tenant = nullptr) noexcept;
  bool evict_some_ssd_victim(std::uint32_t exclude_a, std::uint32_t exclude_b) noexcept;
  /// Frees a detached chain of blocks: DRAM slots (deferred while leased), SSD copies
  /// (header area zeroed; whole slot when `wipe`), block table entries.
  /// `kept_shared` (when given) is set when a slot stayed because other blocks hold it,
  /// or a block held a borrowed slot: recovery could bring the session back from it.
  /// `owner` (when given): the session the blocks were part of. A block whose SSD slot
  /// stays (others hold it) or was borrowed is then retired in LINKS, so recovery does
  /// not take that slot's header, or the session's link to it, as the session's block.
  errc release_chain(std::uint32_t first, bool wipe = false, bool* kept_shared = nullptr,
                     const session_hash* owner = nullptr) noexcept;
  /// Appends the retirement of block `m` of `owner` to LINKS (see release_chain).
  void retire_block(const session_hash& owner, const block_meta& m) noexcept;
  errc drop_locked(locked_session& s, bool wipe = false) noexcept;
  /// What drop() and purge() do to a session: erased from every tier, durably (wiped
  /// SSD slots, synced; a tombstone where an erase failed).
  errc drop_session_locked(locked_session& s) noexcept;
  /// Zeroes the slots' header areas (whole slots when `wipe`) and frees them; a slot
  /// that cannot be erased is quarantined. Returns ok or device_error.
  errc invalidate_ssd(std::span<const std::uint32_t> slots, bool wipe = false) noexcept;
  /// Zeroes the header areas (whole slots when `wipe`) of `slots` in batches (a failed
  /// write is retried once); calls outcome(slot, erased) for each. Frees nothing.
  template <class Outcome>
  void erase_slots(std::span<const std::uint32_t> slots, bool wipe, Outcome&& outcome) noexcept;
  /// Writes blocks of `s` (their DRAM copies, headers built from their metadata) to the
  /// given SSD slots, up to batch_max at a time: the one SSD write routine (saves,
  /// demotions, close). results[i] is bytes or -errno (io_in_doubt: slot quarantined),
  /// or took_shared_copy: the block's content had an SSD copy by the time of the write,
  /// which the block now holds (ssd_slot set, borrowed); its slot went back unwritten.
  /// A whole block written becomes its content's SSD copy when there is none.
  errc write_ssd_blocks(locked_session& s, std::span<const std::uint32_t> blocks,
                        std::span<const std::uint32_t> ssd_slots, std::span<std::int32_t> results) noexcept;
  static constexpr std::int32_t took_shared_copy = 1;
  /// The header area of a DRAM slot is written by whoever writes the slot to SSD; a
  /// slot several blocks hold could have two such writers at once: each claims it.
  bool claim_header(std::uint32_t dram_slot) noexcept {
    return !header_claims_[dram_slot].exchange(true, std::memory_order_acquire);
  }
  void unclaim_header(std::uint32_t dram_slot) noexcept {
    header_claims_[dram_slot].store(false, std::memory_order_release);
  }
  /// Sets the SSD copy of each block written whole; others give their slot back (or
  /// quarantine it when the write is in doubt). Returns how many were adopted.
  std::size_t adopt_written(locked_session& s, std::span<const std::uint32_t> blocks,
                            std::span<const std::uint32_t> ssd_slots, std::span<const std::int32_t> results) noexcept;
  locked_session open_or_evict(const session_hash& key, errc* why) noexcept;
  /// The first session in the policy's victim order for `where` that is unpinned, not
  /// busy (try-lock) and accepted by `want`, locked. Never one of the two excluded records.
  template <class Want>
  locked_session pick_victim(policy::level where, Want&& want, std::uint32_t exclude_a,
                             std::uint32_t exclude_b) noexcept;

  // ---- save path (store_write.cpp)
  errc reserve_locked(locked_session& s, std::span<const token_id> tokens, std::uint32_t first_block,
                      save_reservation& r, const request_keys& keys) noexcept;
  errc commit_locked(locked_session& s, save_reservation& r, bool checksums_known) noexcept;
  /// Gives a reservation's blocks back and empties it (the record is not touched).
  void drop_reservation(save_reservation& r, const session_hash* owner = nullptr) noexcept;
  void zero_unused_tail(std::byte* payload, std::uint32_t tokens) const noexcept;

  // ---- read path (store_read.cpp)
  get_result serve_locked(locked_session& s, std::span<const token_id> prompt, std::uint32_t first_block,
                          std::uint32_t block_count, std::span<std::byte> out, std::span<block_view> views,
                          std::uint32_t* leased_slots, const request_keys& keys) noexcept;
  struct ssd_read_batch;
  /// Reads a batch of SSD blocks into their buffers, verifying each (header, chain,
  /// checksum; copying it out when the batch has an output) as it completes. A block
  /// is ok only when its transfer completed and verified.
  void read_ssd_batch(ssd_read_batch& rb) noexcept;
  /// Frees (or quarantines, when its read is in doubt) the buffer of a read that is
  /// not kept.
  void give_back_read_buffer(const ssd_read_batch& rb, std::size_t i) noexcept;

  // ---- policy events and background work (store_background.cpp)
  std::uint64_t now() const noexcept;
  /// Tells the policy the session's tier counts (and, when `accessed`, that it was used).
  /// `prompt_tokens` > 0: a turn starts with a prompt that long (policy::on_prompt).
  void note(locked_session& s, bool accessed, std::size_t prompt_tokens = 0) noexcept;
  /// A load: the access is told before the blocks it promoted, so a learning policy
  /// does not read the promotion as a save (a turn's end).
  void note_load(locked_session& s, std::size_t prompt_tokens) noexcept;
  void note_miss(const session_hash& key) noexcept;
  void erase_record(locked_session& s) noexcept;
  void erase_if_empty(locked_session& s) noexcept {
    if (s.block_count() == 0 && s.pins() == 0) erase_record(s);
  }
  std::uint32_t promote_locked(locked_session& s, std::uint32_t max_blocks, bool may_demote) noexcept;
  void plan_prefetch_locked(bool likely) noexcept;
  void size_windows_locked(std::size_t queued) noexcept;
  void set_held_locked(std::uint32_t record, std::uint32_t blocks) noexcept;
  /// Free DRAM below the watermark's low mark: wake the background demotion.
  void want_demotion_if_low() noexcept;
  std::uint32_t free_dram_slots() const noexcept { return dram_->capacity() - dram_->used(); }
  void wake_background() noexcept { work_cv_.notify_one(); }
  void background_loop() noexcept;
  void stop_background() noexcept;
  struct prefetch_target;
  struct promotion_job {
    std::uint32_t record;
    std::uint32_t blocks;
    std::uint64_t ticket;
    bool beyond_queue;  // a likely returner, not a queued session: free DRAM only
  };
  void run_promotion(const promotion_job& job) noexcept;

  // ---- recovery and the on-disk format (store_open.cpp)
  void recover();
  bool write_tombstone(const session_hash& key) noexcept;
  void write_or_check_manifest();
  bool mark_clean() noexcept;
  bool take_clean_mark();

  // Blocks per promotion batch: a turn's own SSD read waits behind at most one, and
  // background reads still keep the device busy (4 hid less: docs/benchmarks.md).
  static constexpr unsigned promote_batch = 16;
  static constexpr std::uint32_t likely_per_plan = 64;  // likely returners looked at per prefetch plan

  store& owner_;
  store_config config_;
  kv_geometry geometry_;
  model_id model_;
  hash128 secret_{};
  std::size_t header_bytes_ = 0;
  std::size_t slot_bytes_ = 0;
  std::unique_ptr<host_arena> dram_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> dram_leases_;  // per DRAM slot: leases | free_pending
  std::unique_ptr<host_arena> staging_;
  std::unique_ptr<ssd_space> ssd_;
  std::unique_ptr<block_device> device_;
  std::unique_ptr<cache_index> index_;
  std::unique_ptr<detail::content_table> content_;      // holder counts of shared slots (always made)
  bool sharing_ = false;                                // new blocks are shared (share_prefixes)
  std::unique_ptr<detail::link_log> links_;             // with an SSD tier
  std::unique_ptr<std::atomic<bool>[]> header_claims_;  // per DRAM slot: its header area is being written
  std::vector<remote_session> remote_ids_;              // per record: the remote tier's name of its session
  struct remote_record {                                // per record, under its session's lock
    std::atomic<bool> declined{false};                  // its last save was not published (policy); hint reads it
    std::uint8_t resend_wait = 0;                       // publishes of an incomplete session before the next resend
    std::uint8_t resend_round = 0;                      // resends since the tier last had it whole (the wait doubles)
  };
  std::unique_ptr<remote_record[]> remote_state_;  // with a remote tier
  std::int32_t staging_buffer_base_ = 0;           // registered-buffer index of staging region 0
  std::atomic<std::uint64_t> sequence_{1};
  std::unique_ptr<counters> counters_;
  /// Latency histograms (store::metrics). lookup/load/save are timed in store.cpp
  /// around the public calls; SSD batches and the prefetch lead time here.
  struct latencies {
    detail::latency_histogram lookup, load_dram, load_ssd, save, ssd_read, ssd_write, prefetch_lead;
  };
  std::unique_ptr<latencies> latencies_ = std::make_unique<latencies>();
  /// Per record: when a prefetch last made it resident (detail::ticks(), the clock of
  /// the latency histograms, not config_.clock, which tests may stop), 0 once a load used it.
  std::unique_ptr<std::atomic<std::uint64_t>[]> prefetched_at_;
  void write_metrics(std::string& out) const;
  void write_tenant_metrics(std::string& out) const;  // tier sessions and per-tenant usage
  /// Times one load into the histogram of the tier it was served from: SSD when this
  /// thread ran an SSD read batch meanwhile.
  template <class Load>
  get_result timed_load(Load&& load) noexcept {
    const std::uint64_t t0 = detail::ticks(), batches = detail::ssd_read_batches;
    get_result r = load();
    (detail::ssd_read_batches != batches ? latencies_->load_ssd : latencies_->load_dram)
        .observe_ticks(detail::ticks() - t0);
    return r;
  }
  struct free_deleter {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, free_deleter> zeros_;  // slot_bytes_ of zeros: what erasing writes
  std::atomic<bool> closed_{false};
  std::mutex close_mutex_;

  // Policies. Lock order: record -> policy_mutex_ -> shard -> work_mutex_. Under the
  // policy mutex, records are only try-locked (victim choice).
  mutable std::mutex policy_mutex_;
  std::unique_ptr<policy::eviction_policy> policy_;
  policy::predictive* predictive_ = nullptr;  // policy_ when it is the predictive one
  std::unique_ptr<policy::prefetcher> prefetcher_;
  policy::demotion_watermark watermark_{};
  std::unique_ptr<detail::tenant_table> tenants_;
  std::vector<std::uint32_t> record_tenant_;                    // per record: tenant entry, or no_slot
  std::vector<std::uint32_t> noted_dram_, noted_ssd_;           // per record: tier counts the tenant was charged
  std::uint32_t over_dram_tenants_ = 0, over_ssd_tenants_ = 0;  // tenants past a cap now
  std::size_t configured_tenants_ = 0;                          // entries with caps of their own
  static constexpr std::size_t spare_tenants = 64;              // caps set at run time beyond the configured ones
  std::vector<std::uint32_t> held_;                             // per record: distinct blocks (all tiers)
  std::uint64_t held_total_ = 0;                                // sum of held_
  std::uint32_t held_sessions_ = 0;                             // records with held_ > 0
  std::uint64_t no_room_until_ = 0;                             // queued promotions found no DRAM: none until then
  std::vector<std::uint32_t> queue_records_;                    // set_queue scratch (policy mutex)
  std::mutex queue_mutex_;  // set_queue's hashing scratch; taken before the policy mutex
  std::vector<session_hash> queue_hashes_;

  // Background work: promotions the prefetcher started, demotion, TTL.
  std::mutex work_mutex_;
  std::condition_variable work_cv_, idle_cv_;
  std::vector<promotion_job> jobs_;      // ring, capacity max_sessions
  std::vector<remote_job> remote_jobs_;  // queued sessions to fetch from the remote tier
  std::size_t job_head_ = 0, job_count_ = 0;
  bool demotion_wanted_ = false, stopping_ = false, busy_ = false;
  std::atomic<std::uint64_t> next_ttl_check_{0};
  std::atomic<std::uint64_t> next_plan_{0};                    // periodic prefetch plan
  std::atomic<std::uint32_t> demand_reads_{0};                 // SSD reads a request is waiting on
  std::atomic<std::uint32_t> open_leases_{0}, open_saves_{0};  // in flight now (metrics)
  std::thread worker_;
};

// One batch of SSD reads. A buffer slot is in the DRAM tier (promoted: the block stays
// there) or in the staging arena (read only to be copied out).
struct store::impl::ssd_read_batch {
  struct pending_read {
    std::uint32_t block, position, buffer_slot;  // position: entry index in the view
    bool promoted;
    std::uint32_t matched;
    errc verdict;                 // device_error until the transfer completed and verified
    std::uint32_t first;          // first used token inside the block
    std::uint64_t view_position;  // view position of that token
  };
  ssd_read_batch(locked_session* s, std::byte* copy_to, std::uint32_t first) noexcept
      : session(s), out(copy_to), first_block(first) {}
  void add(std::uint32_t block, std::uint32_t position, std::uint32_t buffer, bool promoted, std::uint32_t matched,
           std::uint32_t first_token, std::uint64_t view_position) noexcept {
    pending[count++] = {block, position, buffer, promoted, matched, errc::device_error, first_token, view_position};
  }
  locked_session* session;
  std::byte* out;  // copy each verified payload to out + (position - first_block) blocks; null: no copy
  std::uint32_t first_block;
  std::size_t count = 0;
  store::impl* self = nullptr;
  pending_read pending[batch_max];
  io_request reqs[batch_max];
};

template <class Outcome>
void store::impl::erase_slots(std::span<const std::uint32_t> slots, bool wipe, Outcome&& outcome) noexcept {
  const std::uint32_t bytes = std::uint32_t(wipe ? slot_bytes_ : header_bytes_);
  for (std::size_t base = 0; base < slots.size(); base += batch_max) {
    io_request reqs[batch_max];
    const std::size_t n = std::min<std::size_t>(batch_max, slots.size() - base);
    for (std::size_t i = 0; i < n; ++i)
      reqs[i] = io_request{
          io_op::write, ssd_->file_of(slots[base + i]), ssd_->offset_of(slots[base + i]), zeros_.get(), bytes, -1, 0};
    if (device_->execute(std::span(reqs, n), config_.queue_depth) != errc::ok)
      for (std::size_t i = 0; i < n; ++i)
        if (reqs[i].result != std::int32_t(bytes) && reqs[i].result != io_in_doubt)
          (void)device_->execute(std::span(&reqs[i], 1));
    for (std::size_t i = 0; i < n; ++i) outcome(slots[base + i], reqs[i].result == std::int32_t(bytes));
  }
}

template <class Want>
locked_session store::impl::pick_victim(policy::level where, Want&& want, std::uint32_t exclude_a,
                                        std::uint32_t exclude_b) noexcept {
  locked_session victim;
  std::lock_guard lock(policy_mutex_);
  // Sessions of tenants past their cap at this level go first, in the policy's order.
  const bool caps_first = (where == policy::level::dram && over_dram_tenants_ > 0) ||
                          (where == policy::level::ssd && over_ssd_tenants_ > 0);
  for (int pass = caps_first ? 0 : 1; pass < 2 && !victim; ++pass)
    policy_->pick_victim(where, [&](std::uint32_t rec) noexcept {
      if (rec == exclude_a || rec == exclude_b || (pass == 0 && !over_cap_locked(rec, where))) return false;
      locked_session h = index_->try_open_record(rec);  // never waits: we hold the policy mutex
      if (!h || h.pins() > 0 || !want(h)) return false;
      victim = std::move(h);
      return true;
    });
  return victim;
}

}  // namespace attnstore
