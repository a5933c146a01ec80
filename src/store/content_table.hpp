// content_table: the store's blocks by content, so sessions that start with the same
// tokens hold one copy per tier (docs/design.md "Shared prefixes").
//
// A block's content is named by its chain hash (model, every token from the start of the
// history, the request keys) within a scope: the tenant's hash, or zero when the store
// shares across tenants (then only a cache salt in the keys keeps two tenants apart). An
// entry has at most one copy per tier, each a slot of that tier with a holder count: the
// number of session blocks that point at it. A slot that is not in the table has one
// holder, its block's session, and the counts below do not track it (the fast path: a
// slot only its owner knows of needs no lock to free).
//
// Fixed capacity (one entry per slot of either tier at most), allocation-free after
// construction; one mutex, held only for table work, never across I/O or other locks.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "attnstore/index/cache_index.hpp"
#include "attnstore/types.hpp"

namespace attnstore::detail {

class content_table {
 public:
  /// What a block's content is known by: its chain hash and block index in a sharing
  /// scope. The index too: after a truncation a session saves blocks whose chains
  /// continue its original history at other positions (docs/design.md, "Truncation").
  struct key {
    hash128 chain{};
    hash128 scope{};
    std::uint64_t index = 0;
    friend bool operator==(const key&, const key&) = default;
  };
  struct copies {
    std::uint32_t dram = no_slot, ssd = no_slot;
    std::uint64_t checksum = 0;
  };

  content_table(std::uint32_t dram_slots, std::uint32_t ssd_slots)
      : holders_{std::make_unique<std::atomic<std::uint32_t>[]>(dram_slots),
                 std::make_unique<std::atomic<std::uint32_t>[]>(ssd_slots)},
        entry_of_{std::vector<std::uint32_t>(dram_slots, no_slot), std::vector<std::uint32_t>(ssd_slots, no_slot)},
        entries_(std::size_t(dram_slots) + ssd_slots) {
    for (std::uint32_t t = 0; t < 2; ++t)
      for (std::uint32_t i = 0; i < entry_of_[t].size(); ++i) holders_[t][i].store(0, std::memory_order_relaxed);
    std::size_t n = 16;
    while (n < 2 * entries_.size()) n <<= 1;
    map_.assign(n, no_slot);
    free_.reserve(entries_.size());
    for (std::size_t i = entries_.size(); i-- > 0;) free_.push_back(std::uint32_t(i));
  }

  /// The copies of `k` now (they may go right after: share() decides).
  copies find(const key& k) const noexcept {
    std::lock_guard lock(mutex_);
    const std::uint32_t e = lookup(k);
    if (e == no_slot) return {};
    return {entries_[e].slot[0], entries_[e].slot[1], entries_[e].checksum};
  }

  /// A new holder of k's copy in tier `t` whose payload checksums to `checksum`: its
  /// slot (one more holder), or no_slot when there is none (or it holds other bytes).
  std::uint32_t share(const key& k, tier t, std::uint64_t checksum) noexcept {
    std::lock_guard lock(mutex_);
    const std::uint32_t e = lookup(k);
    if (e == no_slot || entries_[e].checksum != checksum) return no_slot;
    const std::uint32_t slot = entries_[e].slot[index(t)];
    if (slot != no_slot) holders_[index(t)][slot].fetch_add(1, std::memory_order_relaxed);
    return slot;
  }

  /// Makes `slot` (held by the caller alone, not in the table) k's copy in tier `t`
  /// when k has none there; false when it has one (or the table is full): the slot
  /// then stays the caller's own.
  bool offer(const key& k, tier t, std::uint32_t slot, std::uint64_t checksum) noexcept {
    std::lock_guard lock(mutex_);
    std::uint32_t e = lookup(k);
    if (e != no_slot && (entries_[e].slot[index(t)] != no_slot || entries_[e].checksum != checksum)) return false;
    if (e == no_slot) {
      if (free_.empty()) return false;
      e = free_.back();
      free_.pop_back();
      entries_[e] = entry{k, {no_slot, no_slot}, checksum};
      insert(e);
    }
    entries_[e].slot[index(t)] = slot;
    entry_of_[index(t)][slot] = e;
    holders_[index(t)][slot].store(1, std::memory_order_relaxed);
    return true;
  }

  /// One holder of `slot` lets go of it. True when it was the last (or the slot was
  /// never shared): the caller frees the slot. No lock for a slot not in the table
  /// (only its one holder can put it there).
  bool release(tier t, std::uint32_t slot) noexcept {
    auto& h = holders_[index(t)][slot];
    if (h.load(std::memory_order_relaxed) == 0) return true;
    std::lock_guard lock(mutex_);
    if (h.fetch_sub(1, std::memory_order_relaxed) > 1) return false;
    unlink(t, slot);
    return true;
  }

  /// Holders of a slot: 0 for one that is not in the table (its owner alone holds it).
  std::uint32_t holders(tier t, std::uint32_t slot) const noexcept {
    return holders_[index(t)][slot].load(std::memory_order_relaxed);
  }

