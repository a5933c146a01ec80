// host_arena: the DRAM tier's memory. A slab of fixed-size slots in large pinned
// regions (each <= 1 GiB so io_uring can register it), allocated once at construction.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/host_memory.hpp"
#include "attnstore/detail/slot_pool.hpp"
#include "attnstore/log.hpp"
#include "attnstore/tier/tier_allocator.hpp"

namespace attnstore {

struct host_arena_options {
  std::size_t slot_bytes = 0;                           ///< bytes per slot, rounded up to `alignment`
  std::size_t capacity_bytes = 0;                       ///< total; at least one slot
  std::size_t alignment = 4096;                         ///< slot alignment (O_DIRECT needs 512 or 4096)
  std::size_t max_region_bytes = std::size_t(1) << 30;  ///< io_uring registers <= 1 GiB each
  bool use_cuda_pinned = true;                          ///< cudaHostAlloc when a GPU is present
  bool lock_memory = true;                              ///< mlock otherwise (best effort, logged when it fails)
  bool huge_pages = false;                              ///< try MAP_HUGETLB first
  attnstore::logger log{};
};

/// Fixed-slot pinned DRAM allocator. allocate/release are O(1), thread-safe, and never
/// allocate after construction. Throws std::invalid_argument for bad options and
/// std::bad_alloc when the memory cannot be mapped.
class host_arena final : public tier_allocator {
 public:
  explicit host_arena(const host_arena_options& options) : slots_(check(options)) {
    const std::size_t align = options.alignment;
    slot_bytes_ = (options.slot_bytes + align - 1) / align * align;
    slots_per_region_ = std::uint32_t(options.max_region_bytes / slot_bytes_);
    std::uint32_t remaining = slots_.capacity();
    std::string note;
    try {
      while (remaining > 0) {
        std::uint32_t n = remaining < slots_per_region_ ? remaining : slots_per_region_;
        detail::host_region_request req{n * slot_bytes_, options.use_cuda_pinned, options.lock_memory,
                                        options.huge_pages};
        std::string region_note;
        regions_.push_back(detail::allocate_host_region(req, &region_note));
        if (note.empty()) note = region_note;
        iovecs_.push_back({regions_.back().base, regions_.back().bytes});
        remaining -= n;
      }
    } catch (...) {
      for (auto& r : regions_) detail::free_host_region(r);
      throw;
    }
    pinning_ = regions_.front().pinning;
    pinning_note_ = note;
    if (pinning_ == detail::host_pinning::unlocked)
      options.log(log_level::warning, "host_arena: DRAM tier is not pinned: " + note);
  }

  host_arena(const host_arena&) = delete;
  host_arena& operator=(const host_arena&) = delete;
  ~host_arena() override {
    for (auto& r : regions_) detail::free_host_region(r);
  }

  std::uint32_t allocate() noexcept override { return slots_.allocate(); }
  bool release(std::uint32_t slot) noexcept override { return slots_.release(slot); }
  std::uint32_t capacity() const noexcept override { return slots_.capacity(); }
  std::uint32_t used() const noexcept override { return slots_.used(); }
  std::size_t slot_bytes() const noexcept override { return slot_bytes_; }
  memory_kind kind() const noexcept override {
    return pinning_ == detail::host_pinning::unlocked ? memory_kind::host : memory_kind::host_pinned;
  }

  /// Start of a slot's memory.
  std::byte* data(std::uint32_t slot) const noexcept {
    return static_cast<std::byte*>(regions_[slot / slots_per_region_].base) +
           std::size_t(slot % slots_per_region_) * slot_bytes_;
  }
  /// Which region (registered buffer index) holds a slot.
  std::int32_t region_of(std::uint32_t slot) const noexcept { return std::int32_t(slot / slots_per_region_); }
  /// The regions, for io_uring buffer registration.
  std::span<const iovec> regions() const noexcept { return iovecs_; }
  /// "cuda_pinned", "locked" or "unlocked".
  std::string_view pinning() const noexcept {
    switch (pinning_) {
      case detail::host_pinning::cuda_pinned:
        return "cuda_pinned";
      case detail::host_pinning::locked:
        return "locked";
      case detail::host_pinning::unlocked:
        return "unlocked";
    }
    return "unknown";
  }
  /// Why the memory is not pinned, or empty.
  const std::string& pinning_note() const noexcept { return pinning_note_; }

 private:
  static std::uint32_t check(const host_arena_options& o) {
    auto fail = [](const std::string& m) { throw std::invalid_argument("host_arena_options: " + m); };
    if (o.alignment == 0 || (o.alignment & (o.alignment - 1)))
      fail("alignment is " + std::to_string(o.alignment) + ", must be a power of two");
    if (o.slot_bytes == 0) fail("slot_bytes is 0, must be at least 1");
    const std::size_t slot = (o.slot_bytes + o.alignment - 1) / o.alignment * o.alignment;
    if (slot > o.max_region_bytes)
      fail("slot_bytes is " + std::to_string(o.slot_bytes) + ", must be at most max_region_bytes (" +
           std::to_string(o.max_region_bytes) + ")");
    if (o.capacity_bytes < slot)
      fail("capacity_bytes is " + std::to_string(o.capacity_bytes) + ", must hold at least one slot of " +
           std::to_string(slot) + " bytes");
    std::size_t n = o.capacity_bytes / slot;
    if (n >= tier_allocator::no_slot) fail("capacity_bytes holds too many slots (max 2^32-2)");
    return std::uint32_t(n);
  }

  detail::slot_pool slots_;
  std::size_t slot_bytes_ = 0;
  std::uint32_t slots_per_region_ = 0;
  std::vector<detail::host_region> regions_;
  std::vector<iovec> iovecs_;
  detail::host_pinning pinning_ = detail::host_pinning::unlocked;
  std::string pinning_note_;
};

}  // namespace attnstore
