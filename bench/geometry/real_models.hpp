// KV geometries of real models, from their published configurations (config.json of
// each checkpoint), as one tensor-parallel rank of a common deployment holds them.
// Shared by the geometry tests (tests/unit/test_geometry_groups.cpp) and
// bench/geometry/geometry_report.cpp.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "attnstore/rope.hpp"
#include "attnstore/types.hpp"

namespace attnstore::models {

struct real_model {
  std::string name;
  kv_geometry geometry;           // not validated; tokens_per_block 0 (auto)
  std::uint32_t tp_size = 1;      // the deployment the per-rank shapes assume
  std::optional<rope_spec> rope;  // the spec of rope_variant 0 groups, when attnstore can express it
  std::string note;               // what the geometry leaves out, if anything
};

inline kv_group full(std::uint32_t layers, std::uint32_t heads, std::uint32_t dim) {
  return kv_group{
      .kind = layer_kind::full, .num_layers = layers, .num_kv_heads = heads, .head_dim = dim, .dtype = dtype::bf16};
}
inline kv_group window(std::uint32_t layers, std::uint32_t heads, std::uint32_t dim, std::uint32_t w) {
  return kv_group{.kind = layer_kind::sliding_window,
                  .num_layers = layers,
                  .num_kv_heads = heads,
                  .head_dim = dim,
                  .dtype = dtype::bf16,
                  .window = w};
}

/// DeepSeek-V3 (and Kimi K2, same attention): 61 MLA layers; each token keeps one
/// latent row of kv_lora_rank 512 + qk_rope_head_dim 64, replicated on every TP rank.
/// Its RoPE is YaRN (factor 40), which rope_spec does not express: the spec here is
/// plain RoPE over the 64 rope dims, enough to test that only those dims move.
inline real_model deepseek_v3() {
  real_model m{"DeepSeek-V3", {}, 8, {}, "YaRN RoPE approximated by plain RoPE (rope_spec has no YaRN)"};
  m.geometry.groups = {kv_group{.kind = layer_kind::latent,
                                .num_layers = 61,
                                .num_kv_heads = 1,
                                .head_dim = 576,
                                .dtype = dtype::bf16,
                                .rope_dims = 64}};
  m.rope = rope_spec{.style = rope_style::gptj, .head_dim = 64, .theta = 10000.0};
  return m;
}

/// gpt-oss-20b: 24 layers alternating sliding-window (128 tokens, even layers) and full
/// attention; 8 KV heads of 64 at TP 1. Its RoPE is YaRN (factor 32): plain RoPE here.
inline real_model gpt_oss_20b() {
  real_model m{"gpt-oss-20b", {}, 1, {}, "YaRN RoPE approximated by plain RoPE; attention sinks are weights, not KV"};
  m.geometry.groups = {window(12, 8, 64, 128), full(12, 8, 64)};
  for (std::uint8_t l = 0; l < 24; ++l) m.geometry.layer_group.push_back(l % 2 == 0 ? 0 : 1);
  m.rope = rope_spec{.style = rope_style::neox, .head_dim = 64, .theta = 150000.0};
  return m;
}

/// Gemma 3 12B: 48 layers, five local (1024-token window, RoPE theta 1e4) per global one
/// (theta 1e6, linear scaling 8): two RoPE specs, so its global group is rope_variant 1.
/// 8 KV heads of 256; at TP 8 one per rank.
inline real_model gemma3_12b() {
  real_model m{"Gemma-3-12B", {}, 8, {}, "two RoPE specs: truncated loads are refused (rope_variant 1)"};
  kv_group global = full(8, 1, 256);
  global.rope_variant = 1;
  m.geometry.groups = {window(40, 1, 256, 1024), global};
  for (std::uint32_t l = 0; l < 48; ++l) m.geometry.layer_group.push_back((l + 1) % 6 == 0 ? 1 : 0);
  m.rope = rope_spec{.style = rope_style::neox, .head_dim = 256, .theta = 10000.0};
  return m;
}

/// Qwen3-Next-80B-A3B: 48 layers, a full-attention layer (2 KV heads of 256) every
/// fourth, the other 36 Gated DeltaNet: per sequence a recurrent state of 32 value heads
/// x 128 x 128 and a convolution state of 3 x 8192, both bf16 (~1.05 MiB a layer).
inline real_model qwen3_next_80b() {
  real_model m{
      "Qwen3-Next-80B", {}, 1, {}, "the state is one checkpoint per session (the last turn's end), kept by the hooks"};
  kv_group state{.kind = layer_kind::state,
                 .num_layers = 36,
                 .num_kv_heads = 1,
                 .head_dim = 1,
                 .dtype = dtype::bf16,
                 .rotary = false,
                 .state_bytes = (32ull * 128 * 128 + 3ull * 8192) * 2};
  m.geometry.groups = {state, full(12, 2, 256)};
  for (std::uint32_t l = 0; l < 48; ++l) m.geometry.layer_group.push_back((l + 1) % 4 == 0 ? 1 : 0);
  m.rope = rope_spec{.style = rope_style::neox, .head_dim = 256, .rotary_dim = 64, .theta = 10000000.0};
  return m;
}

/// Llama 3 70B: 80 full-attention GQA layers, 8 KV heads of 128; at TP 8 one per rank.
/// RoPE theta 5e5 with llama3 scaling (factor 8).
inline real_model llama3_70b() {
  real_model m{"Llama-3-70B", {}, 8, {}, ""};
  m.geometry.groups = {full(80, 1, 128)};
  m.rope = rope_spec{.style = rope_style::neox,
                     .head_dim = 128,
                     .theta = 500000.0,
                     .scaling = rope_scaling::llama3,
                     .factor = 8.0,
                     .low_freq_factor = 1.0,
                     .high_freq_factor = 4.0,
                     .original_max_position = 8192};
  return m;
}

inline std::vector<real_model> all() {
  return {deepseek_v3(), gpt_oss_20b(), gemma3_12b(), qwen3_next_80b(), llama3_70b()};
}

}  // namespace attnstore::models
