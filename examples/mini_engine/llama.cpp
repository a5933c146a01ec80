#include "llama.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>

// 32- and 64-byte vector types are passed between always-inline helpers; the ABI note
// GCC emits for that in the SSE2 build is irrelevant here.
#pragma GCC diagnostic ignored "-Wpsabi"

// Build with -ffp-contract=off (the CMake fragment does): with an -march that has FMA,
// contraction would fuse a*b+c differently in different kernels and SIMD paths.

namespace mini {

// =====================================================================================
// config
// =====================================================================================

void llama_config::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument("llama_config: " + m); };
  if (vocab_size <= 0) bad("vocab_size must be positive");
  if (dim <= 0) bad("dim must be positive");
  if (n_layers <= 0) bad("n_layers must be positive");
  if (n_heads <= 0) bad("n_heads must be positive");
  if (n_kv_heads <= 0) bad("n_kv_heads must be positive");
  if (n_heads % n_kv_heads != 0)
    bad("n_heads (" + std::to_string(n_heads) + ") must be a multiple of n_kv_heads (" + std::to_string(n_kv_heads) +
        ")");
  if (head_dim <= 0 || head_dim % 2 != 0) bad("head_dim must be positive and even");
  if (hidden_dim <= 0) bad("hidden_dim must be positive");
  if (max_seq <= 0) bad("max_seq must be positive");
  if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta)) bad("rope_theta must be positive");
  if (!(norm_eps >= 0.0f) || !std::isfinite(norm_eps)) bad("norm_eps must be >= 0");
  switch (attention) {
    case attention_kind::full:
      if (window || kv_lora_rank || rope_dims) bad("window, kv_lora_rank and rope_dims must be 0 for full attention");
      break;
    case attention_kind::window:
      if (window <= 0) bad("window must be positive for window attention");
      if (n_layers < 2) bad("window attention needs n_layers >= 2 (windowed and full layers alternate)");
      if (kv_lora_rank || rope_dims) bad("kv_lora_rank and rope_dims must be 0 for window attention");
      break;
    case attention_kind::latent:
      if (kv_lora_rank <= 0) bad("kv_lora_rank must be positive for latent attention");
      if (rope_dims <= 0 || rope_dims % 2 != 0) bad("rope_dims must be positive and even for latent attention");
      if (n_kv_heads != n_heads)
        bad("n_kv_heads (" + std::to_string(n_kv_heads) + ") must equal n_heads (" + std::to_string(n_heads) +
            ") for latent attention");
      if (window) bad("window must be 0 for latent attention");
      break;
    default:
      bad("attention must be full, window or latent");
  }
  const double big =
      double(vocab_size) * dim +
      double(n_layers) * (double(dim) * head_dim * (n_heads * 2 + n_kv_heads * 2) + 3.0 * dim * hidden_dim) +
      double(n_layers) * (double(dim) + 2.0 * head_dim * n_heads) * (kv_lora_rank + rope_dims);
  if (big > 4e10) bad("model too large");
}

std::size_t llama_config::param_count() const {
  const std::size_t D = std::size_t(dim), HD = std::size_t(head_dim);
  std::size_t per_layer =
      2 * D + D * HD * (std::size_t(n_heads) * 2 + std::size_t(n_kv_heads) * 2) + 3 * D * std::size_t(hidden_dim);
  if (attention == attention_kind::latent) {
    const std::size_t H = std::size_t(n_heads), R = std::size_t(kv_lora_rank), DR = std::size_t(rope_dims);
    // q_proj, kv_a_proj_with_mqa, kv_b_proj (k_nope and v per head), o_proj, norms, MLP.
    per_layer =
        2 * D + H * (HD + DR) * D + (R + DR) * D + H * 2 * HD * R + D * H * HD + 3 * D * std::size_t(hidden_dim);
  }
  return 2 * std::size_t(vocab_size) * D + D + std::size_t(n_layers) * per_layer;
}

namespace {

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(std::string(what) + ": cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw std::runtime_error(std::string(what) + ": cannot read " + path);
  return ss.str();
}

}  // namespace

