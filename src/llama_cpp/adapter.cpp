// attnstore behind llama.cpp: bind() (layout + fingerprint), restore() and save().
// The only llama.cpp internals relied on are the per-sequence state blob that
// llama_state_seq_get_data writes and llama_state_seq_set_data reads (src/llama-kv-cache.cpp
// state_write / state_read at the pinned commit); both directions are checked against
// the binding, and llama.cpp itself refuses a blob whose types or row sizes differ.
#include "attnstore/llama_cpp.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "attnstore/format/manifest.hpp"
#include "attnstore/hash.hpp"

#ifndef ATTNSTORE_LLAMA_CPP_VERSION
#define ATTNSTORE_LLAMA_CPP_VERSION "unknown"
#endif

namespace attnstore::llama_cpp {
namespace {

constexpr std::uint32_t state_magic = 0xaf143cd8;  // llama-context.cpp io_magic

/// XXH3-128 of a whole file (mapped, so the page cache is read in place).
hash128 hash_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("llama_cpp::bind: cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    ::close(fd);
    throw std::runtime_error("llama_cpp::bind: cannot read " + path);
  }
  void* map = ::mmap(nullptr, std::size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw std::runtime_error("llama_cpp::bind: cannot map " + path + ": " + std::strerror(errno));
  ::madvise(map, std::size_t(st.st_size), MADV_SEQUENTIAL);
  const hash128 h = hash_bytes128(map, std::size_t(st.st_size));
  ::munmap(map, std::size_t(st.st_size));
  return h;
}

std::int64_t meta_int(const llama_model* model, const std::string& key, std::int64_t fallback) {
  char buf[64];
  if (llama_model_meta_val_str(model, key.c_str(), buf, sizeof buf) <= 0) return fallback;
  return std::strtoll(buf, nullptr, 10);
}

std::string meta_str(const llama_model* model, const char* key) {
  char buf[256];
  return llama_model_meta_val_str(model, key, buf, sizeof buf) > 0 ? std::string(buf) : std::string();
}

/// Bounds-checked reader over a state blob; any overrun makes ok() false.
struct blob_reader {
  const std::uint8_t* p;
  const std::uint8_t* end;
  bool good = true;
  template <class T>
  T get() noexcept {
    T v{};
    if (std::size_t(end - p) < sizeof(T)) {
      good = false;
      return v;
    }
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  const std::uint8_t* take(std::size_t bytes) noexcept {
    if (std::size_t(end - p) < bytes) {
      good = false;
      return nullptr;
    }
    const std::uint8_t* at = p;
    p += bytes;
    return at;
  }
};

struct blob_writer {
  std::uint8_t* p;
  template <class T>
  void put(T v) noexcept {
    std::memcpy(p, &v, sizeof(T));
    p += sizeof(T);
  }
};

std::uint64_t now_ns() noexcept {
  return std::uint64_t(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

std::span<const token_id> as_token_ids(std::span<const llama_token> tokens) noexcept {
  // int32 and uint32 may alias; negative ids are refused by the callers first.
  return {reinterpret_cast<const token_id*>(tokens.data()), tokens.size()};
}

bool any_negative(std::span<const llama_token> tokens) noexcept {
  for (llama_token t : tokens)
    if (t < 0) return true;
  return false;
}

}  // namespace

std::string_view llama_cpp_version() noexcept { return ATTNSTORE_LLAMA_CPP_VERSION; }

void model_binding::configure(store_config& cfg) const {
  cfg.geometry = geometry;
  cfg.model_name = fingerprint;
  cfg.rope = "none";  // keys are stored after RoPE; the RoPE settings are in the fingerprint
  cfg.keys_pre_rope = false;
  cfg.tp_rank = 0;
  cfg.tp_size = 1;
}

model_binding bind(const llama_model* model, const llama_context_params& params, const std::string& gguf_path,
                   std::uint32_t tokens_per_block) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("llama_cpp::bind: " + why); };
  if (!model) fail("no model");
  if (llama_model_is_recurrent(model) || llama_model_is_hybrid(model))
    fail("recurrent and hybrid memory are not supported (only one standard KV cache)");
  if (llama_model_is_diffusion(model) || llama_model_has_encoder(model))
    fail("diffusion and encoder-decoder models are not supported");
  if (llama_model_n_swa(model) > 0) fail("sliding-window attention is not supported yet (two KV caches)");
  const auto rope_type = llama_model_rope_type(model);
  if (rope_type != LLAMA_ROPE_TYPE_NONE && rope_type != LLAMA_ROPE_TYPE_NORM && rope_type != LLAMA_ROPE_TYPE_NEOX)
    fail("M-RoPE and vision RoPE are not supported (cells carry 2-D positions)");
  if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_AUTO)
    fail(
        "flash_attn_type AUTO: set it ENABLED or DISABLED (the V layout depends on it and llama.h does not say "
        "what AUTO chose)");

