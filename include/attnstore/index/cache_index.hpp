// cache_index: session-keyed, sharded index of stored blocks.
//
// session_hash -> session_record {blocks in order, each with its tier slots, chain hash,
// payload checksum and token ids; pin count}. Every table is sized at
// construction: nothing allocates afterwards. A record is changed only while its own
// mutex is held (through a locked_session), so blocks being written are invisible
// until the writer publishes them, and lookups of one session never wait for another.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/slot_pool.hpp"
#include "attnstore/hash.hpp"
#include "attnstore/status.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

/// Which tier holds a block.
enum class tier : std::uint8_t { none = 0, dram = 1, ssd = 2 };

/// One stored block of a session.
struct block_meta {
  hash128 chain;  ///< chain hash through this block: chain_hash(previous, model, its tokens, keys)
  /// What its KV was computed after: the chain of the block before it when it was saved
  /// (zero for the first), or the digest of a truncated view it was saved after
  /// (view_continuation). Kept for a block that truncation moved away from its
  /// predecessor, so its chain can still be checked (the remote tier's manifests).
  hash128 previous{};
  /// block_keys() of the request that saved the block (zero: none): what its chain hash
  /// was computed with, and what a partial or token-wise match must present too.
  hash128 keys{};
  std::uint64_t checksum = 0;  ///< XXH3-64 of the payload
  /// Sequence number: the put that made the block numbers its blocks put_sequence +
  /// (index - put_first_block); every SSD copy of the block carries it (docs/format.md).
  std::uint64_t sequence = 0;
  std::uint32_t put_first_block = 0;  ///< first block index its put wrote
  std::uint32_t put_blocks = 0;       ///< blocks its put wrote
  /// Its SSD copy is a slot another block's save wrote (a shared prefix): the slot's
  /// header names that save's session and sequence, and the store's LINKS file names
  /// this block (docs/format.md).
  bool borrowed = false;
  /// Its content is in the remote tier (this store published it there, or fetched it
  /// from there): a later publish lists it without sending it again.
  bool published = false;
  std::uint32_t dram_slot = no_slot;
  std::uint32_t ssd_slot = no_slot;
  std::uint32_t tokens = 0;      ///< tokens stored in this block (last block may be partial)
  std::uint32_t next = no_slot;  ///< next block of the session (block table index)
  // The block's part of the session's current view. Untruncated: all its tokens, at
  // the positions they were saved at. After truncation a block may keep a sub-range,
  // and its tokens move: view position = saved position + shift (see truncate.hpp).
  std::uint32_t view_first = 0;  ///< first token of the block in the view
  std::uint32_t view_count = 0;  ///< tokens of the block in the view
  std::uint64_t saved_pos = 0;   ///< position of token 0 when the block was saved
  std::int64_t shift = 0;        ///< view position - saved position

  tier fastest() const noexcept {
    return dram_slot != no_slot ? tier::dram : ssd_slot != no_slot ? tier::ssd : tier::none;
  }
};

/// Feeds block `m`, the next entry of a session's view, to `v`.
inline void continue_view(view_continuation& v, const block_meta& m, std::uint32_t tokens_per_block) noexcept {
  v.add(m.chain, m.previous, m.saved_pos, m.tokens, m.view_first, m.view_count, tokens_per_block);
}

/// Where one reusable block lives (filled by lookup()).
struct block_location {
  tier where = tier::none;
  std::uint32_t slot = no_slot;
  std::uint32_t tokens = 0;  ///< tokens of this block that match the prompt
};

/// One step of matching a prompt against a session's view (match_prompt).
struct block_match {
  std::uint32_t block;     ///< block table index
  std::uint32_t index;     ///< entry index in the session's view
  std::uint64_t position;  ///< view position of the first matched token
  std::uint32_t first;     ///< its offset inside the block
  std::uint32_t tokens;    ///< tokens matched in this entry
  bool whole;              ///< the entry matched entirely (not the last, partial match)
};

/// What lookup() found.
struct lookup_result {
  std::uint64_t tokens = 0;       ///< reusable prefix length in tokens
  std::uint32_t blocks = 0;       ///< blocks holding it (the last may match partially)
  std::uint32_t dram_blocks = 0;  ///< of which in DRAM
  std::uint32_t ssd_blocks = 0;   ///< of which only on SSD
};

struct cache_index_options {
  std::uint32_t max_sessions = 4096;  ///< live session records
  std::uint32_t max_blocks = 0;       ///< stored blocks, all tiers (DRAM slots + SSD slots)
  std::uint32_t tokens_per_block = 0;
  std::uint32_t shards = 64;  ///< power of two
};

class cache_index;

