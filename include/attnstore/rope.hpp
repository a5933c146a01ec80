// RoPE re-embedding for stored keys: the positional rotation is applied (or moved) at
// load time, so a saved cache can be truncated and reused at new positions.
//
// Rotations compose, R(a + b) = R(a) R(b). Keys stored before RoPE get R(p) at their
// new position p; keys stored after RoPE at position p move to p - d with R(-d). Either
// way the stored bytes are never rewritten, so rounding never accumulates across
// truncations. One core routine (detail/rope_core.hpp) serves the CPU and CUDA paths.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/rope_core.hpp"
#include "attnstore/status.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

namespace detail {
/// The element code detail::load_elem / store_elem / rotate_head take for a dtype they
/// handle: f32 0, f16 1, bf16 2 (fp8 keys are not rotated).
constexpr int dtype_code(dtype d) noexcept { return d == dtype::f32 ? 0 : d == dtype::f16 ? 1 : 2; }
}  // namespace detail

enum class rope_style : std::uint8_t {
  neox,  ///< rotate-half: pairs (i, i + rotary_dim/2) (Llama, Mistral, Qwen, HF default)
  gptj,  ///< interleaved: pairs (2i, 2i+1) (GPT-J, some Falcon variants)
};

enum class rope_scaling : std::uint8_t {
  none,
  linear,  ///< positions divided by factor
  llama3,  ///< Llama 3.1 frequency-dependent scaling
};

struct rope_spec {
  rope_style style = rope_style::neox;
  std::uint32_t head_dim = 0;
  std::uint32_t rotary_dim = 0;  ///< 0: head_dim (partial rotary otherwise; even, <= head_dim)
  double theta = 10000.0;
  rope_scaling scaling = rope_scaling::none;
  double factor = 1.0;                         ///< linear and llama3
  double low_freq_factor = 1.0;                ///< llama3
  double high_freq_factor = 4.0;               ///< llama3
  std::uint32_t original_max_position = 8192;  ///< llama3

  std::uint32_t rotary() const noexcept { return rotary_dim ? rotary_dim : head_dim; }

  /// Throws std::invalid_argument naming the field and the allowed values.
  void validate() const {
    auto fail = [](const std::string& m) { throw std::invalid_argument("rope_spec: " + m); };
    if (head_dim == 0 || head_dim % 2) fail("head_dim is " + std::to_string(head_dim) + ", must be even and > 0");
    if (rotary() % 2 || rotary() > head_dim)
      fail("rotary_dim is " + std::to_string(rotary_dim) + ", must be even and <= head_dim");
    if (!(theta > 1.0)) fail("theta is " + std::to_string(theta) + ", must be > 1");
    if (scaling != rope_scaling::none && !(factor > 0)) fail("factor must be > 0");
    if (scaling == rope_scaling::llama3 && !(high_freq_factor > low_freq_factor && original_max_position > 0))
      fail("llama3 scaling needs high_freq_factor > low_freq_factor and original_max_position > 0");
  }

  /// A stable text form, part of the model id (store_config::rope).
  std::string to_string() const {
    std::string s = style == rope_style::neox ? "neox" : "gptj";
    s += ":" + std::to_string(head_dim) + ":" + std::to_string(rotary()) + ":" + std::to_string(theta);
    if (scaling == rope_scaling::linear) s += ":linear:" + std::to_string(factor);
    if (scaling == rope_scaling::llama3)
      s += ":llama3:" + std::to_string(factor) + ":" + std::to_string(low_freq_factor) + ":" +
           std::to_string(high_freq_factor) + ":" + std::to_string(original_max_position);
    return s;
  }

  /// Inverse frequency of pair i (positions are multiplied by it), after scaling.
  double inv_freq(std::uint32_t i) const noexcept {
    double f = std::pow(theta, -2.0 * double(i) / double(rotary()));
    if (scaling == rope_scaling::linear) return f / factor;
    if (scaling == rope_scaling::llama3) {
      const double pi = 3.14159265358979323846;
      const double wavelen = 2 * pi / f;
      const double low_wavelen = original_max_position / low_freq_factor;
      const double high_wavelen = original_max_position / high_freq_factor;
      if (wavelen < high_wavelen) return f;
      if (wavelen > low_wavelen) return f / factor;
      const double smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      return (1 - smooth) * f / factor + smooth * f;
    }
    return f;
  }
};

