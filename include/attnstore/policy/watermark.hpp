// demotion_watermark: when DRAM -> SSD demotion runs (CachedAttention section 3.3:
// demotion starts when free DRAM falls below a watermark, so that saves always find
// room without waiting for an eviction).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace attnstore::policy {

/// Background demotion starts when free DRAM (plus DRAM reserved by promotions in flight,
/// which turns into data as those promotions free their SSD slots) falls below `low`
/// blocks, and demotes victims until it reaches `high` (hysteresis; high >= low).
struct demotion_watermark {
  std::uint32_t low = 0;
  std::uint32_t high = 0;

  /// Fractions of the DRAM tier. Throws std::invalid_argument unless
  /// 0 <= low_fraction <= high_fraction < 1.
  static demotion_watermark of(std::uint32_t dram_blocks, double low_fraction, double high_fraction) {
    if (!(low_fraction >= 0 && low_fraction <= high_fraction && high_fraction < 1))
      throw std::invalid_argument("demotion_watermark: need 0 <= low (" + std::to_string(low_fraction) + ") <= high (" +
                                  std::to_string(high_fraction) + ") < 1");
    return {std::uint32_t(low_fraction * dram_blocks), std::uint32_t(high_fraction * dram_blocks)};
  }
  /// Whether demotion should start now.
  constexpr bool should_start(std::uint32_t free_blocks, std::uint32_t reserved_blocks = 0) const noexcept {
    return free_blocks + reserved_blocks < low;
  }
  /// Whether demotion that has started goes on: free DRAM still below `high`.
  constexpr bool below_high(std::uint32_t free_blocks) const noexcept { return free_blocks < high; }
  /// Free blocks above `high`: what background work (a prefetch of a likely returner)
  /// may take without eating the room kept for saves.
  constexpr std::uint32_t spare(std::uint32_t free_blocks) const noexcept {
    return free_blocks > high ? free_blocks - high : 0;
  }
  /// Blocks to demote to reach `high` (0 when demotion need not start).
  constexpr std::uint32_t deficit(std::uint32_t free_blocks, std::uint32_t reserved_blocks = 0) const noexcept {
    const std::uint64_t have = std::uint64_t(free_blocks) + reserved_blocks;
    return have < low ? std::uint32_t(high - have) : 0;
  }
};

}  // namespace attnstore::policy
