// Core value types: KV geometry, model and session identities, 128-bit hashes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace attnstore {

/// "None" for every index the library hands around: a slot, a block, a record. Every
/// other name for it (tier_allocator::no_slot, policy::no_record...) is this value.
inline constexpr std::uint32_t no_slot = ~0u;

/// One token id as the engine's tokenizer produced it.
using token_id = std::uint32_t;

/// Element type of the stored K and V tensors. `bytes`: rows the engine lays out itself
/// (quantized KV such as llama.cpp's q8_0 blocks); stored and served as they are, never
/// re-rotated (a truncated view of them cannot move its keys).
enum class dtype : std::uint8_t { f32 = 0, f16 = 1, bf16 = 2, fp8_e4m3 = 3, bytes = 4 };

/// Whether keys of this type can be re-rotated (RoPE applied or removed) by attnstore.
constexpr bool rotatable(dtype d) noexcept { return d == dtype::f32 || d == dtype::f16 || d == dtype::bf16; }

constexpr std::size_t dtype_size(dtype d) noexcept {
  switch (d) {
    case dtype::f32:
      return 4;
    case dtype::f16:
    case dtype::bf16:
      return 2;
    case dtype::fp8_e4m3:
    case dtype::bytes:
      return 1;
  }
  return 0;
}

constexpr std::string_view to_string(dtype d) noexcept {
  switch (d) {
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::bf16:
      return "bf16";
    case dtype::fp8_e4m3:
      return "fp8_e4m3";
    case dtype::bytes:
      return "bytes";
  }
  return "unknown";
}

/// A 128-bit hash (XXH3-128). Used for chain hashes, model ids and session keys.
struct hash128 {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  friend constexpr bool operator==(const hash128&, const hash128&) = default;
  constexpr bool is_zero() const noexcept { return lo == 0 && hi == 0; }
};

/// Shape of the KV cache of one model (one tensor-parallel rank).
///
/// Block layout is layer-major: [layer][K|V][token][kv_head][head_dim], so one layer of
/// one block is one contiguous slice of `layer_bytes()` bytes. Sizes are derived, never
/// stored twice.
struct kv_geometry {
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_dim = 0;
  attnstore::dtype dtype = attnstore::dtype::f16;
  std::uint32_t tokens_per_block = 0;  ///< 0: choose so a block is 1-4 MiB (see validate)

  constexpr std::size_t element_bytes() const noexcept { return dtype_size(dtype); }
  /// K and V of one token in one layer.
  constexpr std::size_t token_layer_bytes() const noexcept { return 2ull * num_kv_heads * head_dim * element_bytes(); }
  /// K and V of one token across all layers.
  constexpr std::size_t token_bytes() const noexcept { return token_layer_bytes() * num_layers; }
  /// Bytes of K (or V) of one layer of one block.
  constexpr std::size_t half_layer_bytes() const noexcept {
    return std::size_t(tokens_per_block) * num_kv_heads * head_dim * element_bytes();
  }
  /// One layer of one block (K then V): one contiguous slice.
  constexpr std::size_t layer_bytes() const noexcept { return 2 * half_layer_bytes(); }
  /// A whole block, all layers.
  constexpr std::size_t block_bytes() const noexcept { return layer_bytes() * num_layers; }
  /// Blocks needed for `tokens` tokens (the last one may be partial).
  constexpr std::uint32_t blocks_for(std::size_t tokens) const noexcept {
    return tokens_per_block ? std::uint32_t((tokens + tokens_per_block - 1) / tokens_per_block) : 0;
  }

  friend constexpr bool operator==(const kv_geometry&, const kv_geometry&) = default;

  /// Checks every field and fills tokens_per_block when it is 0. Throws
  /// std::invalid_argument naming the field and the allowed range.
  kv_geometry validated() const {
    auto fail = [](const std::string& what) { throw std::invalid_argument("kv_geometry: " + what); };
    if (num_layers == 0 || num_layers > 1024) fail("num_layers is " + std::to_string(num_layers) + ", allowed 1..1024");
    if (num_kv_heads == 0 || num_kv_heads > 4096)
      fail("num_kv_heads is " + std::to_string(num_kv_heads) + ", allowed 1..4096");
    if (head_dim == 0 || head_dim > 4096) fail("head_dim is " + std::to_string(head_dim) + ", allowed 1..4096");
    if (dtype_size(dtype) == 0)
      fail("dtype is " + std::to_string(int(dtype)) + ", allowed f32, f16, bf16, fp8_e4m3, bytes");
    kv_geometry g = *this;
    if (g.tokens_per_block == 0) g.tokens_per_block = default_tokens_per_block();
    if (g.tokens_per_block > 65536)
      fail("tokens_per_block is " + std::to_string(g.tokens_per_block) + ", allowed 1..65536 (0 = auto)");
    if (g.block_bytes() > (std::size_t(1) << 30))
      fail("one block is " + std::to_string(g.block_bytes()) +
           " bytes; a block must be at most 1 GiB (lower tokens_per_block)");
    return g;
  }

  /// Smallest power-of-two token count that makes a block at least 1 MiB (so at most
  /// 2 MiB unless one token alone is larger), capped at 4096 tokens.
  constexpr std::uint32_t default_tokens_per_block() const noexcept {
    std::size_t per_token = token_bytes();
    if (per_token == 0) return 16;
    std::uint32_t t = 1;
    while (t < 4096 && per_token * t < (std::size_t(1) << 20)) t *= 2;
    return t;
  }
};

/// Fingerprint of everything that makes a KV cache valid for a model: model name or
/// weights id, geometry, positional-encoding spec, whether keys are stored before RoPE,
/// tensor-parallel rank and size. A cache written under one model_id is never served
/// under another.
struct model_id {
  hash128 value;
  friend constexpr bool operator==(const model_id&, const model_id&) = default;
};

/// What a model_id is computed from.
struct model_descriptor {
  std::string_view name;           ///< model name or weights checksum
  kv_geometry geometry;            ///< validated geometry
  std::string_view rope = "none";  ///< positional-encoding spec, serialized
  bool keys_pre_rope = false;      ///< keys stored before positional encoding
  std::uint32_t tp_rank = 0;
  std::uint32_t tp_size = 1;
};

/// Computes the model_id of a descriptor (defined in hash.hpp's implementation).
model_id make_model_id(const model_descriptor& d) noexcept;

/// Identity of a conversation: (tenant, session). A non-owning view; the store only
/// keeps its 128-bit hash, so ids never reach a file name or outlive the call.
struct session_key {
  std::string_view tenant;
  std::string_view session;
};

/// Hash of a session_key, tenant-separated. The index is keyed by this.
struct session_hash {
  hash128 value;
  friend constexpr bool operator==(const session_hash&, const session_hash&) = default;
};

/// A 64-bit name of a session, never 0: what an eviction policy remembers an evicted
/// session by (policy::eviction_policy::on_insert, on_miss).
constexpr std::uint64_t identity_of(const session_hash& h) noexcept {
  const std::uint64_t v = h.value.lo ^ h.value.hi;
  return v != 0 ? v : 1;
}

}  // namespace attnstore
