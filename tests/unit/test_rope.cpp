#include <catch2/catch.hpp>

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "attnstore/rope.hpp"

using namespace attnstore;

namespace {

// Keys in dtype `dt`: tokens x heads x head_dim, dense.
struct keys {
  dtype dt;
  std::uint32_t tokens, heads, dim;
  std::vector<std::byte> bytes;
  keys(dtype d, std::uint32_t t, std::uint32_t h, std::uint32_t hd, std::uint64_t seed)
      : dt(d), tokens(t), heads(h), dim(hd), bytes(std::size_t(t) * h * hd * dtype_size(d)) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0, 1);
    for (std::uint32_t i = 0; i < t * h * hd; ++i) detail::store_elem(bytes.data(), detail::dtype_code(d), i, n(rng));
  }
  float at(std::uint32_t t, std::uint32_t h, std::uint32_t i) const {
    return detail::load_elem(bytes.data(), detail::dtype_code(dt), (t * heads + h) * dim + i);
  }
  std::size_t token_stride() const { return std::size_t(heads) * dim * dtype_size(dt); }
  std::size_t head_stride() const { return std::size_t(dim) * dtype_size(dt); }
};

// The formula, in double: pair (a, b) rotated by angle pos * inv_freq(i).
void reference(const rope_spec& s, const keys& in, std::int64_t first, std::int64_t step, std::vector<double>& out) {
  out.assign(std::size_t(in.tokens) * in.heads * in.dim, 0);
  const std::uint32_t rd = s.rotary(), half = rd / 2;
  for (std::uint32_t t = 0; t < in.tokens; ++t)
    for (std::uint32_t h = 0; h < in.heads; ++h) {
      double* o = &out[(std::size_t(t) * in.heads + h) * in.dim];
      for (std::uint32_t i = 0; i < in.dim; ++i) o[i] = in.at(t, h, i);
      for (std::uint32_t i = 0; i < half; ++i) {
        const std::uint32_t a = s.style == rope_style::neox ? i : 2 * i;
        const std::uint32_t b = s.style == rope_style::neox ? i + half : 2 * i + 1;
        const double ang = double(first + std::int64_t(t) * step) * s.inv_freq(i);
        const double x0 = in.at(t, h, a), x1 = in.at(t, h, b);
        o[a] = x0 * std::cos(ang) - x1 * std::sin(ang);
        o[b] = x0 * std::sin(ang) + x1 * std::cos(ang);
      }
    }
}

double tolerance(dtype dt) { return dt == dtype::f32 ? 2e-6 : dt == dtype::f16 ? 2e-3 : 1.6e-2; }
}  // namespace

TEST_CASE("f16 and bf16 conversions round to nearest even, like the hardware") {
  std::mt19937_64 rng(1);
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = detail::half_to_float(std::uint16_t(h));
    if (std::isnan(f)) continue;
    REQUIRE(detail::float_to_half(f) == h);
    REQUIRE(_cvtss_sh(f, 0) == h);
  }
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t bits = std::uint32_t(rng());
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;
    REQUIRE(detail::float_to_half(f) == _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
    // bf16: nearest even of the top 16 bits
    const std::uint16_t b = detail::float_to_bf16(f);
    const double err = std::fabs(double(detail::bf16_to_float(b)) - double(f));
    const std::uint16_t other = std::uint16_t(b ^ 1);
    if (std::isfinite(detail::bf16_to_float(other)) && std::isfinite(f))
      REQUIRE(err <= std::fabs(double(detail::bf16_to_float(other)) - double(f)));
  }
}