llama_config load_config(const std::string& path) {
  const std::string text = read_text_file(path, "llama config");
  auto fail = [&](const std::string& m) -> void { throw std::runtime_error("llama config: " + path + ": " + m); };
  json::value root;
  try {
    root = json::parse(text);
  } catch (const std::exception& e) {
    fail(e.what());
  }
  if (!root.is_object()) fail("not a JSON object");
  auto present = [&](const char* key) -> const json::value* {
    const json::value* v = root.find(key);
    return (v && !v->is_null()) ? v : nullptr;
  };
  auto get_int = [&](const char* key, const int* dflt) -> int {
    const json::value* v = present(key);
    if (!v) {
      if (!dflt) fail(std::string("missing key \"") + key + "\"");
      return *dflt;
    }
    std::int64_t i = 0;
    try {
      i = v->as_int();
    } catch (const std::exception&) {
      fail(std::string("\"") + key + "\" is not an integer");
    }
    if (i <= 0 || i > std::numeric_limits<int>::max()) fail(std::string("\"") + key + "\" out of range");
    return static_cast<int>(i);
  };
  auto get_float = [&](const char* key, float dflt) -> float {
    const json::value* v = present(key);
    if (!v) return dflt;
    if (!v->is_number()) fail(std::string("\"") + key + "\" is not a number");
    return static_cast<float>(v->number);
  };
  auto get_bool = [&](const char* key, bool dflt) -> bool {
    const json::value* v = present(key);
    if (!v) return dflt;
    if (v->type != json::value::kind::boolean) fail(std::string("\"") + key + "\" is not a boolean");
    return v->boolean;
  };

  if (const json::value* mt = present("model_type")) {
    if (!mt->is_string() || (mt->text != "llama" && mt->text != "mistral"))
      fail("unsupported model_type " + (mt->is_string() ? mt->text : std::string("?")) + " (llama or mistral)");
  }
  if (const json::value* act = present("hidden_act")) {
    if (!act->is_string() || act->text != "silu") fail("unsupported hidden_act (only silu)");
  }
  if (present("rope_scaling")) fail("rope_scaling is not supported");
  if (get_bool("attention_bias", false)) fail("attention_bias is not supported");
  if (get_bool("mlp_bias", false)) fail("mlp_bias is not supported");

  llama_config c;
  c.vocab_size = get_int("vocab_size", nullptr);
  c.dim = get_int("hidden_size", nullptr);
  c.n_layers = get_int("num_hidden_layers", nullptr);
  c.n_heads = get_int("num_attention_heads", nullptr);
  c.n_kv_heads = get_int("num_key_value_heads", &c.n_heads);
  c.hidden_dim = get_int("intermediate_size", nullptr);
  if (c.dim % c.n_heads != 0 && !present("head_dim")) fail("hidden_size is not a multiple of num_attention_heads");
  const int hd = c.dim / c.n_heads;
  c.head_dim = get_int("head_dim", &hd);
  c.rope_theta = get_float("rope_theta", 10000.0f);
  c.norm_eps = get_float("rms_norm_eps", 1e-6f);
  const int ms = 2048;
  c.max_seq = get_int("max_position_embeddings", &ms);
  if (const json::value* sw = present("sliding_window")) {
    if (!sw->is_number() || sw->number < double(c.max_seq)) fail("sliding_window attention is not supported");
  }
  try {
    c.validate();
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return c;
}

void save_config(const llama_config& c, const std::string& path) {
  if (c.attention != attention_kind::full)
    throw std::invalid_argument("llama config: " + path +
                                ": only full-attention models have a config.json form (attention is window or latent)");
  char eps[64], theta[64];
  std::snprintf(eps, sizeof eps, "%.9g", double(c.norm_eps));
  std::snprintf(theta, sizeof theta, "%.9g", double(c.rope_theta));
  std::ostringstream o;
  o << "{\n"
    << "  \"architectures\": [\"LlamaForCausalLM\"],\n"
    << "  \"model_type\": \"llama\",\n"
    << "  \"hidden_act\": \"silu\",\n"
    << "  \"vocab_size\": " << c.vocab_size << ",\n"
    << "  \"hidden_size\": " << c.dim << ",\n"
    << "  \"num_hidden_layers\": " << c.n_layers << ",\n"
    << "  \"num_attention_heads\": " << c.n_heads << ",\n"
    << "  \"num_key_value_heads\": " << c.n_kv_heads << ",\n"
    << "  \"head_dim\": " << c.head_dim << ",\n"
    << "  \"intermediate_size\": " << c.hidden_dim << ",\n"
    << "  \"rope_theta\": " << theta << ",\n"
    << "  \"rms_norm_eps\": " << eps << ",\n"
    << "  \"max_position_embeddings\": " << c.max_seq << ",\n"
    << "  \"tie_word_embeddings\": false,\n"
    << "  \"attention_bias\": false,\n"
    << "  \"rope_scaling\": null\n"
    << "}\n";
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << o.str();
  f.close();
  if (!f) throw std::runtime_error("llama config: cannot write " + path);
}

// =====================================================================================
// paged_kv_cache
// =====================================================================================

paged_kv_cache::paged_kv_cache(const llama_config& c, std::uint32_t num_pages, std::uint32_t page_size)
    : num_pages_(num_pages),
      page_size_(page_size),
      n_layers_(c.n_layers),
      n_kv_heads_(c.cache_kv_heads()),
      head_dim_(c.cache_head_dim()),
      tensors_(c.cache_tensors()) {
  c.validate();
  if (num_pages == 0) throw std::invalid_argument("paged_kv_cache: num_pages is 0");
  if (page_size == 0) throw std::invalid_argument("paged_kv_cache: page_size is 0");
  layer_floats_ = std::size_t(num_pages) * page_size * std::size_t(n_kv_heads_) * std::size_t(head_dim_);
  std::size_t bytes = layer_floats_ * 4 * std::size_t(tensors_) * std::size_t(n_layers_);
  bytes = (bytes + 4095) & ~std::size_t(4095);
  base_ = static_cast<float*>(std::aligned_alloc(4096, bytes));
  if (!base_) throw std::bad_alloc();
  std::memset(base_, 0, bytes);
  free_.resize(num_pages);
  for (std::uint32_t i = 0; i < num_pages; ++i) free_[i] = num_pages - 1 - i;
  in_use_.assign(num_pages, 0);
}

paged_kv_cache::~paged_kv_cache() { std::free(base_); }

paged_kv_cache::paged_kv_cache(paged_kv_cache&& o) noexcept
    : num_pages_(o.num_pages_),
      page_size_(o.page_size_),
      n_layers_(o.n_layers_),
      n_kv_heads_(o.n_kv_heads_),
      head_dim_(o.head_dim_),
      tensors_(o.tensors_),
      layer_floats_(o.layer_floats_),
      base_(std::exchange(o.base_, nullptr)),
      free_(std::move(o.free_)),
      in_use_(std::move(o.in_use_)) {
  o.num_pages_ = 0;
  o.layer_floats_ = 0;
}

paged_kv_cache& paged_kv_cache::operator=(paged_kv_cache&& o) noexcept {
  if (this != &o) {
    std::free(base_);
    num_pages_ = std::exchange(o.num_pages_, 0);
    page_size_ = o.page_size_;
    n_layers_ = o.n_layers_;
    n_kv_heads_ = o.n_kv_heads_;
    head_dim_ = o.head_dim_;
    tensors_ = o.tensors_;
    layer_floats_ = std::exchange(o.layer_floats_, 0);
    base_ = std::exchange(o.base_, nullptr);
    free_ = std::move(o.free_);
    in_use_ = std::move(o.in_use_);
  }
  return *this;
}

std::vector<std::uint32_t> paged_kv_cache::allocate(std::uint32_t n) {
  if (n > free_.size())
    throw std::runtime_error("paged_kv_cache: out of pages (" + std::to_string(n) + " wanted, " +
                             std::to_string(free_.size()) + " of " + std::to_string(num_pages_) + " free)");
  std::vector<std::uint32_t> out(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    out[i] = free_.back();
    free_.pop_back();
    in_use_[out[i]] = 1;
  }
  return out;
}

void paged_kv_cache::release(std::span<const std::uint32_t> pages) {
  for (std::size_t i = 0; i < pages.size(); ++i) {
    const std::uint32_t p = pages[i];
    if (p >= num_pages_)
      throw std::invalid_argument("paged_kv_cache: release of page " + std::to_string(p) + " out of range");
    bool dup = in_use_[p] == 0;
    for (std::size_t j = 0; j < i && !dup; ++j) dup = pages[j] == p;
    if (dup)
      throw std::invalid_argument("paged_kv_cache: release of page " + std::to_string(p) + ", which is not allocated");
  }
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) {
    in_use_[*it] = 0;
    free_.push_back(*it);
  }
}

// =====================================================================================
// SIMD kernels
// =====================================================================================
namespace {

#define MINI_INLINE inline __attribute__((always_inline))

typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int v4i __attribute__((vector_size(16)));
typedef int v8i __attribute__((vector_size(32)));
typedef float v4fu __attribute__((vector_size(16), aligned(4), may_alias));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));
typedef float v16fu __attribute__((vector_size(64), aligned(4), may_alias));

template <class V>
constexpr int lanes_of = int(sizeof(V) / sizeof(float));

template <class V>
MINI_INLINE V loadv(const float* p) {
  if constexpr (sizeof(V) == 16)
    return *reinterpret_cast<const v4fu*>(p);
  else if constexpr (sizeof(V) == 32)
    return *reinterpret_cast<const v8fu*>(p);
  else
    return *reinterpret_cast<const v16fu*>(p);
}
template <class V>
MINI_INLINE void storev(float* p, V v) {
  if constexpr (sizeof(V) == 16)
    *reinterpret_cast<v4fu*>(p) = v;
  else if constexpr (sizeof(V) == 32)
    *reinterpret_cast<v8fu*>(p) = v;
  else
    *reinterpret_cast<v16fu*>(p) = v;
}

// exp for x <= ~88 (Cephes expf: Cody-Waite reduction, degree-6 polynomial; ~1 ulp).
// Only IEEE adds, muls and exact conversions, lane by lane: every vector width gives the
// same bits.
template <class VF, class VI>
MINI_INLINE VF vexp_t(VF x) {
  const VF lo = VF{} - 87.33654475f, hi = VF{} + 88.37626266f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const VF fx = x * 1.44269504088896341f + 0.5f;
  VI n = __builtin_convertvector(fx, VI);  // truncates
  VF nf = __builtin_convertvector(n, VF);
  n = n + (nf > fx);  // -1 where truncation rounded up: floor()
  nf = __builtin_convertvector(n, VF);
  VF r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = p * (r * r) + r + 1.0f;
  const VI bits = (n + 127) << 23;
  return y * (VF)bits;
}

// ---- 8 float lanes: native v8f (AVX2, AVX-512) or two v4f (SSE2) --------------------
// The attention kernel works on 8 logical lanes; both representations do the same lane
// operations, so they give the same bits.
struct f8s {
  v4f lo, hi;
};
MINI_INLINE f8s operator+(f8s a, f8s b) { return {a.lo + b.lo, a.hi + b.hi}; }
MINI_INLINE f8s operator*(f8s a, f8s b) { return {a.lo * b.lo, a.hi * b.hi}; }
MINI_INLINE f8s operator*(f8s a, float s) { return {a.lo * s, a.hi * s}; }
MINI_INLINE f8s operator-(f8s a, float s) { return {a.lo - s, a.hi - s}; }

template <class F>
MINI_INLINE F ld8(const float* p) {
  if constexpr (std::is_same_v<F, f8s>)
    return {loadv<v4f>(p), loadv<v4f>(p + 4)};
  else
    return loadv<v8f>(p);
}
template <class F>
MINI_INLINE void st8(float* p, F v) {
  if constexpr (std::is_same_v<F, f8s>) {
    storev<v4f>(p, v.lo);
    storev<v4f>(p + 4, v.hi);
  } else {
    storev<v8f>(p, v);
  }
}
template <class F>
MINI_INLINE F zero8() {
  return F{};
}
MINI_INLINE v4f halves_sum(v8f a) {
  return __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
}
MINI_INLINE v4f halves_sum(f8s a) { return a.lo + a.hi; }
// Fixed reduction tree: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
template <class F>
MINI_INLINE float hsum8(F a) {
  v4f s = halves_sum(a);
  const v4f t = __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s = s + t;
  return s[0] + s[1];
}
MINI_INLINE v8f vmax8(v8f a, v8f b) { return a > b ? a : b; }
MINI_INLINE f8s vmax8(f8s a, f8s b) { return {a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi}; }
MINI_INLINE v8f vexp8(v8f x) { return vexp_t<v8f, v8i>(x); }
MINI_INLINE f8s vexp8(f8s x) { return {vexp_t<v4f, v4i>(x.lo), vexp_t<v4f, v4i>(x.hi)}; }
// Lanes >= n set to 0.
MINI_INLINE v8f keep_first(v8f a, int n) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return (v8f)((v8i)a & (lane < n));
}
MINI_INLINE f8s keep_first(f8s a, int n) {
  const v4i lane = {0, 1, 2, 3};
  return {(v4f)((v4i)a.lo & (lane < n)), (v4f)((v4i)a.hi & ((lane + 4) < n))};
}

