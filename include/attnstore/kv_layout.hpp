// kv_layout / kv_target: how an engine's own KV memory is laid out, so attnstore copies
// straight into (and out of) it. Paged caches ([num_pages][page_size][kv_heads][head_dim]
// per layer, K and V separate or merged) and contiguous ones (one page per sequence)
// are both described by strides; nothing needs to be in attnstore's format first.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

enum class memory_space : std::uint8_t { host, device };

/// An engine's KV cache layout for the layers of one layer group (or of the whole
/// model when it has one group). Element (token t of page p, head h, dim d) of the
/// group's i-th layer's K is at k_base[i] + p*page_stride + t*token_stride +
/// h*head_stride + d*element_bytes, and likewise for V with v_base. head_dim elements
/// of one head are contiguous. Merged K/V caches set v_base[i] = k_base[i] + (offset of
/// V). A latent (MLA) group has one row per token: k_base only, v_base empty. A
/// contiguous cache is one page of capacity tokens per sequence.
struct kv_layout {
  std::uint32_t num_layers = 0;  ///< layers of the group it describes
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_dim = 0;
  attnstore::dtype dtype = attnstore::dtype::f16;
  std::uint32_t page_size = 0;         ///< tokens per page
  std::size_t page_stride = 0;         ///< bytes between pages
  std::size_t token_stride = 0;        ///< bytes between tokens of a page
  std::size_t head_stride = 0;         ///< bytes between heads of a token
  std::span<std::byte* const> k_base;  ///< per layer of the group, in model order
  std::span<std::byte* const> v_base;  ///< per layer of the group (empty for a latent group)
  memory_space where = memory_space::host;

  /// Throws std::invalid_argument naming the field when the layout cannot hold the
  /// group's layers.
  void check_against(const kv_group& g) const {
    auto fail = [](const std::string& m) { throw std::invalid_argument("kv_layout: " + m); };
    if (g.kind == layer_kind::state) {  // k_base[i]: layer i's state, state_bytes contiguous bytes
      if (num_layers != g.num_layers || k_base.size() != num_layers || !v_base.empty())
        fail("a state group's layout has num_layers " + std::to_string(g.num_layers) +
             ", one k_base per layer (its state) and no v_base");
      for (std::size_t i = 0; i < k_base.size(); ++i)
        if (!k_base[i]) fail("layer " + std::to_string(i) + " has a null state");
      return;
    }
    if (num_layers != g.num_layers || num_kv_heads != g.num_kv_heads || head_dim != g.head_dim || dtype != g.dtype)
      fail("layers/heads/head_dim/dtype (" + std::to_string(num_layers) + "/" + std::to_string(num_kv_heads) + "/" +
           std::to_string(head_dim) + "/" + std::string(to_string(dtype)) + ") differ from the store's " +
           std::string(to_string(g.kind)) + " group (" + std::to_string(g.num_layers) + "/" +
           std::to_string(g.num_kv_heads) + "/" + std::to_string(g.head_dim) + "/" + std::string(to_string(g.dtype)) +
           ")");
    if (page_size == 0) fail("page_size is 0");
    const std::size_t head_bytes = std::size_t(head_dim) * dtype_size(dtype);
    if (head_stride < head_bytes) fail("head_stride is " + std::to_string(head_stride) + ", below head_dim bytes");
    if (token_stride < head_stride * (num_kv_heads - 1) + head_bytes) fail("token_stride too small for the heads");
    if (k_base.size() != num_layers || v_base.size() != (g.tensors() == 2 ? num_layers : 0))
      fail("k_base must have one pointer per layer (" + std::to_string(num_layers) + ") and v_base " +
           (g.tensors() == 2 ? "as many" : "none (a latent group has no V)"));
    for (std::size_t i = 0; i < k_base.size(); ++i)
      if (!k_base[i] || (i < v_base.size() && !v_base[i])) fail("layer " + std::to_string(i) + " has a null base");
  }
  /// The one-group form: the geometry's only group.
  void check_against(const kv_geometry& g) const {
    if (g.groups.size() != 1)
      throw std::invalid_argument("kv_layout: the store's geometry has " + std::to_string(g.groups.size()) +
                                  " layer groups; give kv_target::groups one layout per group");
    check_against(g.groups[0]);
  }
};

/// Engine memory of one layer group for one sequence: its layout and the page ids
/// holding the sequence's tokens in order (position p lives in pages[p / page_size]).
struct kv_group_target {
  const kv_layout* layout = nullptr;
  std::span<const std::uint32_t> pages;
};