/// A session record, locked. Obtained from cache_index::open(); unlocks and releases
/// the record when destroyed. All block operations of a session go through it.
class locked_session {
 public:
  locked_session() = default;
  locked_session(locked_session&& o) noexcept : index_(o.index_), record_(o.record_) { o.index_ = nullptr; }
  locked_session& operator=(locked_session&& o) noexcept;
  locked_session(const locked_session&) = delete;
  ~locked_session() { reset(); }

  explicit operator bool() const noexcept { return index_ != nullptr; }
  void reset() noexcept;

  std::uint32_t block_count() const noexcept;
  std::uint64_t token_count() const noexcept;
  std::uint32_t pins() const noexcept;
  std::uint32_t record_id() const noexcept { return record_; }
  /// Incarnation of the record: changes each time the record id is reused for another
  /// session, so a handle kept across a drop (a lease, a reservation) can tell.
  std::uint32_t generation() const noexcept;
  const session_hash& key() const noexcept;

  /// Block table index of the session's i-th block (O(i)), or no_slot.
  std::uint32_t block_at(std::uint32_t i) const noexcept;
  /// First block (table index) or no_slot; follow block_meta::next.
  std::uint32_t first_block() const noexcept;
  block_meta& meta(std::uint32_t block) const noexcept;
  std::span<const token_id> tokens_of(std::uint32_t block) const noexcept;

  /// Takes a free block table entry, fills its tokens; it is not yet part of the
  /// session (invisible) until publish(). Returns no_slot when the table is full.
  std::uint32_t new_block(std::span<const token_id> tokens) noexcept;
  /// Returns an unpublished (or detached) block entry to the table.
  void free_block(std::uint32_t block) noexcept;
  /// Appends `block` to an unpublished chain (head, tail: no_slot while empty).
  void append(std::uint32_t& head, std::uint32_t& tail, std::uint32_t block) const noexcept {
    if (tail == no_slot)
      head = block;
    else
      meta(tail).next = block;
    tail = block;
  }
  /// Replaces the session's blocks from position `from` on with the chain `first`
  /// (linked through next, `count` blocks). The old blocks from `from` on are detached
  /// and returned as a chain (their slots are still owned by the caller to release).
  std::uint32_t publish(std::uint32_t from, std::uint32_t first, std::uint32_t count) noexcept;
  /// Makes `head` (linked through next) the session's whole view; the caller owns any
  /// block no longer linked from it.
  void relink(std::uint32_t head) noexcept;
  /// Detaches blocks from position `from` to the end; returns their chain.
  std::uint32_t truncate(std::uint32_t from) noexcept { return publish(from, no_slot, 0); }
  /// True once truncate() dropped tokens from the middle: the view is then matched by
  /// token ids (chain hashes cover the original history).
  bool truncated() const noexcept;
  void set_truncated(bool truncated) noexcept;
  /// Rebuilds the count of tokens from the view (after a view changed).
  void recount() noexcept;
  /// Tier counters kept per record so victims are found without walking blocks.
  void count_tiers() noexcept;
  std::uint32_t dram_blocks() const noexcept;
  std::uint32_t ssd_blocks() const noexcept;

  void pin() noexcept;
  void unpin() noexcept;
  /// Removes the session from the index. The caller must have released every block's
  /// slots (truncate(0) first). The handle stays valid (and locked) until destroyed.
  void erase() noexcept;

 private:
  friend class cache_index;
  locked_session(cache_index* index, std::uint32_t record) : index_(index), record_(record) {}
  cache_index* index_ = nullptr;
  std::uint32_t record_ = 0;
};

class cache_index {
 public:
  /// Throws std::invalid_argument naming a bad field.
  explicit cache_index(const cache_index_options& options);
  cache_index(const cache_index&) = delete;
  cache_index& operator=(const cache_index&) = delete;

  /// Opens and locks a session's record; creates it when `create` and it does not
  /// exist. Returns an empty handle when it does not exist or cannot be created; then
  /// `why` (when given) says: not_found (no such session), retry (all max_sessions
  /// records are live: the caller evicts and retries) or no_space (the session's shard
  /// is at its load limit: evicting elsewhere would not help). Never spins.
  locked_session open(const session_hash& key, bool create, errc* why = nullptr) noexcept;
  /// Like open() but never blocks on the record mutex (eviction uses this).
  locked_session try_open_record(std::uint32_t record) noexcept;
  /// Opens record `record` (blocking) only if it is still the incarnation `generation`.
  locked_session open_record(std::uint32_t record, std::uint32_t generation) noexcept;

