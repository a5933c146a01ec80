// scheduler_aware: the eviction rule of CachedAttention (section 3.3). The engine knows
// which sessions run next (its waiting queue); the KV of the sessions in the look-ahead
// eviction window is protected. In every level the victim is the unprotected session
// with the oldest access; only when every candidate is protected, the protected one
// farthest back in the queue. Applied to DRAM -> SSD demotion (DRAM victims), dropping
// from SSD (SSD victims), and returning lent HBM (HBM victims).
#pragma once

#include "attnstore/detail/policy_heap.hpp"
#include "attnstore/policy/eviction_policy.hpp"

namespace attnstore::policy {

struct scheduler_aware_options {
  std::uint32_t max_sessions = 0;  ///< record ids are < max_sessions; at least 1
  /// Eviction window in queued sessions. 0: the paper's rule, (DRAM + SSD) / mean session
  /// KV size, from capacity_blocks and the mean size of the stored sessions, refreshed by
  /// refresh_window().
  std::uint32_t eviction_window = 0;
  /// DRAM + SSD capacity in blocks, for the automatic window (required when
  /// eviction_window is 0).
  std::uint64_t capacity_blocks = 0;
};

class scheduler_aware final : public eviction_policy {
 public:
  /// Throws std::invalid_argument naming a bad field.
  explicit scheduler_aware(const scheduler_aware_options& o)
      : eviction_policy(o.max_sessions), options_(o), scratch_(o.max_sessions) {
    if (o.eviction_window == 0 && o.capacity_blocks == 0)
      throw std::invalid_argument(
          "scheduler_aware_options: capacity_blocks is 0 with eviction_window 0 (automatic); set one of them");
    for (auto& h : unprotected_) h.reset(o.max_sessions);
    for (auto& h : protected_) h.reset(o.max_sessions);
    set_window(o.eviction_window ? o.eviction_window : 1);
    refresh_window();
  }
  std::string_view name() const noexcept override { return "scheduler_aware"; }

  /// Recomputes the automatic window from the mean stored session size (no-op with a
  /// fixed window). Call it at a quiet point (after a save or a queue change), not from
  /// inside a filter. O(change in protected sessions).
  void refresh_window() noexcept {
    if (!options_.eviction_window) fit_window(options_.capacity_blocks);
  }
  const scheduler_aware_options& options() const noexcept { return options_; }

 protected:
  void reposition(std::uint32_t r) noexcept override {
    const session_state& s = state(r);
    for (std::uint32_t l = 0; l < level_count; ++l) {
      if (!s.blocks[l]) {
        unprotected_[l].erase(r);
        protected_[l].erase(r);
      } else if (s.in_window) {
        unprotected_[l].erase(r);
        protected_[l].set(r, ~s.position);  // min-heap: the largest position first
      } else {
        protected_[l].erase(r);
        unprotected_[l].set(r, s.access);
      }
    }
  }
  void forget(std::uint32_t r) noexcept override {
    for (std::uint32_t l = 0; l < level_count; ++l) {
      unprotected_[l].erase(r);
      protected_[l].erase(r);
    }
  }
  std::uint32_t victim(level l, victim_filter accept, void* context) noexcept override {
    auto take = [&](std::uint32_t r) { return accept(context, r); };
    std::uint32_t v = unprotected_[std::size_t(l)].find_first(take, scratch_.data());
    if (v == detail::indexed_heap::npos) v = protected_[std::size_t(l)].find_first(take, scratch_.data());
    return v == detail::indexed_heap::npos ? no_record : v;
  }

 private:
  scheduler_aware_options options_;
  detail::indexed_heap unprotected_[level_count];  // key: access stamp (oldest first)
  detail::indexed_heap protected_[level_count];    // key: ~queue position (farthest back first)
  std::vector<std::uint32_t> scratch_;
};

}  // namespace attnstore::policy
