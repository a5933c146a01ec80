// CPU re-rotation. A vectorised path (AVX2 + F16C, 8 pairs at a time) for the common
// case, the shared scalar core (detail/rope_core.hpp) for the rest; both compute
// x0*c - x1*s and x0*s + x1*c in fp32 with separate multiply and add (no FMA), so the
// two paths give identical results.
#include "attnstore/rope.hpp"

#include <cpuid.h>
#include <immintrin.h>

#include "attnstore/config.hpp"
#include "attnstore/status.hpp"

namespace attnstore {
namespace {

using detail::dtype_code;

__attribute__((target("avx2,f16c"))) __m256 load8(const std::byte* p, int code) {
  if (code == 0) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (code == 1) return _mm256_cvtph_ps(v);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

__attribute__((target("avx2,f16c"))) void store8(std::byte* p, int code, __m256 x) {
  if (code == 0) {
    _mm256_storeu_ps(reinterpret_cast<float*>(p), x);
    return;
  }
  if (code == 1) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
  // bf16, round to nearest even (as float_to_bf16 for every value but NaN: chunks with
  // a NaN take the scalar core, see rotate_head_avx2).
  __m256i b = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  b = _mm256_srli_epi32(b, 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

__attribute__((target("avx2,f16c"))) bool any_nan(__m256 a, __m256 b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0;
}

// neox heads with rotary/2 a multiple of 8: pairs (i, i+half) are 8-wide vectors.
// F16C and the bf16 rounding above keep NaN payloads where the scalar core makes one
// quiet NaN: an f16/bf16 chunk whose results hold a NaN is done by the core, pair by
// pair (nothing of it is stored yet, so it starts from the same inputs).
__attribute__((target("avx2,f16c"))) void rotate_head_avx2(std::byte* head, int code, std::uint32_t half,
                                                           const float* c, const float* s) {
  const std::size_t e = code == 0 ? 4 : 2;
  for (std::uint32_t i = 0; i < half; i += 8) {
    std::byte* pa = head + i * e;
    std::byte* pb = head + (i + half) * e;
    __m256 x0 = load8(pa, code), x1 = load8(pb, code);
    __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    __m256 y0 = _mm256_sub_ps(_mm256_mul_ps(x0, cv), _mm256_mul_ps(x1, sv));
    __m256 y1 = _mm256_add_ps(_mm256_mul_ps(x0, sv), _mm256_mul_ps(x1, cv));
    if (code != 0 && any_nan(y0, y1)) {
      detail::rotate_pairs(head, code, true, half, i, 8, c, s);
      continue;
    }
    store8(pa, code, y0);
    store8(pb, code, y1);
  }
}

bool have_avx2() {
  // F16C from CPUID (leaf 1, ECX bit 29): clang before 16 rejects
  // __builtin_cpu_supports("f16c") at compile time, and the fuzz build is clang.
  static const bool v = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  }();
  return v;
}

}  // namespace

errc rerotate(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
              std::size_t head_stride, const rope_angles& angles) noexcept {
  return rerotate(keys, dt, tokens, heads, token_stride, head_stride, angles.spec(), angles.cos_row(0),
                  angles.sin_row(0), angles.shared());
}

errc rerotate(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
              std::size_t head_stride, const rope_spec& spec, const float* cos, const float* sin,
              bool shared_row) noexcept {
  if (!rotatable(dt)) return errc::unsupported;
  const int code = dtype_code(dt);
  const bool neox = spec.style == rope_style::neox;
  const std::uint32_t half = spec.rotary() / 2;
  const bool fast = neox && half % 8 == 0 && have_avx2();
  for (std::size_t t = 0; t < tokens; ++t) {
    const float* c = cos + (shared_row ? 0 : t * half);
    const float* s = sin + (shared_row ? 0 : t * half);
    for (std::uint32_t h = 0; h < heads; ++h) {
      std::byte* head = keys + t * token_stride + h * head_stride;
      if (fast)
        rotate_head_avx2(head, code, half, c, s);
      else
        detail::rotate_head(head, code, neox, spec.rotary(), c, s);
    }
  }
  return errc::ok;
}

errc rerotate_runs(rope_runs_view b, const rope_spec& spec) noexcept {
  if (!rotatable(b.dt)) return errc::unsupported;
  const std::size_t pairs = spec.rotary() / 2;
  for (std::uint32_t r = 0; r < b.count; ++r) {
    const rope_run& run = b.runs[r];
    const std::size_t row = std::size_t(run.row) * pairs;
    (void)rerotate(b.base + run.offset, b.dt, run.tokens, b.heads, b.token_stride, b.head_stride, spec, b.cos + row,
                   b.sin + row, b.row_step == 0);
  }
  return errc::ok;
}

#if !ATTNSTORE_HAS_CUDA
errc rerotate_cuda(std::byte*, dtype, std::size_t, std::uint32_t, std::size_t, std::size_t, const float*, const float*,
                   bool, const rope_spec&, void*) noexcept {
  return errc::unsupported;
}
errc rerotate_runs_cuda(rope_runs_view, const rope_spec&, void*) noexcept { return errc::unsupported; }
#endif

}  // namespace attnstore