// ---- matrix product ------------------------------------------------------------------
// W (HF [rows=out][cols=in]) is packed in panels of NR output rows: P[panel][k][r] =
// W[panel*NR + r][k] (zero past the last row). Y[t][o] = sum_k X[t][k] * W[o][k], summed
// strictly in k order, one lane per output: the same bits whatever the tile, thread or
// vector width that computes it.
constexpr int NR = 16;

struct mm_args {
  const float* x;
  std::size_t ldx;
  int t0, t1;  // token rows
  const float* panels;
  int K;
  int rows;    // output features
  int p0, p1;  // panels
  float* y;
  std::size_t ldy;
  bool accumulate;  // y += product instead of y = product
};

template <class V, int MR>
MINI_INLINE void mm_tile(const float* __restrict x, std::size_t ldx, const float* __restrict panel, int K,
                         float* __restrict y, std::size_t ldy, int ncols, bool accumulate) {
  constexpr int L = lanes_of<V>, NV = NR / L;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = x + std::size_t(m) * ldx;
  for (int k = 0; k < K; ++k) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = loadv<V>(panel + std::size_t(k) * NR + v * L);
    for (int m = 0; m < MR; ++m) {
      const float xs = xr[m][k];
      for (int v = 0; v < NV; ++v) acc[m][v] = acc[m][v] + w[v] * xs;
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* yr = y + std::size_t(m) * ldy;
    if (ncols == NR) {
      for (int v = 0; v < NV; ++v) {
        V r = acc[m][v];
        if (accumulate) r = loadv<V>(yr + v * L) + r;
        storev<V>(yr + v * L, r);
      }
    } else {
      alignas(64) float tmp[NR];
      for (int v = 0; v < NV; ++v) storev<V>(tmp + v * L, acc[m][v]);
      for (int c = 0; c < ncols; ++c) yr[c] = accumulate ? yr[c] + tmp[c] : tmp[c];
    }
  }
}

template <class V, int M>
MINI_INLINE void mm_tail(int rem, const float* x, std::size_t ldx, const float* panel, int K, float* y, std::size_t ldy,
                         int ncols, bool accumulate) {
  if constexpr (M >= 1) {
    if (rem == M)
      mm_tile<V, M>(x, ldx, panel, K, y, ldy, ncols, accumulate);
    else
      mm_tail<V, M - 1>(rem, x, ldx, panel, K, y, ldy, ncols, accumulate);
  }
}

template <class V, int MR>
MINI_INLINE void mm_range(const mm_args& a) {
  for (int p = a.p0; p < a.p1; ++p) {
    const float* panel = a.panels + std::size_t(p) * std::size_t(a.K) * NR;
    const int ncols = std::min(NR, a.rows - p * NR);
    float* ycol = a.y + std::size_t(p) * NR;
    int t = a.t0;
    for (; t + MR <= a.t1; t += MR)
      mm_tile<V, MR>(a.x + std::size_t(t) * a.ldx, a.ldx, panel, a.K, ycol + std::size_t(t) * a.ldy, a.ldy, ncols,
                     a.accumulate);
    if (t < a.t1)
      mm_tail<V, MR - 1>(a.t1 - t, a.x + std::size_t(t) * a.ldx, a.ldx, panel, a.K, ycol + std::size_t(t) * a.ldy,
                         a.ldy, ncols, a.accumulate);
  }
}

// Generic build (SSE2 on x86-64; NEON and others elsewhere), plus AVX2 and AVX-512
// clones on x86 picked at run time.
#if defined(__x86_64__) || defined(__i386__)
#define MINI_X86 1
#define MINI_TARGET(t) __attribute__((target(t)))
#else
#define MINI_X86 0
#define MINI_TARGET(t)
#endif

void mm_sse2(const mm_args& a) { mm_range<v4f, 2>(a); }
MINI_TARGET("avx2") void mm_avx2(const mm_args& a) { mm_range<v8f, 4>(a); }
MINI_TARGET("avx512f,avx512vl") void mm_avx512(const mm_args& a) { mm_range<v16f, 8>(a); }

// ---- attention -----------------------------------------------------------------------
// One query token, one KV head, its G query heads. Scores s_j = (q . k_j) * scale for
// j < P in position order (q . k: 8 lanes d mod 8, then hsum8); softmax with max
// subtraction, exp(s_j - max) and its sum in 8 lanes (j mod 8) reduced by hsum8;
// out = (sum_j e_j v_j, sequential in j, lane per d) * (1 / sum). Everything is a
// function of the query's position and the cache contents alone.
struct attn_args {
  const float* q;          // G heads of head_dim floats, contiguous
  const float* kbase;      // layer K base + kv_head * head_dim
  const float* vbase;      // layer V base + kv_head * head_dim
  const std::size_t* off;  // float offset of position j's token in a layer array
  std::size_t P;           // keys at positions [0, P)
  int G, HD;
  float scale;
  float* S;        // scratch: G rows of Pp floats
  std::size_t Pp;  // P rounded up to 8
  float* out;      // G heads of head_dim floats
};

template <class F>
MINI_INLINE float dot8(const float* a, const float* b, int HD) {
  F acc = ld8<F>(a) * ld8<F>(b);
  for (int c = 8; c < HD; c += 8) acc = acc + ld8<F>(a + c) * ld8<F>(b + c);
  return hsum8(acc);
}

MINI_INLINE float dot_scalar(const float* a, const float* b, int HD) {
  float s = a[0] * b[0];
  for (int d = 1; d < HD; ++d) s = s + a[d] * b[d];
  return s;
}

// out_h[d0 .. d0+8*NV) for heads h0 and h0+1 (TWO) over all keys.
template <class F, int NV, bool TWO>
MINI_INLINE void pv_chunk(const attn_args& a, int h0, int d0, const float* inv) {
  F acc0[NV], acc1[NV];
  for (int c = 0; c < NV; ++c) acc0[c] = acc1[c] = zero8<F>();
  const float* e0 = a.S + std::size_t(h0) * a.Pp;
  const float* e1 = e0 + a.Pp;
  const float* vb = a.vbase + d0;
  for (std::size_t j = 0; j < a.P; ++j) {
    const float* vp = vb + a.off[j];
    F v[NV];
    for (int c = 0; c < NV; ++c) v[c] = ld8<F>(vp + 8 * c);
    const float x0 = e0[j];
    for (int c = 0; c < NV; ++c) acc0[c] = acc0[c] + v[c] * x0;
    if constexpr (TWO) {
      const float x1 = e1[j];
      for (int c = 0; c < NV; ++c) acc1[c] = acc1[c] + v[c] * x1;
    }
  }
  float* o0 = a.out + std::size_t(h0) * a.HD + d0;
  for (int c = 0; c < NV; ++c) st8<F>(o0 + 8 * c, acc0[c] * inv[0]);
  if constexpr (TWO) {
    float* o1 = o0 + a.HD;
    for (int c = 0; c < NV; ++c) st8<F>(o1 + 8 * c, acc1[c] * inv[1]);
  }
}

template <class F, bool TWO>
MINI_INLINE void pv_heads(const attn_args& a, int h0, const float* inv) {
  int d0 = 0;
  for (; d0 + 32 <= a.HD; d0 += 32) pv_chunk<F, 4, TWO>(a, h0, d0, inv);
  switch ((a.HD - d0) / 8) {
    case 3:
      pv_chunk<F, 3, TWO>(a, h0, d0, inv);
      break;
    case 2:
      pv_chunk<F, 2, TWO>(a, h0, d0, inv);
      break;
    case 1:
      pv_chunk<F, 1, TWO>(a, h0, d0, inv);
      break;
    default:
      break;
  }
}

