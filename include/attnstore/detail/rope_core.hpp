// The one rotation routine shared by the CPU path and the CUDA kernel (compiled by
// both g++ and nvcc): element conversion and the rotation of one head's pairs.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ATTNSTORE_HD __host__ __device__ __forceinline__
#else
#define ATTNSTORE_HD inline
#endif

namespace attnstore::detail {

// IEEE half <-> float, round to nearest even, with subnormals, inf and NaN.
ATTNSTORE_HD float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

ATTNSTORE_HD std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return std::uint16_t(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0));  // inf/NaN
  if (abs >= 0x477FF000u) return std::uint16_t(sign | 0x7C00u);                                     // rounds to inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    if (abs < 0x33000000u) return std::uint16_t(sign);
    // value / 2^-24 = m * 2^(e - 126), m the 24-bit mantissa with its implicit bit
    const std::uint32_t e = abs >> 23;
    const std::uint32_t m = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t sh = 126 - e;
    std::uint32_t r = m >> sh;
    const std::uint32_t rem = m & ((1u << sh) - 1), mid = 1u << (sh - 1);
    if (rem > mid || (rem == mid && (r & 1))) ++r;  // 0x400 here is the smallest normal: still right
    return std::uint16_t(sign | r);
  }
  std::uint32_t r = abs - 0x38000000u;  // rebias exponent by (127 - 15) << 23
  const std::uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  return std::uint16_t(sign | r);
}

ATTNSTORE_HD float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

ATTNSTORE_HD std::uint16_t float_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return std::uint16_t((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);                                               // round to nearest even
  return std::uint16_t(x >> 16);
}

/// Element access by dtype code (0 f32, 1 f16, 2 bf16), fp32 math.
ATTNSTORE_HD float load_elem(const void* p, int dtype, std::uint32_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  const std::uint16_t v = static_cast<const std::uint16_t*>(p)[i];
  return dtype == 1 ? half_to_float(v) : bf16_to_float(v);
}
ATTNSTORE_HD void store_elem(void* p, int dtype, std::uint32_t i, float v) {
  if (dtype == 0)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<std::uint16_t*>(p)[i] = dtype == 1 ? float_to_half(v) : float_to_bf16(v);
}

/// The rotation of one pair: two fp32 products, then one subtraction or addition. Every
/// path computes exactly this (no FMA: the CUDA part is built with -fmad=false, the CPU
/// vector path uses separate multiplies and adds), so all give the same bits.
ATTNSTORE_HD void rotate_pair(float x0, float x1, float cos, float sin, float& y0, float& y1) {
  y0 = x0 * cos - x1 * sin;
  y1 = x0 * sin + x1 * cos;
}

/// Rotates pairs [first, first + count) of one head whose rotary part has `half`
/// pairs, by the angles of pair i at cos[i] and sin[i]. neox pairs (i, i + half); gptj
/// pairs (2i, 2i+1).
ATTNSTORE_HD void rotate_pairs(void* head, int dtype, bool neox, std::uint32_t half, std::uint32_t first,
                               std::uint32_t count, const float* cos, const float* sin) {
  for (std::uint32_t i = first; i < first + count; ++i) {
    const std::uint32_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    float y0, y1;
    rotate_pair(load_elem(head, dtype, a), load_elem(head, dtype, b), cos[i], sin[i], y0, y1);
    store_elem(head, dtype, a, y0);
    store_elem(head, dtype, b, y1);
  }
}

/// Rotates one head's rotary pairs by the angles whose cosines and sines are given
/// (rotary_dim / 2 of each). Elements past rotary_dim are left as they are.
ATTNSTORE_HD void rotate_head(void* head, int dtype, bool neox, std::uint32_t rotary_dim, const float* cos,
                              const float* sin) {
  rotate_pairs(head, dtype, neox, rotary_dim / 2, 0, rotary_dim / 2, cos, sin);
}

}  // namespace attnstore::detail