  /// Longest prefix of `prompt` whose blocks are stored with matching chain hashes;
  /// the last block may match partially (token ids compared inside it). Writes up to
  /// out.size() locations. Allocation-free. Recency is the caller's business (the store
  /// tells its eviction policy). `keys`: the request's keys (valid: validate_request_keys),
  /// as match_prompt takes them.
  lookup_result lookup(const session_hash& key, const model_id& model, std::span<const token_id> prompt,
                       std::span<block_location> out = {}, const request_keys& keys = {}) noexcept;
  /// The same on a session already locked.
  lookup_result lookup(locked_session& s, const model_id& model, std::span<const token_id> prompt,
                       std::span<block_location> out = {}, const request_keys& keys = {}) noexcept;

  /// Walks the longest prefix of `prompt` that the session's view holds: chain hashes
  /// for whole untruncated blocks, token ids inside the first block that differs and
  /// everywhere in a truncated view. Calls visit(const block_match&) for each matched
  /// entry, in order; visit returns false to stop. Returns the tokens matched up to
  /// where the walk stopped. Allocation-free.
  ///
  /// Keys: the chain hash of block i is computed with block_keys(keys, its first token,
  /// its tokens), and a block matched by token ids (a partial match, a truncated view)
  /// must hold that same digest: a block saved under another LoRA adapter, salt or
  /// image never matches, not even partly. A block whose stored range held a media
  /// span the request does not have (the prompt ends before it) is not matched either.
  template <class Visit>
  std::uint64_t match_prompt(locked_session& s, const model_id& model, std::span<const token_id> prompt, Visit&& visit,
                             const request_keys& keys = {}) noexcept;

  /// The record id of a live session, or no_slot; takes only the shard lock (the
  /// record may be erased right after: callers recheck under try_open_record or open).
  std::uint32_t find(const session_hash& key) noexcept;

  /// A block table entry. The caller holds the owning session's lock, or owns the
  /// block because it was detached from its session (publish/truncate).
  block_meta& block(std::uint32_t b) noexcept { return blocks_[b]; }
  /// Returns a detached block table entry.
  void release_block(std::uint32_t b) noexcept { block_pool_.release(b); }

  /// Whether a record holds a session now (it may stop right after).
  bool record_live(std::uint32_t record) const noexcept { return records_[record].live(); }
  std::uint32_t live_sessions() const noexcept { return live_.load(std::memory_order_relaxed); }
  /// Sessions pinned now (a load or save in progress, or pinned by the engine).
  std::uint32_t pinned_sessions() const noexcept { return pinned_.load(std::memory_order_relaxed); }
  std::uint32_t max_sessions() const noexcept { return std::uint32_t(records_.size()); }
  std::uint32_t tokens_per_block() const noexcept { return tokens_per_block_; }
  std::uint32_t free_blocks() const noexcept { return block_pool_.capacity() - block_pool_.used(); }

 private:
  friend class locked_session;
  struct record {
    std::mutex mutex;
    session_hash key{};
    std::uint32_t head = no_slot, tail = no_slot, count = 0;
    std::uint64_t tokens = 0;
    std::uint32_t dram_blocks = 0, ssd_blocks = 0, pins = 0;
    std::uint32_t generation = 0;  // bumped when the record is freed for reuse
    bool truncated = false;
    // bit 0: live (indexed); bits 1..: handles held. One word, so "the last handle of
    // an erased record" is decided by a single read-modify-write.
    std::atomic<std::uint32_t> state{0};
    bool live() const noexcept { return state.load(std::memory_order_acquire) & 1u; }
  };
  struct shard {
    std::mutex mutex;
    std::vector<hash128> keys;
    std::vector<std::uint32_t> values;  // record id, or no_slot for empty
    std::uint32_t mask = 0;
    std::uint32_t count = 0, limit = 0;  // entries; at most limit (< capacity: probes end)
  };

  shard& shard_of(const session_hash& k) noexcept { return shards_[k.value.hi & shard_mask_]; }
  std::uint32_t find_in(shard& s, const session_hash& k) const noexcept;
  void insert_in(shard& s, const session_hash& k, std::uint32_t rec) noexcept;
  void erase_in(shard& s, const session_hash& k) noexcept;
  void release_record(std::uint32_t rec) noexcept;

  std::uint32_t tokens_per_block_;
  std::vector<record> records_;
  detail::slot_pool record_pool_;
  std::vector<shard> shards_;
  std::uint64_t shard_mask_;
  std::vector<block_meta> blocks_;
  std::vector<token_id> tokens_;
  detail::slot_pool block_pool_;
  std::atomic<std::uint32_t> live_{0};
  std::atomic<std::uint32_t> pinned_{0};
};

}  // namespace attnstore

#include "attnstore/detail/cache_index.inl"
