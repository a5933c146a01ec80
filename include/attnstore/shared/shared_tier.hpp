// The shared tier: KV blocks and session manifests in a Redis Cluster, so that a session
// saved by one store is served by another (issue 15). Blocks are content-addressed by
// (model, chain hash), immutable and written once; a session's manifest lists its chain of
// blocks and its token ids under a keyed hash of (tenant, session). A reader verifies
// everything it gets exactly as an SSD block is verified; a bad value is a miss.
//
// This is the component; the store decides which sessions go here and when, and promotes
// what it fetches into its own DRAM. docs/shared_tier.md describes formats and trust.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "attnstore/log.hpp"
#include "attnstore/shared/records.hpp"
#include "attnstore/shared/redis_cluster.hpp"
#include "attnstore/types.hpp"

namespace attnstore::shared {

/// Configuration; the constructor validates every field and throws std::invalid_argument
/// naming the field and its allowed range (the cluster part: redis_cluster_config's rules).
struct shared_tier_config {
  /// Seeds, AUTH user and password, timeouts, circuit breaker. max_value_bytes must hold a
  /// block record (header_bytes(tokens_per_block) + block_bytes) and the servers'
  /// proto-max-bulk-len must be at least that.
  redis_cluster_config cluster;
  /// The store's model_id (non-zero): every key and record carries it; nothing written under
  /// one model is served under another.
  model_id model{};
  /// The fleet's secret (non-zero), the same on every store that shares sessions: session and
  /// tenant hashes are keyed with it (hash_session, hash_tenant), so manifest keys cannot be
  /// derived from session ids without it. Keep it out of the cluster.
  hash128 fleet_secret{};
  /// The geometry's tokens_per_block (1..65536) and block_bytes() (1 B..1 GiB).
  std::uint32_t tokens_per_block = 0;
  std::size_t block_bytes = 0;
  /// Expiry of block records and of manifests (PX); 0: none (the servers' LRU alone
  /// evicts). At most 365 days.
  std::chrono::milliseconds block_ttl{std::chrono::hours{24}};
  std::chrono::milliseconds manifest_ttl{std::chrono::hours{24}};
  /// Bound on the bytes publish() has copied and the writer has not yet sent (records of the
  /// blocks to upload and the manifest). A publish that would exceed it is refused (busy).
  /// At least one block record, at most 64 GiB.
  std::size_t max_bytes_in_flight = std::size_t(256) << 20;
  /// Bytes of values per pipelined batch, reads and writes (at least one record is always
  /// sent). 1 MiB..1 GiB.
  std::size_t max_batch_bytes = std::size_t(64) << 20;
  /// Rounds of SET ... GET a manifest write spends putting back a newer manifest it
  /// displaced (see publish), 0..16.
  unsigned manifest_retries = 4;
  /// Bounds on manifests read back.
  manifest_limits limits{};
  /// Write failures at debug; the cluster client logs breaker transitions through its own.
  logger log{};
};

/// A session as the shared tier names it: keyed hashes, never the ids in clear.
struct shared_session {
  session_hash session;  ///< hash_session(key, fleet_secret)
  hash128 tenant;        ///< hash_tenant(key.tenant, fleet_secret)
};

/// What publish() takes: a session's whole view as the manifest will list it, and the
/// payloads of the blocks to upload. Views: publish copies what it keeps before returning.
struct publish_request {
  /// The manifest's version, > 0: a manifest is never replaced by one with a smaller
  /// sequence (next_manifest_sequence gives one).
  std::uint64_t sequence = 0;
  /// Every stored token of the blocks the manifest lists, back to back (blocks of
  /// tokens_per_block; the last may be partial). 1..limits.max_tokens.
  std::span<const token_id> tokens;
  /// An untruncated history: per block, its block_keys() digest; empty: every block is
  /// keyless (zero). Empty when `blocks` is given.
  std::span<const hash128> keys;
  /// Per block (as many as blocks), its payload (block_bytes) to upload, or nullptr for a
  /// block that is already in the tier: listed in the manifest, not sent.
  std::span<const std::byte* const> payloads;
  /// A view (truncated or not): per block, what it is and keeps (check_view must accept
  /// it). Empty: the untruncated history of `tokens` under `keys`.
  std::span<const remote_block> blocks;
};

/// fetch_blocks' answer.
struct fetch_result {
  std::uint32_t prefix = 0;                      ///< blocks [0, prefix) are ok: the reusable prefix
  shared_status first_miss = shared_status::ok;  ///< why block `prefix` is not (ok: every block was)
};

/// Per-reason miss counts.
struct shared_miss_counts {
  std::uint64_t not_found = 0, verify_failed = 0, timeout = 0, node_down = 0, oom = 0, auth_error = 0, other = 0;
  std::uint64_t total() const noexcept {
    return not_found + verify_failed + timeout + node_down + oom + auth_error + other;
  }
};

/// Counters since construction (relaxed reads: a snapshot).
struct shared_tier_stats {
  std::uint64_t manifest_hits = 0;         ///< fetch_manifest ok
  shared_miss_counts manifest_misses;      ///< fetch_manifest misses, by reason
  std::uint64_t block_hits = 0;            ///< blocks fetch_blocks served (verified)
  shared_miss_counts block_misses;         ///< the block that ended a prefix, by reason
  std::uint64_t blocks_skipped = 0;        ///< blocks after a prefix's end (not served)
  std::uint64_t publishes = 0;             ///< publish calls queued
  std::uint64_t publishes_refused = 0;     ///< publish calls refused as busy
  std::uint64_t publishes_dropped = 0;     ///< queued publishes dropped unsent at destruction
  std::uint64_t blocks_written = 0;        ///< block records stored by this tier
  std::uint64_t blocks_present = 0;        ///< listed blocks found there, and kept (not sent)
  shared_miss_counts write_failures;       ///< block and manifest writes that failed, by reason
  std::uint64_t manifests_written = 0;     ///< manifests stored (and not displaced by this tier again)
  std::uint64_t manifests_truncated = 0;   ///< of them, cut at the first block that failed to upload
  std::uint64_t manifests_superseded = 0;  ///< not kept: a newer manifest was there and was put back
  std::uint64_t bytes_read = 0;            ///< value bytes received (blocks and manifests)
  std::uint64_t bytes_written = 0;         ///< value bytes sent (blocks and manifests)
  std::uint64_t bytes_in_flight = 0;       ///< copied by publish, not yet sent (now)
};

/// A shared tier on one Redis Cluster.
///
/// Reads (fetch_manifest, fetch_blocks) run in the caller's thread on a cluster client of
/// their own; writes (publish) are copied and queued, and one background thread sends them
/// on a second client, so a large upload never holds a node's connection that a read
/// waits for.
///
/// Failure is a miss, never a stall: every cluster call is bounded by the client's
/// request_timeout (fetch_blocks starts no batch once request_timeout has passed since the
/// call began: at most two in all, one when the prefix fits a batch), a dead node's breaker
/// fails its keys at once, and publish never waits for the network.
///
/// Threads: every member may be called from any thread at once (reads to the same node
/// serialize on its connection). The destructor must not run concurrently with a call.
class shared_tier {
 public:
  /// Validates `config` (std::invalid_argument naming the field), creates the two cluster
  /// clients and starts the writer thread. Connects to nothing: the first call does.
  explicit shared_tier(shared_tier_config config);
  /// Stops the writer: the publish being sent finishes (each batch bounded by
  /// request_timeout); publishes still queued are dropped (publishes_dropped).
  ~shared_tier();
  shared_tier(const shared_tier&) = delete;
  shared_tier& operator=(const shared_tier&) = delete;

