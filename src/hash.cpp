// Run-time choice of the XXH3 kernel, and the hashes built on it.
#include "attnstore/hash.hpp"

#include <algorithm>
#include <cstring>

namespace attnstore {
namespace detail {

#define ATTNSTORE_DECLARE_KERNEL(ns)                                                  \
  namespace ns {                                                                      \
  std::uint64_t checksum64(const void*, std::size_t) noexcept;                        \
  hash128 hash_bytes128(const void*, std::size_t) noexcept;                           \
  hash128 chain_hash(hash128, const hash128&, const token_id*, std::size_t) noexcept; \
  std::uint64_t copy_with_checksum(void*, const void*, std::size_t) noexcept;         \
  void stream_reset(void*) noexcept;                                                  \
  void stream_update(void*, const void*, std::size_t) noexcept;                       \
  std::uint64_t stream_digest(const void*) noexcept;                                  \
  }
ATTNSTORE_DECLARE_KERNEL(sse2)
ATTNSTORE_DECLARE_KERNEL(avx2)
ATTNSTORE_DECLARE_KERNEL(avx512)
#undef ATTNSTORE_DECLARE_KERNEL

namespace {
struct hash_kernels {
  std::string_view name;
  std::uint64_t (*checksum64)(const void*, std::size_t) noexcept;
  hash128 (*hash_bytes128)(const void*, std::size_t) noexcept;
  hash128 (*chain_hash)(hash128, const hash128&, const token_id*, std::size_t) noexcept;
  std::uint64_t (*copy_with_checksum)(void*, const void*, std::size_t) noexcept;
  void (*stream_reset)(void*) noexcept;
  void (*stream_update)(void*, const void*, std::size_t) noexcept;
  std::uint64_t (*stream_digest)(const void*) noexcept;
};

hash_kernels pick() noexcept {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return {"avx512",
            avx512::checksum64,
            avx512::hash_bytes128,
            avx512::chain_hash,
            avx512::copy_with_checksum,
            avx512::stream_reset,
            avx512::stream_update,
            avx512::stream_digest};
  if (__builtin_cpu_supports("avx2"))
    return {"avx2",
            avx2::checksum64,
            avx2::hash_bytes128,
            avx2::chain_hash,
            avx2::copy_with_checksum,
            avx2::stream_reset,
            avx2::stream_update,
            avx2::stream_digest};
  return {"sse2",
          sse2::checksum64,
          sse2::hash_bytes128,
          sse2::chain_hash,
          sse2::copy_with_checksum,
          sse2::stream_reset,
          sse2::stream_update,
          sse2::stream_digest};
}

const hash_kernels& kernels() noexcept {
  static const hash_kernels k = pick();
  return k;
}
}  // namespace
}  // namespace detail

std::uint64_t checksum64(const void* data, std::size_t bytes) noexcept {
  return detail::kernels().checksum64(data, bytes);
}

hash128 hash_bytes128(const void* data, std::size_t bytes) noexcept {
  return detail::kernels().hash_bytes128(data, bytes);
}

hash128 chain_hash(hash128 previous, const model_id& model, std::span<const token_id> tokens,
                   const hash128& keys_digest) noexcept {
  if (keys_digest.is_zero()) return detail::kernels().chain_hash(previous, model.value, tokens.data(), tokens.size());
  // A keyed block hashes under its own model value: XXH3-128 of (tag, model, digest).
  const std::uint64_t mixed[5] = {0x4b'45'59'45'44'4d'49'58ull,  // domain tag: keyed model
                                  model.value.lo, model.value.hi, keys_digest.lo, keys_digest.hi};
  const hash128 keyed = detail::kernels().hash_bytes128(mixed, sizeof(mixed));
  return detail::kernels().chain_hash(previous, keyed, tokens.data(), tokens.size());
}

std::uint64_t copy_with_checksum(void* dst, const void* src, std::size_t bytes) noexcept {
  return detail::kernels().copy_with_checksum(dst, src, bytes);
}

std::string_view hash_kernel_name() noexcept { return detail::kernels().name; }

namespace {
// Appends fixed-width little-endian fields and length-prefixed strings to a small
// stack buffer; the hash of the buffer is the identity. Long strings are pre-hashed.
struct field_writer {
  unsigned char buf[256];
  std::size_t n = 0;
  void u64(std::uint64_t v) noexcept {
    for (int i = 0; i < 8; ++i) buf[n++] = static_cast<unsigned char>(v >> (8 * i));
  }
  void str(std::string_view s) noexcept {
    hash128 h = hash_bytes128(s.data(), s.size());
    u64(s.size());
    u64(h.lo);
    u64(h.hi);
  }
  hash128 digest() const noexcept { return hash_bytes128(buf, n); }
};
}  // namespace

hash128 view_link(const hash128& view, const hash128& chain, std::uint64_t saved_block, std::uint32_t view_first,
                  std::uint32_t view_count) noexcept {
  const std::uint64_t fields[7] = {0x56'49'45'57'4c'49'4e'4bull,  // domain tag: view links
                                   view.lo,
                                   view.hi,
                                   chain.lo,
                                   chain.hi,
                                   saved_block,
                                   std::uint64_t(view_first) << 32 | view_count};
  return detail::kernels().hash_bytes128(fields, sizeof(fields));
}

session_hash hash_session(const session_key& key, const hash128& secret) noexcept {
  field_writer w;
  w.u64(0x5e55'10'4e'4b'45'59ull);  // domain tag: session keys
  w.u64(secret.lo);
  w.u64(secret.hi);
  w.str(key.tenant);
  w.str(key.session);
  return {w.digest()};
}

hash128 hash_tenant(std::string_view tenant, const hash128& secret) noexcept {
  field_writer w;
  w.u64(0x7e'4e'41'4e'54'49'44ull);  // domain tag: tenant ids
  w.u64(secret.lo);
  w.u64(secret.hi);
  w.str(tenant);
  return w.digest();
}

model_id make_model_id(const model_descriptor& d) noexcept {
  // 216 bytes of the writer's 256: every field below, in this order (docs/format.md).
  field_writer w;
  w.u64(0x4d'4f'44'45'4c'49'44ull);  // domain tag: model ids
  w.str(d.name);
  const kv_geometry& g = d.geometry;
  w.str(g.describe());  // every layer group's kind, shape, dtype, rope, window, quantization; the layer order
  w.u64(g.num_layers);
  w.u64(g.num_kv_heads);
  w.u64(g.head_dim);
  w.u64(static_cast<std::uint64_t>(g.dtype));
  w.u64(g.tokens_per_block);
  w.str(d.rope);
  w.u64(d.keys_pre_rope ? 1 : 0);
  w.u64(d.tp_rank);
  w.u64(d.tp_size);
  w.str(d.weights_revision);
  w.str(d.tokenizer);
  w.u64(d.pp_rank);
  w.u64(d.pp_size);
  w.u64(d.layout_version);
  return {w.digest()};
}

hash128 detail::block_keys_at(const request_keys& keys, std::int64_t block_first_token, std::uint32_t tokens) noexcept {
  // Spans are sorted and disjoint, so their ends are sorted too: skip those that end
  // at or before the block, take those that start before its end.
  const std::int64_t end = block_first_token + std::int64_t(tokens);
  auto it = std::partition_point(keys.media.begin(), keys.media.end(), [&](const media_span& m) {
    return std::int64_t(m.first_token) + std::int64_t(m.tokens) <= block_first_token;
  });
  const bool media_here = it != keys.media.end() && std::int64_t(it->first_token) < end;
  if (keys.lora.empty() && keys.salt.empty() && !media_here) return {};
  field_writer w;
  w.u64(0x4b'45'59'53'42'4c'4bull);  // domain tag: request keys of a block
  w.str(keys.lora);
  w.str(keys.salt);
  hash128 h = w.digest();
  for (; it != keys.media.end() && std::int64_t(it->first_token) < end; ++it) {
    const std::uint64_t span[6] = {
        h.lo,       h.hi,           std::uint64_t(std::int64_t(it->first_token) - block_first_token),
        it->tokens, it->content.lo, it->content.hi};
    h = hash_bytes128(span, sizeof(span));
  }
  if (h.is_zero()) h.lo = 1;  // zero means "no keys": never produced by keys
  return h;
}

hash128 block_keys(const request_keys& keys, std::uint64_t block_first_token, std::uint32_t tokens) noexcept {
  return detail::block_keys_at(keys, std::int64_t(block_first_token), tokens);
}

errc validate_request_keys(const request_keys& keys, std::size_t prompt_tokens, const char** why) noexcept {
  auto fail = [&](const char* m) {
    if (why) *why = m;
    return errc::invalid_argument;
  };
  std::uint64_t next = 0;  // first token the next span may start at
  for (const media_span& m : keys.media) {
    if (m.tokens == 0) return fail("request_keys: a media span has tokens 0");
    if (m.first_token < next) return fail("request_keys: media spans are not sorted by first_token or overlap");
    if (m.first_token > prompt_tokens || m.tokens > prompt_tokens - m.first_token)
      return fail("request_keys: a media span reaches past the end of the prompt");
    next = m.first_token + m.tokens;
  }
  if (why) *why = nullptr;
  return errc::ok;
}

void checksum_stream::reset() noexcept { detail::kernels().stream_reset(state_); }
void checksum_stream::update(const void* data, std::size_t bytes) noexcept {
  detail::kernels().stream_update(state_, data, bytes);
}
std::uint64_t checksum_stream::digest() const noexcept { return detail::kernels().stream_digest(state_); }

}  // namespace attnstore
