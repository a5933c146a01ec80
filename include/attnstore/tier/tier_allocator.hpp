// The interface every tier allocator shares: fixed-size slots, O(1), thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "attnstore/types.hpp"

namespace attnstore {

/// Where a tier's memory can be used from.
enum class memory_kind : std::uint8_t {
  host,         ///< pageable host memory
  host_pinned,  ///< page-locked host memory (DMA-capable)
  device,       ///< GPU memory
  file,         ///< extents of files on an SSD
};

constexpr std::string_view to_string(memory_kind k) noexcept {
  switch (k) {
    case memory_kind::host:
      return "host";
    case memory_kind::host_pinned:
      return "host_pinned";
    case memory_kind::device:
      return "device";
    case memory_kind::file:
      return "file";
  }
  return "unknown";
}

/// A tier's space, handed out in slots of slot_bytes(). allocate/release are O(1),
/// thread-safe and never allocate.
class tier_allocator {
 public:
  static constexpr std::uint32_t no_slot = attnstore::no_slot;
  virtual ~tier_allocator() = default;
  /// A free slot, or no_slot when the tier is full.
  [[nodiscard]] virtual std::uint32_t allocate() noexcept = 0;
  /// Returns a slot. Returns false for a slot that was not allocated (a caller bug).
  virtual bool release(std::uint32_t slot) noexcept = 0;
  /// Total slots.
  virtual std::uint32_t capacity() const noexcept = 0;
  /// Slots handed out now.
  virtual std::uint32_t used() const noexcept = 0;
  virtual std::size_t slot_bytes() const noexcept = 0;
  virtual memory_kind kind() const noexcept = 0;
};

}  // namespace attnstore