  /// The keyed hashes of a session key under the fleet secret. Allocation-free.
  shared_session identify(const session_key& key) const noexcept;

  /// Reads and verifies the session's manifest (decode_manifest: this model, this session,
  /// this tenant, chains recomputed). ok with `out` filled (its vectors' capacity reused);
  /// not_found, verify_failed, timeout, node_down, auth_error or error with `out` cleared.
  [[nodiscard]] shared_status fetch_manifest(const shared_session& session, session_manifest& out) noexcept;

  /// Reads the blocks of a view (a manifest's ref(i), from any entry on; each is verified
  /// against its own previous chain): each payload is received from the network straight into out[i]
  /// (block_bytes each) and verified there exactly (verify_block_parts: the checks of
  /// verify_block_record) as soon as it has arrived. status[i] is ok, a miss
  /// (not_found, verify_failed, timeout, node_down, auth_error, error), skipped for blocks
  /// after the first miss, or invalid_argument (a ref's tokens out of range, or a block
  /// before the last that is not full). Blocks are read in pipelined batches of up to max_batch_bytes over every node
  /// at once; the prefix ends at the first block that is not ok and later batches are not
  /// read. out[i] holds the block only when status[i] is ok (after a miss, the buffers of
  /// later blocks of its batch may have been written). `checksums` (optional): for every
  /// ok block, checksums[i] is its payload's checksum64, the one just verified (so the
  /// caller need not hash the payload again). refs, out, status and a non-empty checksums
  /// must be equally long (else every status is invalid_argument and the prefix is 0).
  [[nodiscard]] fetch_result fetch_blocks(std::span<const block_ref> refs, std::span<std::byte* const> out,
                                          std::span<shared_status> status,
                                          std::span<std::uint64_t> checksums = {}) noexcept;

