// mini llama: a small fp32 Llama forward pass over a paged KV cache, for the example
// inference engine. CPU only, deterministic to the bit:
//
//  * every output element of every matrix product is one sequential sum over the input
//    dimension (k = 0, 1, ...), whatever the number of tokens in the call, the tiling,
//    the thread count or the SIMD width used (SSE2, AVX2 or AVX-512, picked at run time;
//    no FMA contraction), so a token's results never depend on which other tokens share
//    its call;
//  * attention for a query reads every key and value, its own included, from the cache,
//    in position order, with an accumulation order that depends only on its position.
//
// So the last-token logits are bitwise identical whether a prompt is prefilled in one
// call or several, and whether the history's KV was computed in this process or copied
// into (other) pages of the cache byte for byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace mini {

/// What the attention layers of a model keep and attend.
enum class attention_kind : int {
  full = 0,    ///< every layer attends every earlier token (Llama)
  window = 1,  ///< even layers attend the last `window` tokens, odd layers all of them (gpt-oss)
  latent = 2,  ///< multi-head latent attention: one compressed row per token (DeepSeek's MLA)
};

struct llama_config {
  int vocab_size = 512, dim = 256, n_layers = 4, n_heads = 8, n_kv_heads = 2, head_dim = 32, hidden_dim = 688;
  float rope_theta = 10000.0f, norm_eps = 1e-5f;
  int max_seq = 8192;
  /// full: the Llama above. window: layers 0, 2, 4... attend only keys at positions
  /// (p - window, p] for a query at p (their own included); the others attend all.
  /// latent (MLA as DeepSeek-V2-Lite, without its query LoRA and kv norm): a layer
  /// caches one row per token, [c_kv (kv_lora_rank) | k_rope (rope_dims, rotated by
  /// position)]; at attention time head h's key is [W_uk_h c_kv (head_dim) | k_rope]
  /// and its value W_uv_h c_kv (head_dim); queries are [q_nope (head_dim) | q_rope
  /// (rope_dims, rotated)]. n_kv_heads must equal n_heads (every head reconstructs
  /// its own key and value). Only full models have a checkpoint (config.json) form.
  attention_kind attention = attention_kind::full;
  int window = 0;        ///< window: tokens a windowed layer attends
  int kv_lora_rank = 0;  ///< latent: dimensions of c_kv
  int rope_dims = 0;     ///< latent: dimensions of k_rope and of each head's q_rope

  /// Throws std::invalid_argument naming the first bad field (sizes must be positive,
  /// n_heads a multiple of n_kv_heads, head_dim even; window > 0 and at least 2 layers
  /// for window models; kv_lora_rank > 0, rope_dims even and > 0, n_kv_heads ==
  /// n_heads for latent ones; the fields of the other kinds 0).
  void validate() const;
  /// Number of weights (embeddings, projections, norms, lm_head).
  std::size_t param_count() const;
  /// Whether layer `layer` attends only the last `window` tokens.
  bool windowed(int layer) const { return attention == attention_kind::window && layer % 2 == 0; }
  /// The KV cache's shape per layer: tensors per token (K and V, or the latent row),
  /// heads per tensor and floats per head.
  int cache_tensors() const { return attention == attention_kind::latent ? 1 : 2; }
  int cache_kv_heads() const { return attention == attention_kind::latent ? 1 : n_kv_heads; }
  int cache_head_dim() const { return attention == attention_kind::latent ? kv_lora_rank + rope_dims : head_dim; }
  /// Dimensions RoPE rotates in a cached key head (the trailing ones for latent).
  int rotary_dims() const { return attention == attention_kind::latent ? rope_dims : head_dim; }
  bool operator==(const llama_config&) const = default;
};

/// Reads a Hugging Face config.json (LlamaForCausalLM keys). Throws std::runtime_error
/// naming the file for a missing key, a bad value or an unsupported feature (rope_scaling,
/// biases, an activation other than silu, a model_type other than llama/mistral).
llama_config load_config(const std::string& config_json_path);
/// Writes `c` as a Hugging Face config.json. Throws std::invalid_argument for a window or
/// latent model (they have no checkpoint form here).
void save_config(const llama_config& c, const std::string& config_json_path);