  /// A copy found corrupt: nobody new is given it. Its holders keep their references
  /// (each finds the damage on its own read and lets go).
  void forget(tier t, std::uint32_t slot) noexcept {
    std::lock_guard lock(mutex_);
    if (holders_[index(t)][slot].load(std::memory_order_relaxed) == 0 || entry_of_[index(t)][slot] == no_slot) return;
    const std::uint32_t e = entry_of_[index(t)][slot];
    entries_[e].slot[index(t)] = no_slot;
    entry_of_[index(t)][slot] = no_slot;
    if (entries_[e].slot[0] == no_slot && entries_[e].slot[1] == no_slot) drop_entry(e);
  }

  /// Recovery: an SSD slot that `holders` (> 0) recovered blocks hold. With `keyed`,
  /// it becomes k's SSD copy when k has none; a slot held by several blocks that is
  /// not k's copy is counted without a key (freed when its last holder goes).
  void recovered(bool keyed, const key& k, std::uint32_t slot, std::uint32_t holders, std::uint64_t checksum) noexcept {
    if (keyed && offer(k, tier::ssd, slot, checksum)) {
      holders_[1][slot].store(holders, std::memory_order_relaxed);
    } else if (holders > 1) {
      std::lock_guard lock(mutex_);
      entry_of_[1][slot] = no_slot;
      holders_[1][slot].store(holders, std::memory_order_relaxed);
    }
  }

  struct usage {
    std::uint64_t shared_slots[2] = {0, 0};   ///< slots with more than one holder (DRAM, SSD)
    std::uint64_t extra_holders[2] = {0, 0};  ///< holders beyond the first: copies not stored
  };
  /// Walks every slot: for stats and tests, not for request paths.
  usage count() const noexcept {
    usage u;
    for (std::uint32_t t = 0; t < 2; ++t)
      for (std::size_t i = 0; i < entry_of_[t].size(); ++i) {
        const std::uint32_t h = holders_[t][i].load(std::memory_order_relaxed);
        if (h > 1) {
          ++u.shared_slots[t];
          u.extra_holders[t] += h - 1;
        }
      }
    return u;
  }

 private:
  struct entry {
    key k;
    std::uint32_t slot[2] = {no_slot, no_slot};  // DRAM, SSD
    std::uint64_t checksum = 0;
  };
  static std::uint32_t index(tier t) noexcept { return t == tier::ssd ? 1 : 0; }
  std::size_t home(const key& k) const noexcept {
    return std::size_t((k.chain.lo ^ ((k.scope.lo + k.index) * 0x9e3779b97f4a7c15ull)) & (map_.size() - 1));
  }
  std::uint32_t lookup(const key& k) const noexcept {
    for (std::size_t p = home(k);; p = (p + 1) & (map_.size() - 1)) {
      const std::uint32_t e = map_[p];
      if (e == no_slot || entries_[e].k == k) return e;
    }
  }
  void insert(std::uint32_t e) noexcept {
    std::size_t p = home(entries_[e].k);
    while (map_[p] != no_slot) p = (p + 1) & (map_.size() - 1);
    map_[p] = e;
  }
  // Backward-shift deletion: probe sequences stay unbroken without tombstones.
  void erase_from_map(std::uint32_t e) noexcept {
    const std::size_t mask = map_.size() - 1;
    std::size_t p = home(entries_[e].k);
    while (map_[p] != e) p = (p + 1) & mask;
    for (std::size_t q = (p + 1) & mask; map_[q] != no_slot; q = (q + 1) & mask) {
      const std::size_t h = home(entries_[map_[q]].k);
      // Move q's entry into the hole at p when its home is not in (p, q].
      if (((q - h) & mask) >= ((q - p) & mask)) {
        map_[p] = map_[q];
        p = q;
      }
    }
    map_[p] = no_slot;
  }
  void drop_entry(std::uint32_t e) noexcept {
    erase_from_map(e);
    free_.push_back(e);
  }
  void unlink(tier t, std::uint32_t slot) noexcept {
    holders_[index(t)][slot].store(0, std::memory_order_relaxed);
    const std::uint32_t e = entry_of_[index(t)][slot];
    if (e == no_slot) return;  // forgotten or keyless: counted only
    entry_of_[index(t)][slot] = no_slot;
    entries_[e].slot[index(t)] = no_slot;
    if (entries_[e].slot[0] == no_slot && entries_[e].slot[1] == no_slot) drop_entry(e);
  }

  mutable std::mutex mutex_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> holders_[2];  // per slot: holders, 0 = not in the table
  std::vector<std::uint32_t> entry_of_[2];                    // per slot: its entry, or no_slot
  std::vector<entry> entries_;
  std::vector<std::uint32_t> map_;  // open addressing: entry index or no_slot
  std::vector<std::uint32_t> free_;
};

}  // namespace attnstore::detail