template <class F, bool VEC>
MINI_INLINE void attn_one(const attn_args& a) {
  const int G = a.G, HD = a.HD;
  // scores
  for (std::size_t j = 0; j < a.P; ++j) {
    const float* kp = a.kbase + a.off[j];
    for (int h = 0; h < G; ++h) {
      const float* q = a.q + std::size_t(h) * HD;
      const float d = VEC ? dot8<F>(q, kp, HD) : dot_scalar(q, kp, HD);
      a.S[std::size_t(h) * a.Pp + j] = d * a.scale;
    }
  }
  const std::size_t full = a.P / 8;
  const int rest = int(a.P % 8);
  const std::size_t Pl = (a.P + 7) & ~std::size_t(7);
  float* inv = a.S + std::size_t(G) * a.Pp;
  for (int h = 0; h < G; ++h) {
    float* s = a.S + std::size_t(h) * a.Pp;
    for (std::size_t j = a.P; j < Pl; ++j) s[j] = -std::numeric_limits<float>::infinity();
    // max: exact in any order
    F mv = ld8<F>(s);
    for (std::size_t c = 1; c < Pl / 8; ++c) mv = vmax8(mv, ld8<F>(s + 8 * c));
    alignas(32) float ml[8];
    st8<F>(ml, mv);
    float m = ml[0];
    for (int i = 1; i < 8; ++i) m = ml[i] > m ? ml[i] : m;
    // exp and sum, lane j % 8
    F sum = zero8<F>();
    for (std::size_t c = 0; c < full; ++c) {
      const F e = vexp8(ld8<F>(s + 8 * c) - m);
      st8<F>(s + 8 * c, e);
      sum = sum + e;
    }
    if (rest) {
      const F e = keep_first(vexp8(ld8<F>(s + 8 * full) - m), rest);
      st8<F>(s + 8 * full, e);
      sum = sum + e;
    }
    inv[h] = 1.0f / hsum8(sum);
  }
  if constexpr (VEC) {
    int h = 0;
    for (; h + 2 <= G; h += 2) pv_heads<F, true>(a, h, inv + h);
    if (h < G) pv_heads<F, false>(a, h, inv + h);
  } else {
    for (int h = 0; h < G; ++h) {
      const float* e = a.S + std::size_t(h) * a.Pp;
      float* out = a.out + std::size_t(h) * HD;
      for (int d = 0; d < HD; ++d) out[d] = 0.0f;
      for (std::size_t j = 0; j < a.P; ++j) {
        const float* vp = a.vbase + a.off[j];
        const float ej = e[j];
        for (int d = 0; d < HD; ++d) out[d] = out[d] + vp[d] * ej;
      }
      for (int d = 0; d < HD; ++d) out[d] = out[d] * inv[h];
    }
  }
}

template <class F>
MINI_INLINE void attn_dispatch(const attn_args& a) {
  if (a.HD % 8 == 0)
    attn_one<F, true>(a);
  else
    attn_one<F, false>(a);
}

void attn_sse2(const attn_args& a) { attn_dispatch<f8s>(a); }
MINI_TARGET("avx2") void attn_avx2(const attn_args& a) { attn_dispatch<v8f>(a); }
MINI_TARGET("avx512f,avx512vl") void attn_avx512(const attn_args& a) { attn_dispatch<v8f>(a); }

// ---- SIMD level ------------------------------------------------------------------------
simd_level detect_best() {
#if MINI_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return simd_level::avx512;
  if (__builtin_cpu_supports("avx2")) return simd_level::avx2;
#endif
  return simd_level::sse2;  // the generic kernels
}

std::atomic<int>& simd_state() {
  static std::atomic<int> s = [] {
    int best = int(detect_best());
    if (const char* e = std::getenv("MINI_LLAMA_SIMD")) {
      const std::string v = e;
      int want = best;
      if (v == "sse2")
        want = 0;
      else if (v == "avx2")
        want = 1;
      else if (v == "avx512")
        want = 2;
      best = std::min(best, want);
    }
    return best;
  }();
  return s;
}

void matmul_kernel(const mm_args& a) {
  switch (simd_level(simd_state().load(std::memory_order_relaxed))) {
    case simd_level::avx512:
      mm_avx512(a);
      break;
    case simd_level::avx2:
      mm_avx2(a);
      break;
    default:
      mm_sse2(a);
      break;
  }
}

void attn_kernel(const attn_args& a) {
  switch (simd_level(simd_state().load(std::memory_order_relaxed))) {
    case simd_level::avx512:
      attn_avx512(a);
      break;
    case simd_level::avx2:
      attn_avx2(a);
      break;
    default:
      attn_sse2(a);
      break;
  }
}

// Elementwise silu(g) * u = g / (1 + exp(-g)) * u with the portable vector exp.
void silu_mul(const float* g, const float* u, float* out, int n) {
  auto one = [](v4f gv, v4f uv) { return gv / (vexp_t<v4f, v4i>(v4f{} - gv) + 1.0f) * uv; };
  int i = 0;
  for (; i + 4 <= n; i += 4) storev<v4f>(out + i, one(loadv<v4f>(g + i), loadv<v4f>(u + i)));
  if (i < n) {
    alignas(16) float gb[4] = {}, ub[4] = {}, ob[4];
    for (int k = i; k < n; ++k) {
      gb[k - i] = g[k];
      ub[k - i] = u[k];
    }
    storev<v4f>(ob, one(loadv<v4f>(gb), loadv<v4f>(ub)));
    for (int k = i; k < n; ++k) out[k] = ob[k - i];
  }
}

