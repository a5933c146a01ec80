// What the shared tier keeps in a Redis Cluster: the keys, the block record (the SSD block
// layout of format/block_header.hpp, verbatim) and the session manifest record, with the
// checks that make a value read from the network safe to serve. No I/O: everything here
// is pure and can be tested (and fuzzed) without a server. docs/shared_tier.md describes
// the formats byte by byte.
//
// Nothing read from the network is trusted: every decode and verify below takes arbitrary
// bytes (random, truncated, of another model, session or tenant) and answers
// verify_failed for anything but the exact record that was asked for. They never read
// outside the value, never allocate more than the value's size implies, never throw.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "attnstore/format/block_header.hpp"
#include "attnstore/remote_tier.hpp"
#include "attnstore/shared/redis_cluster.hpp"
#include "attnstore/status.hpp"
#include "attnstore/types.hpp"

namespace attnstore::shared {

/// Outcome of a shared tier call, per block or per manifest. Every miss says why.
enum class shared_status : std::uint8_t {
  ok = 0,
  not_found,         ///< no such key: never written, expired (TTL), evicted (LRU) or deleted
  verify_failed,     ///< a value that is not the record asked for: damaged, truncated, of another
                     ///< model, session or tenant, tokens that differ, a chain that does not continue
  timeout,           ///< no answer within the cluster client's timeouts
  node_down,         ///< the key's node is unreachable, its breaker is open, the cluster is failing
                     ///< over or resharding (no route, CLUSTERDOWN, LOADING, TRYAGAIN, redirections)
  oom,               ///< the node is at maxmemory and cannot evict (writes)
  auth_error,        ///< AUTH refused: wrong user or password (the configuration's fault)
  error,             ///< anything else: an error reply, a malformed reply, no memory
  skipped,           ///< fetch_blocks: a block after the prefix's first miss (never served)
  busy,              ///< publish: the write would exceed max_bytes_in_flight; nothing was queued
  invalid_argument,  ///< the caller's request is out of range (sizes, counts, spans that differ)
  bad_state,         ///< the tier is shutting down
};

/// Stable lower-case name of a status, for logs and stats.
constexpr std::string_view to_string(shared_status s) noexcept {
  constexpr std::string_view names[] = {"ok",        "not_found", "verify_failed",    "timeout",
                                        "node_down", "oom",       "auth_error",       "error",
                                        "skipped",   "busy",      "invalid_argument", "bad_state"};
  const auto i = static_cast<std::size_t>(s);
  return i < std::size(names) ? names[i] : std::string_view("unknown");
}

/// The store's view: a verify failure is checksum_error (never served), transient failures
/// and a full queue are retry, a full node is no_space, a refused AUTH is rejected.
constexpr errc to_errc(shared_status s) noexcept {
  switch (s) {
    case shared_status::ok:
      return errc::ok;
    case shared_status::not_found:
    case shared_status::skipped:
      return errc::not_found;
    case shared_status::verify_failed:
      return errc::checksum_error;
    case shared_status::timeout:
    case shared_status::node_down:
    case shared_status::busy:
      return errc::retry;
    case shared_status::oom:
      return errc::no_space;
    case shared_status::auth_error:
      return errc::rejected;
    case shared_status::invalid_argument:
      return errc::invalid_argument;
    case shared_status::bad_state:
      return errc::bad_state;
    case shared_status::error:
      return errc::device_error;
  }
  return errc::device_error;
}

/// A cluster client's per-key status as a shared tier status. `exists` (a write-once SET
/// that found the record there) is ok: content-addressed records are equal by construction.
constexpr shared_status from_redis(redis_status s) noexcept {
  switch (s) {
    case redis_status::ok:
    case redis_status::exists:
      return shared_status::ok;
    case redis_status::not_found:
      return shared_status::not_found;
    case redis_status::timeout:
      return shared_status::timeout;
    case redis_status::io_error:
    case redis_status::circuit_open:
    case redis_status::no_route:
    case redis_status::redirect_limit:
    case redis_status::cluster_down:
    case redis_status::loading:
    case redis_status::try_again:
      return shared_status::node_down;
    case redis_status::oom:
      return shared_status::oom;
    case redis_status::auth_error:
      return shared_status::auth_error;
    case redis_status::invalid_argument:
      return shared_status::invalid_argument;
    case redis_status::server_error:
    case redis_status::protocol_error:
    case redis_status::internal_error:
      return shared_status::error;
  }
  return shared_status::error;
}

// ---------------------------------------------------------------------------------- keys

/// A key as fixed storage (no heap): at most record_key::capacity bytes.
struct record_key {
  static constexpr std::size_t capacity = 80;
  std::array<char, capacity> bytes{};
  std::uint8_t size = 0;
  std::string_view view() const noexcept { return {bytes.data(), size}; }
};

/// `ats:<model>:b:{<chain>}`: the block whose chain hash is `chain`, under `model` (each hash
/// as 32 lowercase hex digits, hi then lo, as the MANIFEST writes them). The hash tag is the
/// chain: blocks spread over every slot, hence every master (a tag on the model would put a
/// model's every block on one node).
record_key block_key(const hash128& model, const hash128& chain) noexcept;

/// `ats:<model>:m:{<session>}`: the manifest of a session (its keyed hash), under `model`.
record_key manifest_key(const hash128& model, const session_hash& session) noexcept;

// --------------------------------------------------------------------------- block records

/// The size of the blocks of one model: what every block record must match.
struct record_shape {
  std::uint32_t tokens_per_block = 0;  ///< kv_geometry::tokens_per_block
  std::size_t block_bytes = 0;         ///< kv_geometry::block_bytes(): one block's payload
  /// The header area: format::header_bytes (fixed fields, token ids, zeros to 4096).
  constexpr std::size_t header_bytes() const noexcept { return format::header_bytes(tokens_per_block); }
  /// A block record: header area then the payload, unpadded.
  constexpr std::size_t record_bytes() const noexcept { return header_bytes() + block_bytes; }
};

/// What the reader expects of one block: where it sits in the session and what it holds.
struct block_ref {
  hash128 chain;                     ///< the block's chain hash (its key)
  hash128 previous;                  ///< what its KV continues (the block before it when saved; zero for block 0)
  hash128 keys;                      ///< its block_keys() digest (zero: a request without keys)
  std::uint32_t index = 0;           ///< its block index when saved (saved position / tokens_per_block)
  std::span<const token_id> tokens;  ///< its token ids (1..tokens_per_block)
};

/// Writes a block record's header area (area[0, shape.header_bytes())) with
/// format::write_header: the SSD layout, with session and tenant zero, block_index
/// `index`, a put of one block (put_first_block = index, put_blocks = 1) and sequence 0.
/// Every field is a function of the block's content, so two writers of one block produce
/// byte-identical records (blocks are shared by every session and tenant that reach them).
void write_block_header(std::byte* area, const record_shape& shape, const model_id& model, std::uint32_t index,
                        const hash128& chain, const hash128& keys, std::span<const token_id> tokens,
                        std::uint64_t payload_checksum) noexcept;

/// Checks a block record read from the network against what the reader asked for, exactly
/// as an SSD slot is judged (format::judge_slot: magic, version, header checksum, sizes,
/// model) and more: the value is exactly shape.record_bytes() long; session and tenant are
/// zero and the put is the one-block put write_block_header writes; the chain, keys digest
/// and index equal ref's; the chain recomputed from ref.previous, the record's token ids
/// and its keys digest (chain_hash) equals it; the token ids equal ref.tokens. Then the
/// payload is copied to `out` (shape.block_bytes) while its checksum is computed, and
/// compared. ok, or verify_failed (then `out` holds unspecified bytes: never serve them).
[[nodiscard]] shared_status verify_block_record(std::span<const std::byte> value, const record_shape& shape,
                                                const model_id& model, const block_ref& ref, std::byte* out) noexcept;

/// verify_block_record for a record that arrived in two pieces and is verified where it
/// lies: its header area `head` (exactly shape.header_bytes()) and its payload, already in
/// the caller's buffer at `payload` (shape.block_bytes). The same checks, in the same order;
/// the payload's checksum is computed in place (no copy). ok (with *payload_checksum, when
/// given, the payload's checksum64), or verify_failed (never serve the payload then).
[[nodiscard]] shared_status verify_block_parts(std::span<const std::byte> head, const std::byte* payload,
                                               const record_shape& shape, const model_id& model, const block_ref& ref,
                                               std::uint64_t* payload_checksum = nullptr) noexcept;

// ------------------------------------------------------------------------ manifest records

inline constexpr std::uint64_t manifest_magic = 0x324e4d5353544e41ull;  // "ANTSSMN2" little-endian
inline constexpr std::uint32_t manifest_version = 2;
inline constexpr std::size_t manifest_fixed_bytes = 88;   ///< fields before the block list
inline constexpr std::size_t manifest_block_bytes = 48;   ///< one block entry
inline constexpr std::size_t manifest_trailer_bytes = 8;  ///< the XXH3-64 checksum

/// One block of a manifest: a stored block and the part of it the session's view keeps
/// (remote_block's fields: previous, keys, index, tokens, view_first, view_count), and its
/// chain. Untruncated, every block is whole, at its saved position, after the block before
/// it. After a truncation (truncate.hpp) a block may keep a sub-range, at a view position
/// before its saved one, after a block that is not its predecessor.
struct manifest_block : remote_block {
  hash128 chain;  ///< chain_hash(previous, model, its tokens, keys): its key (computed, never stored)
};

/// A session's view in the shared tier: its blocks in order, the part of each it keeps,
/// and their token ids. A turn appends (a new manifest with a larger sequence replaces
/// the old one).
struct session_manifest {
  hash128 model;         ///< model_id::value
  session_hash session;  ///< hash_session(key, fleet secret)
  hash128 tenant;        ///< hash_tenant(key.tenant, fleet secret)
  std::uint32_t tokens_per_block = 0;
  std::uint64_t sequence = 0;  ///< version: a manifest never replaces one with a larger sequence
  std::vector<manifest_block> blocks;
  std::vector<token_id> tokens;  ///< every block's stored token ids, back to back

