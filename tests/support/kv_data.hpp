// Deterministic KV payloads and token sequences for tests: what each block must hold
// is a function of (session, block, version), so any read can be checked exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::testing {

inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Fills one block's payload from a seed.
inline void fill_block(std::span<std::byte> out, std::uint64_t seed) {
  std::uint64_t s = mix(seed);
  std::size_t i = 0;
  for (; i + 8 <= out.size(); i += 8) {
    s = mix(s);
    std::memcpy(out.data() + i, &s, 8);
  }
  for (; i < out.size(); ++i) out[i] = std::byte(mix(s + i));
}

inline std::uint64_t block_seed(std::uint64_t session, std::uint32_t block, std::uint64_t version = 0) {
  return mix(session * 1000003ull + block * 7919ull + version * 104729ull);
}

/// `count` blocks back to back for a session, blocks [first, first+count).
inline std::vector<std::byte> make_blocks(std::size_t block_bytes, std::uint64_t session, std::uint32_t first,
                                          std::uint32_t count, std::uint64_t version = 0) {
  std::vector<std::byte> v(block_bytes * count);
  for (std::uint32_t i = 0; i < count; ++i)
    fill_block(std::span(v).subspan(i * block_bytes, block_bytes), block_seed(session, first + i, version));
  return v;
}

inline std::vector<token_id> make_tokens(std::uint64_t session, std::size_t n, std::uint64_t salt = 0) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id(mix(session * 31 + i + salt * 1000000007ull) % 32000);
  return t;
}

}  // namespace attnstore::testing