// =====================================================================================
// thread pool: run(tasks, f) calls f(task, worker) for every task once, spread over the
// caller (worker 0) and the pool's threads. Which thread runs a task never matters to
// the results.
// =====================================================================================
class thread_pool {
 public:
  explicit thread_pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~thread_pool() {
    {
      std::lock_guard lk(m_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  template <class F>
  void run(std::size_t tasks, F&& f) {
    if (tasks == 0) return;
    if (n_ == 1 || tasks == 1) {
      for (std::size_t i = 0; i < tasks; ++i) f(i, 0);
      return;
    }
    std::lock_guard run_lock(run_m_);
    using FD = std::remove_reference_t<F>;
    dispatch(
        tasks, [](void* ctx, std::size_t i, int w) { (*static_cast<FD*>(ctx))(i, w); }, &f);
  }

 private:
  using fn_t = void (*)(void*, std::size_t, int);
  // Workers and the dispatcher spin this many pause loops (some tens of microseconds)
  // before sleeping: the jobs of one forward pass follow each other closely.
  static constexpr int spin_iterations = 2000;

  int n_;
  std::vector<std::thread> workers_;
  std::mutex run_m_, m_;
  std::condition_variable cv_, done_cv_;
  std::atomic<std::uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  fn_t fn_ = nullptr;  // written before gen_ is bumped, read after it is seen
  void* ctx_ = nullptr;
  std::size_t tasks_ = 0;
  std::atomic<std::size_t> next_{0};

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  void work(int id) {
    for (;;) {
      const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= tasks_) return;
      fn_(ctx_, i, id);
    }
  }
  void dispatch(std::size_t tasks, fn_t fn, void* ctx) {
    fn_ = fn;
    ctx_ = ctx;
    tasks_ = tasks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard lk(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    for (int i = 0; i < spin_iterations; ++i) {
      if (pending_.load(std::memory_order_acquire) == 0) return;
      pause();
    }
    std::unique_lock lk(m_);
    done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  void worker(int id) {
    std::uint64_t seen = 0;
    for (;;) {
      bool ready = false;
      for (int i = 0; i < spin_iterations && !ready; ++i) {
        ready = gen_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_relaxed);
        if (!ready) pause();
      }
      if (!ready) {
        std::unique_lock lk(m_);
        cv_.wait(lk, [&] { return stop_.load() || gen_.load() != seen; });
      }
      if (stop_.load()) return;
      seen = gen_.load(std::memory_order_acquire);
      work(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard lk(m_);
        done_cv_.notify_one();
      }
    }
  }
};

int default_threads() {
  if (const char* e = std::getenv("MINI_LLAMA_THREADS")) {
    const int n = std::atoi(e);
    if (n > 0) return std::min(n, 256);
  }
  const unsigned h = std::thread::hardware_concurrency();
  return h ? int(std::min(h, 64u)) : 1;
}

// 64-byte aligned float storage.
struct fbuf {
  float* p = nullptr;
  std::size_t n = 0;
  fbuf() = default;
  explicit fbuf(std::size_t count) { resize(count); }
  fbuf(const fbuf&) = delete;
  fbuf& operator=(const fbuf&) = delete;
  fbuf(fbuf&& o) noexcept : p(std::exchange(o.p, nullptr)), n(std::exchange(o.n, 0)) {}
  fbuf& operator=(fbuf&& o) noexcept {
    if (this != &o) {
      std::free(p);
      p = std::exchange(o.p, nullptr);
      n = std::exchange(o.n, 0);
    }
    return *this;
  }
  ~fbuf() { std::free(p); }
  void resize(std::size_t count) {
    std::free(p);
    p = nullptr;
    n = count;
    const std::size_t bytes = ((std::max<std::size_t>(count, 1) * 4) + 63) & ~std::size_t(63);
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  float* data() { return p; }
  const float* data() const { return p; }
};

struct packed_matrix {
  int rows = 0, cols = 0, panels = 0;
  fbuf data;

  void pack(std::span<const float> w, int r, int c) {
    rows = r;
    cols = c;
    panels = (r + NR - 1) / NR;
    data.resize(std::size_t(panels) * c * NR);
    for (int p = 0; p < panels; ++p)
      for (int k = 0; k < c; ++k)
        for (int i = 0; i < NR; ++i) {
          const int row = p * NR + i;
          data.p[(std::size_t(p) * c + k) * NR + i] = row < r ? w[std::size_t(row) * c + k] : 0.0f;
        }
  }
  // Rows [r0, r0+n) back in [row][col] layout.
  std::vector<float> unpack(int r0, int n) const {
    std::vector<float> w(std::size_t(n) * cols);
    for (int i = 0; i < n; ++i) {
      const int row = r0 + i, p = row / NR, lane = row % NR;
      for (int k = 0; k < cols; ++k) w[std::size_t(i) * cols + k] = data.p[(std::size_t(p) * cols + k) * NR + lane];
    }
    return w;
  }
};

struct layer_weights {
  std::vector<float> attn_norm, mlp_norm;
  packed_matrix wqkv;   // rows: q (n_heads*head_dim), k, v (n_kv_heads*head_dim each)
                        // latent: q (n_heads*(head_dim+rope_dims)), kv_a (kv_lora_rank+rope_dims)
  packed_matrix wkvb;   // latent only: [n_heads*2*head_dim][kv_lora_rank], per head k_nope then v
  packed_matrix wo;     // [dim][n_heads*head_dim]
  packed_matrix wgu;    // rows: gate (hidden), up (hidden)
  packed_matrix wdown;  // [dim][hidden]
};

// Portable PRNG (splitmix64) and an approximately normal variate from four uniforms.
struct prng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Sum of 4 U(-0.5, 0.5) scaled to unit variance (Irwin-Hall): exact integer math plus
  // one multiplication, so the same floats on every machine.
  float normal() {
    std::int64_t acc = 0;
    for (int i = 0; i < 4; ++i) acc += std::int64_t(next() >> 40) - (std::int64_t(1) << 23);
    return float(double(acc) * (1.7320508075688772 / double(std::int64_t(1) << 24)));
  }
};

}  // namespace

simd_level best_simd() {
  static const simd_level b = detect_best();
  return b;
}
simd_level simd() { return simd_level(simd_state().load()); }
simd_level set_simd(simd_level l) {
  const int v = std::min(int(l), int(best_simd()));
  simd_state().store(std::max(v, 0));
  return simd_level(simd_state().load());
}

// =====================================================================================
// model
// =====================================================================================

struct llama_model::impl {
  llama_config cfg;
  std::vector<float> embed;  // [vocab][dim]
  std::vector<layer_weights> layers;
  std::vector<float> final_norm;
  packed_matrix lm_head;
  std::vector<double> inv_freq;  // rotary_dims()/2
  std::unique_ptr<thread_pool> pool;

  using getter = std::function<std::vector<float>(const std::string&, std::vector<std::int64_t>)>;
  void build(const llama_config& c, const getter& get);

  void matmul(const float* x, std::size_t ldx, int n, const packed_matrix& w, float* y, std::size_t ldy,
              bool accumulate) const;
  void rmsnorm_rows(const float* x, float* y, int r0, int r1, const std::vector<float>& w) const;
};

namespace {

std::string layer_name(int l, const char* rest) { return "model.layers." + std::to_string(l) + "." + rest; }

}  // namespace

void llama_model::impl::build(const llama_config& c, const getter& get) {
  c.validate();
  cfg = c;
  const std::int64_t D = c.dim, V = c.vocab_size, HD = c.head_dim, H = c.n_heads, KV = c.n_kv_heads, F = c.hidden_dim;
  embed = get("model.embed_tokens.weight", {V, D});
  layers.resize(std::size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    layer_weights& L = layers[std::size_t(l)];
    L.attn_norm = get(layer_name(l, "input_layernorm.weight"), {D});
    L.mlp_norm = get(layer_name(l, "post_attention_layernorm.weight"), {D});
    if (c.attention == attention_kind::latent) {
      const std::int64_t R = c.kv_lora_rank, DR = c.rope_dims;
      std::vector<float> q = get(layer_name(l, "self_attn.q_proj.weight"), {H * (HD + DR), D});
      const std::vector<float> kva = get(layer_name(l, "self_attn.kv_a_proj_with_mqa.weight"), {R + DR, D});
      q.insert(q.end(), kva.begin(), kva.end());
      L.wqkv.pack(q, int(H * (HD + DR) + R + DR), int(D));
      L.wkvb.pack(get(layer_name(l, "self_attn.kv_b_proj.weight"), {H * 2 * HD, R}), int(H * 2 * HD), int(R));
    } else {
      std::vector<float> q = get(layer_name(l, "self_attn.q_proj.weight"), {H * HD, D});
      const std::vector<float> k = get(layer_name(l, "self_attn.k_proj.weight"), {KV * HD, D});
      const std::vector<float> v = get(layer_name(l, "self_attn.v_proj.weight"), {KV * HD, D});
      q.insert(q.end(), k.begin(), k.end());
      q.insert(q.end(), v.begin(), v.end());
      L.wqkv.pack(q, int((H + 2 * KV) * HD), int(D));
    }
    L.wo.pack(get(layer_name(l, "self_attn.o_proj.weight"), {D, H * HD}), int(D), int(H * HD));
    {
      std::vector<float> g = get(layer_name(l, "mlp.gate_proj.weight"), {F, D});
      const std::vector<float> u = get(layer_name(l, "mlp.up_proj.weight"), {F, D});
      g.insert(g.end(), u.begin(), u.end());
      L.wgu.pack(g, int(2 * F), int(D));
    }
    L.wdown.pack(get(layer_name(l, "mlp.down_proj.weight"), {D, F}), int(D), int(F));
  }
  final_norm = get("model.norm.weight", {D});
  lm_head.pack(get("lm_head.weight", {V, D}), int(V), int(D));
  const std::int64_t RD = c.rotary_dims();
  inv_freq.resize(std::size_t(RD / 2));
  for (std::int64_t i = 0; i < RD / 2; ++i)
    inv_freq[std::size_t(i)] = std::pow(double(c.rope_theta), -double(2 * i) / double(RD));
  if (!pool) pool = std::make_unique<thread_pool>(default_threads());
}

void llama_model::impl::matmul(const float* x, std::size_t ldx, int n, const packed_matrix& w, float* y,
                               std::size_t ldy, bool accumulate) const {
  if (n <= 0) return;
  const int T = pool->size();
  const int MB = 64;  // token rows per task
  const int nblk = (n + MB - 1) / MB;
  int groups = 1;
  if (nblk < 3 * T) groups = std::min(w.panels, (3 * T + nblk - 1) / nblk);
  const int pg = (w.panels + groups - 1) / groups;
  groups = (w.panels + pg - 1) / pg;
  const double macs = double(n) * w.rows * w.cols;
  auto task = [&](std::size_t i, int) {
    const int b = int(i) / groups, g = int(i) % groups;
    mm_args a{x,      ldx,       b * MB, std::min(n, (b + 1) * MB),        w.data.data(),
              w.cols, w.rows,    g * pg, std::min(w.panels, (g + 1) * pg), y,
              ldy,    accumulate};
    matmul_kernel(a);
  };
  if (macs < 65536.0) {
    for (std::size_t i = 0; i < std::size_t(nblk) * groups; ++i) task(i, 0);
  } else {
    pool->run(std::size_t(nblk) * groups, task);
  }
}

void llama_model::impl::rmsnorm_rows(const float* x, float* y, int r0, int r1, const std::vector<float>& w) const {
  const int D = cfg.dim;
  const double eps = cfg.norm_eps;
  for (int t = r0; t < r1; ++t) {
    const float* xr = x + std::size_t(t) * D;
    float* yr = y + std::size_t(t) * D;
    double ss = 0;
    for (int i = 0; i < D; ++i) ss += double(xr[i]) * double(xr[i]);
    const float inv = float(1.0 / std::sqrt(ss / D + eps));
    for (int i = 0; i < D; ++i) yr[i] = (xr[i] * inv) * w[std::size_t(i)];
  }
}

llama_model::llama_model(std::unique_ptr<impl> p) : p_(std::move(p)) {}
llama_model::llama_model(llama_model&&) noexcept = default;
llama_model& llama_model::operator=(llama_model&&) noexcept = default;
llama_model::~llama_model() = default;

const llama_config& llama_model::config() const { return p_->cfg; }
int llama_model::threads() const { return p_->pool->size(); }
void llama_model::set_threads(int n) { p_->pool = std::make_unique<thread_pool>(std::max(1, n)); }

llama_model llama_model::random(const llama_config& c, std::uint64_t seed) { return random(c, seed, 0.02f); }

llama_model llama_model::random(const llama_config& c, std::uint64_t seed, float stddev) {
  auto p = std::make_unique<impl>();
  std::uint64_t tensor_no = 0;
  p->build(c, [&](const std::string& name, const std::vector<std::int64_t>& shape) {
    std::size_t n = 1;
    for (auto d : shape) n *= std::size_t(d);
    std::vector<float> w(n);
    ++tensor_no;
    if (name.find("norm") != std::string::npos) {
      std::fill(w.begin(), w.end(), 1.0f);
    } else {
      prng r{seed * 0x100000001B3ull + tensor_no * 0x9E3779B97F4A7C15ull};
      for (auto& v : w) v = r.normal() * stddev;
    }
    return w;
  });
  return llama_model(std::move(p));
}

llama_model llama_model::from_weights(const llama_config& c, const std::vector<weight_tensor>& ws) {
  std::map<std::string, const weight_tensor*> by_name;
  for (const auto& w : ws) by_name[w.name] = &w;
  auto p = std::make_unique<impl>();
  p->build(c, [&](const std::string& name, const std::vector<std::int64_t>& shape) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error("llama: missing weight '" + name + "'");
    const weight_tensor& w = *it->second;
    if (w.shape != shape)
      throw std::runtime_error("llama: weight '" + name + "' has shape " + st::shape_string(w.shape) + ", expected " +
                               st::shape_string(shape));
    std::size_t n = 1;
    for (auto d : shape) n *= std::size_t(d);
    if (w.data.size() != n)
      throw std::runtime_error("llama: weight '" + name + "' has " + std::to_string(w.data.size()) + " values, shape " +
                               st::shape_string(shape) + " needs " + std::to_string(n));
    return w.data;
  });
  return llama_model(std::move(p));
}

llama_model llama_model::load(const std::string& dir) {
  namespace fs = std::filesystem;
  const llama_config c = load_config((fs::path(dir) / "config.json").string());
  bool tie = false;
  {
    const json::value root = json::parse(read_text_file((fs::path(dir) / "config.json").string(), "llama config"));
    if (const json::value* t = root.find("tie_word_embeddings"); t && t->type == json::value::kind::boolean)
      tie = t->boolean;
  }
  std::vector<st::reader> files;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    files.emplace_back(single.string());
  } else if (fs::exists(index)) {
    const std::string text = read_text_file(index.string(), "llama");
    json::value root;
    try {
      root = json::parse(text);
    } catch (const std::exception& e) {
      throw std::runtime_error("llama: " + index.string() + ": " + e.what());
    }
    const json::value* map = root.find("weight_map");
    if (!map || !map->is_object()) throw std::runtime_error("llama: " + index.string() + ": no weight_map object");
    std::set<std::string> shards;
    for (const auto& [name, file] : map->members) {
      if (!file.is_string())
        throw std::runtime_error("llama: " + index.string() + ": weight_map value of '" + name + "' is not a string");
      shards.insert(file.text);
    }
    for (const auto& s : shards) files.emplace_back((fs::path(dir) / s).string());
  } else {
    throw std::runtime_error("llama: " + dir + ": neither model.safetensors nor model.safetensors.index.json exists");
  }
  std::string where = files.size() == 1 ? files[0].path() : index.string();
  auto p = std::make_unique<impl>();
  p->build(c, [&](const std::string& name, const std::vector<std::int64_t>& shape) {
    std::string n = name;
    auto find = [&](const std::string& nm) -> const st::reader* {
      for (const auto& f : files)
        if (f.contains(nm)) return &f;
      return nullptr;
    };
    const st::reader* r = find(n);
    if (!r && name == "lm_head.weight" && tie) {
      n = "model.embed_tokens.weight";
      r = find(n);
    }
    if (!r) throw std::runtime_error("safetensors: " + where + ": missing tensor '" + name + "'");
    return r->read_f32(n, shape);
  });
  return llama_model(std::move(p));
}

