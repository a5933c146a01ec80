#include "chat_engine.hpp"

#include <gguf.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

namespace llama_chat {
namespace {

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Uniform in [-a, a).
float uniform(std::uint64_t& s, float a) { return a * (float(splitmix(s) >> 40) / float(1ull << 24) * 2.0f - 1.0f); }

}  // namespace

std::string model_spec::name() const {
  char buf[160];
  std::snprintf(buf, sizeof buf, "tiny-llama-e%u-l%u-h%u-kv%u-ff%u-v%u-s%llu", embd, layers, heads, kv_heads, ff, vocab,
                static_cast<unsigned long long>(seed));
  return buf;
}

std::string ensure_model(const std::string& path, const model_spec& spec) {
  namespace fs = std::filesystem;
  if (fs::exists(path)) return path;
  if (spec.embd % spec.heads || spec.heads % spec.kv_heads || spec.vocab < 259)
    throw std::runtime_error("model_spec: embd must divide by heads, heads by kv_heads, vocab >= 259");
  const std::uint32_t head_dim = spec.embd / spec.heads, kv = head_dim * spec.kv_heads;

  std::size_t elements = std::size_t(spec.vocab) * spec.embd * 2 + spec.embd;
  elements += std::size_t(spec.layers) * (2 * spec.embd + 2 * std::size_t(spec.embd) * spec.embd +
                                          2 * std::size_t(spec.embd) * kv + 3 * std::size_t(spec.embd) * spec.ff);
  ggml_init_params ip{elements * 4 + (std::size_t(spec.layers) * 16 + 16) * ggml_tensor_overhead(), nullptr, false};
  ggml_context* g = ggml_init(ip);
  if (!g) throw std::runtime_error("ensure_model: ggml_init failed");
  gguf_context* out = gguf_init_empty();
  std::uint64_t rng = spec.seed * 0x2545f4914f6cdd1dull + 7;
  std::vector<float> row;

  auto add = [&](const std::string& name, std::int64_t in, std::int64_t outs, bool weight) {
    ggml_tensor* t = outs ? ggml_new_tensor_2d(g, weight ? GGML_TYPE_F16 : GGML_TYPE_F32, in, outs)
                          : ggml_new_tensor_1d(g, GGML_TYPE_F32, in);
    ggml_set_name(t, name.c_str());
    const std::int64_t rows = outs ? outs : 1;
    row.resize(std::size_t(in));
    const float a = weight ? std::sqrt(3.0f / float(in)) : 0.0f;
    for (std::int64_t r = 0; r < rows; ++r) {
      for (auto& v : row) v = weight ? uniform(rng, a) : 1.0f;
      if (weight)
        ggml_fp32_to_fp16_row(row.data(), static_cast<ggml_fp16_t*>(t->data) + r * in, in);
      else
        std::copy(row.begin(), row.end(), static_cast<float*>(t->data) + r * in);
    }
    gguf_add_tensor(out, t);
  };
  add("token_embd.weight", spec.embd, spec.vocab, true);
  for (std::uint32_t l = 0; l < spec.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", spec.embd, 0, false);
    add(p + "attn_q.weight", spec.embd, spec.embd, true);
    add(p + "attn_k.weight", spec.embd, kv, true);
    add(p + "attn_v.weight", spec.embd, kv, true);
    add(p + "attn_output.weight", spec.embd, spec.embd, true);
    add(p + "ffn_norm.weight", spec.embd, 0, false);
    add(p + "ffn_gate.weight", spec.embd, spec.ff, true);
    add(p + "ffn_up.weight", spec.embd, spec.ff, true);
    add(p + "ffn_down.weight", spec.ff, spec.embd, true);
  }
  add("output_norm.weight", spec.embd, 0, false);
  add("output.weight", spec.embd, spec.vocab, true);

  gguf_set_val_str(out, "general.architecture", "llama");
  gguf_set_val_str(out, "general.name", spec.name().c_str());
  gguf_set_val_u32(out, "general.file_type", 1);  // mostly f16
  gguf_set_val_u32(out, "llama.context_length", spec.ctx_train);
  gguf_set_val_u32(out, "llama.embedding_length", spec.embd);
  gguf_set_val_u32(out, "llama.block_count", spec.layers);
  gguf_set_val_u32(out, "llama.feed_forward_length", spec.ff);
  gguf_set_val_u32(out, "llama.attention.head_count", spec.heads);
  gguf_set_val_u32(out, "llama.attention.head_count_kv", spec.kv_heads);
  gguf_set_val_f32(out, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
  gguf_set_val_f32(out, "llama.rope.freq_base", 10000.0f);
  gguf_set_val_u32(out, "llama.rope.dimension_count", head_dim);
  gguf_set_val_u32(out, "llama.vocab_size", spec.vocab);

  // SPM vocabulary: unk, bos, eos, the 256 byte tokens, then plain pieces.
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<std::int32_t> types;
  auto piece = [&](std::string s, std::int32_t type) {
    pieces.push_back(std::move(s));
    scores.push_back(-float(pieces.size()));
    types.push_back(type);
  };
  piece("<unk>", 2);
  piece("<s>", 3);
  piece("</s>", 3);
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    piece(buf, 6);
  }
  while (pieces.size() < spec.vocab) piece("\xe2\x96\x81w" + std::to_string(pieces.size()), 1);
  std::vector<const char*> cstr;
  for (auto& s : pieces) cstr.push_back(s.c_str());
  gguf_set_val_str(out, "tokenizer.ggml.model", "llama");
  gguf_set_arr_str(out, "tokenizer.ggml.tokens", cstr.data(), cstr.size());
  gguf_set_arr_data(out, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores.data(), scores.size());
  gguf_set_arr_data(out, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types.data(), types.size());
  gguf_set_val_u32(out, "tokenizer.ggml.unknown_token_id", 0);
  gguf_set_val_u32(out, "tokenizer.ggml.bos_token_id", 1);
  gguf_set_val_u32(out, "tokenizer.ggml.eos_token_id", 2);

  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string tmp = path + ".tmp";
  const bool ok = gguf_write_to_file(out, tmp.c_str(), false);
  gguf_free(out);
  ggml_free(g);
  if (!ok) throw std::runtime_error("ensure_model: cannot write " + tmp);
  fs::rename(tmp, path);  // a half-written model is never found under the final name
  return path;
}

namespace {
void drop_below_error(ggml_log_level level, const char* text, void*) {
  if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}
}  // namespace

void quiet_llama_logs() { llama_log_set(drop_below_error, nullptr); }

llama_context_params context_params(const context_options& o) {
  llama_context_params p = llama_context_default_params();
  p.n_ctx = o.n_ctx;
  p.n_batch = o.n_batch;
  p.n_ubatch = o.n_batch;
  p.n_seq_max = o.seqs;
  p.kv_unified = true;
  p.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
  p.type_k = o.kv_type;
  p.type_v = o.kv_type;
  if (o.threads) {
    p.n_threads = int(o.threads);
    p.n_threads_batch = int(o.threads);
  }
  p.no_perf = true;
  return p;
}

bool decode_span(llama_context* ctx, llama_seq_id seq, const std::vector<llama_token>& tokens, std::size_t from,
                 std::size_t to, const std::vector<std::size_t>& cuts) {
  const std::size_t most = llama_n_batch(ctx);
  llama_batch batch = llama_batch_init(std::int32_t(most), 0, 1);
  bool ok = true;
  std::size_t at = from;
  while (ok && at < to) {
    std::size_t end = std::min(to, at + most);
    for (std::size_t c : cuts)
      if (c > at && c < end) end = c;
    batch.n_tokens = 0;
    for (std::size_t i = at; i < end; ++i) {
      const int k = batch.n_tokens++;
      batch.token[k] = tokens[i];
      batch.pos[k] = llama_pos(i);
      batch.n_seq_id[k] = 1;
      batch.seq_id[k][0] = seq;
      batch.logits[k] = i + 1 == to;
    }
    ok = llama_decode(ctx, batch) == 0;
    at = end;
  }
  llama_batch_free(batch);
  return ok;
}

llama_token greedy(llama_context* ctx, std::vector<float>* logits_out) {
  const float* logits = llama_get_logits_ith(ctx, -1);
  const int n = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
  if (logits_out) logits_out->assign(logits, logits + n);
  return llama_token(std::max_element(logits, logits + n) - logits);
}

bool decode_one(llama_context* ctx, llama_seq_id seq, llama_token token, llama_pos pos) {
  llama_batch batch = llama_batch_init(1, 0, 1);
  batch.n_tokens = 1;
  batch.token[0] = token;
  batch.pos[0] = pos;
  batch.n_seq_id[0] = 1;
  batch.seq_id[0][0] = seq;
  batch.logits[0] = 1;
  const bool ok = llama_decode(ctx, batch) == 0;
  llama_batch_free(batch);
  return ok;
}

std::vector<llama_token> random_tokens(std::uint64_t seed, std::size_t count, std::uint32_t vocab) {
  std::vector<llama_token> out(count);
  std::uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& t : out) t = llama_token(3 + splitmix(s) % (vocab - 3));
  return out;
}

}  // namespace llama_chat
