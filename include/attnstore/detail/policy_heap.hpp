// indexed_heap: a fixed-capacity binary min-heap of record ids with a position index, so
// that push, erase and a key change are O(log n) and membership is O(1). Sized once at
// construction; no operation allocates afterwards. Used by the eviction policies
// (one heap per storage level and victim class).
#pragma once

#include <cstdint>
#include <vector>

namespace attnstore::detail {

class indexed_heap {
 public:
  static constexpr std::uint32_t npos = ~0u;

  indexed_heap() = default;
  explicit indexed_heap(std::uint32_t capacity) { reset(capacity); }

  void reset(std::uint32_t capacity) {
    heap_.assign(capacity, npos);
    pos_.assign(capacity, npos);
    key_.assign(capacity, 0);
    size_ = 0;
  }

  std::uint32_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  bool contains(std::uint32_t id) const noexcept { return id < pos_.size() && pos_[id] != npos; }
  std::uint64_t key(std::uint32_t id) const noexcept { return key_[id]; }
  /// Smallest key's id, or npos.
  std::uint32_t top() const noexcept { return size_ ? heap_[0] : npos; }
  /// The i-th slot of the heap array (heap order, not sorted order); i < size().
  std::uint32_t at(std::uint32_t i) const noexcept { return heap_[i]; }

  /// Inserts `id` with `key`, or changes its key when present.
  void set(std::uint32_t id, std::uint64_t key) noexcept {
    if (pos_[id] == npos) {
      key_[id] = key;
      pos_[id] = size_;
      heap_[size_++] = id;
      up(pos_[id]);
      return;
    }
    const std::uint64_t old = key_[id];
    if (old == key) return;
    key_[id] = key;
    if (key < old)
      up(pos_[id]);
    else
      down(pos_[id]);
  }

  /// Removes `id` when present.
  void erase(std::uint32_t id) noexcept {
    const std::uint32_t i = pos_[id];
    if (i == npos) return;
    const std::uint32_t last = heap_[--size_];
    pos_[id] = npos;
    heap_[size_] = npos;
    if (i == size_) return;
    heap_[i] = last;
    pos_[last] = i;
    if (!up(i)) down(i);
  }

  /// Visits ids in ascending key order until `accept(id)` returns true; returns that id
  /// or npos. Rejected ids are taken out into `scratch` (capacity >= size()) and put
  /// back, so the cost is O((rejected + 1) log n). `accept` must not change the heap.
  template <class Accept>
  std::uint32_t find_first(Accept&& accept, std::uint32_t* scratch) noexcept {
    std::uint32_t found = npos, parked = 0;
    while (size_) {
      const std::uint32_t id = heap_[0];
      if (accept(id)) {
        found = id;
        break;
      }
      scratch[parked++] = id;
      erase(id);
    }
    for (std::uint32_t i = 0; i < parked; ++i) set(scratch[i], key_[scratch[i]]);
    return found;
  }

 private:
  bool less(std::uint32_t a, std::uint32_t b) const noexcept {
    // Ties broken by id so that the order is total and runs are reproducible.
    return key_[a] < key_[b] || (key_[a] == key_[b] && a < b);
  }
  bool up(std::uint32_t i) noexcept {
    const std::uint32_t id = heap_[i];
    bool moved = false;
    while (i > 0) {
      const std::uint32_t parent = (i - 1) / 2;
      if (!less(id, heap_[parent])) break;
      heap_[i] = heap_[parent];
      pos_[heap_[i]] = i;
      i = parent;
      moved = true;
    }
    heap_[i] = id;
    pos_[id] = i;
    return moved;
  }
  void down(std::uint32_t i) noexcept {
    const std::uint32_t id = heap_[i];
    for (;;) {
      std::uint32_t child = 2 * i + 1;
      if (child >= size_) break;
      if (child + 1 < size_ && less(heap_[child + 1], heap_[child])) ++child;
      if (!less(heap_[child], id)) break;
      heap_[i] = heap_[child];
      pos_[heap_[i]] = i;
      i = child;
    }
    heap_[i] = id;
    pos_[id] = i;
  }

  std::vector<std::uint32_t> heap_;
  std::vector<std::uint32_t> pos_;
  std::vector<std::uint64_t> key_;
  std::uint32_t size_ = 0;
};

}  // namespace attnstore::detail