std::vector<weight_tensor> llama_model::weights() const {
  const llama_config& c = p_->cfg;
  const std::int64_t D = c.dim, V = c.vocab_size, HD = c.head_dim, H = c.n_heads, KV = c.n_kv_heads, F = c.hidden_dim;
  std::vector<weight_tensor> out;
  out.push_back({"model.embed_tokens.weight", {V, D}, p_->embed});
  for (int l = 0; l < c.n_layers; ++l) {
    const layer_weights& L = p_->layers[std::size_t(l)];
    out.push_back({layer_name(l, "input_layernorm.weight"), {D}, L.attn_norm});
    if (c.attention == attention_kind::latent) {
      const std::int64_t R = c.kv_lora_rank, DR = c.rope_dims, QR = H * (HD + DR);
      out.push_back({layer_name(l, "self_attn.q_proj.weight"), {QR, D}, L.wqkv.unpack(0, int(QR))});
      out.push_back(
          {layer_name(l, "self_attn.kv_a_proj_with_mqa.weight"), {R + DR, D}, L.wqkv.unpack(int(QR), int(R + DR))});
      out.push_back({layer_name(l, "self_attn.kv_b_proj.weight"), {H * 2 * HD, R}, L.wkvb.unpack(0, int(H * 2 * HD))});
      out.push_back({layer_name(l, "self_attn.o_proj.weight"), {D, H * HD}, L.wo.unpack(0, int(D))});
      out.push_back({layer_name(l, "post_attention_layernorm.weight"), {D}, L.mlp_norm});
      out.push_back({layer_name(l, "mlp.gate_proj.weight"), {F, D}, L.wgu.unpack(0, int(F))});
      out.push_back({layer_name(l, "mlp.up_proj.weight"), {F, D}, L.wgu.unpack(int(F), int(F))});
      out.push_back({layer_name(l, "mlp.down_proj.weight"), {D, F}, L.wdown.unpack(0, int(D))});
      continue;
    }
    out.push_back({layer_name(l, "self_attn.q_proj.weight"), {H * HD, D}, L.wqkv.unpack(0, int(H * HD))});
    out.push_back({layer_name(l, "self_attn.k_proj.weight"), {KV * HD, D}, L.wqkv.unpack(int(H * HD), int(KV * HD))});
    out.push_back(
        {layer_name(l, "self_attn.v_proj.weight"), {KV * HD, D}, L.wqkv.unpack(int((H + KV) * HD), int(KV * HD))});
    out.push_back({layer_name(l, "self_attn.o_proj.weight"), {D, H * HD}, L.wo.unpack(0, int(D))});
    out.push_back({layer_name(l, "post_attention_layernorm.weight"), {D}, L.mlp_norm});
    out.push_back({layer_name(l, "mlp.gate_proj.weight"), {F, D}, L.wgu.unpack(0, int(F))});
    out.push_back({layer_name(l, "mlp.up_proj.weight"), {F, D}, L.wgu.unpack(int(F), int(F))});
    out.push_back({layer_name(l, "mlp.down_proj.weight"), {D, F}, L.wdown.unpack(0, int(D))});
  }
  out.push_back({"model.norm.weight", {D}, p_->final_norm});
  out.push_back({"lm_head.weight", {V, D}, p_->lm_head.unpack(0, int(V))});
  return out;
}