  /// Block i's stored token ids (blocks before the last are full, so they start at i x tokens_per_block).
  std::span<const token_id> tokens_of(std::size_t i) const noexcept {
    return std::span<const token_id>(tokens).subspan(std::size_t(i) * tokens_per_block, blocks[i].tokens);
  }
  /// The ones block i has in the view.
  std::span<const token_id> view_tokens_of(std::size_t i) const noexcept {
    return tokens_of(i).subspan(blocks[i].view_first, blocks[i].view_count);
  }
  /// What fetch_blocks needs for block i.
  block_ref ref(std::size_t i) const noexcept {
    return block_ref{blocks[i].chain, blocks[i].previous, blocks[i].keys, blocks[i].index, tokens_of(i)};
  }
};

/// Bounds a reader puts on a manifest before it believes any count in it.
struct manifest_limits {
  std::size_t max_tokens = std::size_t(1) << 22;  ///< 4 Mi tokens (16 MiB of token ids)
};

/// Fills `m.blocks` from m.tokens and m.tokens_per_block under `model`, as an untruncated
/// history (every block whole, at its position, after the one before): token counts,
/// chains, the per-block keys digests `keys` (empty: zero for every block; else one per
/// block). invalid_argument when tokens are empty, tokens_per_block is 0 or keys has the
/// wrong length.
[[nodiscard]] shared_status build_manifest_blocks(session_manifest& m, const model_id& model,
                                                  std::span<const hash128> keys) noexcept;

/// Fills `m.blocks` from m.tokens and a view's blocks as the store describes them
/// (remote_block: previous, keys, saved index, tokens, kept range); chains are computed.
/// invalid_argument when they do not describe a view check_view accepts.
[[nodiscard]] shared_status build_view_blocks(session_manifest& m, const model_id& model,
                                              std::span<const remote_block> blocks) noexcept;

/// Whether m.blocks describe a view: their token counts against m.tokens, and every entry
/// one valid_view_entry (remote_tier.hpp) accepts where the view places it. ok or
/// invalid_argument.
[[nodiscard]] shared_status check_view(const session_manifest& m) noexcept;

/// Size of m's record.
std::size_t manifest_record_bytes(const session_manifest& m) noexcept;

/// Serializes `m` into `out` (resized to manifest_record_bytes): fixed fields, block
/// entries, token ids, then XXH3-64 of everything before. invalid_argument when m is not a
/// view check_view accepts, error when `out` cannot grow.
[[nodiscard]] shared_status encode_manifest(const session_manifest& m, std::vector<std::byte>& out) noexcept;

/// What a reader expects of a manifest.
struct manifest_expectation {
  model_id model;
  session_hash session;
  hash128 tenant;
  std::uint32_t tokens_per_block = 0;
  manifest_limits limits;
};

/// Parses and checks a manifest record read from the network: magic, version, exact size
/// for its counts (within `limits`), checksum, model, session, tenant and tokens_per_block
/// equal to `expect`'s, and a view check_view accepts. Every chain is computed from the
/// block's previous chain, token ids and keys digest (so a manifest can point only at blocks
/// of this model holding exactly these tokens). ok with `out` filled (its vectors' capacity
/// is reused), verify_failed with `out` cleared, or error when `out` cannot grow.
[[nodiscard]] shared_status decode_manifest(std::span<const std::byte> value, const manifest_expectation& expect,
                                            session_manifest& out) noexcept;

/// The sequence a manifest of a session should carry: one more than the previous one
/// known (0 when none), and at least the wall clock in microseconds, so a publisher that
/// never saw the previous manifest still orders after it (given clocks within a turn's
/// time of each other).
std::uint64_t next_manifest_sequence(std::uint64_t previous) noexcept;

}  // namespace attnstore::shared