// Engine KV memory: per layer a K and a V array of shape
// [num_pages][page_size][n_kv_heads][head_dim], float32, owned here (one 4 KiB-aligned,
// zero-initialised allocation; layer l's K then V). Move-only. A latent model's cache
// has one array per layer, [num_pages][page_size][1][kv_lora_rank + rope_dims] (k() is
// that array, v() null): its shape comes from llama_config::cache_*().
class paged_kv_cache {
 public:
  paged_kv_cache(const llama_config&, std::uint32_t num_pages, std::uint32_t page_size);
  ~paged_kv_cache();
  paged_kv_cache(paged_kv_cache&&) noexcept;
  paged_kv_cache& operator=(paged_kv_cache&&) noexcept;
  paged_kv_cache(const paged_kv_cache&) = delete;
  paged_kv_cache& operator=(const paged_kv_cache&) = delete;

  std::uint32_t page_size() const { return page_size_; }
  std::uint32_t num_pages() const { return num_pages_; }
  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  /// Arrays per layer: 2 (K and V) or 1 (a latent row).
  int tensors() const { return tensors_; }

  /// Base of layer `layer`'s [num_pages][page_size][kv_heads][head_dim] K (V) array (V:
  /// nullptr in a latent cache).
  float* k(int layer) { return base_ + std::size_t(layer) * tensors_ * layer_floats_; }
  float* v(int layer) { return tensors_ == 2 ? k(layer) + layer_floats_ : nullptr; }
  const float* k(int layer) const { return base_ + std::size_t(layer) * tensors_ * layer_floats_; }
  const float* v(int layer) const { return tensors_ == 2 ? k(layer) + layer_floats_ : nullptr; }

  std::size_t page_stride_bytes() const { return std::size_t(page_size_) * token_stride_bytes(); }
  std::size_t token_stride_bytes() const { return std::size_t(n_kv_heads_) * head_stride_bytes(); }
  std::size_t head_stride_bytes() const { return std::size_t(head_dim_) * 4; }
  /// Bytes of one layer's K (or V) array: num_pages * page_stride_bytes().
  std::size_t layer_bytes() const { return layer_floats_ * 4; }

  /// Takes n free pages (lowest ids first on a fresh cache). Throws std::runtime_error when
  /// fewer than n are free; nothing is taken then.
  std::vector<std::uint32_t> allocate(std::uint32_t n);
  /// Returns pages to the free list. Throws std::invalid_argument for an id out of range
  /// or not allocated (nothing is released then).
  void release(std::span<const std::uint32_t> pages);
  std::uint32_t free_pages() const { return static_cast<std::uint32_t>(free_.size()); }

 private:
  std::uint32_t num_pages_ = 0, page_size_ = 0;
  int n_layers_ = 0, n_kv_heads_ = 0, head_dim_ = 0, tensors_ = 2;
  std::size_t layer_floats_ = 0;
  float* base_ = nullptr;
  std::vector<std::uint32_t> free_;  // stack; back() is allocated next
  std::vector<std::uint8_t> in_use_;
};

/// A sequence's pages in token order (position p lives in pages[p / page_size], slot
/// p % page_size); length = tokens whose KV is in the cache.
struct sequence {
  std::vector<std::uint32_t> pages;
  std::size_t length = 0;
};

// Called around each layer of a forward pass, on the calling thread, each exactly once
// per layer per forward() in layer order: before_layer(l), after_layer(l), before_layer(l+1)...
//  * before_layer(l): after layer l's Q/K/V projections, before it writes its new K/V
//    into the cache and before it reads the K/V of positions < start (the hook waits for
//    layer l's load there; the load may write whole pages, the new tokens' slots
//    included).
//  * after_layer(l): right after layer l has written the new tokens' K/V into the cache
//    and before its attention (the hook saves layer l there, the save overlapping the
//    rest of the pass). The hook must not modify layer l's cache afterwards.
// Either may be null.
struct layer_hooks {
  void (*before_layer)(void* ctx, int layer) = nullptr;
  void (*after_layer)(void* ctx, int layer) = nullptr;
  void* ctx = nullptr;
};

/// A weight in Hugging Face naming and layout ([out_features][in_features] for linears).
struct weight_tensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