void llama_model::save(const std::string& dir, st::dtype storage) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error("llama: cannot create " + dir + ": " + ec.message());
  const std::vector<weight_tensor> ws = weights();
  std::vector<st::tensor_ref> refs;
  refs.reserve(ws.size());
  for (const auto& w : ws) refs.push_back({w.name, w.shape, w.data});
  st::write((fs::path(dir) / "model.safetensors").string(), refs, storage, {{"format", "pt"}});
  save_config(p_->cfg, (fs::path(dir) / "config.json").string());
}

double llama_model::forward_flops(std::size_t n_new, std::size_t start) const {
  if (n_new == 0) return 0;
  const llama_config& c = p_->cfg;
  const double D = c.dim, H = c.n_heads, KV = c.n_kv_heads, HD = c.head_dim, F = c.hidden_dim, V = c.vocab_size,
               L = c.n_layers, n = double(n_new), s = double(start);
  const double qkv = 2 * D * (H + 2 * KV) * HD, o = 2 * H * HD * D, mlp = 2 * 3 * D * F;
  const double att_pairs = n * s + n * (n + 1) / 2;  // sum over new positions p of (p + 1)
  const double att_last = s + n;                     // the last token's keys
  const double att = 4 * HD * H;
  if (c.attention == attention_kind::window) {
    // Pairs a windowed layer attends: sum over new positions p of min(p + 1, window).
    const double W = c.window;
    auto windowed_pairs = [&](double first, double last) {  // positions [first, last]
      double pairs = 0;
      const double full_until = std::min(last, W - 1);  // p + 1 <= W
      if (full_until >= first) pairs += (first + 1 + full_until + 1) * (full_until - first + 1) / 2;
      const double from = std::max(first, W);
      if (last >= from) pairs += W * (last - from + 1);
      return pairs;
    };
    double pairs = 0;
    for (int l = 0; l < c.n_layers; ++l) {
      const bool last = l == c.n_layers - 1;
      const double first = last ? s + n - 1 : s;
      pairs += c.windowed(l) ? windowed_pairs(first, s + n - 1) : (last ? att_last : att_pairs);
    }
    return L * n * qkv + (L - 1) * n * (o + mlp) + (o + mlp) + pairs * att + 2 * D * V;
  }
  if (c.attention == attention_kind::latent) {
    const double R = c.kv_lora_rank, DR = c.rope_dims;
    const double proj = 2 * D * (H * (HD + DR) + R + DR);
    const double up = 2 * R * 2 * H * HD * (s + n);  // every cached row, every layer
    const double att_l = 4 * (HD + DR) * H;
    return L * (n * proj + up) + (L - 1) * n * (o + mlp) + (o + mlp) + (L - 1) * att_pairs * att_l + att_last * att_l +
           2 * D * V;
  }
  return L * n * qkv + (L - 1) * n * (o + mlp) + (o + mlp) + (L - 1) * att_pairs * att + att_last * att + 2 * D * V;
}

