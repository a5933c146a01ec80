// tenant_table: what each tenant holds per tier and its caps, by keyed tenant hash
// (hash_tenant), never by the id in clear. Fixed capacity, allocation-free after
// construction, stable entry indices (a session record names its tenant by one). The
// store guards it with its policy mutex: usage is counted where the policy is told a
// session's tier counts, so the two never disagree.
#pragma once

#include <cstdint>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::detail {

struct tenant_entry {
  hash128 tenant{};
  std::uint64_t dram_blocks = 0, ssd_blocks = 0;  // blocks held, as the policy was last told
  std::uint64_t dram_cap = 0, ssd_cap = 0;        // in blocks; 0: no cap
  std::uint32_t sessions = 0;
  bool configured = false;  // a quota set for it by name: kept while it holds nothing
  std::uint64_t quota_demoted_blocks = 0, quota_evicted_sessions = 0;
  bool over_dram(std::uint64_t extra = 0) const noexcept { return dram_cap && dram_blocks + extra > dram_cap; }
  bool over_ssd(std::uint64_t extra = 0) const noexcept { return ssd_cap && ssd_blocks + extra > ssd_cap; }
};

class tenant_table {
 public:
  explicit tenant_table(std::uint32_t capacity) : entries_(capacity), live_(capacity, 0) {
    std::uint32_t n = 1;
    while (n < 2 * capacity) n <<= 1;
    map_.assign(n, no_slot);
    free_.reserve(capacity);
    for (std::uint32_t i = capacity; i-- > 0;) free_.push_back(i);
  }

  std::uint32_t find(const hash128& t) const noexcept {
    for (std::uint32_t p = home(t);; p = (p + 1) & mask()) {
      const std::uint32_t e = map_[p];
      if (e == no_slot) return no_slot;
      if (entries_[e].tenant == t) return e;
    }
  }

  /// The tenant's entry, made (with the default caps) if new; no_slot when full.
  std::uint32_t find_or_add(const hash128& t, std::uint64_t dram_cap, std::uint64_t ssd_cap) noexcept {
    std::uint32_t p = home(t);
    for (;; p = (p + 1) & mask()) {
      const std::uint32_t e = map_[p];
      if (e == no_slot) break;
      if (entries_[e].tenant == t) return e;
    }
    if (free_.empty()) return no_slot;
    const std::uint32_t e = free_.back();
    free_.pop_back();
    entries_[e] = tenant_entry{};
    entries_[e].tenant = t;
    entries_[e].dram_cap = dram_cap;
    entries_[e].ssd_cap = ssd_cap;
    live_[e] = 1;
    map_[p] = e;
    return e;
  }

  tenant_entry& operator[](std::uint32_t e) noexcept { return entries_[e]; }
  const tenant_entry& operator[](std::uint32_t e) const noexcept { return entries_[e]; }

  /// Forgets a tenant that holds no session and has no quota of its own.
  void remove_if_unused(std::uint32_t e) noexcept {
    const tenant_entry& t = entries_[e];
    if (t.sessions > 0 || t.configured || !live_[e]) return;
    std::uint32_t i = home(t.tenant);
    while (map_[i] != e) i = (i + 1) & mask();
    // Backward-shift deletion: later entries of the probe run move up, so lookups never
    // need tombstones (a long-running store sees tenants come and go).
    for (std::uint32_t j = (i + 1) & mask();; j = (j + 1) & mask()) {
      if (map_[j] == no_slot) break;
      const std::uint32_t k = home(entries_[map_[j]].tenant);
      const bool movable = i <= j ? (k <= i || k > j) : (k <= i && k > j);
      if (movable) {
        map_[i] = map_[j];
        i = j;
      }
    }
    map_[i] = no_slot;
    live_[e] = 0;
    free_.push_back(e);
  }

  std::uint32_t capacity() const noexcept { return std::uint32_t(entries_.size()); }
  bool live(std::uint32_t e) const noexcept { return live_[e] != 0; }

 private:
  std::uint32_t mask() const noexcept { return std::uint32_t(map_.size() - 1); }
  std::uint32_t home(const hash128& t) const noexcept { return std::uint32_t(t.lo) & mask(); }
  std::vector<tenant_entry> entries_;
  std::vector<std::uint8_t> live_;
  std::vector<std::uint32_t> free_;
  std::vector<std::uint32_t> map_;  // open addressing: entry index or no_slot
};

}  // namespace attnstore::detail
