// cache_index bodies. Lock order: record -> shard. open() takes the shard lock and
// releases it before it waits for the record.
#pragma once

namespace attnstore {

inline cache_index::cache_index(const cache_index_options& o)
    : tokens_per_block_(o.tokens_per_block),
      records_(o.max_sessions),
      record_pool_(o.max_sessions),
      blocks_(o.max_blocks),
      block_pool_(o.max_blocks) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("cache_index_options: " + m); };
  if (o.max_sessions == 0) fail("max_sessions is 0, must be at least 1");
  if (o.max_blocks == 0) fail("max_blocks is 0, must be at least 1");
  if (o.tokens_per_block == 0) fail("tokens_per_block is 0, must be at least 1");
  if (o.shards == 0 || (o.shards & (o.shards - 1)))
    fail("shards is " + std::to_string(o.shards) + ", must be a power of two");
  tokens_.resize(std::size_t(o.max_blocks) * o.tokens_per_block);
  shards_ = std::vector<shard>(o.shards);
  shard_mask_ = o.shards - 1;
  // Keys are keyed hashes (the store's secret), so sessions spread evenly; a shard still
  // has a hard limit (3/4 of its table) so that no insert or probe can run forever.
  // Twice the mean plus slack keeps a refusal out of reach for honest key sets.
  std::uint32_t per = 16;
  while (per * 3 / 4 < 2 * (o.max_sessions / o.shards + 8)) per *= 2;
  for (auto& s : shards_) {
    s.keys.assign(per, hash128{});
    s.values.assign(per, no_slot);
    s.mask = per - 1;
    s.limit = per * 3 / 4;
  }
}

inline std::uint32_t cache_index::find_in(shard& s, const session_hash& k) const noexcept {
  std::uint32_t i = std::uint32_t(k.value.lo) & s.mask;
  for (std::uint32_t probes = 0; probes <= s.mask; ++probes, i = (i + 1) & s.mask) {
    if (s.values[i] == no_slot) return no_slot;
    if (s.keys[i] == k.value) return s.values[i];
  }
  return no_slot;
}

inline void cache_index::insert_in(shard& s, const session_hash& k, std::uint32_t rec) noexcept {
  std::uint32_t i = std::uint32_t(k.value.lo) & s.mask;
  while (s.values[i] != no_slot) i = (i + 1) & s.mask;  // ends: count < limit < capacity
  s.keys[i] = k.value;
  s.values[i] = rec;
  ++s.count;
}

inline void cache_index::erase_in(shard& s, const session_hash& k) noexcept {
  std::uint32_t i = std::uint32_t(k.value.lo) & s.mask;
  while (s.values[i] != no_slot && !(s.keys[i] == k.value)) i = (i + 1) & s.mask;
  if (s.values[i] == no_slot) return;
  --s.count;
  // Backward-shift deletion keeps probe chains intact without tombstones.
  for (std::uint32_t j = (i + 1) & s.mask; s.values[j] != no_slot; j = (j + 1) & s.mask) {
    std::uint32_t home = std::uint32_t(s.keys[j].lo) & s.mask;
    bool movable = i <= j ? (home <= i || home > j) : (home <= i && home > j);
    if (movable) {
      s.keys[i] = s.keys[j];
      s.values[i] = s.values[j];
      i = j;
    }
  }
  s.values[i] = no_slot;
}

inline void cache_index::release_record(std::uint32_t rec) noexcept {
  record& r = records_[rec];
  // 2 = one handle and not live: this was the last handle of an erased record.
  if (r.state.fetch_sub(2, std::memory_order_acq_rel) == 2) {
    r.head = r.tail = no_slot;
    r.count = 0;
    r.tokens = 0;
    r.dram_blocks = r.ssd_blocks = r.pins = 0;
    r.truncated = false;
    ++r.generation;  // handles of the old incarnation no longer match
    record_pool_.release(rec);
  }
}

inline locked_session cache_index::open(const session_hash& key, bool create, errc* why) noexcept {
  auto refuse = [&](errc e) {
    if (why) *why = e;
    return locked_session{};
  };
  for (;;) {
    shard& s = shard_of(key);
    std::uint32_t rec;
    {
      std::lock_guard lock(s.mutex);
      rec = find_in(s, key);
      if (rec == no_slot) {
        if (!create) return refuse(errc::not_found);
        if (s.count >= s.limit) return refuse(errc::no_space);
        rec = record_pool_.allocate();
        if (rec == no_slot) return refuse(errc::retry);
        record& r = records_[rec];
        r.key = key;
        r.state.store(1u | 2u, std::memory_order_release);  // live, one handle
        insert_in(s, key, rec);
        live_.fetch_add(1, std::memory_order_relaxed);
      } else {
        records_[rec].state.fetch_add(2, std::memory_order_acq_rel);  // indexed, so live
      }
    }
    records_[rec].mutex.lock();
    if (records_[rec].live()) return locked_session(this, rec);
    records_[rec].mutex.unlock();  // erased while we waited: look again
    release_record(rec);
  }
}

