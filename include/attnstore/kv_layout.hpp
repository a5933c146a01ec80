// kv_layout / kv_target: how an engine's own KV memory is laid out, so attnstore copies
// straight into (and out of) it. Paged caches ([num_pages][page_size][kv_heads][head_dim]
// per layer, K and V separate or merged) and contiguous ones (one page per sequence)
// are both described by strides; nothing needs to be in attnstore's format first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

enum class memory_space : std::uint8_t { host, device };

/// An engine's KV cache layout. Element (token t of page p, head h, dim d) of layer l's
/// K is at k_base[l] + p*page_stride + t*token_stride + h*head_stride + d*element_bytes,
/// and likewise for V with v_base. head_dim elements of one head are contiguous.
/// Merged K/V caches set v_base[l] = k_base[l] + (offset of V). A contiguous cache is
/// one page of capacity tokens per sequence.
struct kv_layout {
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_dim = 0;
  attnstore::dtype dtype = attnstore::dtype::f16;
  std::uint32_t page_size = 0;         ///< tokens per page
  std::size_t page_stride = 0;         ///< bytes between pages
  std::size_t token_stride = 0;        ///< bytes between tokens of a page
  std::size_t head_stride = 0;         ///< bytes between heads of a token
  std::span<std::byte* const> k_base;  ///< per layer
  std::span<std::byte* const> v_base;  ///< per layer
  memory_space where = memory_space::host;

  /// Throws std::invalid_argument naming the field when the layout cannot hold the
  /// store's geometry.
  void check_against(const kv_geometry& g) const {
    auto fail = [](const std::string& m) { throw std::invalid_argument("kv_layout: " + m); };
    if (num_layers != g.num_layers || num_kv_heads != g.num_kv_heads || head_dim != g.head_dim || dtype != g.dtype)
      fail("layers/heads/head_dim/dtype (" + std::to_string(num_layers) + "/" + std::to_string(num_kv_heads) + "/" +
           std::to_string(head_dim) + "/" + std::string(to_string(dtype)) + ") differ from the store's geometry (" +
           std::to_string(g.num_layers) + "/" + std::to_string(g.num_kv_heads) + "/" + std::to_string(g.head_dim) +
           "/" + std::string(to_string(g.dtype)) + ")");
    if (page_size == 0) fail("page_size is 0");
    const std::size_t head_bytes = std::size_t(head_dim) * dtype_size(dtype);
    if (head_stride < head_bytes) fail("head_stride is " + std::to_string(head_stride) + ", below head_dim bytes");
    if (token_stride < head_stride * (num_kv_heads - 1) + head_bytes) fail("token_stride too small for the heads");
    if (k_base.size() != num_layers || v_base.size() != num_layers)
      fail("k_base/v_base must have one pointer per layer (" + std::to_string(num_layers) + ")");
  }
};

/// Engine memory for one sequence: the layout and the page ids holding its tokens in
/// order (token position p lives in pages[p / page_size]).
struct kv_target {
  const kv_layout* layout = nullptr;
  std::span<const std::uint32_t> pages;
};
/// Where the KV to save is read from: the same description.
using kv_source = kv_target;

/// Direction of a block <-> engine copy.
enum class copy_direction : std::uint8_t { to_engine, from_engine };

/// Appends to `out` the segments that move layer `layer` of tokens [block_first,
/// block_first + tokens) of one stored block (payload at `block_payload`, in
/// attnstore's [layer][K|V][token][head][dim] layout) to or from sequence positions
/// [first_token, first_token + tokens) of the engine memory in `t`. Consecutive tokens of one page merge into one
/// segment when the engine packs heads and tokens densely. Returns the number of segments written, or 0 if `out` is too
/// small. Allocation-free.
std::size_t layer_segments(const kv_geometry& g, const std::byte* block_payload, std::uint32_t layer,
                           std::uint32_t block_first, std::uint64_t first_token, std::uint32_t tokens,
                           const kv_target& t, copy_direction dir, std::span<copy_segment> out) noexcept;

/// Upper bound of segments layer_segments() produces for one block and one layer.
inline std::size_t max_layer_segments(const kv_geometry& g, const kv_layout& l) noexcept {
  const std::size_t head_bytes = std::size_t(g.head_dim) * g.element_bytes();
  const bool dense_heads = l.head_stride == head_bytes;
  const std::size_t per_token = dense_heads ? 1 : g.num_kv_heads;
  return 2 * std::size_t(g.tokens_per_block) * per_token;
}

inline std::size_t layer_segments(const kv_geometry& g, const std::byte* block_payload, std::uint32_t layer,
                                  std::uint32_t block_first, std::uint64_t first_token, std::uint32_t tokens,
                                  const kv_target& t, copy_direction dir, std::span<copy_segment> out) noexcept {
  const kv_layout& L = *t.layout;
  const std::size_t elem = g.element_bytes();
  const std::size_t head_bytes = std::size_t(g.head_dim) * elem;
  const std::size_t token_bytes = head_bytes * g.num_kv_heads;  // one token, one of K/V, in the block
  const bool dense_heads = L.head_stride == head_bytes;
  std::size_t n = 0;
  auto emit = [&](const std::byte* block_side, std::byte* engine_side, std::size_t bytes) {
    if (n == out.size()) return false;
    // Merge with the previous segment when both sides continue it.
    if (n > 0) {
      copy_segment& p = out[n - 1];
      const std::byte* pb = static_cast<const std::byte*>(dir == copy_direction::to_engine ? p.src : p.dst);
      std::byte* pe = static_cast<std::byte*>(dir == copy_direction::to_engine ? p.dst : const_cast<void*>(p.src));
      if (pb + p.bytes == block_side && pe + p.bytes == engine_side) {
        p.bytes += bytes;
        return true;
      }
    }
    out[n++] = dir == copy_direction::to_engine ? copy_segment{block_side, engine_side, bytes}
                                                : copy_segment{engine_side, const_cast<std::byte*>(block_side), bytes};
    return true;
  };
  const std::byte* layer_base = block_payload + std::size_t(layer) * g.layer_bytes();
  for (int side = 0; side < 2; ++side) {  // K then V
    const std::byte* src_side = layer_base + side * g.half_layer_bytes();
    std::byte* const engine_layer = side == 0 ? L.k_base[layer] : L.v_base[layer];
    for (std::uint32_t i = 0; i < tokens; ++i) {
      const std::uint64_t pos = first_token + i;
      std::byte* tok = engine_layer + std::size_t(t.pages[pos / L.page_size]) * L.page_stride +
                       std::size_t(pos % L.page_size) * L.token_stride;
      const std::byte* btok = src_side + std::size_t(block_first + i) * token_bytes;
      if (dense_heads) {
        if (!emit(btok, tok, token_bytes)) return 0;
      } else {
        for (std::uint32_t h = 0; h < g.num_kv_heads; ++h)
          if (!emit(btok + h * head_bytes, tok + std::size_t(h) * L.head_stride, head_bytes)) return 0;
      }
    }
  }
  return n;
}

}  // namespace attnstore
