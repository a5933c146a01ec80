// What the mini-engine model tests share: deterministic prompts, bitwise comparison of
// logits, and chunked prefills of a model into a paged cache.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "llama.hpp"

namespace mini::testing {

inline std::vector<std::uint32_t> make_tokens(std::size_t n, std::uint32_t vocab, std::uint32_t seed) {
  std::vector<std::uint32_t> t(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = std::uint32_t((s >> 33) % vocab);
  }
  return t;
}

inline bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// Relative L2 distance of a from b.
inline float rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return float(std::sqrt(num / den));
}

/// Prefills `tokens` after what `seq` holds, in chunks of the given sizes (summing to
/// tokens.size()); returns the last logits.
inline std::vector<float> prefill(const llama_model& m, paged_kv_cache& cache, sequence& seq,
                                  std::span<const std::uint32_t> tokens, const std::vector<std::size_t>& chunks,
                                  const layer_hooks* hooks = nullptr) {
  std::vector<float> logits(std::size_t(m.config().vocab_size));
  std::size_t pos = seq.length, i = 0;
  for (std::size_t c : chunks) {
    m.forward(cache, seq, tokens.subspan(i, c), pos, logits, hooks);
    pos += c;
    i += c;
  }
  REQUIRE(i == tokens.size());
  return logits;
}

/// One prefill of `tokens` into a fresh cache.
inline std::vector<float> prefill_once(const llama_model& m, std::span<const std::uint32_t> tokens,
                                       std::uint32_t page_size = 16) {
  const llama_config& c = m.config();
  paged_kv_cache cache(c, std::uint32_t((tokens.size() + page_size - 1) / page_size + 1), page_size);
  sequence seq;
  return prefill(m, cache, seq, tokens, {tokens.size()});
}

}  // namespace mini::testing
