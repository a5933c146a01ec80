// Fixed-capacity free list of slot numbers: O(1) allocate/release, thread-safe, no
// allocation after construction. Shared by every tier allocator. First in, first out:
// slots come back in the order they were freed, so a session freed and written again
// lands at ascending file offsets (sequential I/O) rather than reversed.
#pragma once

#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::detail {

class slot_pool {
 public:
  static constexpr std::uint32_t none = attnstore::no_slot;

  explicit slot_pool(std::uint32_t capacity) : free_(capacity), in_use_(capacity, 0) {
    // Lowest slot numbers come out first: it keeps files and regions compact.
    for (std::uint32_t i = 0; i < capacity; ++i) free_[i] = i;
    count_ = capacity;
  }

  std::uint32_t allocate() noexcept {
    std::lock_guard lock(mutex_);
    if (count_ == 0) return none;
    std::uint32_t s = free_[head_];
    head_ = head_ + 1 == free_.size() ? 0 : head_ + 1;
    --count_;
    in_use_[s] = 1;
    return s;
  }

  /// Releases a slot. Returns false (and changes nothing) for a slot that is not in use:
  /// a double free is a bug the caller must hear about, not silent corruption.
  bool release(std::uint32_t slot) noexcept {
    std::lock_guard lock(mutex_);
    if (slot >= in_use_.size() || !in_use_[slot]) return false;
    in_use_[slot] = 0;
    std::size_t tail = head_ + count_;
    if (tail >= free_.size()) tail -= free_.size();
    free_[tail] = slot;
    ++count_;
    return true;
  }

  /// Marks exactly the slots with used[i] != 0 as in use (recovery after a restart).
  void rebuild(std::span<const std::uint8_t> used) noexcept {
    std::lock_guard lock(mutex_);
    head_ = 0;
    count_ = 0;
    for (std::uint32_t i = 0; i < in_use_.size(); ++i) {
      in_use_[i] = i < used.size() && used[i] ? 1 : 0;
      if (!in_use_[i]) free_[count_++] = i;
    }
  }

  std::uint32_t capacity() const noexcept { return std::uint32_t(in_use_.size()); }
  std::uint32_t used() const noexcept {
    std::lock_guard lock(mutex_);
    return capacity() - count_;
  }
  bool is_used(std::uint32_t slot) const noexcept {
    std::lock_guard lock(mutex_);
    return slot < in_use_.size() && in_use_[slot];
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::uint32_t> free_;
  std::vector<std::uint8_t> in_use_;
  std::size_t head_ = 0;     // next slot to hand out
  std::uint32_t count_ = 0;  // free slots, from head_ on (wrapping)
};

}  // namespace attnstore::detail