  model_binding b;
  b.layers = std::uint32_t(llama_model_n_layer(model));
  const std::string arch = meta_str(model, "general.architecture");
  const std::int64_t n_head = llama_model_n_head(model), n_head_kv = llama_model_n_head_kv(model);
  if (n_head <= 0 || n_head_kv <= 0 || b.layers == 0) fail("model reports no attention heads or layers");
  const std::int64_t head_k = meta_int(model, arch + ".attention.key_length", llama_model_n_embd(model) / n_head);
  const std::int64_t head_v = meta_int(model, arch + ".attention.value_length", llama_model_n_embd(model) / n_head);
  const std::int64_t k_elems = head_k * n_head_kv;
  b.v_elements = std::uint32_t(head_v * n_head_kv);
  b.type_k = params.type_k;
  b.type_v = params.type_v;
  b.k_row_bytes = ggml_row_size(ggml_type(params.type_k), k_elems);
  b.v_row_bytes = ggml_row_size(ggml_type(params.type_v), b.v_elements);
  if (b.k_row_bytes != b.v_row_bytes || b.type_k != b.type_v)
    fail("K and V rows differ in type or size (" + std::to_string(b.k_row_bytes) + " and " +
         std::to_string(b.v_row_bytes) + " bytes); attnstore stores K and V of one shape");
  b.v_trans = params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED;
  if (b.v_trans && ggml_is_quantized(ggml_type(params.type_v)))
    fail("quantized V needs flash attention (llama.cpp refuses it too)");
  b.streams = params.kv_unified ? 1 : std::max<std::uint32_t>(1, params.n_seq_max);
  b.max_cells = params.n_ctx;

  kv_geometry g;
  g.num_layers = b.layers;
  g.tokens_per_block = tokens_per_block;
  switch (ggml_type(params.type_k)) {
    case GGML_TYPE_F16:
      g.dtype = dtype::f16;
      break;
    case GGML_TYPE_BF16:
      g.dtype = dtype::bf16;
      break;
    case GGML_TYPE_F32:
      g.dtype = dtype::f32;
      break;
    default:
      g.dtype = dtype::bytes;  // quantized rows: stored as llama.cpp lays them out
  }
  if (g.dtype == dtype::bytes) {
    g.num_kv_heads = 1;
    g.head_dim = std::uint32_t(b.k_row_bytes);
  } else {
    g.num_kv_heads = std::uint32_t(n_head_kv);
    g.head_dim = std::uint32_t(head_k);
  }
  b.geometry = g.validated();

