// A lock-free latency histogram with fixed bucket bounds (1-2-5 steps from 1 us to
// 10 s), written as a Prometheus histogram. observe() is a few relaxed atomic adds: no
// lock, no allocation, safe from any thread.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <thread>

#if defined(__x86_64__)
#include <cpuid.h>
#include <x86intrin.h>
#endif

namespace attnstore::detail {

/// Whether the TSC ticks at a constant rate in every power state (CPUID 0x80000007
/// EDX bit 8): then it is a monotonic clock cheaper to read than steady_clock (a timed
/// call costs 21 ns with it, 55 ns with steady_clock: docs/benchmarks.md, BM_MetricsPerCall).
inline bool invariant_tsc() noexcept {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(0x80000007, &a, &b, &c, &d) && (d & (1u << 8)) != 0;
#else
  return false;
#endif
}

/// A cheap timestamp for latency histograms: the invariant TSC, else steady_clock
/// nanoseconds. Only differences mean anything; ns_per_tick() converts them.
inline std::uint64_t ticks() noexcept {
#if defined(__x86_64__)
  static const bool tsc = invariant_tsc();
  if (tsc) return __rdtsc();
#endif
  return std::uint64_t(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

/// Nanoseconds per tick, measured once per process against steady_clock (over 5 ms:
/// the first call waits that long, so a store calls it when it opens).
inline double ns_per_tick() noexcept {
  static const double factor = [] {
#if defined(__x86_64__)
    if (!invariant_tsc()) return 1.0;
    const auto c0 = std::chrono::steady_clock::now();
    const std::uint64_t t0 = __rdtsc();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const auto c1 = std::chrono::steady_clock::now();
    const std::uint64_t t1 = __rdtsc();
    const double ns = std::chrono::duration<double, std::nano>(c1 - c0).count();
    return t1 > t0 && ns > 0 ? ns / double(t1 - t0) : 1.0;
#else
    return 1.0;
#endif
  }();
  return factor;
}

class latency_histogram {
 public:
  /// Upper bounds in nanoseconds: 1, 2, 5 us ... 5 s, 10 s (then +Inf).
  static constexpr std::array<std::uint64_t, 22> bounds_ns{
      1'000,       2'000,       5'000,         10'000,        20'000,        50'000,        100'000,    200'000,
      500'000,     1'000'000,   2'000'000,     5'000'000,     10'000'000,    20'000'000,    50'000'000, 100'000'000,
      200'000'000, 500'000'000, 1'000'000'000, 2'000'000'000, 5'000'000'000, 10'000'000'000};

  /// Records a latency measured as ticks() end - start.
  void observe_ticks(std::uint64_t elapsed_ticks) noexcept {
    observe(std::uint64_t(double(elapsed_ticks) * ns_per_tick()));
  }
  void observe(std::uint64_t ns) noexcept {
    std::size_t b = 0;
    while (b < bounds_ns.size() && ns > bounds_ns[b]) ++b;
    counts_[b].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  }

  /// Appends `name`{labels,le=...} cumulative buckets, _sum (seconds) and _count. The
  /// caller writes HELP/TYPE once per name. `labels` is empty or `key="value"`.
  void write(std::string& out, std::string_view name, std::string_view labels) const {
    char line[256];
    std::uint64_t cumulative = 0;
    const std::string sep = labels.empty() ? "" : ",";
    for (std::size_t b = 0; b <= bounds_ns.size(); ++b) {
      cumulative += counts_[b].load(std::memory_order_relaxed);
      if (b < bounds_ns.size())
        std::snprintf(line, sizeof line, "%.*s_bucket{%.*s%sle=\"%g\"} %" PRIu64 "\n", int(name.size()), name.data(),
                      int(labels.size()), labels.data(), sep.c_str(), double(bounds_ns[b]) / 1e9, cumulative);
      else
        std::snprintf(line, sizeof line, "%.*s_bucket{%.*s%sle=\"+Inf\"} %" PRIu64 "\n", int(name.size()), name.data(),
                      int(labels.size()), labels.data(), sep.c_str(), cumulative);
      out += line;
    }
    std::string braces;
    if (!labels.empty()) {
      braces += '{';
      braces += labels;
      braces += '}';
    }
    std::snprintf(line, sizeof line, "%.*s_sum%s %.9f\n%.*s_count%s %" PRIu64 "\n", int(name.size()), name.data(),
                  braces.c_str(), double(sum_ns_.load(std::memory_order_relaxed)) / 1e9, int(name.size()), name.data(),
                  braces.c_str(), cumulative);
    out += line;
  }

 private:
  std::array<std::atomic<std::uint64_t>, bounds_ns.size() + 1> counts_{};
  std::atomic<std::uint64_t> sum_ns_{0};
};

}  // namespace attnstore::detail
