// A toy engine memory for hook tests: paged K and V per layer, optionally with padded
// strides (not attnstore's layout), and deterministic per-token contents.
#pragma once

#include <cstring>
#include <vector>

#include "attnstore/kv_layout.hpp"
#include "support/kv_data.hpp"

namespace attnstore::testing {

// A toy engine memory: paged K and V per layer, [pages][page_size][heads][dim] f16-sized
// elements, optionally with padded head and token strides (not attnstore's layout).
struct paged_memory {
  kv_geometry g;
  std::uint32_t pages, page_size;
  std::size_t head_stride, token_stride, page_stride;
  std::vector<std::byte> k, v;
  std::vector<std::byte*> kb, vb;
  kv_layout layout;
  paged_memory(const kv_geometry& geom, std::uint32_t npages, std::uint32_t psize, std::size_t head_pad)
      : g(geom), pages(npages), page_size(psize) {
    head_stride = g.head_dim * g.element_bytes() + head_pad;
    token_stride = head_stride * g.num_kv_heads;
    page_stride = token_stride * page_size;
    k.resize(page_stride * pages * g.num_layers);
    v.resize(k.size());
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      kb.push_back(k.data() + l * page_stride * pages);
      vb.push_back(v.data() + l * page_stride * pages);
    }
    layout = kv_layout{g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, page_size,         page_stride,
                       token_stride, head_stride,    kb,         vb,      memory_space::host};
  }
  // Element bytes of (layer, K or V, position, head) given the page table.
  std::byte* at(std::uint32_t l, int side, const std::vector<std::uint32_t>& table, std::size_t pos, std::uint32_t h) {
    return (side ? vb : kb)[l] + table[pos / page_size] * page_stride + (pos % page_size) * token_stride +
           h * head_stride;
  }
  // What the engine would compute for token `pos` of a session: deterministic bytes.
  void fill_token(std::uint64_t session, const std::vector<std::uint32_t>& table, std::size_t pos) {
    for (std::uint32_t l = 0; l < g.num_layers; ++l)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t h = 0; h < g.num_kv_heads; ++h)
          fill_block({at(l, side, table, pos, h), g.head_dim * g.element_bytes()},
                                         session * 7919 + pos * 131 + l * 17 + side * 3 + h);
  }
  bool token_equals(std::uint64_t session, const std::vector<std::uint32_t>& table, std::size_t pos) {
    std::vector<std::byte> want(g.head_dim * g.element_bytes());
    for (std::uint32_t l = 0; l < g.num_layers; ++l)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t h = 0; h < g.num_kv_heads; ++h) {
          fill_block(want, session * 7919 + pos * 131 + l * 17 + side * 3 + h);
          if (std::memcmp(want.data(), at(l, side, table, pos, h), want.size()) != 0) return false;
        }
    return true;
  }
};

}  // namespace attnstore::testing