  // Everything that makes these KV bytes valid, readable in a store's logs.
  char rope[256];
  std::snprintf(rope, sizeof rope, "rope=%d/%d/%g/%g/%g/%g/%g/%g/%u", int(rope_type), int(params.rope_scaling_type),
                double(params.rope_freq_base), double(params.rope_freq_scale), double(params.yarn_ext_factor),
                double(params.yarn_attn_factor), double(params.yarn_beta_fast), double(params.yarn_beta_slow),
                params.yarn_orig_ctx);
  b.fingerprint = "llama.cpp " + std::string(llama_cpp_version()) + " gguf=" + format::hex128(hash_file(gguf_path)) +
                  " k=" + ggml_type_name(ggml_type(params.type_k)) + " v=" + ggml_type_name(ggml_type(params.type_v)) +
                  " v_trans=" + (b.v_trans ? "1" : "0") + " streams=" + std::to_string(b.streams) + " " + rope;
  return b;
}

session_cache::session_cache(store& kv, llama_context* ctx, const model_binding& binding, llama_seq_id scratch_seq)
    : store_(kv), ctx_(ctx), binding_(binding), scratch_(scratch_seq) {
  const kv_geometry& g = kv.geometry();
  kv_geometry want = binding.geometry;
  if (want.tokens_per_block == 0) want.tokens_per_block = g.tokens_per_block;
  const model_id expected = make_model_id(model_descriptor{binding.fingerprint, g, "none", false, 0, 1});
  if (!(g == want) || !(kv.model() == expected))
    throw std::invalid_argument("llama_cpp::session_cache: the store was not configured with this binding (" +
                                binding.fingerprint + ")");
  if (!ctx) throw std::invalid_argument("llama_cpp::session_cache: no context");
  if (scratch_ >= 0 && (binding.streams != 1 || std::uint32_t(scratch_) >= llama_n_seq_max(ctx)))
    throw std::invalid_argument(
        "llama_cpp::session_cache: the scratch sequence must exist and share the KV stream (kv_unified)");
  binding_.geometry = g;
  binding_.max_cells = llama_n_ctx_seq(ctx);
  const std::uint32_t max_blocks = g.blocks_for(binding_.max_cells) + 1;
  views_.resize(max_blocks);
  lease_ = read_lease(max_blocks);
  payloads_.resize(max_blocks);
}

restore_result session_cache::restore(const session_key& session, std::span<const llama_token> prompt,
                                      llama_seq_id seq) noexcept {
  const std::uint64_t t0 = now_ns();
  restore_result out;
  llama_memory_t mem = llama_get_memory(ctx_);
  if (seq < 0 || std::uint32_t(seq) >= llama_n_seq_max(ctx_) || seq == scratch_ || any_negative(prompt)) {
    out.status = errc::invalid_argument;
    return out;
  }
  llama_memory_seq_rm(mem, seq, -1, -1);
  if (prompt.size() < 2) return out;
  // Leave the last prompt token to the engine: its logits start the reply.
  const std::size_t usable = std::min<std::size_t>(prompt.size() - 1, binding_.max_cells);
  const std::uint32_t want_views =
      std::min<std::uint32_t>(std::uint32_t(views_.size()), store_.geometry().blocks_for(usable));
  get_result got =
      store_.acquire(session, as_token_ids(prompt.first(usable)), std::span(views_).first(want_views), lease_);
  out.status = got.status == errc::not_found ? errc::ok : got.status;
  // A truncated view moves keys to new positions; llama.cpp's keys are stored after
  // RoPE, so the restore ends at the first block that would need re-rotation.
  std::uint64_t tokens = 0;
  std::uint32_t blocks = 0;
  for (; blocks < got.blocks; ++blocks) {
    const block_view& v = views_[blocks];
    if (v.shift != 0 || v.first != 0 || v.position != tokens) break;
    tokens += v.tokens;
  }
  tokens = std::min<std::uint64_t>(tokens, usable);
  if (tokens == 0) {
    lease_.release();
    stats_.restore_ns += now_ns() - t0;
    return out;
  }

  const kv_geometry& g = store_.geometry();
  const std::size_t row = binding_.k_row_bytes, n = std::size_t(tokens);
  const std::size_t el = ggml_type_size(ggml_type(binding_.type_v));
  const std::size_t layer_data = 4 + 8 + n * row;  // type, row size, rows (K, or V not transposed)
  const std::size_t v_layer_data = binding_.v_trans ? 4 + 4 + 4 + n * binding_.v_elements * el : layer_data;
  const std::size_t bytes =
      4 + 4 + 4 + 4 * binding_.streams + n * 12 + 8 + binding_.layers * (layer_data + v_layer_data);
  if (blob_.size() < bytes) blob_.resize(bytes);  // grows to the longest restore, then stays
  blob_writer w{blob_.data()};
  w.put<std::uint32_t>(state_magic);
  w.put<std::int32_t>(seq);
  w.put<std::uint32_t>(binding_.streams);
  w.put<std::uint32_t>(std::uint32_t(n));  // stream 0 carries the cells; llama.cpp puts them in seq's stream
  for (std::size_t i = 0; i < n; ++i) {
    w.put<std::int32_t>(std::int32_t(i));
    w.put<std::uint32_t>(1);
    w.put<std::int32_t>(seq);
  }
  w.put<std::uint32_t>(binding_.v_trans ? 1 : 0);
  w.put<std::uint32_t>(binding_.layers);
  const std::size_t half = g.half_layer_bytes();
  // Rows of layer l, K (half 0) or V (half 1), for positions [0, n), block by block.
  auto copy_rows = [&](std::uint32_t l, std::size_t which) {
    std::size_t done = 0;
    for (std::uint32_t b = 0; b < blocks && done < n; ++b) {
      const std::size_t take = std::min<std::size_t>(views_[b].tokens, n - done);
      std::memcpy(w.p, views_[b].payload + l * g.layer_bytes() + which * half, take * row);
      w.p += take * row;
      done += take;
    }
  };
  for (std::uint32_t l = 0; l < binding_.layers; ++l) {
    w.put<std::int32_t>(binding_.type_k);
    w.put<std::uint64_t>(row);
    copy_rows(l, 0);
  }
  for (std::uint32_t l = 0; l < binding_.layers; ++l) {
    w.put<std::int32_t>(binding_.type_v);
    if (!binding_.v_trans) {
      w.put<std::uint64_t>(row);
      copy_rows(l, 1);
      continue;
    }
    w.put<std::uint32_t>(std::uint32_t(el));
    w.put<std::uint32_t>(binding_.v_elements);
    // Transposed: element j of every cell, then element j + 1.
    for (std::uint32_t j = 0; j < binding_.v_elements; ++j) {
      std::size_t done = 0;
      for (std::uint32_t b = 0; b < blocks && done < n; ++b) {
        const std::size_t take = std::min<std::size_t>(views_[b].tokens, n - done);
        const std::byte* src = views_[b].payload + l * g.layer_bytes() + half + j * el;
        for (std::size_t t = 0; t < take; ++t, w.p += el) std::memcpy(w.p, src + t * row, el);
        done += take;
      }
    }
  }
  lease_.release();
  const std::size_t used = std::size_t(w.p - blob_.data());
  if (used != bytes || llama_state_seq_set_data(ctx_, blob_.data(), used, seq) != used) {
    llama_memory_seq_rm(mem, seq, -1, -1);
    out.status = errc::unsupported;
    stats_.restore_ns += now_ns() - t0;
    return out;
  }
  out.tokens = std::uint32_t(n);
  ++stats_.restores;
  stats_.restored_tokens += n;
  stats_.restore_ns += now_ns() - t0;
  return out;
}

errc session_cache::save(const session_key& session, std::span<const llama_token> history, llama_seq_id seq) noexcept {
  const std::uint64_t t0 = now_ns();
  struct timer {
    adapter_stats& s;
    std::uint64_t t0;
    ~timer() { s.save_ns += now_ns() - t0; }
  } timing{stats_, t0};
  llama_memory_t mem = llama_get_memory(ctx_);
  const std::uint64_t n = history.size();
  if (seq < 0 || std::uint32_t(seq) >= llama_n_seq_max(ctx_) || seq == scratch_ || any_negative(history) ||
      n > binding_.max_cells)
    return errc::invalid_argument;
  if (n == 0) return errc::ok;
  if (llama_memory_seq_pos_min(mem, seq) != 0 || llama_memory_seq_pos_max(mem, seq) != llama_pos(n - 1))
    return errc::invalid_argument;
  const kv_geometry& g = store_.geometry();
  const std::span<const token_id> tokens = as_token_ids(history);
  const lookup_result stored = store_.lookup(session, tokens);
  const std::uint32_t first_block = std::uint32_t(stored.tokens / g.tokens_per_block);
  const std::uint64_t from = std::uint64_t(first_block) * g.tokens_per_block;
  if (stored.tokens == n) return errc::ok;  // nothing new

  // Read out the cells of positions [from, n): through the scratch sequence (it shares
  // the cells, nothing is copied) only those; else the whole sequence.
  const llama_seq_id source = scratch_ >= 0 ? scratch_ : seq;
  if (scratch_ >= 0) {
    llama_memory_seq_rm(mem, scratch_, -1, -1);
    llama_memory_seq_cp(mem, seq, scratch_, llama_pos(from), llama_pos(n));
  }
  const std::size_t size = llama_state_seq_get_size(ctx_, source);
  if (blob_.size() < size) blob_.resize(size);
  const std::size_t wrote = size ? llama_state_seq_get_data(ctx_, blob_.data(), size, source) : 0;
  if (scratch_ >= 0) llama_memory_seq_rm(mem, scratch_, -1, -1);
  if (wrote == 0 || wrote > size) return errc::unsupported;

  blob_reader r{blob_.data(), blob_.data() + wrote};
  if (r.get<std::uint32_t>() != state_magic) return errc::unsupported;
  r.get<std::int32_t>();
  if (r.get<std::uint32_t>() != binding_.streams) return errc::unsupported;
  std::uint32_t cells = 0;
  for (std::uint32_t s = 0; s < binding_.streams && r.good && cells == 0; ++s) cells = r.get<std::uint32_t>();
  if (!r.good || cells == 0) return errc::unsupported;
  const std::size_t span = std::size_t(n - from);
  cell_of_.assign(span, -1);
  for (std::uint32_t c = 0; c < cells; ++c) {
    const std::int32_t pos = r.get<std::int32_t>();
    const std::uint32_t ids = r.get<std::uint32_t>();
    if (!r.good || ids == 0 || ids > 64) return errc::unsupported;
    for (std::uint32_t i = 0; i < ids; ++i) r.get<std::int32_t>();
    if (pos < 0 || std::uint64_t(pos) >= n) return errc::invalid_argument;
    if (std::uint64_t(pos) < from) continue;                        // whole-sequence read: an old cell
    if (cell_of_[pos - from] != -1) return errc::invalid_argument;  // one position twice
    cell_of_[pos - from] = std::int32_t(c);
  }
  for (std::int32_t c : cell_of_)
    if (c < 0) return errc::invalid_argument;  // a position missing
  const std::uint32_t v_trans = r.get<std::uint32_t>();
  if (r.get<std::uint32_t>() != binding_.layers || v_trans != (binding_.v_trans ? 1u : 0u) || !r.good)
    return errc::unsupported;
  const std::size_t row = binding_.k_row_bytes;
  const std::size_t el = ggml_type_size(ggml_type(binding_.type_v));
  k_rows_.resize(binding_.layers);
  v_rows_.resize(binding_.layers);
  for (std::uint32_t l = 0; l < binding_.layers; ++l) {
    if (r.get<std::int32_t>() != binding_.type_k || r.get<std::uint64_t>() != row) return errc::unsupported;
    k_rows_[l] = r.take(std::size_t(cells) * row);
  }
  for (std::uint32_t l = 0; l < binding_.layers; ++l) {
    if (r.get<std::int32_t>() != binding_.type_v) return errc::unsupported;
    if (!v_trans) {
      if (r.get<std::uint64_t>() != row) return errc::unsupported;
      v_rows_[l] = r.take(std::size_t(cells) * row);
    } else {
      if (r.get<std::uint32_t>() != el || r.get<std::uint32_t>() != binding_.v_elements) return errc::unsupported;
      v_rows_[l] = r.take(std::size_t(cells) * binding_.v_elements * el);
    }
  }
  if (!r.good) return errc::unsupported;

  const std::uint32_t blocks = g.blocks_for(n) - first_block;
  save_reservation reservation;
  const errc reserved = store_.reserve(session, tokens, first_block, std::span(payloads_).first(blocks), reservation);
  if (reserved != errc::ok) return reserved;
  const std::size_t half = g.half_layer_bytes();
  for (std::uint32_t b = 0; b < blocks; ++b) {
    const std::size_t t_begin = std::size_t(b) * g.tokens_per_block;
    const std::size_t t_end = std::min<std::size_t>(t_begin + g.tokens_per_block, span);
    for (std::uint32_t l = 0; l < binding_.layers; ++l) {
      std::byte* k_dst = payloads_[b] + l * g.layer_bytes();
      std::byte* v_dst = k_dst + half;
      for (std::size_t t = t_begin; t < t_end; ++t) {
        const std::size_t c = std::size_t(cell_of_[t]);
        std::memcpy(k_dst + (t - t_begin) * row, k_rows_[l] + c * row, row);
        if (!v_trans) {
          std::memcpy(v_dst + (t - t_begin) * row, v_rows_[l] + c * row, row);
        } else {
          std::byte* dst = v_dst + (t - t_begin) * row;
          for (std::uint32_t j = 0; j < binding_.v_elements; ++j)
            std::memcpy(dst + j * el, v_rows_[l] + (std::size_t(j) * cells + c) * el, el);
        }
      }
    }
  }
  const errc committed = store_.commit(reservation);
  if (committed == errc::ok) {
    ++stats_.saves;
    stats_.saved_blocks += blocks;
    stats_.extracted_cells += cells;
  }
  return committed;
}

}  // namespace attnstore::llama_cpp
