// Test knobs from the environment (soak sizes, seeds).
#pragma once

#include <cstdint>
#include <cstdlib>

namespace attnstore::testing {

/// The unsigned value of environment variable `name`, or `fallback` when unset or empty.
inline std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  return std::strtoull(v, nullptr, 10);
}

}  // namespace attnstore::testing
