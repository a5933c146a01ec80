// What llama_chat and the adapter's tests share: a generated Llama GGUF (random f16
// weights, an SPM byte vocabulary; no download), and a minimal llama.cpp engine loop
// that decodes a conversation turn by turn with the same batching in every mode, so
// KV computed once and KV restored are bitwise comparable.
#pragma once

#include <llama.h>

#include <cstdint>
#include <string>
#include <vector>

namespace llama_chat {

/// Shape of the generated model. The default is the ~200M-parameter shape of small
/// real Llama models (GQA 16/4, head dim 64).
struct model_spec {
  std::uint32_t embd = 1024, layers = 16, heads = 16, kv_heads = 4, ff = 2816, vocab = 512, ctx_train = 16384;
  std::uint64_t seed = 1;  ///< another seed: other weights, same shape
  std::string name() const;
};

/// Writes the GGUF to `path` unless a file made from the same spec is there already.
/// Returns the path. Throws std::runtime_error on I/O errors.
std::string ensure_model(const std::string& path, const model_spec& spec);

/// llama.cpp's log, silenced below errors (set once per process).
void quiet_llama_logs();

struct context_options {
  std::uint32_t n_ctx = 4096, n_batch = 512, seqs = 2, threads = 0;  // threads 0: all cores
  bool flash_attn = true;
  ggml_type kv_type = GGML_TYPE_F16;
};
llama_context_params context_params(const context_options& o);

/// Decodes tokens[from, to) into `seq` at positions [from, to), split at every
/// boundary in `cuts` (absolute positions) and after every n_batch tokens from there:
/// the same cuts give the same KV bytes whether [0, from) was decoded or restored.
/// Logits only for the last token.
/// Returns false when llama_decode fails.
bool decode_span(llama_context* ctx, llama_seq_id seq, const std::vector<llama_token>& tokens, std::size_t from,
                 std::size_t to, const std::vector<std::size_t>& cuts);

/// Greedy next token from the last decode's logits; `logits_out` (when set) receives them.
llama_token greedy(llama_context* ctx, std::vector<float>* logits_out = nullptr);

/// Decodes one token at `pos` (a reply step). Returns false when llama_decode fails.
bool decode_one(llama_context* ctx, llama_seq_id seq, llama_token token, llama_pos pos);

/// Deterministic pseudo-random token ids in [3, vocab) (no special tokens).
std::vector<llama_token> random_tokens(std::uint64_t seed, std::size_t count, std::uint32_t vocab);

}  // namespace llama_chat