void llama_model::forward(paged_kv_cache& cache, sequence& seq, std::span<const std::uint32_t> tokens,
                          std::size_t start, std::span<float> logits, const layer_hooks* hooks) const {
  const impl& m = *p_;
  const llama_config& c = m.cfg;
  auto bad = [](const std::string& s) { throw std::invalid_argument("llama forward: " + s); };
  if (tokens.empty()) bad("no tokens");
  if (seq.length != start)
    bad("seq.length (" + std::to_string(seq.length) + ") differs from start (" + std::to_string(start) + ")");
  if (start + tokens.size() > std::size_t(c.max_seq))
    bad("positions up to " + std::to_string(start + tokens.size()) + " exceed max_seq " + std::to_string(c.max_seq));
  if (logits.size() < std::size_t(c.vocab_size))
    bad("logits holds " + std::to_string(logits.size()) + " floats, vocab_size is " + std::to_string(c.vocab_size));
  for (const auto t : tokens)
    if (t >= std::uint32_t(c.vocab_size)) bad("token id " + std::to_string(t) + " >= vocab_size");
  if (cache.n_layers() != c.n_layers || cache.n_kv_heads() != c.cache_kv_heads() ||
      cache.head_dim() != c.cache_head_dim() || cache.tensors() != c.cache_tensors())
    bad("cache geometry (layers/kv heads/head_dim) differs from the model's");
  const std::size_t ps = cache.page_size();
  if (seq.pages.size() < (start + ps - 1) / ps) bad("seq.pages has fewer pages than start positions need");
  for (const auto p : seq.pages)
    if (p >= cache.num_pages()) bad("page id " + std::to_string(p) + " out of range");

  const int n = int(tokens.size());
  const std::size_t total = start + std::size_t(n);
  const std::size_t need = (total + ps - 1) / ps;
  if (seq.pages.size() < need) {
    const auto more = cache.allocate(std::uint32_t(need - seq.pages.size()));
    seq.pages.insert(seq.pages.end(), more.begin(), more.end());
  }

  const int D = c.dim, H = c.n_heads, KV = c.n_kv_heads, HD = c.head_dim, F = c.hidden_dim, G = H / KV;
  const bool latent = c.attention == attention_kind::latent;
  // Latent: R + DR floats of [c_kv | k_rope] per token; keys and (zero-padded) values of
  // HDK = head_dim + rope_dims floats per head once reconstructed.
  const int R = c.kv_lora_rank, DR = c.rope_dims, HDK = HD + DR;
  const int QKV = latent ? H * HDK + R + DR : (H + 2 * KV) * HD, QD = H * HD;
  thread_pool& pool = *m.pool;
  const int T = pool.size();

  fbuf x(std::size_t(n) * D), xn(std::size_t(n) * D), qkv(std::size_t(n) * QKV), att(std::size_t(n) * QD),
      gu(std::size_t(n) * 2 * F), act(std::size_t(n) * F);
  for (int t = 0; t < n; ++t)
    std::memcpy(x.p + std::size_t(t) * D, m.embed.data() + std::size_t(tokens[std::size_t(t)]) * D, std::size_t(D) * 4);

  // RoPE tables for the new positions (double precision angle, rounded once).
  const int half = c.rotary_dims() / 2;
  std::vector<float> rc(std::size_t(n) * half), rs(std::size_t(n) * half);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < half; ++i) {
      const double ang = double(start + std::size_t(t)) * m.inv_freq[std::size_t(i)];
      rc[std::size_t(t) * half + i] = float(std::cos(ang));
      rs[std::size_t(t) * half + i] = float(std::sin(ang));
    }

  const std::size_t Pp = (total + 7) & ~std::size_t(7);
  std::vector<fbuf> scratch;
  scratch.reserve(std::size_t(T));
  for (int i = 0; i < T; ++i) scratch.emplace_back(std::size_t(G) * Pp + std::size_t(G));  // scores, 1/sums

  const std::size_t token_floats = std::size_t(cache.n_kv_heads()) * cache.head_dim(), page_floats = ps * token_floats;
  // Float offset of position j's token within a layer's K (V) array.
  std::vector<std::size_t> offsets(total);
  for (std::size_t j = 0; j < total; ++j)
    offsets[j] = std::size_t(seq.pages[j / ps]) * page_floats + (j % ps) * token_floats;
  const float scale = float(1.0 / std::sqrt(double(latent ? HDK : HD)));

  // Latent: the cached c_kv rows gathered, their up-projection, the reconstructed keys
  // and values of every position ([position][head][HDK], contiguous) and the attention
  // output per head before the V padding is dropped.
  fbuf ckv, kvb, kr, vr, attl;
  std::vector<std::size_t> loff;
  if (latent) {
    ckv.resize(total * std::size_t(R));
    kvb.resize(total * std::size_t(2 * H * HD));
    kr.resize(total * std::size_t(H * HDK));
    vr.resize(total * std::size_t(H * HDK));
    attl.resize(std::size_t(n) * H * HDK);
    loff.resize(total);
    for (std::size_t j = 0; j < total; ++j) loff[j] = j * std::size_t(H * HDK);
  }

  // Row-parallel helper for the cheap elementwise steps.
  auto rows = [&](int r0, int r1, auto&& f) {
    const int cnt = r1 - r0;
    if (cnt <= 0) return;
    const int chunk = std::max(16, (cnt + 4 * T - 1) / (4 * T));
    const int tasks = (cnt + chunk - 1) / chunk;
    pool.run(std::size_t(tasks), [&](std::size_t i, int) {
      const int a = r0 + int(i) * chunk;
      f(a, std::min(r1, a + chunk));
    });
  };

  for (int l = 0; l < c.n_layers; ++l) {
    const layer_weights& L = m.layers[std::size_t(l)];
    const bool last_layer = l == c.n_layers - 1;
    const int r0 = last_layer ? n - 1 : 0;  // rows whose output is still needed after K/V

    rows(0, n, [&](int a, int b) { m.rmsnorm_rows(x.p, xn.p, a, b, L.attn_norm); });
    m.matmul(xn.p, std::size_t(D), n, L.wqkv, qkv.p, std::size_t(QKV), false);
    rows(0, n, [&](int a, int b) {
      for (int t = a; t < b; ++t) {
        float* row = qkv.p + std::size_t(t) * QKV;
        const float* cs = rc.data() + std::size_t(t) * half;
        const float* sn = rs.data() + std::size_t(t) * half;
        auto rotate = [&](float* v) {
          for (int i = 0; i < half; ++i) {
            const float x0 = v[i], x1 = v[i + half];
            v[i] = x0 * cs[i] - x1 * sn[i];
            v[i + half] = x1 * cs[i] + x0 * sn[i];
          }
        };
        if (latent) {  // each head's q_rope, then the shared k_rope
          for (int h = 0; h < H; ++h) rotate(row + std::size_t(h) * HDK + HD);
          rotate(row + std::size_t(H) * HDK + R);
        } else {
          for (int h = 0; h < H + KV; ++h) rotate(row + std::size_t(h) * HD);  // q heads, then k heads
        }
      }
    });

    if (hooks && hooks->before_layer) hooks->before_layer(hooks->ctx, l);
    float* kl = cache.k(l);
    float* vl = cache.v(l);
    for (int t = 0; t < n; ++t) {
      const std::size_t pos = start + std::size_t(t);
      const std::size_t off = std::size_t(seq.pages[pos / ps]) * page_floats + (pos % ps) * token_floats;
      const float* row = qkv.p + std::size_t(t) * QKV;
      if (latent) {
        std::memcpy(kl + off, row + std::size_t(H) * HDK, token_floats * 4);  // [c_kv | k_rope]
      } else {
        std::memcpy(kl + off, row + QD, token_floats * 4);
        std::memcpy(vl + off, row + QD + token_floats, token_floats * 4);
      }
    }
    if (hooks && hooks->after_layer) hooks->after_layer(hooks->ctx, l);

    const int nrows = n - r0;
    if (latent) {
      // Keys and values of every position from its cached row: [W_uk c_kv | k_rope] and
      // [W_uv c_kv | 0] per head. Each is a function of that row alone (the matmul's
      // sums do not depend on the other rows of the call).
      const int tot = int(total);
      rows(0, tot, [&](int a, int b) {
        for (int j = a; j < b; ++j)
          std::memcpy(ckv.p + std::size_t(j) * R, kl + offsets[std::size_t(j)], std::size_t(R) * 4);
      });
      m.matmul(ckv.p, std::size_t(R), tot, L.wkvb, kvb.p, std::size_t(2 * H * HD), false);
      rows(0, tot, [&](int a, int b) {
        for (int j = a; j < b; ++j) {
          const float* up = kvb.p + std::size_t(j) * 2 * H * HD;
          const float* rope = kl + offsets[std::size_t(j)] + R;
          for (int h = 0; h < H; ++h) {
            float* kd = kr.p + loff[std::size_t(j)] + std::size_t(h) * HDK;
            float* vd = vr.p + loff[std::size_t(j)] + std::size_t(h) * HDK;
            std::memcpy(kd, up + std::size_t(h) * 2 * HD, std::size_t(HD) * 4);
            std::memcpy(kd + HD, rope, std::size_t(DR) * 4);
            std::memcpy(vd, up + std::size_t(h) * 2 * HD + HD, std::size_t(HD) * 4);
            std::memset(vd + HD, 0, std::size_t(DR) * 4);
          }
        }
      });
      // Attention: tasks (row, head), most expensive (latest) rows first.
      pool.run(std::size_t(nrows) * H, [&](std::size_t i, int w) {
        const int t = n - 1 - int(i) / H, h = int(i) % H;
        attn_args a;
        a.q = qkv.p + std::size_t(t) * QKV + std::size_t(h) * HDK;
        a.kbase = kr.p + std::size_t(h) * HDK;
        a.vbase = vr.p + std::size_t(h) * HDK;
        a.off = loff.data();
        a.P = start + std::size_t(t) + 1;
        a.G = 1;
        a.HD = HDK;
        a.scale = scale;
        a.S = scratch[std::size_t(w)].p;
        a.Pp = Pp;
        a.out = attl.p + std::size_t(t) * H * HDK + std::size_t(h) * HDK;
        attn_kernel(a);
      });
      for (int t = r0; t < n; ++t)
        for (int h = 0; h < H; ++h)
          std::memcpy(att.p + std::size_t(t) * QD + std::size_t(h) * HD,
                      attl.p + std::size_t(t) * H * HDK + std::size_t(h) * HDK, std::size_t(HD) * 4);
    } else {
      // Attention: tasks (row, kv head), most expensive (latest) rows first. A windowed
      // layer's query at p sees only positions (p - window, p].
      const bool windowed = c.windowed(l);
      pool.run(std::size_t(nrows) * KV, [&](std::size_t i, int w) {
        const int t = n - 1 - int(i) / KV, g = int(i) % KV;
        const std::size_t P = start + std::size_t(t) + 1;
        const std::size_t first = windowed && P > std::size_t(c.window) ? P - std::size_t(c.window) : 0;
        attn_args a;
        a.q = qkv.p + std::size_t(t) * QKV + std::size_t(g) * G * HD;
        a.kbase = kl + std::size_t(g) * HD;
        a.vbase = vl + std::size_t(g) * HD;
        a.off = offsets.data() + first;
        a.P = P - first;
        a.G = G;
        a.HD = HD;
        a.scale = scale;
        a.S = scratch[std::size_t(w)].p;
        a.Pp = Pp;
        a.out = att.p + std::size_t(t) * QD + std::size_t(g) * G * HD;
        attn_kernel(a);
      });
    }

    const std::size_t ro = std::size_t(r0);
    m.matmul(att.p + ro * QD, std::size_t(QD), nrows, L.wo, x.p + ro * D, std::size_t(D), true);
    rows(r0, n, [&](int a, int b) { m.rmsnorm_rows(x.p, xn.p, a, b, L.mlp_norm); });
    m.matmul(xn.p + ro * D, std::size_t(D), nrows, L.wgu, gu.p + ro * 2 * F, std::size_t(2 * F), false);
    rows(r0, n, [&](int a, int b) {
      for (int t = a; t < b; ++t) {
        const float* g = gu.p + std::size_t(t) * 2 * F;
        silu_mul(g, g + F, act.p + std::size_t(t) * F, F);
      }
    });
    m.matmul(act.p + ro * F, std::size_t(F), nrows, L.wdown, x.p + ro * D, std::size_t(D), true);
  }

  m.rmsnorm_rows(x.p, xn.p, n - 1, n, m.final_norm);
  m.matmul(xn.p + std::size_t(n - 1) * D, std::size_t(D), 1, m.lm_head, logits.data(), std::size_t(c.vocab_size),
           false);
  seq.length = total;
}

std::uint32_t argmax(std::span<const float> logits) {
  if (logits.empty()) throw std::invalid_argument("argmax: empty logits");
  std::size_t best = 0;
  bool have = false;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i])) continue;
    if (!have || logits[i] > logits[best]) {
      best = i;
      have = true;
    }
  }
  return static_cast<std::uint32_t>(best);
}

}  // namespace mini
