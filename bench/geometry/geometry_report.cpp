// geometry_report: bytes a real model's history costs in the store, per token, against
// storing every layer in full. Each geometry of bench/geometry/real_models.hpp is saved
// through a real store (DRAM, then demoted to SSD) and its tier usage read back; the
// last line printed is one JSON object keyed by model.
//
//   geometry_report [--tokens N] [--dir PATH]
//
// bytes_per_token_full: what keeping every layer's KV for every token takes (K and V,
// or the latent row), with no header, padding or trimming. bytes_per_token_blocks: the
// SSD tier's used bytes (headers and sector padding included) over the tokens saved;
// bytes_per_token_stored adds the session's one checkpoint (state groups, window tails)
// spread over its tokens.
// checkpoint_bytes: a session's checkpoint (the states of state groups, the window tails
// with window_tails); checkpoint_bytes_stored: the slots it takes (derived from the
// format: its blocks are ordinary blocks). For state groups, "full" counts one state
// per session too, spread over its tokens.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "attnstore/store.hpp"
#include "geometry/real_models.hpp"

using namespace attnstore;

namespace {

struct figures {
  bool stored = false;
  std::string why;
  double full = 0, stored_ssd = 0, stored_dram = 0;
  double checkpoint = 0, checkpoint_stored = 0;  // state groups: per sequence
  std::uint32_t tokens_per_block = 0;
};

// Every layer in full, per token: what a store without groups would keep. State
// groups keep bytes per sequence, not per token: not counted here (see state_bytes).
double full_bytes_per_token(const kv_geometry& g) {
  double t = 0;
  for (const auto& k : g.groups)
    if (k.kind != layer_kind::state)
      t += double(k.num_layers) * double(k.num_kv_heads) * k.head_dim * dtype_size(k.dtype) *
           (k.kind == layer_kind::latent ? 1 : 2);
  return t;
}
double state_bytes_per_sequence(const kv_geometry& g) {
  double t = 0;
  for (const auto& k : g.groups)
    if (k.kind == layer_kind::state) t += double(k.num_layers) * double(k.state_bytes);
  return t;
}

figures measure(const models::real_model& m, std::uint64_t tokens, const std::string& dir) {
  figures f;
  kv_geometry g;
  try {
    g = m.geometry.validated();
  } catch (const std::exception& e) {
    f.why = e.what();
    f.full = full_bytes_per_token(m.geometry);
    return f;
  }
  f.full = full_bytes_per_token(g) + state_bytes_per_sequence(g) / double(tokens);
  f.tokens_per_block = g.tokens_per_block;
  // The hooks keep the states as one checkpoint per session, in ordinary blocks: this
  // many slots (derived from the format, not measured here).
  f.checkpoint = double(g.checkpoint_bytes());
  f.checkpoint_stored =
      double((g.checkpoint_bytes() + g.block_bytes() - 1) / g.block_bytes()) * double(format::slot_bytes(g));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::uint32_t blocks = g.blocks_for(tokens);
  store_config c;
  c.geometry = g;
  c.model_name = m.name;
  c.tp_size = m.tp_size;
  const std::size_t slot = format::slot_bytes(g);
  c.dram_bytes = std::size_t(blocks + 8) * slot;
  c.ssd_directory = dir;
  c.ssd_bytes = std::size_t(blocks + 8) * slot;
  c.background_thread = false;
  c.log = logger{&logger::quiet, nullptr};
  store s(c);
  std::vector<token_id> toks(tokens);
  for (std::size_t i = 0; i < tokens; ++i) toks[i] = token_id((i * 2654435761u) % 150000);
  // Saved in turns of 32 blocks, as an engine would, each extending the history.
  const std::uint32_t per_turn = 32;
  std::vector<std::byte> data(std::size_t(per_turn) * g.block_bytes());
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i * 131 + 7);
  for (std::uint32_t b = 0; b < blocks; b += per_turn) {
    const std::uint32_t n = std::min(per_turn, blocks - b);
    const std::size_t upto = std::min<std::size_t>(tokens, std::size_t(b + n) * g.tokens_per_block);
    if (s.put({"report", "session"}, std::span(toks).first(upto), b,
              std::span(data).first(std::size_t(n) * g.block_bytes())) != errc::ok) {
      f.why = "put failed";
      return f;
    }
  }
  f.stored_dram = double(s.stats().dram_used_bytes) / double(tokens);
  if (s.demote({"report", "session"}) != errc::ok) {
    f.why = "demote failed";
    return f;
  }
  f.stored_ssd = double(s.stats().ssd_used_bytes) / double(tokens);
  f.stored = true;
  (void)s.close();
  std::filesystem::remove_all(dir);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t tokens = 4096;
  std::string dir = (std::filesystem::temp_directory_path() / "attnstore-geometry-report").string();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc)
      tokens = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--dir" && i + 1 < argc)
      dir = argv[++i];
    else {
      std::fprintf(stderr, "usage: geometry_report [--tokens N] [--dir PATH]\n");
      return 2;
    }
  }
  if (tokens == 0) {
    std::fprintf(stderr, "geometry_report: --tokens must be at least 1\n");
    return 2;
  }
  std::string json = "{";
  std::printf("%-30s %10s %12s %14s %14s %7s  %s\n", "model", "tok/block", "full B/tok", "stored B/tok", "(DRAM B/tok)",
              "ratio", "note");
  bool first = true;
  // Every real model, and each with sliding-window groups again with window_tails (its
  // windows kept only before the checkpoint).
  std::vector<models::real_model> runs;
  for (const auto& m : models::all()) {
    runs.push_back(m);
    bool windows = false;
    for (const auto& k : m.geometry.groups) windows |= k.kind == layer_kind::sliding_window;
    if (!windows) continue;
    models::real_model t = m;
    t.name += " (window_tails)";
    t.geometry.window_tails = true;
    t.note = "windows kept only before the checkpoint: resumes only there";
    runs.push_back(t);
  }
  for (const auto& m : runs) {
    const figures f = measure(m, tokens, dir);
    char line[1024];
    if (f.stored) {
      // A session of `tokens` tokens: its blocks and one checkpoint.
      const double with_ckpt = f.stored_ssd + f.checkpoint_stored / double(tokens);
      std::printf("%-30s %10u %12.0f %14.0f %14.0f %7.3f  %s\n", m.name.c_str(), f.tokens_per_block, f.full, with_ckpt,
                  f.stored_dram, with_ckpt / f.full, m.note.c_str());
      std::snprintf(line, sizeof line,
                    "%s\"%s\": {\"tokens\": %" PRIu64
                    ", \"tokens_per_block\": %u, \"bytes_per_token_full\": %.1f, \"bytes_per_token_stored\": %.1f, "
                    "\"bytes_per_token_dram\": %.1f, \"stored_over_full\": %.4f, \"checkpoint_bytes\": %.0f, "
                    "\"checkpoint_bytes_stored\": %.0f, \"bytes_per_token_blocks\": %.1f}",
                    first ? "" : ", ", m.name.c_str(), tokens, f.tokens_per_block, f.full, with_ckpt, f.stored_dram,
                    with_ckpt / f.full, f.checkpoint, f.checkpoint_stored, f.stored_ssd);
    } else {
      std::printf("%-30s %10s %12.0f %14s %14s %7s  refused: %s\n", m.name.c_str(), "-", f.full, "-", "-", "-",
                  f.why.c_str());
      std::snprintf(line, sizeof line,
                    "%s\"%s\": {\"tokens\": %" PRIu64
                    ", \"bytes_per_token_full\": %.1f, \"state_bytes_per_sequence\": %.0f, "
                    "\"bytes_per_token_stored\": null, \"refused\": \"%s\"}",
                    first ? "" : ", ", m.name.c_str(), tokens, f.full, state_bytes_per_sequence(m.geometry),
                    f.why.c_str());
    }
    json += line;
    first = false;
  }
  json += "}";
  std::printf("%s\n", json.c_str());
  return 0;
}
