// Workloads and measurement for the mini engine: multi-turn conversations (generated or
// read from JSON lines), run in each KV mode, summarised the same way for the demo and
// for bench/e2e.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine.hpp"

namespace mini {

struct workload_options {
  int sessions = 4;
  int turns = 6;
  std::size_t first_user_tokens = 1600;  ///< system prompt + first message (a long system prompt or document)
  std::size_t user_min = 60, user_max = 240;
  std::size_t reply_min = 40, reply_max = 200;
  std::uint64_t seed = 1;
};

/// Turn-major interleaving (every session's turn 1, then turn 2...), so several
/// sessions are in flight and each one's history must survive the others' turns.
std::vector<request> make_workload(const workload_options& o, int vocab_size);

/// JSON lines: {"session": "...", "turn": 1, "input_tokens": 120, "output_tokens": 80}
/// (other keys, e.g. "timestamp", ignored), in arrival order. Token ids are synthesized
/// (logs carry counts, not text). Throws std::runtime_error naming the line.
std::vector<request> load_jsonl(const std::string& path, int vocab_size);

struct run_summary {
  std::string mode;
  std::vector<turn_result> turns;
  double wall_s = 0;
  std::size_t prefill_tokens = 0, reused_tokens = 0, prompt_tokens = 0;
  std::size_t reused_dram_blocks = 0, reused_ssd_blocks = 0;
  double ttft_median_long_ms = 0;  ///< median TTFT over turns with >= long_history tokens
  std::size_t long_turns = 0;
  double prefill_s = 0;            ///< sum of TTFTs
  double prompt_tokens_per_s = 0;  ///< prompt tokens served per second of TTFT
};

run_summary summarize(const std::string& mode, std::vector<turn_result> turns, double wall_s,
                      std::size_t long_history = 2048);

}  // namespace mini

namespace mini {

/// Everything one comparison run needs; the mini_engine demo and bench/e2e share it.
struct compare_options {
  workload_options workload;
  std::string trace;      ///< JSON-lines file instead of the generator
  std::string model_dir;  ///< checkpoint instead of seeded weights
  std::uint64_t model_seed = 7;
  /// Seeded weights only: "full" (the Llama), "window" (gpt-oss's alternating
  /// sliding-window and full layers) or "latent" (MLA: one compressed row per token).
  std::string attention = "full";
  int window = 128;  ///< --window: tokens a windowed layer attends
  /// --window-tails: the store keeps a windowed layer's KV only as its last window,
  /// in a checkpoint beside the session (kv_geometry::window_tails)
  bool window_tails = false;
  int kv_lora_rank = 64;                                                   ///< latent: c_kv dimensions
  int rope_dims = 16;                                                      ///< latent: k_rope dimensions
  std::vector<std::string> modes{"recompute", "store-dram", "store-ssd"};  ///< also "resident"
  std::uint64_t dram_mib = 512;
  std::uint64_t ssd_mib = 2048;
  std::string ssd_dir;  ///< default: a fresh directory under /tmp
  std::uint32_t preload_layers = 2;
  std::size_t long_history = 2048;
  bool overlap_next = true;       ///< --no-overlap: loads never overlap the previous request
  std::size_t context_limit = 0;  ///< --context N: truncate conversations past N tokens
  std::size_t sink_tokens = 64;
  bool verbose = true;             ///< per-turn lines
  std::uint16_t metrics_port = 0;  ///< serve store metrics on 127.0.0.1:port (0: off)
  bool metrics_hold = false;       ///< wait at the end for one more scrape
  /// Several nodes (modes nodes-local, nodes-shared): each its own engine, DRAM and SSD;
  /// a conversation's turns go round-robin over them. nodes-shared gives every store the
  /// shared tier on the Redis Cluster at redis_seed (ATTNSTORE_REDIS_USER/PASSWORD).
  int nodes = 1;
  std::string redis_seed;
};

struct compare_result {
  std::vector<run_summary> runs;
  bool outputs_identical = true;  ///< every turn's reply equal across modes
  // With a context limit: first-token logits of reuse (store-dram) against recompute,
  // over turns whose history was truncated at least once.
  std::size_t truncated_turns = 0;
  double top1_agreement = 0;       ///< fraction of those turns with the same argmax
  double kl_mean = 0, kl_max = 0;  ///< KL(recompute || reuse) in nats
  std::string copy_backend, io_backend, dram_pinning;
};

/// Runs the workload once per mode on fresh stores and engines.
compare_result run_compare(const compare_options& o);
/// Parses the shared command line (see --help). Returns false to exit with `code`.
bool parse_compare_args(int argc, char** argv, compare_options& o, int& code);
void print_compare(const compare_result& r, const compare_options& o);
void print_compare_json(const compare_result& r);

}  // namespace mini
