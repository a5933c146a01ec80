// One XXH3 kernel set. Included by hash_{sse2,avx2,avx512}.cpp, each compiled with its
// own -m flags and ATTNSTORE_HASH_NS; hash.cpp picks one at start-up.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstring>

#include "attnstore/types.hpp"

namespace attnstore::detail::ATTNSTORE_HASH_NS {

std::uint64_t checksum64(const void* data, std::size_t bytes) noexcept { return XXH3_64bits(data, bytes); }

hash128 hash_bytes128(const void* data, std::size_t bytes) noexcept {
  XXH128_hash_t h = XXH3_128bits(data, bytes);
  return {h.low64, h.high64};
}

hash128 chain_hash(hash128 previous, const hash128& model, const token_id* tokens, std::size_t count) noexcept {
  XXH3_state_t state;  // on the stack: no allocation
  XXH3_128bits_reset(&state);
  std::uint64_t head[4] = {previous.lo, previous.hi, model.lo, model.hi};
  XXH3_128bits_update(&state, head, sizeof(head));
  XXH3_128bits_update(&state, tokens, count * sizeof(token_id));
  XXH128_hash_t h = XXH3_128bits_digest(&state);
  return {h.low64, h.high64};
}

std::uint64_t copy_with_checksum(void* dst, const void* src, std::size_t bytes) noexcept {
  // 16 KiB chunks: source and destination chunk both stay in the 48 KiB L1 while the
  // hash reads the copy, so memory sees one read and one write per byte, as a bare
  // memcpy does. (32 KiB chunks measured 0.86 of memcpy here, 16 KiB 0.97.)
  constexpr std::size_t chunk = 16 * 1024;
  if (bytes <= chunk) {
    std::memcpy(dst, src, bytes);
    return XXH3_64bits(dst, bytes);
  }
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  auto* d = static_cast<unsigned char*>(dst);
  auto* s = static_cast<const unsigned char*>(src);
  for (std::size_t off = 0; off < bytes; off += chunk) {
    std::size_t n = bytes - off < chunk ? bytes - off : chunk;
    std::memcpy(d + off, s + off, n);
    XXH3_64bits_update(&state, d + off, n);
  }
  return XXH3_64bits_digest(&state);
}

// checksum_stream's state is an XXH3_state_t in caller storage (hash.hpp).
static_assert(sizeof(XXH3_state_t) <= 640 && alignof(XXH3_state_t) <= 64);
void stream_reset(void* state) noexcept { XXH3_64bits_reset(static_cast<XXH3_state_t*>(state)); }
void stream_update(void* state, const void* data, std::size_t bytes) noexcept {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state), data, bytes);
}
std::uint64_t stream_digest(const void* state) noexcept {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state));
}

}  // namespace attnstore::detail::ATTNSTORE_HASH_NS
