// belady: Belady's MIN, the optimum the other policies are measured against. It must be
// told the future: set_next_use() gives each session the time (or position) of its next
// use, and the victim in a level is the session used farthest in the future. For the
// simulator only; a store cannot know the future.
//
// With whole sessions of different sizes, MIN is a heuristic; it is optimal when the
// caller evicts block by block, the tail of the victim first, and may decline to store
// (bypass) what would be used after everything it would have to evict (the simulator's
// OPT does both; tests/policy checks that no policy beats it).
#pragma once

#include "attnstore/detail/policy_heap.hpp"
#include "attnstore/policy/eviction_policy.hpp"

namespace attnstore::policy {

class belady final : public eviction_policy {
 public:
  /// Next use of a session that is never used again.
  static constexpr std::uint64_t never = ~0ull;

  /// Throws std::invalid_argument when max_sessions is 0.
  explicit belady(std::uint32_t max_sessions)
      : eviction_policy(max_sessions), next_(max_sessions, never), scratch_(max_sessions) {
    for (auto& h : heap_) h.reset(max_sessions);
    any_.reset(max_sessions);
  }
  std::string_view name() const noexcept override { return "belady"; }

  /// The session's next use (any clock; larger = later; `never` when it has none).
  void set_next_use(std::uint32_t r, std::uint64_t when) noexcept {
    if (!live(r)) return;
    next_[r] = when;
    reposition(r);
  }
  std::uint64_t next_use(std::uint32_t r) const noexcept { return next_[r]; }

  /// The farthest-used session holding blocks in any level that `accept` takes.
  template <class Accept>
  std::uint32_t pick_farthest(Accept&& accept) noexcept {
    const std::uint32_t v = any_.find_first([&](std::uint32_t r) { return accept(r); }, scratch_.data());
    return v == detail::indexed_heap::npos ? no_record : v;
  }

 protected:
  void reposition(std::uint32_t r) noexcept override {
    const session_state& s = state(r);
    const std::uint64_t key = ~next_[r];  // min-heap: the farthest first
    for (std::uint32_t l = 0; l < level_count; ++l) {
      if (s.blocks[l])
        heap_[l].set(r, key);
      else
        heap_[l].erase(r);
    }
    if (s.blocks[0] + s.blocks[1] + s.blocks[2])
      any_.set(r, key);
    else
      any_.erase(r);
  }
  void forget(std::uint32_t r) noexcept override {
    for (auto& h : heap_) h.erase(r);
    any_.erase(r);
    next_[r] = never;
  }
  std::uint32_t victim(level l, victim_filter accept, void* context) noexcept override {
    const std::uint32_t v =
        heap_[std::size_t(l)].find_first([&](std::uint32_t r) { return accept(context, r); }, scratch_.data());
    return v == detail::indexed_heap::npos ? no_record : v;
  }

 private:
  std::vector<std::uint64_t> next_;
  detail::indexed_heap heap_[level_count];
  detail::indexed_heap any_;
  std::vector<std::uint32_t> scratch_;
};

}  // namespace attnstore::policy
