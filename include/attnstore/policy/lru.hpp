// lru: the victim in a level is the session holding blocks there whose last access is
// oldest. The baseline the paper compares against (58% hit rate against 86%).
#pragma once

#include "attnstore/detail/policy_heap.hpp"
#include "attnstore/policy/eviction_policy.hpp"

namespace attnstore::policy {

/// Least recently used, per level: one indexed min-heap on the access stamp per level,
/// so that a session that gains blocks in a level (a demotion) takes its place by its
/// own recency, not at the front. O(log n) per event and decision; allocation-free.
/// Ignores the queue and its window.
class lru final : public eviction_policy {
 public:
  /// Throws std::invalid_argument when max_sessions is 0.
  explicit lru(std::uint32_t max_sessions) : eviction_policy(max_sessions), scratch_(max_sessions) {
    for (auto& h : heap_) h.reset(max_sessions);
  }
  std::string_view name() const noexcept override { return "lru"; }

 protected:
  void reposition(std::uint32_t r) noexcept override {
    for (std::uint32_t l = 0; l < level_count; ++l) {
      if (state(r).blocks[l])
        heap_[l].set(r, state(r).access);
      else
        heap_[l].erase(r);
    }
  }
  void forget(std::uint32_t r) noexcept override {
    for (auto& h : heap_) h.erase(r);
  }
  std::uint32_t victim(level l, victim_filter accept, void* context) noexcept override {
    const std::uint32_t v =
        heap_[std::size_t(l)].find_first([&](std::uint32_t r) { return accept(context, r); }, scratch_.data());
    return v == detail::indexed_heap::npos ? no_record : v;
  }

 private:
  detail::indexed_heap heap_[level_count];
  std::vector<std::uint32_t> scratch_;
};

}  // namespace attnstore::policy
