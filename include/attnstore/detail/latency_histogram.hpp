// A lock-free latency histogram with fixed bucket bounds (1-2-5 steps from 1 us to
// 10 s), written as a Prometheus histogram. observe() is a few relaxed atomic adds: no
// lock, no allocation, safe from any thread.
#pragma once

#include <array>
#include <atomic>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace attnstore::detail {

class latency_histogram {
 public:
  /// Upper bounds in nanoseconds: 1, 2, 5 us ... 5 s, 10 s (then +Inf).
  static constexpr std::array<std::uint64_t, 22> bounds_ns{
      1'000,       2'000,       5'000,       10'000,        20'000,        50'000,        100'000,     200'000,
      500'000,     1'000'000,   2'000'000,   5'000'000,     10'000'000,    20'000'000,    50'000'000,  100'000'000,
      200'000'000, 500'000'000, 1'000'000'000, 2'000'000'000, 5'000'000'000, 10'000'000'000};

  void observe(std::uint64_t ns) noexcept {
    std::size_t b = 0;
    while (b < bounds_ns.size() && ns > bounds_ns[b]) ++b;
    counts_[b].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  }
  std::uint64_t count() const noexcept {
    std::uint64_t n = 0;
    for (const auto& c : counts_) n += c.load(std::memory_order_relaxed);
    return n;
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
                  braces.c_str(), double(sum_ns_.load(std::memory_order_relaxed)) / 1e9, int(name.size()),
                  name.data(), braces.c_str(), cumulative);
    out += line;
  }

 private:
  std::array<std::atomic<std::uint64_t>, bounds_ns.size() + 1> counts_{};
  std::atomic<std::uint64_t> sum_ns_{0};
};

}  // namespace attnstore::detail