  /// Queues a write-behind of the request's blocks and then of the session's manifest: every
  /// listed block is kept in the tier (PEXPIRE with block_ttl, or TOUCH: the servers' LRU
  /// sees it used); those absent are stored with SET NX when the request carries their
  /// payload, and otherwise end the manifest there. Copies
  /// the payloads into block records (computing their checksums) before returning; never
  /// waits for the network. ok (queued), busy (the bytes would exceed max_bytes_in_flight:
  /// nothing queued), invalid_argument (sizes, counts, sequence 0; see publish_request),
  /// error (no memory), bad_state (shutting down).
  ///
  /// The writer stores blocks first and the manifest after them. When a block upload fails
  /// (oom, timeout, node down) or a listed block is missing, the manifest is cut before
  /// that block (nothing is written
  /// when it is block 0). Manifests are versioned by `sequence`: the write is
  /// `SET ... GET`; when the value it displaced is a valid manifest of the same session with
  /// a larger sequence, that one is put back (again with SET ... GET, up to
  /// manifest_retries rounds, keeping the largest seen), so a stale write-behind never
  /// leaves an older manifest over a newer one for longer than those round trips.
  [[nodiscard]] shared_status publish(const shared_session& session, const publish_request& request) noexcept;

  /// Whether the last publish of the session that the writer finished lacked a block it
  /// listed (an upload failed, or a block listed without a payload was not in the tier any
  /// more: evicted, expired, its node restarted): the tier may lack blocks the caller
  /// believes published, and its next publish should carry every payload it still has.
  /// False positives are possible (sessions share bits of a fixed table); O(1).
  bool incomplete(const shared_session& session) const noexcept;

  /// Waits until every queued publish has been sent (or failed). ok, or timeout after
  /// `limit`. For tests and orderly shutdown; the store's paths never call it.
  [[nodiscard]] shared_status flush(std::chrono::milliseconds limit) noexcept;

  /// Counters since construction.
  shared_tier_stats stats() const noexcept;
  /// The validated configuration.
  const shared_tier_config& config() const noexcept;
  /// The block record size of this tier.
  record_shape shape() const noexcept;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace attnstore::shared
