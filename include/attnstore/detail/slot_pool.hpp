// Fixed-capacity free list of slot numbers: O(1) allocate/release, thread-safe, no
// allocation after construction. Shared by every tier allocator.
#pragma once

#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

namespace attnstore::detail {

class slot_pool {
 public:
  static constexpr std::uint32_t none = ~0u;

  explicit slot_pool(std::uint32_t capacity) : free_(capacity), in_use_(capacity, 0) {
    // Lowest slot numbers come out first: it keeps files and regions compact.
    for (std::uint32_t i = 0; i < capacity; ++i) free_[i] = capacity - 1 - i;
    top_ = capacity;
  }

  std::uint32_t allocate() noexcept {
    std::lock_guard lock(mutex_);
    if (top_ == 0) return none;
    std::uint32_t s = free_[--top_];
    in_use_[s] = 1;
    return s;
  }

  /// Releases a slot. Returns false (and changes nothing) for a slot that is not in use:
  /// a double free is a bug the caller must hear about, not silent corruption.
  bool release(std::uint32_t slot) noexcept {
    std::lock_guard lock(mutex_);
    if (slot >= in_use_.size() || !in_use_[slot]) return false;
    in_use_[slot] = 0;
    free_[top_++] = slot;
    return true;
  }

  /// Marks exactly the slots with used[i] != 0 as in use (recovery after a restart).
  void rebuild(std::span<const std::uint8_t> used) noexcept {
    std::lock_guard lock(mutex_);
    top_ = 0;
    for (std::uint32_t i = std::uint32_t(in_use_.size()); i-- > 0;) {
      in_use_[i] = i < used.size() && used[i] ? 1 : 0;
      if (!in_use_[i]) free_[top_++] = i;
    }
  }

  std::uint32_t capacity() const noexcept { return std::uint32_t(in_use_.size()); }
  std::uint32_t used() const noexcept {
    std::lock_guard lock(mutex_);
    return capacity() - top_;
  }
  bool is_used(std::uint32_t slot) const noexcept {
    std::lock_guard lock(mutex_);
    return slot < in_use_.size() && in_use_[slot];
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::uint32_t> free_;
  std::vector<std::uint8_t> in_use_;
  std::uint32_t top_ = 0;
};

}  // namespace attnstore::detail