TEST_CASE("rotation matches the double-precision formula for every style, dtype and scaling") {
  for (auto style : {rope_style::neox, rope_style::gptj})
    for (auto dt : {dtype::f32, dtype::f16, dtype::bf16})
      for (auto scaling : {rope_scaling::none, rope_scaling::linear, rope_scaling::llama3})
        for (std::uint32_t rotary : {0u, 32u}) {  // full, and partial rotary of a 64-dim head
          rope_spec s;
          s.style = style;
          s.head_dim = 64;
          s.rotary_dim = rotary;
          s.theta = scaling == rope_scaling::llama3 ? 500000.0 : 10000.0;
          s.scaling = scaling;
          s.factor = scaling == rope_scaling::none ? 1.0 : 8.0;
          s.original_max_position = 8192;
          keys k(dt, 37, 3, 64, 11);
          std::vector<double> want;
          const std::int64_t first = 12345;
          reference(s, k, first, 1, want);
          rope_angles angles(s, k.tokens);
          REQUIRE(angles.fill(first, 1, k.tokens));
          REQUIRE(rerotate(k.bytes.data(), dt, k.tokens, k.heads, k.token_stride(), k.head_stride(), angles) ==
                  errc::ok);
          double worst = 0;
          for (std::uint32_t t = 0; t < k.tokens; ++t)
            for (std::uint32_t h = 0; h < k.heads; ++h)
              for (std::uint32_t i = 0; i < 64; ++i) {
                const double w = want[(std::size_t(t) * k.heads + h) * 64 + i];
                worst = std::max(worst, std::fabs(k.at(t, h, i) - w) / std::max(1.0, std::fabs(w)));
              }
          INFO(s.to_string() << " dtype " << to_string(dt));
          CHECK(worst <= tolerance(dt));
        }
}

TEST_CASE("rotations compose: R(a) then R(b) equals R(a+b) within fp32 rounding") {
  rope_spec s;
  s.head_dim = 128;
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const std::int64_t a = std::int64_t(rng() % 20000) - 10000, b = std::int64_t(rng() % 20000) - 10000;
    keys x(dtype::f32, 8, 2, 128, trial), y = x;
    rope_angles ra(s, 1), rb(s, 1), rab(s, 1);
    ra.fill(a, 0, 8);
    rb.fill(b, 0, 8);
    rab.fill(a + b, 0, 8);
    (void)rerotate(x.bytes.data(), dtype::f32, 8, 2, x.token_stride(), x.head_stride(), ra);
    (void)rerotate(x.bytes.data(), dtype::f32, 8, 2, x.token_stride(), x.head_stride(), rb);
    (void)rerotate(y.bytes.data(), dtype::f32, 8, 2, y.token_stride(), y.head_stride(), rab);
    for (std::uint32_t t = 0; t < 8; ++t)
      for (std::uint32_t i = 0; i < 128; ++i) CHECK(std::fabs(x.at(t, 0, i) - y.at(t, 0, i)) < 1e-5);
  }
}

TEST_CASE("keys stored after RoPE and moved by -d equal keys rotated fresh at the new positions") {
  for (auto dt : {dtype::f32, dtype::bf16}) {
    rope_spec s;
    s.head_dim = 64;
    keys raw(dt, 50, 2, 64, 9);
    const std::int64_t old_pos = 3000, d = 1900;
    // Stored after RoPE at positions 3000..3049 (the stored bytes, rounded to dtype).
    keys stored = raw;
    rope_angles at_old(s, 50);
    at_old.fill(old_pos, 1, 50);
    (void)rerotate(stored.bytes.data(), dt, 50, 2, stored.token_stride(), stored.head_stride(), at_old);
    // Load after truncation: one shared delta.
    keys moved = stored;
    rope_angles delta(s, 1);
    delta.fill(-d, 0, 50);
    (void)rerotate(moved.bytes.data(), dt, 50, 2, moved.token_stride(), moved.head_stride(), delta);
    // Fresh: the raw keys rotated at 1100..1149.
    keys fresh = raw;
    rope_angles at_new(s, 50);
    at_new.fill(old_pos - d, 1, 50);
    (void)rerotate(fresh.bytes.data(), dt, 50, 2, fresh.token_stride(), fresh.head_stride(), at_new);
    double worst = 0;
    for (std::uint32_t t = 0; t < 50; ++t)
      for (std::uint32_t i = 0; i < 64; ++i)
        worst = std::max(worst, double(std::fabs(moved.at(t, 1, i) - fresh.at(t, 1, i))));
    INFO("dtype " << to_string(dt));
    CHECK(worst < (dt == dtype::f32 ? 1e-5 : 0.05));  // bf16: two roundings of the stored value
  }
}

TEST_CASE("the vectorised CPU path and the shared scalar core give identical bytes") {
  for (auto dt : {dtype::f32, dtype::f16, dtype::bf16}) {
    rope_spec s;
    s.head_dim = 128;
    keys a(dt, 16, 4, 128, 3), b = a;
    rope_angles ang(s, 16);
    ang.fill(777, 1, 16);
    (void)rerotate(a.bytes.data(), dt, 16, 4, a.token_stride(), a.head_stride(), ang);
    for (std::uint32_t t = 0; t < 16; ++t)
      for (std::uint32_t h = 0; h < 4; ++h)
        detail::rotate_head(b.bytes.data() + t * b.token_stride() + h * b.head_stride(), detail::dtype_code(dt), true,
                            128, ang.cos_row(t), ang.sin_row(t));
    INFO("dtype " << to_string(dt));
    CHECK(a.bytes == b.bytes);
  }
}