/// Cosines and sines for a run of tokens: token t is rotated by the angle of position
/// delta first_delta + t * step (step 1 with first_delta = p: keys stored before RoPE
/// placed at p, p+1...; step 0 with first_delta = -d: keys stored after RoPE moved back
/// by d). Angles are computed in double and rounded once to float.
class rope_angles {
 public:
  rope_angles() = default;
  /// Sizes the table for up to `max_tokens` rows (allocates; cold path).
  rope_angles(const rope_spec& spec, std::size_t max_tokens) : spec_(spec) {
    spec.validate();
    half_ = spec.rotary() / 2;
    inv_.resize(half_);
    for (std::uint32_t i = 0; i < half_; ++i) inv_[i] = spec.inv_freq(i);
    cos_.resize(std::max<std::size_t>(1, max_tokens) * half_);
    sin_.resize(cos_.size());
  }
  /// Fills rows for `tokens` tokens (or one shared row when step is 0). Returns false
  /// when the table is too small. Allocation-free.
  bool fill(std::int64_t first_delta, std::int64_t step, std::size_t tokens) noexcept {
    const std::size_t rows = step == 0 ? 1 : tokens;
    if (rows * half_ > cos_.size()) return false;
    for (std::size_t t = 0; t < rows; ++t)
      row(first_delta + std::int64_t(t) * step, cos_.data() + t * half_, sin_.data() + t * half_);
    shared_ = step == 0;
    return true;
  }
  /// Writes the row of position delta `delta` (pairs() cosines and sines) to caller
  /// storage, as fill() computes each of its rows. Allocation-free and const: one
  /// table serves threads at once.
  void row(std::int64_t delta, float* cos, float* sin) const noexcept {
    for (std::uint32_t i = 0; i < half_; ++i) {
      const double a = double(delta) * inv_[i];
      cos[i] = float(std::cos(a));
      sin[i] = float(std::sin(a));
    }
  }
  const float* cos_row(std::size_t t) const noexcept { return cos_.data() + (shared_ ? 0 : t * half_); }
  const float* sin_row(std::size_t t) const noexcept { return sin_.data() + (shared_ ? 0 : t * half_); }
  const rope_spec& spec() const noexcept { return spec_; }
  bool shared() const noexcept { return shared_; }
  std::uint32_t pairs() const noexcept { return half_; }

 private:
  rope_spec spec_{};
  std::uint32_t half_ = 0;
  std::vector<double> inv_;
  std::vector<float> cos_, sin_;
  bool shared_ = false;
};

/// Rotates keys in place: `tokens` tokens of `heads` heads of `dt` elements, token t's
/// head h at keys + t*token_stride + h*head_stride (bytes), by the angles' row t.
/// f32, f16 and bf16; fp32 math. Returns ok, unsupported (fp8).
errc rerotate(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
              std::size_t head_stride, const rope_angles& angles) noexcept;

/// The same with explicit angle rows: row t at cos + t*pairs (or row 0 for every token
/// when `shared_row`).
errc rerotate(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
              std::size_t head_stride, const rope_spec& spec, const float* cos, const float* sin,
              bool shared_row) noexcept;

/// The same on a GPU stream (CUDA part only; unsupported elsewhere): one kernel launch.
/// `cos_device` and `sin_device` hold the angle rows in device memory. Returns ok,
/// unsupported (fp8, or no CUDA part), invalid_argument (2^32 tokens or more),
/// device_error (the launch failed).
errc rerotate_cuda(std::byte* keys, dtype dt, std::size_t tokens, std::uint32_t heads, std::size_t token_stride,
                   std::size_t head_stride, const float* cos_device, const float* sin_device, bool shared_row,
                   const rope_spec& spec, void* cuda_stream) noexcept;

/// One run of a batched re-rotation: `tokens` consecutive tokens, token_stride apart
/// (in engine memory: tokens of one page that share how their angle rows advance).
struct rope_run {
  std::uint64_t offset = 0;  ///< bytes from the batch's base to the run's first token
  std::uint32_t tokens = 0;
  std::uint32_t row = 0;  ///< angle row of the first token; token t uses row + t * row_step
};
static_assert(sizeof(rope_run) == 16, "rope_run is copied to device memory as is");

/// Many runs rotated by one call: keys of run r's token t, head h at
/// base + runs[r].offset + t*token_stride + h*head_stride, rotated by angle row
/// runs[r].row + t*row_step (row i at cos + i*rotary/2 and sin + i*rotary/2).
/// Non-owning and trivially copyable; for rerotate_runs_cuda every pointer is device
/// memory, for rerotate_runs host memory.
struct rope_runs_view {
  std::byte* base = nullptr;
  const rope_run* runs = nullptr;
  std::uint32_t count = 0;
  std::uint32_t max_tokens = 0;  ///< must be at least the tokens of the longest run (sizes the GPU grid)
  std::uint32_t row_step = 0;    ///< 0: a run's tokens share its row (a shift); 1: a row per position (no other values)
  const float* cos = nullptr;
  const float* sin = nullptr;
  dtype dt = dtype::f16;
  std::uint32_t heads = 0;
  std::size_t token_stride = 0;
  std::size_t head_stride = 0;
};

/// Rotates every run of `batch` on the CPU, each as rerotate() does. Returns ok,
/// unsupported (fp8).
errc rerotate_runs(rope_runs_view batch, const rope_spec& spec) noexcept;

/// The same on a GPU stream in one kernel launch (CUDA part only; unsupported
/// elsewhere). The run table is read when the kernel runs: it must be in device memory
/// by then, in stream order. Gives rerotate()'s bits for every finite element. Returns
/// ok, unsupported (fp8, or no CUDA part), invalid_argument (runs is null),
/// device_error (the launch failed).
errc rerotate_runs_cuda(rope_runs_view batch, const rope_spec& spec, void* cuda_stream) noexcept;

}  // namespace attnstore
