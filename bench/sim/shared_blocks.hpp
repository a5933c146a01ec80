// shared_blocks: the simulator's content-addressed table of shared prefix blocks (the
// blocks of a system prompt that many sessions start with; docs/sim.md, "Shared
// prefixes"). A block is found by its chain hash, which covers every token from the
// start of the history, so two sessions find the same entry exactly when their histories
// agree up to the end of that block. Each session that holds the block holds it in one
// tier (its claim: DRAM or SSD, as it would hold a block of its own); the entry keeps at
// most one copy per tier, a DRAM copy while some holder claims it in DRAM and an SSD copy
// while some holder claims it on SSD, each reference-counted by those claims.
// tiered_cache moves the bytes (slots); this table only keeps the entries. An entry with
// no claim left is erased.
//
// Open addressing with linear probing and backward-shift deletion over a table sized at
// reserve(): no allocation after it. Single-threaded, like the simulator.
#pragma once

#include <cstdint>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::sim {

class shared_blocks {
 public:
  struct entry {
    hash128 key{};
    std::uint32_t dram_slot = ~0u, ssd_slot = ~0u;  ///< the copies (~0u: none)
    std::uint32_t dram_refs = 0, ssd_refs = 0;      ///< holders claiming it in DRAM, on SSD
  };
  static constexpr std::uint32_t none = ~0u;

  /// Room for `capacity` live entries. Allocates; call before use (again only when empty).
  void reserve(std::uint32_t capacity) {
    std::uint32_t size = 16;
    while (size < 2ull * capacity) size *= 2;
    table_.assign(size, none);
    mask_ = size - 1;
    entries_.assign(capacity, entry{});
    free_.clear();
    for (std::uint32_t i = capacity; i-- > 0;) free_.push_back(i);
    live_ = 0;
  }
  bool reserved() const noexcept { return !table_.empty(); }

  /// The entry holding `key`, or none.
  std::uint32_t find(const hash128& key) const noexcept {
    if (table_.empty()) return none;
    for (std::uint32_t i = home(key);; i = (i + 1) & mask_) {
      const std::uint32_t id = table_[i];
      if (id == none) return none;
      if (entries_[id].key == key) return id;
    }
  }

  /// A new entry for `key` (which must not be present), zeroed; none when full.
  std::uint32_t insert(const hash128& key) noexcept {
    if (free_.empty()) return none;
    const std::uint32_t id = free_.back();
    free_.pop_back();
    entries_[id] = entry{};
    entries_[id].key = key;
    std::uint32_t i = home(key);
    while (table_[i] != none) i = (i + 1) & mask_;
    table_[i] = id;
    ++live_;
    return id;
  }

  /// Removes an entry (its slot must have been released by the caller).
  void erase(std::uint32_t id) noexcept {
    std::uint32_t i = home(entries_[id].key);
    while (table_[i] != id) i = (i + 1) & mask_;
    // Backward shift: move later members of the probe run into the hole.
    for (std::uint32_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      const std::uint32_t x = table_[j];
      if (x == none) break;
      const std::uint32_t h = home(entries_[x].key);
      // x may fill the hole at i when its home is not in (i, j] (cyclically).
      if (((j - h) & mask_) >= ((j - i) & mask_)) {
        table_[i] = x;
        i = j;
      }
    }
    table_[i] = none;
    entries_[id] = entry{};
    free_.push_back(id);
    --live_;
  }

  entry& operator[](std::uint32_t id) noexcept { return entries_[id]; }
  const entry& operator[](std::uint32_t id) const noexcept { return entries_[id]; }
  std::uint32_t size() const noexcept { return live_; }
  std::uint32_t capacity() const noexcept { return std::uint32_t(entries_.size()); }

  /// Calls f(id, entry) for every live entry (inspection only: O(capacity)).
  template <class F>
  void for_each(F&& f) const {
    for (std::uint32_t i = 0; i < table_.size(); ++i)
      if (table_[i] != none) f(table_[i], entries_[table_[i]]);
  }
  /// Every live entry is reachable from its home (inspection only).
  bool check() const noexcept {
    std::uint32_t n = 0;
    for (std::uint32_t i = 0; i < table_.size(); ++i) {
      if (table_[i] == none) continue;
      ++n;
      if (find(entries_[table_[i]].key) != table_[i]) return false;
    }
    return n == live_;
  }

 private:
  std::uint32_t home(const hash128& k) const noexcept {
    return std::uint32_t((k.lo ^ (k.hi * 0x9e3779b97f4a7c15ull)) >> 17) & mask_;
  }

  std::vector<std::uint32_t> table_;  // entry ids, none where empty
  std::vector<entry> entries_;
  std::vector<std::uint32_t> free_;
  std::uint32_t mask_ = 0, live_ = 0;
};

}  // namespace attnstore::sim
