// CUDA re-rotation. One launch rotates a whole table of runs (rerotate_runs_cuda: every
// page run of a loaded layer) or one run (rerotate_cuda). A thread rotates V consecutive
// pairs of one head of one token: one 16-byte load and store per side where the
// addresses allow (the usual case: 16-byte aligned heads), else pair by pair. Either
// way each pair goes through the CPU path's core routines (detail/rope_core.hpp), and
// this file is built with -fmad=false, so every element gets the CPU's bits.
// Indexing is 32-bit within a block's tile of tokens: no 64-bit division per thread.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "attnstore/rope.hpp"

namespace attnstore {
namespace {

constexpr unsigned block_threads = 256;
constexpr unsigned max_grid_y = 65535;

// Kernel parameters, passed by value.
struct launch_params {
  std::byte* base;
  const rope_run* runs;  // device table; nullptr: the one run `single`
  rope_run single;
  const float* cos;
  const float* sin;
  unsigned long long token_stride, head_stride;
  unsigned half;      // pairs per head
  unsigned groups;    // threads per head (half / V)
  unsigned items;     // threads per token (heads * groups)
  unsigned tile;      // tokens per block; blockIdx.y picks the tile within the run
  unsigned row_step;  // 0: the run's row for every token; 1: row + t
};

template <int Code>
using raw_t = std::conditional_t<Code == 0, float, std::uint16_t>;

template <class T>
__device__ __forceinline__ void load16(const std::byte* p, T* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  std::memcpy(out, &v, 16);
}
template <class T>
__device__ __forceinline__ void store16(std::byte* p, const T* in) {
  uint4 v;
  std::memcpy(&v, in, 16);
  *reinterpret_cast<uint4*>(p) = v;
}
template <unsigned V>
__device__ __forceinline__ void load_floats(const float* p, float* out) {
  if constexpr (V % 4 == 0) {
    for (unsigned j = 0; j < V / 4; ++j) {
      const float4 f = reinterpret_cast<const float4*>(p)[j];
      out[4 * j] = f.x, out[4 * j + 1] = f.y, out[4 * j + 2] = f.z, out[4 * j + 3] = f.w;
    }
  } else if constexpr (V == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    out[0] = f.x, out[1] = f.y;
  } else {
    for (unsigned j = 0; j < V; ++j) out[j] = p[j];
  }
}

// Pairs [i0, i0 + V) of one head; c and s point at the angles of pair i0.
template <int Code, bool Neox, unsigned V>
__device__ __forceinline__ void rotate_group(std::byte* head, unsigned i0, unsigned half, const float* c,
                                             const float* s) {
  using T = raw_t<Code>;
  if constexpr (V > 1) {
    // neox: V elements from pair i0 and V from pair i0 + half, 16 bytes each.
    // gptj: the 2V interleaved elements of pairs i0.., 16 bytes.
    static_assert(V * sizeof(T) * (Neox ? 1 : 2) == 16, "one 16-byte vector per side");
    constexpr unsigned n = 16 / sizeof(T);
    constexpr unsigned angle_align = V * 4 < 16 ? V * 4 : 16;
    std::byte* pa = head + std::size_t(Neox ? i0 : 2 * i0) * sizeof(T);
    std::byte* pb = head + std::size_t(i0 + half) * sizeof(T);
    const auto where = reinterpret_cast<std::uintptr_t>(pa) | (Neox ? reinterpret_cast<std::uintptr_t>(pb) : 0);
    const auto angles = reinterpret_cast<std::uintptr_t>(c) | reinterpret_cast<std::uintptr_t>(s);
    if ((where & 15) == 0 && (angles & (angle_align - 1)) == 0) {
      float cv[V], sv[V];
      load_floats<V>(c, cv);
      load_floats<V>(s, sv);
      T a[n], b[Neox ? n : 1];
      load16(pa, a);
      if constexpr (Neox) load16(pb, b);
      T* hi = Neox ? b : a;  // the pairs' second elements
#pragma unroll
      for (unsigned k = 0; k < V; ++k) {
        const unsigned ia = Neox ? k : 2 * k, ib = Neox ? k : 2 * k + 1;
        float y0, y1;
        detail::rotate_pair(detail::load_elem(a, Code, ia), detail::load_elem(hi, Code, ib), cv[k], sv[k], y0, y1);
        detail::store_elem(a, Code, ia, y0);
        detail::store_elem(hi, Code, ib, y1);
      }
      store16(pa, a);
      if constexpr (Neox) store16(pb, b);
      return;
    }
  }
  detail::rotate_pairs(head, Code, Neox, half, i0, V, c - i0, s - i0);  // unaligned (or V == 1): pair by pair
}

// Block (x, y): tokens [y * tile, (y + 1) * tile) of run x; thread j of the block's
// tile * items works on token j / items, head and pair group from j % items.
template <int Code, bool Neox, unsigned V>
__global__ void __launch_bounds__(block_threads) rerotate_runs_kernel(launch_params p) {
  const rope_run run = p.runs ? p.runs[blockIdx.x] : p.single;
  const unsigned first = blockIdx.y * p.tile;
  if (first >= run.tokens) return;
  const unsigned work = min(run.tokens - first, p.tile) * p.items;
  std::byte* const keys = p.base + run.offset;
  for (unsigned j = threadIdx.x; j < work; j += blockDim.x) {
    const unsigned tt = j / p.items, rest = j - tt * p.items;
    const unsigned h = rest / p.groups, g = rest - h * p.groups;
    const unsigned t = first + tt;
    const std::size_t angle = (std::size_t(run.row) + std::size_t(t) * p.row_step) * p.half + std::size_t(g) * V;
    rotate_group<Code, Neox, V>(keys + t * p.token_stride + h * p.head_stride, g * V, p.half, p.cos + angle,
                                p.sin + angle);
  }
}

template <int Code, bool Neox>
errc launch(launch_params p, unsigned count, unsigned max_tokens, unsigned heads, cudaStream_t stream) noexcept {
  constexpr unsigned per_vector = 16 / sizeof(raw_t<Code>);
  constexpr unsigned V = Neox ? per_vector : per_vector / 2;
  const bool vectors = p.half % V == 0;  // else the last group of a head would be partial
  p.groups = p.half / (vectors ? V : 1);
  p.items = heads * p.groups;
  p.tile = std::max(1u, block_threads / p.items);
  if ((max_tokens + p.tile - 1) / p.tile > max_grid_y) p.tile = (max_tokens + max_grid_y - 1) / max_grid_y;
  const dim3 grid(count, (max_tokens + p.tile - 1) / p.tile);
  const unsigned threads =
      unsigned(std::min<unsigned long long>(block_threads, (p.tile * 1ull * p.items + 31) / 32 * 32));
  if (vectors)
    rerotate_runs_kernel<Code, Neox, V><<<grid, threads, 0, stream>>>(p);
  else
    rerotate_runs_kernel<Code, Neox, 1><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? errc::ok : errc::device_error;
}

// `single` is the run when b.runs is nullptr (rerotate_cuda).
errc dispatch(const rope_runs_view& b, const rope_spec& spec, rope_run single, void* cuda_stream) noexcept {
  if (!rotatable(b.dt)) return errc::unsupported;
  launch_params p{};
  p.base = b.base;
  p.runs = b.runs;
  p.single = single;
  p.cos = b.cos;
  p.sin = b.sin;
  p.token_stride = b.token_stride;
  p.head_stride = b.head_stride;
  p.half = spec.rotary() / 2;
  p.row_step = b.row_step;
  if (b.count == 0 || b.max_tokens == 0 || b.heads == 0 || p.half == 0) return errc::ok;
  auto* s = static_cast<cudaStream_t>(cuda_stream);
  const bool neox = spec.style == rope_style::neox;
  const unsigned n = b.count, most = b.max_tokens, heads = b.heads;
  switch (b.dt) {
    case dtype::f32:
      return neox ? launch<0, true>(p, n, most, heads, s) : launch<0, false>(p, n, most, heads, s);
    case dtype::f16:
      return neox ? launch<1, true>(p, n, most, heads, s) : launch<1, false>(p, n, most, heads, s);
    default:
      return neox ? launch<2, true>(p, n, most, heads, s) : launch<2, false>(p, n, most, heads, s);
  }
}

}  // namespace

errc rerotate_cuda(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
                   std::size_t head_stride, const float* cos_device, const float* sin_device, bool shared_row,
                   const rope_spec& spec, void* cuda_stream) noexcept {
  if (tokens > 0xFFFFFFFFu) return errc::invalid_argument;
  rope_runs_view one;  // runs stays nullptr: the kernel takes the run from its parameters
  one.base = keys;
  one.count = 1;
  one.max_tokens = std::uint32_t(tokens);
  one.row_step = shared_row ? 0 : 1;
  one.cos = cos_device;
  one.sin = sin_device;
  one.dt = dt;
  one.heads = heads;
  one.token_stride = token_stride;
  one.head_stride = head_stride;
  return dispatch(one, spec, rope_run{0, std::uint32_t(tokens), 0}, cuda_stream);
}

errc rerotate_runs_cuda(rope_runs_view b, const rope_spec& spec, void* cuda_stream) noexcept {
  if (!b.runs && b.count) return errc::invalid_argument;
  return dispatch(b, spec, rope_run{}, cuda_stream);
}

}  // namespace attnstore