/// SIMD code path of the matrix and attention kernels: sse2 is the generic build (SSE2 on
/// x86-64, whatever the compiler targets elsewhere), avx2 and avx512 are run-time-selected
/// clones on x86. All give bitwise-identical results; the best the CPU supports is used
/// unless set_simd() (or MINI_LLAMA_SIMD=sse2|avx2|avx512 in the environment) picks a
/// lower one. Process-wide.
enum class simd_level : int { sse2 = 0, avx2 = 1, avx512 = 2 };
simd_level simd();
simd_level best_simd();
/// Selects `l`, clamped to best_simd(); returns the level now in use.
simd_level set_simd(simd_level l);

class llama_model {
 public:
  /// Deterministic seeded weights: linears and embeddings ~N(0, 0.02) (from a portable
  /// integer PRNG, so identical on every machine), norms 1.
  static llama_model random(const llama_config&, std::uint64_t seed);
  static llama_model random(const llama_config&, std::uint64_t seed, float stddev);
  /// dir/config.json (HF Llama keys) + dir/model.safetensors (or the shards listed in
  /// dir/model.safetensors.index.json); F32, F16, BF16 or F64 tensors, converted to f32.
  /// lm_head.weight may be absent when tie_word_embeddings is true. Throws
  /// std::runtime_error naming the file and tensor for missing tensors or wrong shapes.
  static llama_model load(const std::string& dir);
  /// From tensors named as in a checkpoint. Throws std::runtime_error for a missing
  /// tensor or a wrong shape; other names are ignored.
  static llama_model from_weights(const llama_config&, const std::vector<weight_tensor>&);

  llama_model(llama_model&&) noexcept;
  llama_model& operator=(llama_model&&) noexcept;
  ~llama_model();

  const llama_config& config() const;
  /// All weights in checkpoint naming and layout (a copy).
  std::vector<weight_tensor> weights() const;
  /// Writes dir/config.json and dir/model.safetensors (tensors stored as `storage`:
  /// F32, F16 or BF16); creates dir if needed.
  void save(const std::string& dir, st::dtype storage = st::dtype::f32) const;

  /// Threads a forward pass uses (caller included). Default: MINI_LLAMA_THREADS from the
  /// environment, else std::thread::hardware_concurrency(). Results do not depend on it.
  int threads() const;
  /// Replaces the thread pool; not while a forward() on this model runs.
  void set_threads(int n);

  /// Prefill/decode: runs tokens[0..n) at positions [start, start+n) of `seq`
  /// (seq.length must equal start; the KV of positions < start is in `cache` at
  /// seq.pages, or is put there by hooks->before_layer). Grows seq.pages from `cache` as
  /// needed, writes the new tokens' K (after RoPE) and V (latent: the row [c_kv |
  /// k_rope after RoPE]) into the cache, sets
  /// seq.length = start+n, and writes the logits of the LAST token into
  /// logits[0..vocab_size). Throws std::invalid_argument for an empty call, a token id
  /// >= vocab_size, seq.length != start, start+n > max_seq, too small logits, a cache of
  /// another geometry or page ids out of range; std::runtime_error when the cache has no
  /// free pages left. Concurrent calls on one model are safe (they share its threads).
  void forward(paged_kv_cache& cache, sequence& seq, std::span<const std::uint32_t> tokens, std::size_t start,
               std::span<float> logits, const layer_hooks* hooks = nullptr) const;

  /// Floating-point operations a forward(n_new tokens at start) executes: 2 per
  /// multiply-add of the matrix products (Q/K/V for every new token in every layer; in
  /// the last layer the attention, O and MLP only for the last token, whose logits are
  /// the only ones wanted; lm_head for the last token) plus 4*head_dim*n_heads per
  /// (query, key) pair of attention (window: only the pairs a windowed layer attends;
  /// latent: 4*(head_dim + rope_dims)*n_heads per pair, plus the up-projection of every
  /// cached row in every layer).
  double forward_flops(std::size_t n_new, std::size_t start) const;

 private:
  struct impl;
  explicit llama_model(std::unique_ptr<impl>);
  std::unique_ptr<impl> p_;
};

/// Index of the largest logit (the first one on ties; NaNs ignored). Throws
/// std::invalid_argument for an empty span.
std::uint32_t argmax(std::span<const float> logits);

}  // namespace mini