/// Engine memory for one sequence. A model with one layer group sets layout and pages;
/// a model with several sets `groups`, one per kv_geometry::groups entry, in order
/// (engines that page groups separately, as vLLM's hybrid allocator does, give each
/// its own pages). Everything it points at must stay valid until the load or save
/// finishes.
struct kv_target {
  const kv_layout* layout = nullptr;
  std::span<const std::uint32_t> pages;
  std::span<const kv_group_target> groups = {};
  /// Group gi's memory.
  kv_group_target group(std::uint32_t gi) const noexcept {
    return groups.empty() ? kv_group_target{layout, pages} : groups[gi];
  }
  /// Throws std::invalid_argument naming what does not fit the geometry.
  void check_against(const kv_geometry& g) const {
    if (groups.empty()) {
      if (!layout) throw std::invalid_argument("kv_target: no layout");
      layout->check_against(g);
      return;
    }
    if (groups.size() != g.groups.size())
      throw std::invalid_argument("kv_target: " + std::to_string(groups.size()) + " group targets for " +
                                  std::to_string(g.groups.size()) + " layer groups");
    for (std::size_t i = 0; i < groups.size(); ++i) {
      if (!groups[i].layout) throw std::invalid_argument("kv_target: group " + std::to_string(i) + " has no layout");
      groups[i].layout->check_against(g.groups[i]);
    }
  }
  /// Whether every group's pages hold `tokens` positions.
  bool holds(const kv_geometry& g, std::uint64_t tokens) const noexcept {
    for (std::uint32_t i = 0; i < std::max<std::size_t>(1, groups.size()) && i < g.groups.size(); ++i) {
      if (g.groups[i].kind == layer_kind::state) continue;  // one state per sequence, no pages
      const kv_group_target t = group(i);
      if (std::uint64_t(t.pages.size()) * t.layout->page_size < tokens) return false;
    }
    return true;
  }
  /// Where the memory is (every group's layout must agree).
  memory_space where() const noexcept { return groups.empty() ? layout->where : groups[0].layout->where; }
};
/// Where the KV to save is read from: the same description.
using kv_source = kv_target;

/// Direction of a block <-> engine copy.
enum class copy_direction : std::uint8_t { to_engine, from_engine };

/// Appends to `out` the segments that move layer `layer` of tokens [block_first,
/// block_first + tokens) of one stored block (payload at `block_payload`, laid out as
/// kv_geometry says) to or from sequence positions [first_token, first_token + tokens)
/// of the engine memory in `t`. Consecutive tokens of one page merge into one segment
/// when the engine packs heads and tokens densely. Returns the number of segments
/// written, or 0 if `out` is too small. Allocation-free.
std::size_t layer_segments(const kv_geometry& g, const std::byte* block_payload, std::uint32_t layer,
                           std::uint32_t block_first, std::uint64_t first_token, std::uint32_t tokens,
                           const kv_target& t, copy_direction dir, std::span<copy_segment> out) noexcept;

/// Upper bound of segments layer_segments() produces for one block and one layer of
/// group `gi` in layout `l`.
inline std::size_t max_layer_segments(const kv_geometry& g, std::uint32_t gi, const kv_layout& l) noexcept {
  const kv_group& k = g.groups[gi];
  const std::size_t head_bytes = std::size_t(k.head_dim) * dtype_size(k.dtype);
  const bool dense_heads = l.head_stride == head_bytes;
  const std::size_t per_token = dense_heads ? 1 : k.num_kv_heads;
  return k.tensors() * std::size_t(g.tokens_per_block) * per_token;
}
/// The one-group form.
inline std::size_t max_layer_segments(const kv_geometry& g, const kv_layout& l) noexcept {
  const std::size_t head_bytes = std::size_t(l.head_dim) * dtype_size(l.dtype);
  const bool dense_heads = l.head_stride == head_bytes;
  return 2 * std::size_t(g.tokens_per_block) * (dense_heads ? 1 : l.num_kv_heads);
}
/// The same, for the largest layer of any group of `t`.
inline std::size_t max_layer_segments(const kv_geometry& g, const kv_target& t) noexcept {
  std::size_t m = 0;
  for (std::uint32_t i = 0; i < g.groups.size(); ++i) m = std::max(m, max_layer_segments(g, i, *t.group(i).layout));
  return m;
}

inline std::size_t layer_segments(const kv_geometry& g, const std::byte* block_payload, std::uint32_t layer,
                                  std::uint32_t block_first, std::uint64_t first_token, std::uint32_t tokens,
                                  const kv_target& t, copy_direction dir, std::span<copy_segment> out) noexcept {
  const layer_shape& shape = g.layers[layer];
  if (shape.bytes == 0) return 0;  // kept in the checkpoint, not in blocks
  const kv_group& k = g.groups[shape.group];
  const kv_group_target gt = t.group(shape.group);
  const kv_layout& L = *gt.layout;
  const std::size_t head_bytes = std::size_t(k.head_dim) * dtype_size(k.dtype);
  const std::size_t token_bytes = k.row_bytes();  // one token, one tensor, in the block
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
  const std::byte* layer_base = block_payload + shape.offset;
  for (std::uint32_t side = 0; side < k.tensors(); ++side) {  // K then V (or the one latent row)
    const std::byte* src_side = layer_base + side * shape.tensor_bytes;
    std::byte* const engine_layer = side == 0 ? L.k_base[shape.in_group] : L.v_base[shape.in_group];
    for (std::uint32_t i = 0; i < tokens; ++i) {
      const std::uint64_t pos = first_token + i;
      std::byte* tok = engine_layer + std::size_t(gt.pages[pos / L.page_size]) * L.page_stride +
                       std::size_t(pos % L.page_size) * L.token_stride;
      const std::byte* btok = src_side + std::size_t(block_first + i) * token_bytes;
      if (dense_heads) {
        if (!emit(btok, tok, token_bytes)) return 0;
      } else {
        for (std::uint32_t h = 0; h < k.num_kv_heads; ++h)
          if (!emit(btok + h * head_bytes, tok + std::size_t(h) * L.head_stride, head_bytes)) return 0;
      }
    }
  }
  return n;
}

}  // namespace attnstore