inline locked_session cache_index::try_open_record(std::uint32_t rec) noexcept {
  record& r = records_[rec];
  // Take a handle only while the record is live, then the lock without waiting.
  std::uint32_t st = r.state.load(std::memory_order_acquire);
  do {
    if (!(st & 1u)) return {};
  } while (!r.state.compare_exchange_weak(st, st + 2, std::memory_order_acq_rel));
  if (!r.mutex.try_lock()) {
    release_record(rec);
    return {};
  }
  if (!r.live()) {
    r.mutex.unlock();
    release_record(rec);
    return {};
  }
  return locked_session(this, rec);
}

inline locked_session cache_index::open_record(std::uint32_t rec, std::uint32_t generation) noexcept {
  if (rec >= records_.size()) return {};
  record& r = records_[rec];
  std::uint32_t st = r.state.load(std::memory_order_acquire);
  do {
    if (!(st & 1u)) return {};
  } while (!r.state.compare_exchange_weak(st, st + 2, std::memory_order_acq_rel));
  r.mutex.lock();
  // The generation changes only when the last handle of an erased record goes, and we
  // hold a handle: read under the lock, it is this incarnation's or a later one's.
  if (!r.live() || r.generation != generation) {
    r.mutex.unlock();
    release_record(rec);
    return {};
  }
  return locked_session(this, rec);
}

inline std::uint32_t cache_index::find(const session_hash& key) noexcept {
  shard& s = shard_of(key);
  std::lock_guard lock(s.mutex);
  return find_in(s, key);
}

inline lookup_result cache_index::lookup(const session_hash& key, const model_id& model,
                                         std::span<const token_id> prompt, std::span<block_location> out,
                                         const request_keys& keys) noexcept {
  locked_session s = open(key, false);
  if (!s) return {};
  return lookup(s, model, prompt, out, keys);
}

inline lookup_result cache_index::lookup(locked_session& s, const model_id& model, std::span<const token_id> prompt,
                                         std::span<block_location> out, const request_keys& keys) noexcept {
  lookup_result res;
  auto visit = [&](const block_match& bm) {
    const block_meta& m = blocks_[bm.block];
    const tier t = m.fastest();
    if (res.blocks < out.size()) out[res.blocks] = {t, t == tier::dram ? m.dram_slot : m.ssd_slot, bm.tokens};
    ++res.blocks;
    if (t == tier::dram)
      ++res.dram_blocks;
    else
      ++res.ssd_blocks;
    return true;
  };
  res.tokens = match_prompt(s, model, prompt, visit, keys);
  return res;
}

template <class Visit>
std::uint64_t cache_index::match_prompt(locked_session& s, const model_id& model, std::span<const token_id> prompt,
                                        Visit&& visit, const request_keys& keys) noexcept {
  const bool by_tokens = s.truncated();
  const bool keyed = !keys.empty();
  hash128 prev{};
  std::uint64_t pos = 0;
  std::uint32_t index = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot && pos < prompt.size(); b = blocks_[b].next, ++index) {
    const block_meta& m = blocks_[b];
    const std::size_t remaining = prompt.size() - pos;
    const auto stored = s.tokens_of(b).subspan(m.view_first, m.view_count);
    // The request's keys over the block's whole stored range, placed where the view
    // puts the block's token 0 (its saved position, untruncated).
    const hash128 digest =
        keyed ? detail::block_keys_at(keys, std::int64_t(m.saved_pos) + m.shift, m.tokens) : hash128{};
    std::uint32_t matched = 0;
    bool chained = false;
    if (!by_tokens && remaining >= m.view_count &&
        chain_hash(prev, model, prompt.subspan(pos, m.view_count), digest) == m.chain) {
      matched = m.view_count;
      prev = m.chain;
      chained = true;
    } else if (digest == m.keys) {
      // The block differs (an edit), the prompt ends inside it, or the view is
      // truncated: its KV is valid for the tokens before the first difference, since
      // KV of a token depends only on the tokens up to it (and the keys, which match).
      matched = std::uint32_t(common_prefix(stored, prompt.subspan(pos)));
    }
    if (matched == 0) break;
    // Past a chain-hash mismatch nothing further can match (untruncated views).
    const bool whole = matched == m.view_count && (chained || by_tokens);
    if (!visit(block_match{b, index, pos, m.view_first, matched, whole})) return pos + matched;
    pos += matched;
    if (!whole) break;
  }
  return pos;
}

// ---- locked_session ----

inline locked_session& locked_session::operator=(locked_session&& o) noexcept {
  if (this != &o) {
    reset();
    index_ = o.index_;
    record_ = o.record_;
    o.index_ = nullptr;
  }
  return *this;
}

inline void locked_session::reset() noexcept {
  if (!index_) return;
  index_->records_[record_].mutex.unlock();
  index_->release_record(record_);
  index_ = nullptr;
}

