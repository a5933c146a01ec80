// llama_cpp: attnstore behind llama.cpp. A conversation's verified prefix is restored
// into a llama_context sequence before the engine decodes the new tokens, and the
// turn's new blocks are saved after it; nothing else in the engine changes. The blocks
// are ordinary attnstore blocks (layer-major, chain-hashed over token ids, checksummed),
// so edits mid-history reuse up to the edit, and tiering, the scheduler-aware policy,
// restart recovery and truncation apply as for any engine.
//
// Per turn:
//   auto r = cache.restore(key, prompt, seq);           // KV of prompt[0, r.tokens) is in seq
//   llama_decode(prompt[r.tokens:]) ... generate ...
//   cache.save(key, history, seq);                      // only blocks not yet stored are read out
//
// The KV moves through llama.cpp's public per-sequence state API
// (llama_state_seq_get_data / set_data): restore builds that blob from leased DRAM
// blocks; save extracts only the new cells (through a scratch sequence that shares the
// cells, when the context has one) and cuts them into blocks.
//
// What makes KV valid is the model fingerprint (bind()): the GGUF file's bytes
// (metadata and tensor data), the KV types, V transposition (flash attention off),
// the stream layout, the RoPE settings of the context and the llama.cpp version. It is
// the store's model name, so a store written under any other fingerprint serves nothing.
//
// Supported: models with one standard KV cache (no sliding-window, recurrent or hybrid
// memory, no M-RoPE); bind() says why otherwise.
#pragma once

#include <llama.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "attnstore/status.hpp"
#include "attnstore/store.hpp"

namespace attnstore::llama_cpp {

/// The llama.cpp build the adapter was compiled against (scripts/llama-cpp.sh).
std::string_view llama_cpp_version() noexcept;

/// How one llama_context lays out its KV, and the fingerprint of what makes it valid.
struct model_binding {
  kv_geometry geometry;     ///< the store geometry: one K row and one V row per token and layer
  std::string fingerprint;  ///< hex; the store's model_name
  std::uint32_t layers = 0;
  std::int32_t type_k = 0, type_v = 0;  ///< ggml_type of the cache
  std::size_t k_row_bytes = 0, v_row_bytes = 0;
  std::uint32_t v_elements = 0;  ///< n_embd_v_gqa (the V row's elements)
  bool v_trans = false;          ///< V stored transposed (flash attention off)
  std::uint32_t streams = 1;     ///< KV streams of the context (1 when unified)
  std::uint32_t max_cells = 0;   ///< n_ctx: cells a restore may fill

  /// Sets what makes up the store's model id: geometry, model_name (the fingerprint),
  /// rope "none" (keys are stored after RoPE), no TP. Capacities etc. stay the caller's.
  void configure(store_config& cfg) const;
};

/// Describes the KV of a context created from `model` with `params`, read from
/// `gguf_path` (the file hashed into the fingerprint). tokens_per_block 0: the store's
/// default (blocks of 1-2 MiB); smaller blocks reuse more of an edited history.
/// Throws std::invalid_argument when the model's memory is not one standard KV cache
/// (sliding window, recurrent, hybrid, M-RoPE), K and V rows differ in size, or
/// flash_attn_type is AUTO (its resolution is not visible through llama.h; set it
/// enabled or disabled); std::runtime_error when the GGUF file cannot be read.
model_binding bind(const llama_model* model, const llama_context_params& params, const std::string& gguf_path,
                   std::uint32_t tokens_per_block = 0);

/// What restore() put into the sequence.
struct restore_result {
  /// ok (tokens may be 0: a miss), checksum_error / device_error (a verified prefix
  /// shorter than the stored one was restored, or none), invalid_argument (bad
  /// sequence id), unsupported (llama.cpp refused the state: the sequence is empty).
  errc status = errc::ok;
  std::uint32_t tokens = 0;  ///< prompt[0, tokens) are in the sequence at positions [0, tokens)
};

struct adapter_stats {
  std::uint64_t restores = 0, restored_tokens = 0;
  std::uint64_t saves = 0, saved_blocks = 0, extracted_cells = 0;
  std::uint64_t restore_ns = 0, save_ns = 0;
};

/// One llama_context's connection to a store. Not thread-safe: call it from the thread
/// that drives the context (llama_context is not thread-safe either).
class session_cache {
 public:
  /// `binding` must come from bind() for this context, and the store must have been
  /// configured with it (binding.configure). `scratch_seq`: a sequence id the engine
  /// never uses, in the same KV stream as the sequences it saves (kv_unified, or
  /// n_seq_max == 1 has none: pass -1); with it a save reads out only the new cells,
  /// without it the whole sequence is read and the old cells skipped.
  /// Throws std::invalid_argument when the store's geometry or model is not the binding's.
  session_cache(store& kv, llama_context* ctx, const model_binding& binding, llama_seq_id scratch_seq = -1);

  /// Empties `seq` and restores the longest verified stored prefix of `prompt` into
  /// it, leaving at least the last prompt token for the engine to decode (it needs
  /// that token's logits). Blocks that fail verification end the prefix there.
  restore_result restore(const session_key& session, std::span<const llama_token> prompt, llama_seq_id seq) noexcept;

  /// Saves the KV of `history` (held by `seq` at positions [0, history.size())). Blocks
  /// already stored for this history are not read out again; the block holding the
  /// first unsaved token is re-saved. Returns the store's put codes; invalid_argument
  /// when the sequence does not hold exactly those positions; unsupported when
  /// llama.cpp's state is not laid out as the binding says.
  errc save(const session_key& session, std::span<const llama_token> history, llama_seq_id seq) noexcept;

  const adapter_stats& stats() const noexcept { return stats_; }
  const model_binding& binding() const noexcept { return binding_; }

 private:
  errc fill_blocks(std::span<std::byte*> payloads, std::uint64_t from_token, std::uint64_t tokens) noexcept;

  store& store_;
  llama_context* ctx_;
  model_binding binding_;
  llama_seq_id scratch_;
  std::vector<std::uint8_t> blob_;                    // llama.cpp sequence state, reused
  std::vector<std::int32_t> cell_of_;                 // save: cell index of each position from the first re-saved one
  std::vector<const std::uint8_t*> k_rows_, v_rows_;  // save: each layer's rows inside blob_
  std::vector<block_view> views_;
  std::vector<std::byte*> payloads_;
  read_lease lease_;
  adapter_stats stats_;
};

}  // namespace attnstore::llama_cpp
