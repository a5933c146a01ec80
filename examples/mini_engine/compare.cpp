// The comparison run shared by the mini_engine demo and bench/e2e.
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "driver.hpp"
#include "metrics_server.hpp"
#ifdef MINI_WITH_REDIS
#include "attnstore/shared/store_remote.hpp"
#endif

namespace mini {

// The default seeded model with the attention variant the options name.
llama_config seeded_config(const compare_options& o) {
  llama_config c;
  if (o.attention == "window") {
    c.attention = attention_kind::window;
    c.window = o.window;
  } else if (o.attention == "latent") {
    c.attention = attention_kind::latent;
    c.n_kv_heads = c.n_heads;  // every head reconstructs its own key and value
    c.kv_lora_rank = o.kv_lora_rank;
    c.rope_dims = o.rope_dims;
  } else if (o.attention != "full") {
    throw std::invalid_argument("unknown attention '" + o.attention + "' (full, window, latent)");
  }
  c.validate();
  return c;
}

namespace {

// One serving node of a mode: its store, hooks and engine (recompute and resident: the
// engine alone).
struct node {
  std::unique_ptr<attnstore::store> kv;
  std::unique_ptr<attnstore::copy_backend> copier;
  std::unique_ptr<attnstore::hooks> hk;
  std::unique_ptr<engine> eng;
  std::string dir;
#ifdef MINI_WITH_REDIS
  std::shared_ptr<attnstore::shared::store_remote> remote;
#endif
  // The write-behind of the turns so far has reached the shared tier (between rounds: a
  // conversation's next turn comes after its user read the reply and typed).
  void settle() {
#ifdef MINI_WITH_REDIS
    if (remote) (void)remote->tier().flush(std::chrono::milliseconds{30000});
#endif
  }
};

bool store_mode(const std::string& mode) {
  return mode == "store-dram" || mode == "store-ssd" || mode == "nodes-local" || mode == "nodes-shared";
}

}  // namespace

compare_result run_compare(const compare_options& o) {
  if (!o.model_dir.empty() && o.attention != "full")
    throw std::invalid_argument("--attention " + o.attention +
                                " needs seeded weights (checkpoints are full attention)");
  llama_model model =
      o.model_dir.empty() ? llama_model::random(seeded_config(o), o.model_seed) : llama_model::load(o.model_dir);
  const auto& cfg = model.config();
  std::vector<request> work =
      o.trace.empty() ? make_workload(o.workload, cfg.vocab_size) : load_jsonl(o.trace, cfg.vocab_size);
  std::size_t max_tokens = 0;
  {
    std::map<std::string, std::size_t> len;
    for (const auto& r : work)
      max_tokens = std::max(max_tokens, len[r.session] += r.user_tokens.size() + r.reply_tokens);
  }
  if (max_tokens + 1 > std::size_t(cfg.max_seq))
    throw std::runtime_error("workload: a conversation reaches " + std::to_string(max_tokens) +
                             " tokens, beyond the model's max_seq " + std::to_string(cfg.max_seq));
  const std::uint32_t page_size = 16;
  const std::uint32_t pages = std::uint32_t(4 * (max_tokens / page_size + 4));  // current + prefetched request + slack

  compare_result result;
  [[maybe_unused]] const attnstore::hash128 run_fleet{
      std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) | 1, std::uint64_t(::getpid())};
  // --metrics-port: the store in use (or the last one's final text) on 127.0.0.1.
  std::mutex metrics_mutex;
  const attnstore::store* metrics_store = nullptr;
  std::string metrics_last;
  std::unique_ptr<metrics_server> metrics;
  if (o.metrics_port)
    metrics = std::make_unique<metrics_server>(o.metrics_port, [&] {
      std::lock_guard lock(metrics_mutex);
      if (!metrics_store) return metrics_last;
      std::string text;
      metrics_store->metrics(text);
      return text;
    });
  std::vector<std::vector<std::vector<std::uint32_t>>> replies;
  std::vector<std::vector<std::pair<std::vector<float>, std::size_t>>> logits_by_mode;
  for (const auto& mode : o.modes) {
    engine_options eo;
    eo.page_size = page_size;
    eo.num_pages = mode == "resident" ? std::uint32_t(pages * std::max(1, o.workload.sessions)) : pages;
    if (mode == "recompute") {
      eo.mode = kv_mode::recompute;
    } else if (mode == "resident") {
      eo.mode = kv_mode::resident;
    } else if (store_mode(mode)) {
      eo.mode = kv_mode::store;
    } else {
      throw std::invalid_argument("unknown mode '" + mode +
                                  "' (recompute, resident, store-dram, store-ssd, nodes-local, nodes-shared)");
    }
    const bool multi = mode == "nodes-local" || mode == "nodes-shared";
    const int n_nodes = multi ? std::max(1, o.nodes) : 1;
    std::vector<node> nodes(static_cast<std::size_t>(n_nodes));
    for (int ni = 0; ni < n_nodes && store_mode(mode); ++ni) {
      node& nd = nodes[std::size_t(ni)];
      attnstore::store_config sc;
      sc.geometry = kv_geometry_of(cfg);
      sc.geometry.window_tails = o.window_tails;
      sc.model_name = o.model_dir.empty() ? "mini-llama-seed-" + std::to_string(o.model_seed) : o.model_dir;
      if (cfg.attention != attention_kind::full) sc.model_name += "-" + o.attention;
      sc.rope = rope_spec_of(cfg).to_string();
      sc.dram_bytes = o.dram_mib << 20;
      const std::string leaf = multi ? mode + "-" + std::to_string(ni) : mode;
      nd.dir =
          o.ssd_dir.empty()
              ? (std::filesystem::temp_directory_path() / ("attnstore-mini-" + std::to_string(::getpid()) + "-" + leaf))
                    .string()
              : o.ssd_dir + "/" + leaf;
      std::filesystem::remove_all(nd.dir);
      sc.ssd_directory = nd.dir;
      sc.ssd_bytes = o.ssd_mib << 20;
      // store-ssd measures loads from SSD: the prefetcher would promote the demoted
      // sessions back while they wait in the queue (bench/micro/prefetch_bench measures that).
      sc.prefetch = mode != "store-ssd";
      if (mode == "nodes-shared") {
#ifdef MINI_WITH_REDIS
        if (o.redis_seed.empty()) throw std::invalid_argument("nodes-shared needs --redis HOST:PORT");
        attnstore::shared::shared_tier_config t;
        t.cluster.seeds = {o.redis_seed};
        if (const char* u = std::getenv("ATTNSTORE_REDIS_USER")) t.cluster.user = u;
        if (const char* pw = std::getenv("ATTNSTORE_REDIS_PASSWORD")) t.cluster.password = pw;
        t.model = attnstore::store_model_id(sc);
        // One fleet per run (every node's): sessions of an earlier run on the same
        // cluster are not found, so the figures are this run's alone.
        t.fleet_secret = run_fleet;
        t.tokens_per_block = sc.geometry.validated().tokens_per_block;
        t.block_bytes = sc.geometry.validated().block_bytes();
        t.cluster.max_value_bytes = std::max<std::size_t>(t.cluster.max_value_bytes, t.block_bytes + (1u << 20));
        nd.remote = std::make_shared<attnstore::shared::store_remote>(t);
        sc.remote = nd.remote;
#else
        throw std::invalid_argument("nodes-shared: built without hiredis (attnstore::redis)");
#endif
      }
      nd.kv = std::make_unique<attnstore::store>(sc);
      std::string why;
      nd.copier = attnstore::make_copy_backend(&why);
      attnstore::hooks_config hc;
      hc.preload_layers = o.preload_layers;
      hc.rope = rope_spec_of(cfg);
      nd.hk = std::make_unique<attnstore::hooks>(*nd.kv, *nd.copier, hc);
      result.copy_backend = std::string(nd.copier->name());
      result.io_backend = std::string(nd.kv->io_backend_name());
      result.dram_pinning = std::string(nd.kv->dram_pinning());
    }
    if (store_mode(mode)) {
      std::lock_guard lock(metrics_mutex);
      metrics_store = nodes[0].kv.get();
    }
    eo.context_limit = o.context_limit;
    eo.sink_tokens = o.sink_tokens;
    eo.forced_replies = o.context_limit > 0;  // same conversation in every mode, to compare logits
    for (node& nd : nodes) {
      engine_options e = eo;
      e.hooks = nd.hk.get();
      e.store = nd.kv.get();
      e.demote_after_turn = mode == "store-ssd";
      e.overlap_next = o.overlap_next;
      nd.eng = std::make_unique<engine>(model, e);
    }
    if (o.verbose)
      std::printf("\n[%s%s]\n", mode.c_str(), multi ? (", " + std::to_string(n_nodes) + " nodes").c_str() : "");
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<turn_result> turns;
    std::vector<std::vector<std::uint32_t>> mode_replies;
    // Round-robin: turn k of a conversation goes to node (its first-seen index + k) mod N.
    std::map<std::string, int> home, turn_no;
    for (std::size_t i = 0; i < work.size();) {
      // One queue per round of turns: what a scheduler would hold at once.
      std::size_t j = i;
      std::map<std::string, int> in_round;
      while (j < work.size() && !in_round[work[j].session]++) ++j;
      std::vector<turn_result> res(j - i);
      std::vector<std::vector<std::size_t>> by_node(nodes.size());
      for (std::size_t k = i; k < j; ++k) {
        const std::string& sn = work[k].session;
        if (!home.count(sn)) home[sn] = int(home.size());
        by_node[std::size_t((home[sn] + turn_no[sn]++) % n_nodes)].push_back(k);
      }
      for (std::size_t ni = 0; ni < nodes.size(); ++ni) {
        if (by_node[ni].empty()) continue;
        std::vector<request> q;
        for (std::size_t k : by_node[ni]) q.push_back(work[k]);
        auto part = nodes[ni].eng->run_queue(q);
        for (std::size_t x = 0; x < part.size(); ++x) {
          res[by_node[ni][x] - i] = std::move(part[x]);
          // The front end holds the conversation: every node sees its whole history.
          const std::string& sn = work[by_node[ni][x]].session;
          for (std::size_t other = 0; other < nodes.size(); ++other)
            if (other != ni) nodes[other].eng->edit_history(sn, nodes[ni].eng->history(sn));
        }
      }
      for (node& nd : nodes) nd.settle();
      for (std::size_t k = 0; k < res.size(); ++k) {
        const auto& t = res[k];
        if (o.verbose)
          std::printf(
              "  %-11s history %5zu  prompt %5zu  reused %5zu (DRAM %3u / SSD %3u blocks)  prefilled %5zu  "
              "TTFT %8.1f ms%s\n",
              work[i + k].session.c_str(), t.history_tokens, t.prompt_tokens, t.reused_tokens, t.dram_blocks,
              t.ssd_blocks, t.prefill_tokens, t.ttft_ms,
              t.save_status == attnstore::errc::ok || eo.mode != kv_mode::store
                  ? ""
                  : ("  save: " + std::string(attnstore::to_string(t.save_status))).c_str());
        mode_replies.push_back(t.reply);
      }
      turns.insert(turns.end(), res.begin(), res.end());
      i = j;
    }
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.verbose)
      for (const auto& t : turns)
        if (t.truncated) {
          std::printf("  (truncations happened in this run: the conversation outgrew the %zu-token window)\n",
                      o.context_limit);
          break;
        }
    result.runs.push_back(summarize(mode, std::move(turns), wall, o.long_history));
    if (!replies.empty() && mode_replies != replies.front()) result.outputs_identical = false;
    replies.push_back(std::move(mode_replies));
    logits_by_mode.push_back({});
    for (const auto& t : result.runs.back().turns) logits_by_mode.back().push_back({t.first_logits, t.truncations});
    if (nodes[0].kv) {
      std::lock_guard lock(metrics_mutex);
      metrics_last.clear();
      nodes[0].kv->metrics(metrics_last);
      metrics_store = nullptr;
    }
    for (node& nd : nodes) {
      nd.eng.reset();
      nd.hk.reset();
      nd.kv.reset();
      if (!nd.dir.empty() && o.ssd_dir.empty()) std::filesystem::remove_all(nd.dir);
    }
  }
  if (metrics && o.metrics_hold) {
    // A scraper (tests/metrics/test_scrape.py) waits for this line, then scrapes once.
    const std::uint64_t before = metrics->served();
    std::printf("\nmetrics: final on 127.0.0.1:%u/metrics\n", unsigned(o.metrics_port));
    std::fflush(stdout);
    for (int i = 0; i < 600 && metrics->served() == before; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  // Reuse against recompute over the same kept tokens, on truncated conversations.
  auto index_of = [&](const char* m) -> int {
    for (std::size_t i = 0; i < o.modes.size(); ++i)
      if (o.modes[i] == m) return int(i);
    return -1;
  };
  const int rc = index_of("recompute"), rd = index_of("store-dram");
  if (o.context_limit && rc >= 0 && rd >= 0) {
    double kl_sum = 0;
    std::size_t agree = 0;
    for (std::size_t t = 0; t < logits_by_mode[rd].size(); ++t) {
      if (logits_by_mode[rd][t].second == 0) continue;
      const auto& a = logits_by_mode[rc][t].first;  // recompute: the reference
      const auto& b = logits_by_mode[rd][t].first;
      auto log_softmax = [](const std::vector<float>& x) {
        double m = *std::max_element(x.begin(), x.end()), z = 0;
        for (float v : x) z += std::exp(double(v) - m);
        std::vector<double> out(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) out[i] = double(x[i]) - m - std::log(z);
        return out;
      };
      const auto la = log_softmax(a), lb = log_softmax(b);
      double kl = 0;
      for (std::size_t i = 0; i < la.size(); ++i) kl += std::exp(la[i]) * (la[i] - lb[i]);
      kl_sum += kl;
      result.kl_max = std::max(result.kl_max, kl);
      agree += argmax(a) == argmax(b);
      ++result.truncated_turns;
    }
    if (result.truncated_turns) {
      result.top1_agreement = double(agree) / double(result.truncated_turns);
      result.kl_mean = kl_sum / double(result.truncated_turns);
    }
  }
  return result;
}

bool parse_compare_args(int argc, char** argv, compare_options& o, int& code) {
  auto usage = [&](FILE* f) {
    std::fprintf(f,
                 "usage: %s [--sessions N] [--turns N] [--first-tokens N] [--trace FILE.jsonl] [--model DIR]\n"
                 "          [--modes recompute,resident,store-dram,store-ssd] [--dram-mib N] [--ssd-mib N]\n"
                 "          [--ssd-dir DIR] [--preload-layers N] [--seed N] [--no-overlap] [--context N [--sink N]]\n"
                 "          [--quiet] [--json] [--metrics-port N [--metrics-hold]]\n"
                 "          [--attention full|window|latent] [--window N] [--window-tails]\n"
                 "          [--nodes N [--redis HOST:PORT]]\n"
                 "  --attention: the seeded model's layers: full (default), window (even layers attend the\n"
                 "    last --window tokens, default 128; odd ones all) or latent (MLA: one row per token);\n"
                 "  --window-tails: window layers stored only as their last window (a checkpoint per session);\n"
                 "  --metrics-port N: serve the store's metrics (Prometheus text) on 127.0.0.1:N/metrics;\n"
                 "  --metrics-hold: at the end, wait (up to 60 s) until they are scraped once more;\n"
                 "  --nodes N: modes recompute, store-dram (one node), nodes-local (N nodes, each its own\n"
                 "    store, turns round-robin) and, with --redis, nodes-shared (the same with a shared tier on\n"
                 "    that Redis Cluster; ATTNSTORE_REDIS_USER/ATTNSTORE_REDIS_PASSWORD for AUTH)\n",
                 argv[0]);
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--sessions")
        o.workload.sessions = std::stoi(next());
      else if (a == "--turns")
        o.workload.turns = std::stoi(next());
      else if (a == "--first-tokens")
        o.workload.first_user_tokens = std::stoul(next());
      else if (a == "--trace")
        o.trace = next();
      else if (a == "--model")
        o.model_dir = next();
      else if (a == "--dram-mib")
        o.dram_mib = std::stoull(next());
      else if (a == "--ssd-mib")
        o.ssd_mib = std::stoull(next());
      else if (a == "--ssd-dir")
        o.ssd_dir = next();
      else if (a == "--preload-layers")
        o.preload_layers = std::uint32_t(std::stoul(next()));
      else if (a == "--seed")
        o.workload.seed = std::stoull(next());
      else if (a == "--quiet")
        o.verbose = false;
      else if (a == "--no-overlap")
        o.overlap_next = false;
      else if (a == "--context")
        o.context_limit = std::stoul(next());
      else if (a == "--sink")
        o.sink_tokens = std::stoul(next());
      else if (a == "--json")
        o.verbose = false;
      else if (a == "--metrics-port")
        o.metrics_port = std::uint16_t(std::stoul(next()));
      else if (a == "--metrics-hold")
        o.metrics_hold = true;
      else if (a == "--nodes") {
        o.nodes = std::stoi(next());
        if (o.nodes < 1 || o.nodes > 64) throw std::invalid_argument("--nodes must be 1..64");
      } else if (a == "--redis")
        o.redis_seed = next();
      else if (a == "--attention") {
        o.attention = next();
        if (o.attention != "full" && o.attention != "window" && o.attention != "latent")
          throw std::invalid_argument("--attention is '" + o.attention + "', allowed full, window, latent");
      } else if (a == "--window") {
        o.window = std::stoi(next());
        if (o.window < 1) throw std::invalid_argument("--window must be >= 1");
      } else if (a == "--window-tails") {
        o.window_tails = true;
      } else if (a == "--modes") {
        o.modes.clear();
        std::string m = next();
        for (std::size_t p = 0; p <= m.size();) {
          std::size_t c = m.find(',', p);
          if (c == std::string::npos) c = m.size();
          if (c > p) o.modes.push_back(m.substr(p, c - p));
          p = c + 1;
        }
      } else if (a == "--help" || a == "-h") {
        usage(stdout);
        code = 0;
        return false;
      } else {
        throw std::invalid_argument("unknown option " + a);
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: %s\n", argv[0], e.what());
      usage(stderr);
      code = 2;
      return false;
    }
  }
  if (o.nodes > 1 && o.modes == std::vector<std::string>{"recompute", "store-dram", "store-ssd"}) {
    o.modes = {"recompute", "store-dram", "nodes-local"};
    if (!o.redis_seed.empty()) o.modes.push_back("nodes-shared");
  }
  return true;
}

void print_compare(const compare_result& r, const compare_options& o) {
  std::printf("\nKV copies: %s backend; SSD I/O: %s; DRAM tier: %s\n", r.copy_backend.c_str(), r.io_backend.c_str(),
              r.dram_pinning.c_str());
  std::printf("%-11s %10s %10s %9s %9s %15s %14s %8s\n", "mode", "prefilled", "reused", "DRAM blk", "SSD blk",
              "TTFT>=2K (ms)", "prompt tok/s", "wall s");
  const run_summary* base = nullptr;
  for (const auto& s : r.runs) {
    if (s.mode == "recompute") base = &s;
    char ttft[32] = "-";
    if (s.long_turns) std::snprintf(ttft, sizeof(ttft), "%.1f", s.ttft_median_long_ms);
    std::printf("%-11s %10zu %10zu %9zu %9zu %15s %14.0f %8.1f\n", s.mode.c_str(), s.prefill_tokens, s.reused_tokens,
                s.reused_dram_blocks, s.reused_ssd_blocks, ttft, s.prompt_tokens_per_s, s.wall_s);
  }
  if (base && base->long_turns)
    for (const auto& s : r.runs)
      if (&s != base && s.long_turns)
        std::printf("%s: median TTFT of turns with >= %zu history tokens %.1f%% lower than recompute (%zu turns)\n",
                    s.mode.c_str(), o.long_history, 100.0 * (1 - s.ttft_median_long_ms / base->ttft_median_long_ms),
                    s.long_turns);
  if (o.context_limit) {
    std::printf("replies are forced from the trace (--context): every mode sees the same conversation\n");
    if (r.truncated_turns)
      std::printf(
          "after truncation (%zu turns): reuse vs recompute over the same kept tokens: top-1 agreement "
          "%.1f%%, KL mean %.4f, max %.4f nats\n",
          r.truncated_turns, 100 * r.top1_agreement, r.kl_mean, r.kl_max);
  } else {
    std::printf("greedy replies identical across modes: %s\n", r.outputs_identical ? "yes" : "NO");
  }
}

void print_compare_json(const compare_result& r) {
  auto find = [&](const char* m) -> const run_summary* {
    for (const auto& s : r.runs)
      if (s.mode == m) return &s;
    return nullptr;
  };
  const run_summary* rc = find("recompute");
  const run_summary* rd = find("store-dram");
  const run_summary* rs = find("store-ssd");
  const run_summary* nl = find("nodes-local");
  const run_summary* ns = find("nodes-shared");
  auto num = [](const run_summary* s, double run_summary::*f) { return s ? s->*f : -1.0; };
  std::printf("{\"ttft_recompute_ms\": %.3f, \"ttft_reuse_dram_ms\": %.3f, \"ttft_reuse_ssd_ms\": %.3f, ",
              num(rc, &run_summary::ttft_median_long_ms), num(rd, &run_summary::ttft_median_long_ms),
              num(rs, &run_summary::ttft_median_long_ms));
  if (nl || ns)  // several nodes, turns round-robin: local tiers only, and with the shared tier
    std::printf(
        "\"ttft_nodes_local_ms\": %.3f, \"ttft_nodes_shared_ms\": %.3f, \"reused_tokens_nodes_local\": %zu, "
        "\"reused_tokens_nodes_shared\": %zu, \"reused_tokens_single_node\": %zu, ",
        num(nl, &run_summary::ttft_median_long_ms), num(ns, &run_summary::ttft_median_long_ms),
        nl ? nl->reused_tokens : 0, ns ? ns->reused_tokens : 0, rd ? rd->reused_tokens : 0);
  std::printf("\"prefill_tokens_recompute\": %zu, \"prefill_tokens_reuse\": %zu, ", rc ? rc->prefill_tokens : 0,
              rd ? rd->prefill_tokens : (rs ? rs->prefill_tokens : 0));
  std::printf(
      "\"long_turns\": %zu, \"prompt_tokens_per_s_recompute\": %.1f, \"prompt_tokens_per_s_reuse_dram\": %.1f, "
      "\"prompt_tokens_per_s_reuse_ssd\": %.1f, \"outputs_identical\": %s, \"copy_backend\": \"%s\", "
      "\"io_backend\": \"%s\", \"truncated_turns\": %zu, \"top1_agreement\": %.4f, \"kl_mean\": %.6f}\n",
      rc ? rc->long_turns : 0, num(rc, &run_summary::prompt_tokens_per_s), num(rd, &run_summary::prompt_tokens_per_s),
      num(rs, &run_summary::prompt_tokens_per_s), r.outputs_identical ? "true" : "false", r.copy_backend.c_str(),
      r.io_backend.c_str(), r.truncated_turns, r.top1_agreement, r.kl_mean);
}

}  // namespace mini