inline std::uint32_t locked_session::block_count() const noexcept { return index_->records_[record_].count; }
inline std::uint64_t locked_session::token_count() const noexcept { return index_->records_[record_].tokens; }
inline std::uint32_t locked_session::pins() const noexcept { return index_->records_[record_].pins; }
inline std::uint32_t locked_session::generation() const noexcept { return index_->records_[record_].generation; }
inline const session_hash& locked_session::key() const noexcept { return index_->records_[record_].key; }
inline std::uint32_t locked_session::first_block() const noexcept { return index_->records_[record_].head; }
inline std::uint32_t locked_session::dram_blocks() const noexcept { return index_->records_[record_].dram_blocks; }
inline std::uint32_t locked_session::ssd_blocks() const noexcept { return index_->records_[record_].ssd_blocks; }
inline block_meta& locked_session::meta(std::uint32_t block) const noexcept { return index_->blocks_[block]; }

inline std::uint32_t locked_session::block_at(std::uint32_t i) const noexcept {
  std::uint32_t b = first_block();
  while (b != no_slot && i-- > 0) b = index_->blocks_[b].next;
  return b;
}

inline std::span<const token_id> locked_session::tokens_of(std::uint32_t block) const noexcept {
  return {index_->tokens_.data() + std::size_t(block) * index_->tokens_per_block_, index_->blocks_[block].tokens};
}

inline std::uint32_t locked_session::new_block(std::span<const token_id> tokens) noexcept {
  std::uint32_t b = index_->block_pool_.allocate();
  if (b == no_slot) return no_slot;
  index_->blocks_[b] = block_meta{};
  index_->blocks_[b].tokens = std::uint32_t(tokens.size());
  index_->blocks_[b].view_count = std::uint32_t(tokens.size());
  std::memcpy(index_->tokens_.data() + std::size_t(b) * index_->tokens_per_block_, tokens.data(),
              tokens.size() * sizeof(token_id));
  return b;
}

inline void locked_session::free_block(std::uint32_t block) noexcept { index_->block_pool_.release(block); }

inline std::uint32_t locked_session::publish(std::uint32_t from, std::uint32_t first, std::uint32_t count) noexcept {
  auto& r = index_->records_[record_];
  auto& blocks = index_->blocks_;
  std::uint32_t prev = no_slot, cur = r.head;
  for (std::uint32_t i = 0; i < from && cur != no_slot; ++i) {
    prev = cur;
    cur = blocks[cur].next;
  }
  const std::uint32_t detached = cur;
  if (prev == no_slot)
    r.head = first;
  else
    blocks[prev].next = first;
  std::uint32_t tail = prev;
  for (std::uint32_t b = first; b != no_slot; b = blocks[b].next) tail = b;
  r.tail = tail;
  (void)count;
  recount();
  return detached;
}

inline void locked_session::relink(std::uint32_t head) noexcept {
  auto& r = index_->records_[record_];
  r.head = head;
  r.tail = no_slot;
  for (std::uint32_t b = head; b != no_slot; b = index_->blocks_[b].next) r.tail = b;
  recount();
}

inline void locked_session::recount() noexcept {
  // O(blocks), on the put/demote/truncate path only.
  auto& r = index_->records_[record_];
  r.count = 0;
  r.tokens = 0;
  for (std::uint32_t b = r.head; b != no_slot; b = index_->blocks_[b].next) {
    ++r.count;
    r.tokens += index_->blocks_[b].view_count;
  }
  count_tiers();
}

inline bool locked_session::truncated() const noexcept { return index_->records_[record_].truncated; }
inline void locked_session::set_truncated(bool t) noexcept { index_->records_[record_].truncated = t; }

inline void locked_session::count_tiers() noexcept {
  auto& r = index_->records_[record_];
  r.dram_blocks = r.ssd_blocks = 0;
  for (std::uint32_t b = r.head; b != no_slot; b = index_->blocks_[b].next) {
    if (index_->blocks_[b].dram_slot != no_slot) ++r.dram_blocks;
    if (index_->blocks_[b].ssd_slot != no_slot) ++r.ssd_blocks;
  }
}

inline void locked_session::pin() noexcept {
  if (index_->records_[record_].pins++ == 0) index_->pinned_.fetch_add(1, std::memory_order_relaxed);
}
inline void locked_session::unpin() noexcept {
  auto& p = index_->records_[record_].pins;
  if (p && --p == 0) index_->pinned_.fetch_sub(1, std::memory_order_relaxed);
}

inline void locked_session::erase() noexcept {
  auto& r = index_->records_[record_];
  if (!r.live()) return;
  {
    auto& s = index_->shard_of(r.key);
    std::lock_guard lock(s.mutex);
    index_->erase_in(s, r.key);
    r.state.fetch_and(~1u, std::memory_order_acq_rel);
  }
  index_->live_.fetch_sub(1, std::memory_order_relaxed);
  if (r.pins > 0) {  // an erased record's pins go with it
    r.pins = 0;
    index_->pinned_.fetch_sub(1, std::memory_order_relaxed);
  }
}

}  // namespace attnstore