TEST_CASE("the vectorised CPU path matches the scalar core for NaN keys and results that overflow") {
  for (auto dt : {dtype::f16, dtype::bf16}) {
    rope_spec s;
    s.head_dim = 128;
    keys a(dt, 4, 4, 128, 9);
    const int code = detail::dtype_code(dt);
    // Past the first 8-pair chunk: a NaN with a payload, and values whose rotation
    // overflows to infinity.
    const std::uint16_t nan_bits = dt == dtype::f16 ? 0x7D55 : 0x7F95;
    std::memcpy(a.bytes.data() + (1 * 128 + 20) * 2, &nan_bits, 2);
    for (std::uint32_t i : {40u, 104u})
      detail::store_elem(a.bytes.data(), code, 2 * 128 + i, dt == dtype::f16 ? 65000.0f : 3.3e38f);
    keys b = a;
    rope_angles ang(s, 4);
    ang.fill(-1000, 1, 4);
    (void)rerotate(a.bytes.data(), dt, 4, 4, a.token_stride(), a.head_stride(), ang);
    for (std::uint32_t t = 0; t < 4; ++t)
      for (std::uint32_t h = 0; h < 4; ++h)
        detail::rotate_head(b.bytes.data() + t * b.token_stride() + h * b.head_stride(), code, true, 128,
                            ang.cos_row(t), ang.sin_row(t));
    INFO("dtype " << to_string(dt));
    CHECK(a.bytes == b.bytes);
  }
}

TEST_CASE("a batch of runs rotates each run as rerotate does, with shared or per-position rows") {
  for (auto dt : {dtype::f32, dtype::f16, dtype::bf16})
    for (std::uint32_t step : {0u, 1u}) {
      rope_spec s{rope_style::gptj, 64, 48};
      keys a(dt, 40, 3, 64, 5), b = a;
      rope_angles rows(s, 64);  // row r: position delta 100 + r (a shift index when step is 0)
      rows.fill(100, 1, 64);
      float c[24], sn[24];
      rows.row(100 + 7, c, sn);  // row() is what fill() computes for one row
      CHECK(std::memcmp(c, rows.cos_row(7), sizeof(c)) == 0);
      CHECK(std::memcmp(sn, rows.sin_row(7), sizeof(sn)) == 0);
      // Runs out of order, of 1..16 tokens, rows not in token order.
      const rope_run runs[] = {
          {a.token_stride() * 20, 16, 3}, {0, 1, 9}, {a.token_stride() * 3, 12, 40}, {a.token_stride(), 2, 0}};
      rope_runs_view v;
      v.base = a.bytes.data();
      v.runs = runs;
      v.count = 4;
      v.max_tokens = 16;
      v.row_step = step;
      v.cos = rows.cos_row(0);
      v.sin = rows.sin_row(0);
      v.dt = dt;
      v.heads = 3;
      v.token_stride = a.token_stride();
      v.head_stride = a.head_stride();
      REQUIRE(rerotate_runs(v, s) == errc::ok);
      for (const rope_run& r : runs)
        (void)rerotate(b.bytes.data() + r.offset, dt, r.tokens, 3, b.token_stride(), b.head_stride(), s,
                       rows.cos_row(r.row), rows.sin_row(r.row), step == 0);
      INFO("dtype " << to_string(dt) << ", row_step " << step);
      CHECK(a.bytes == b.bytes);
    }
}

TEST_CASE("bad rope specs name the field") {
  rope_spec s;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("head_dim is 0"));
  s.head_dim = 64;
  s.rotary_dim = 80;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("rotary_dim is 80"));
  s.rotary_dim = 0;
  s.theta = 0.5;
  CHECK_THROWS_WITH(s.validate(), Catch::Contains("theta"));
  s.theta = 10000;
  CHECK_NOTHROW(s.validate());
  rope_spec g = s;
  g.style = rope_style::gptj;
  CHECK(g.to_string() != s.to_string());
}
