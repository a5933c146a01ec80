// CUDA re-rotation: one thread per (token, head, pair), the same core routine as the
// CPU path (detail/rope_core.hpp).
#include <cuda_runtime.h>

#include "attnstore/rope.hpp"

namespace attnstore {
namespace {

__global__ void rerotate_kernel(std::byte* keys, int code, bool neox, unsigned rotary, unsigned heads,
                                unsigned long long tokens, unsigned long long token_stride,
                                unsigned long long head_stride, const float* cos, const float* sin, bool shared) {
  const unsigned half = rotary / 2;
  const unsigned long long idx = blockIdx.x * 1ull * blockDim.x + threadIdx.x;
  const unsigned long long total = tokens * heads * half;
  if (idx >= total) return;
  const unsigned i = unsigned(idx % half);
  const unsigned h = unsigned((idx / half) % heads);
  const unsigned long long t = idx / (1ull * half * heads);
  std::byte* head = keys + t * token_stride + h * head_stride;
  const float* c = cos + (shared ? 0 : t * half);
  const float* s = sin + (shared ? 0 : t * half);
  const unsigned a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
  const float x0 = detail::load_elem(head, code, a), x1 = detail::load_elem(head, code, b);
  detail::store_elem(head, code, a, x0 * c[i] - x1 * s[i]);
  detail::store_elem(head, code, b, x0 * s[i] + x1 * c[i]);
}

}  // namespace

errc rerotate_cuda(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
                   std::size_t head_stride, const float* cos_device, const float* sin_device, bool shared_row,
                   const rope_spec& spec, void* cuda_stream) noexcept {
  if (dt == dtype::fp8_e4m3) return errc::unsupported;
  const int code = dt == dtype::f32 ? 0 : dt == dtype::f16 ? 1 : 2;
  const unsigned long long total = 1ull * tokens * heads * (spec.rotary() / 2);
  if (total == 0) return errc::ok;
  const unsigned threads = 256;
  const unsigned long long blocks = (total + threads - 1) / threads;
  rerotate_kernel<<<unsigned(blocks), threads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(
      keys, code, spec.style == rope_style::neox, spec.rotary(), heads, tokens, token_stride, head_stride, cos_device,
      sin_device, shared_row);
  return cudaGetLastError() == cudaSuccess ? errc::ok : errc::device_error;
}

}  // namespace attnstore
