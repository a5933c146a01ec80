// remote_tier: a tier below the SSD that other stores share, so a conversation's next
// turn finds its history on whichever node it lands (issue 15). The store calls it; an
// implementation does the network I/O: attnstore::shared::store_remote (a Redis Cluster,
// include/attnstore/shared/store_remote.hpp), or an embedder's own.
//
// What comes back is untrusted until verified: an implementation verifies every block it
// returns exactly (model, chain, token ids, payload checksum); the store then checks the
// token ids against the prompt and the keys digests against the request's own, and keeps
// only the prefix that agrees. A miss of any kind (not there, evicted, a node down, a
// timeout, a bad value) is zero blocks, within the implementation's time bound.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "attnstore/status.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

/// One block of a session's view as the remote tier carries it: what it stores and the
/// part of it the view keeps. Untruncated, every block is whole (view_first 0, view_count
/// = tokens), saved at its view position, after the block before it. After a truncation
/// (truncate.hpp) a block may keep a sub-range and sit before its saved position; its view
/// position is where the blocks before it in the view end.
struct remote_block {
  hash128 previous;              ///< what its KV continues (block_meta::previous; zero: saved at position 0)
  hash128 keys;                  ///< its block_keys() digest (zero: saved without keys)
  std::uint32_t index = 0;       ///< its block index when saved (saved position / tokens_per_block)
  std::uint32_t tokens = 0;      ///< tokens it stores: tokens_per_block, except perhaps the last
  std::uint32_t view_first = 0;  ///< the view keeps its tokens [view_first, view_first + view_count)
  std::uint32_t view_count = 0;
};

/// Whether `b`, the entry of a view after entries that keep `position` tokens, can be what
/// a store's view holds: its tokens (tokens_per_block unless it is the `last`), a kept
/// range of at least one token inside it, saved at position 0 exactly when it continues
/// nothing, and placed where truncation can place it: where its first kept token was
/// saved, or whole blocks before (truncation drops whole blocks, and moves tokens only
/// back); a block not moved is kept from its start. What the tier's readers and the
/// store check of every entry a fetch returns.
constexpr bool valid_view_entry(const remote_block& b, std::uint64_t position, std::uint32_t tokens_per_block,
                                bool last) noexcept {
  const std::uint64_t tpb = tokens_per_block;
  if (tpb == 0 || b.tokens == 0 || b.tokens > tpb || (!last && b.tokens != tpb)) return false;
  if (b.view_count == 0 || b.view_first >= b.tokens || b.view_count > b.tokens - b.view_first) return false;
  if ((b.index == 0) != b.previous.is_zero()) return false;
  const std::uint64_t saved = std::uint64_t(b.index) * tpb + b.view_first;
  return position <= saved && (saved - position) % tpb == 0 && (position != saved || b.view_first == 0);
}

/// One leading entry of a view the caller holds: fetch() skips the tier's entries that are
/// these very ones.
struct remote_held_block {
  hash128 chain;
  std::uint32_t index = 0, view_first = 0, view_count = 0;
};

/// What the caller holds of the session's view, for fetch().
struct remote_held {
  /// Its leading entries the prompt matches whole.
  std::span<const remote_held_block> blocks;
  /// How many of the prompt's tokens its view gives: a view in the tier that gives no
  /// more is not read.
  std::uint64_t tokens = 0;
};

/// Where fetch() puts what it found: room for payloads.size() blocks.
struct remote_fetch {
  std::span<std::byte* const> payloads;  ///< block_bytes each, written for the blocks returned
  std::span<token_id> tokens;            ///< tokens_per_block x payloads.size(): the blocks' stored token ids
  std::span<remote_block> blocks;        ///< per block: what it is and what the view keeps of it
  std::span<std::uint64_t> checksums;    ///< per block: checksum64 of its payload, as verified
};

/// What fetch() found: view entries [first, first + blocks), in out[0, blocks).
struct remote_found {
  std::uint32_t first = 0;
  std::uint32_t blocks = 0;
};

/// A session as the remote tier names it: keyed hashes under a secret the stores of a
/// fleet share (not a store's own), so every node names a session alike.
struct remote_session {
  session_hash session{};
  hash128 tenant{};
};

class remote_tier {
 public:
  virtual ~remote_tier() = default;

  /// The name of `key` in the tier. Allocation-free.
  virtual remote_session identify(const session_key& key) const noexcept = 0;

  /// The leading blocks of the session's view as some store published it, as long as the
  /// view's kept token ids from its start are a prefix of `prompt` (the last block's at
  /// least in part; every block, up to the room given, when `prompt` is empty), each
  /// verified. The answer starts at the first entry that is not held.blocks[i] (same
  /// chain, saved index and kept range): first <= held.blocks.size(). When the view gives
  /// no more of a non-empty prompt than held.tokens, nothing is read: 0 blocks. A miss is
  /// 0 blocks.
  virtual remote_found fetch(const remote_session& session, std::span<const token_id> prompt, const remote_held& held,
                             const remote_fetch& out) noexcept = 0;

  /// Write-behind of a session's view after a turn: per block, its stored tokens (back
  /// to back; every block full but the last), what it is and keeps (`blocks`), and its
  /// payload (nullptr: a block this store published before, listed but not sent). Copies
  /// what it keeps before returning and never waits for the network: ok (queued), retry
  /// (over its bound on bytes in flight: nothing queued), or an error.
  virtual errc publish(const remote_session& session, std::span<const token_id> tokens,
                       std::span<const remote_block> blocks, std::span<const std::byte* const> payloads) noexcept = 0;

  /// The session is gone: what names it in the tier goes too (best effort).
  virtual void drop(const remote_session& session) noexcept = 0;

  /// About how long the tier keeps a block it was given, in seconds (a TTL; under memory
  /// pressure it may keep it less): the policy weighs a session's chance of returning
  /// within it before publishing (policy::eviction_policy::worth_sharing).
  virtual double retention_s() const noexcept { return 86400; }

  /// Whether the tier may lack blocks of the session that an earlier publish gave it (a
  /// write failed, a block was evicted or its server restarted): the store's next publish
  /// then carries every payload it still holds in DRAM, not only the new blocks (copied
  /// under the session's lock; while the tier stays incomplete, the store backs off). A
  /// tier that cannot tell says false.
  virtual bool incomplete(const remote_session& session) const noexcept {
    (void)session;
    return false;
  }
};

}  // namespace attnstore
