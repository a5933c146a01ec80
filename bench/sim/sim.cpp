// sim: trace-driven simulation of KV-cache policies (none, lru, scheduler_aware, opt,
// predictive) over the real attnstore index, policies and prefetcher. See docs/sim.md.
//
//   sim --preset paper --json                 the paper's setup; JSON object printed last
//   sim --preset paper --requests 1000000     trace length
//   sim --sweep --svg docs/sim_hit_rate.svg   capacity sweeps, table and plot
//   sim --trace log.jsonl                     replay an imported JSON-lines log
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine_sim.hpp"
#include "fluid_bound.hpp"

using namespace attnstore;
using attnstore::sim::policy_kind;

namespace {

struct cli {
  std::string preset = "paper";
  std::string trace_file, write_trace, svg, csv, markdown;
  std::uint64_t requests = 200000;
  std::uint64_t seed = 1;
  bool json = false, sweep = false, stats_only = false, check = false, open_loop = false, quiet = false;
  bool dram_sweep = true;
  bool bound = false;  // print the fluid bound (fluid_bound.hpp) and exit
  unsigned threads = 2;
  std::vector<policy_kind> policies{policy_kind::none, policy_kind::lru, policy_kind::scheduler_aware, policy_kind::opt,
                                    policy_kind::predictive};
  std::vector<double> ratios;    // sweep points; empty: the default list
  double capacity_ratio = 0;     // 0: absolute sizes
  double session_rate = 0;       // 0: the preset's
  double shared_tier_ratio = 0;  // > 0: the shared tier holds this many working sets
  sim::sim_config config;
};

[[noreturn]] void usage(const std::string& error = {}) {
  if (!error.empty()) std::fprintf(stderr, "sim: %s\n\n", error.c_str());
  std::fprintf(stderr,
               "usage: sim [options]\n"
               "  --preset NAME           trace preset: paper (default), light, heavy, long, think, diurnal,\n"
               "                          shared-prompt (sessions start with one of their app's system prompts)\n"
               "  --requests N            trace length in requests (default 200000)\n"
               "  --seed N                trace seed (default 1)\n"
               "  --rate R                session arrivals per second (default: the preset's)\n"
               "  --trace FILE            replay a JSON-lines log instead (see docs/traces.md)\n"
               "  --open-loop             replay by timestamps (default for --trace)\n"
               "  --write-trace FILE      write the generated trace as JSON lines\n"
               "  --trace-stats           print trace statistics and exit\n"
               "  --policies a,b,...      of none, lru, scheduler_aware, opt, predictive (default all)\n"
               "  --model NAME            llama-13b (0.78 MiB/token, default), llama-65b (2.5 MiB),\n"
               "                          llama-70b (0.31 MiB, GQA), mistral-7b (0.125 MiB)\n"
               "  --dram-gb X             DRAM tier (default 128)\n"
               "  --ssd-tb X              SSD tier (default 10)\n"
               "  --capacity-ratio R      DRAM+SSD = R x working set, split as 128 GB : 10 TB\n"
               "  --tokens-per-block N    block size (default 64)\n"
               "  --eviction-window N     scheduler_aware window in sessions (default: paper rule)\n"
               "  --prefetch-window N     prefetch window in sessions (default: paper rule)\n"
               "  --prefetch-inflight-gb X  bound on prefetch bytes in flight (default 4, at most DRAM/32)\n"
               "  --no-prefetch           scheduler_aware, opt and predictive without the prefetcher\n"
               "  --queue-window N        the engine shows the cache only its first N waiting requests\n"
               "                          (default all); also the eviction window unless set\n"
               "  --horizon S             predictive: horizon in seconds (default: per level, Little's law)\n"
               "  --no-density            predictive: rank by P(return within horizon) only\n"
               "  --min-samples N         predictive: returns seen before learned scores are used (200)\n"
               "  --prefetch-likely N     predictive: prefetch candidates beyond the queue per plan (16; 0 off)\n"
               "  --prefetch-min-p P      predictive: ... whose P(return within the DRAM residence time) >= P (0.5)\n"
               "  --watermark F           DRAM fraction kept free (default 0.02)\n"
               "  --ttl S                 expire sessions idle for S seconds (default off)\n"
               "  --close-on-last         the engine closes a session after its last turn\n"
               "  --no-prefix-sharing     every session stores its own copy of its system prompt (default:\n"
               "                          shared prompt blocks are stored once per tier, reference-counted)\n"
               "  --hint-composing P      the engine says when a user starts typing, for a share P of\n"
               "                          turns (store::hint composing; predictive learns from it)\n"
               "  --hint-left P           ... and when a user leaves, for a share P of sessions\n"
               "  --pcie-gbps X           host-to-GPU bandwidth, all GPUs (default 104 = 4 x 26)\n"
               "  --ssd-read-gbps X       SSD read bandwidth (default 5)\n"
               "  --ssd-write-gbps X      SSD write bandwidth (default 4)\n"
               "  --context N             context window in tokens (default 4096)\n"
               "  --max-batch N           running requests (default 256)\n"
               "  --nodes N               engines, each with its own GPU, DRAM and SSD (default 1); with\n"
               "                          --capacity-ratio, the nodes' DRAM + SSD together are R x working set\n"
               "  --routing R             sticky (default), round-robin (turn k of a session to node\n"
               "                          (home + k) mod N) or random (a node per turn); home = session mod N\n"
               "  --route-seed N          random routing's seed (default 1)\n"
               "  --shared-tier-bytes B   a tier all nodes share (content-addressed blocks, LRU over bytes, as\n"
               "                          Redis allkeys-lru); suffixes K M G T; default 0: none\n"
               "  --shared-tier-ratio X   ... sized X x the working set instead\n"
               "  --shared-tier-gbps X    each node's link to it, per direction (default 12.5: 100 Gb/s)\n"
               "  --shared-tier-latency-us X  per request to it (default 200)\n"
               "  --shared-write-inflight-gb X  write-behind: bytes a node may have in flight (default 8)\n"
               "  --share-policy P        all (default: every session after each turn) or policy (those the\n"
               "                          eviction policy finds worth it: predictive's P(return within the\n"
               "                          share horizon) >= --share-min-p; a declined one when seen typing)\n"
               "  --share-min-p X         predictive's share_min_probability (default 0.1)\n"
               "  --share-horizon-s X     predictive's share_horizon_s (default 86400)\n"
               "  --sweep                 capacity sweeps (total and DRAM); with --svg/--csv/--markdown\n"
               "  --ratios a,b,...        total sweep points, (DRAM+SSD) / working set\n"
               "                          (default 0.05,0.075,0.1,0.15,0.25,0.5,1,2 and the configured point)\n"
               "  --no-dram-sweep         only the total sweep\n"
               "  --bound                 print what a policy that knows each session's class and the true\n"
               "                          return-time distributions could keep at most (fluid model, see\n"
               "                          bench/sim/fluid_bound.hpp) at the sweep's ratios, and exit\n"
               "  --svg FILE, --csv FILE, --markdown FILE   sweep outputs\n"
               "  --threads N             policies simulated in parallel (default 2)\n"
               "  --check                 verify the cache's invariants while running (slow)\n"
               "  --warmup F              fraction of the arrival span not measured (default 0.2)\n"
               "  --json                  print one JSON object last, keyed by policy\n"
               "  --quiet                 no table\n");
  std::exit(error.empty() ? 0 : 2);
}

policy_kind parse_policy(const std::string& s) {
  if (s == "none") return policy_kind::none;
  if (s == "lru") return policy_kind::lru;
  if (s == "scheduler_aware" || s == "sa") return policy_kind::scheduler_aware;
  if (s == "opt" || s == "belady") return policy_kind::opt;
  if (s == "predictive" || s == "pred") return policy_kind::predictive;
  usage("unknown policy '" + s + "' (none, lru, scheduler_aware, opt, predictive)");
}

double number(const char* s, const char* what) {
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (!end || *end || !std::isfinite(v) || v < 0) usage(std::string("bad number for ") + what + ": " + s);
  return v;
}

/// Bytes with an optional suffix K, M, G or T (powers of 1000).
double bytes_value(const char* s, const char* what) {
  std::string v = s;
  double scale = 1;
  if (!v.empty()) {
    const char u = char(std::toupper(static_cast<unsigned char>(v.back())));
    const std::string units = "KMGT";
    if (const auto at = units.find(u); at != std::string::npos) {
      scale = std::pow(1000.0, double(at + 1));
      v.pop_back();
    }
  }
  return number(v.c_str(), what) * scale;
}

/// The capacity sweep's points, (DRAM + SSD) / working set, from starved to ample.
std::vector<double> default_ratios() { return {0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0}; }

double share(const char* s, const char* what) {
  const double v = number(s, what);
  if (v > 1) usage(std::string(what) + " is a share of turns or sessions, in [0, 1]: " + s);
  return v;
}

cli parse(int argc, char** argv) {
  cli c;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> const char* {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    if (a == "--help" || a == "-h")
      usage();
    else if (a == "--preset")
      c.preset = val();
    else if (a == "--requests")
      c.requests = std::uint64_t(number(val(), "--requests"));
    else if (a == "--seed")
      c.seed = std::uint64_t(number(val(), "--seed"));
    else if (a == "--rate")
      c.session_rate = number(val(), "--rate");
    else if (a == "--trace")
      c.trace_file = val();
    else if (a == "--open-loop")
      c.open_loop = true;
    else if (a == "--write-trace")
      c.write_trace = val();
    else if (a == "--trace-stats")
      c.stats_only = true;
    else if (a == "--policies") {
      c.policies.clear();
      std::stringstream ss(val());
      for (std::string p; std::getline(ss, p, ',');) c.policies.push_back(parse_policy(p));
    } else if (a == "--model") {
      const std::string m = val();
      c.config.model.name = m;
      if (m == "llama-13b")
        c.config.model.kv_bytes_per_token = 2.0 * 40 * 5120 * 2;
      else if (m == "llama-65b")
        c.config.model.kv_bytes_per_token = 2.0 * 80 * 8192 * 2;
      else if (m == "llama-70b")
        c.config.model.kv_bytes_per_token = 2.0 * 80 * 1024 * 2;
      else if (m == "mistral-7b")
        c.config.model.kv_bytes_per_token = 2.0 * 32 * 1024 * 2;
      else
        usage("unknown model '" + m + "'");
      if (m == "llama-65b") {  // 5x the FLOPs of 13B; HBM holds fewer tokens
        c.config.engine.prefill_s_per_token *= 5;
        c.config.engine.decode_step_s *= 4;
        c.config.engine.hbm_kv_tokens = 80000;
      }
    } else if (a == "--dram-gb")
      c.config.tiers.dram_bytes = number(val(), a.c_str()) * 1e9;
    else if (a == "--ssd-tb")
      c.config.tiers.ssd_bytes = number(val(), a.c_str()) * 1e12;
    else if (a == "--capacity-ratio")
      c.capacity_ratio = number(val(), a.c_str());
    else if (a == "--tokens-per-block")
      c.config.tiers.tokens_per_block = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--eviction-window")
      c.config.tiers.eviction_window = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--prefetch-window")
      c.config.tiers.prefetch_window = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--prefetch-inflight-gb")
      c.config.tiers.prefetch_bytes_in_flight = number(val(), a.c_str()) * 1e9;
    else if (a == "--no-prefetch")
      c.config.tiers.prefetch = false;
    else if (a == "--queue-window")
      c.config.tiers.queue_window = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--horizon")
      c.config.tiers.predictive.horizon_s = number(val(), a.c_str());
    else if (a == "--no-density")
      c.config.tiers.predictive.density = false;
    else if (a == "--prior-weight")
      c.config.tiers.predictive.prior_weight = number(val(), a.c_str());
    else if (a == "--half-life")
      c.config.tiers.predictive.half_life_s = number(val(), a.c_str());
    else if (a == "--min-samples")
      c.config.tiers.predictive.min_samples = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--prefetch-min-p")
      c.config.tiers.predictive.prefetch_min_probability = number(val(), a.c_str());
    else if (a == "--share-policy") {
      const std::string v = val();
      if (v != "all" && v != "policy") usage("--share-policy must be all or policy");
      c.config.cluster.share_by_policy = v == "policy";
    } else if (a == "--share-min-p")
      c.config.tiers.predictive.share_min_probability = number(val(), a.c_str());
    else if (a == "--share-horizon-s")
      c.config.tiers.predictive.share_horizon_s = number(val(), a.c_str());
    else if (a == "--prefetch-likely")
      c.config.tiers.prefetch_likely = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--ratios") {
      std::stringstream ss(val());
      for (std::string x; std::getline(ss, x, ',');) c.ratios.push_back(number(x.c_str(), "--ratios"));
    } else if (a == "--no-dram-sweep")
      c.dram_sweep = false;
    else if (a == "--watermark")
      c.config.tiers.watermark = number(val(), a.c_str());
    else if (a == "--ttl")
      c.config.tiers.ttl_s = number(val(), a.c_str());
    else if (a == "--close-on-last")
      c.config.close_on_last = true;
    else if (a == "--no-prefix-sharing")
      c.config.prefix_sharing = false;
    else if (a == "--hint-composing")
      c.config.hint_composing = share(val(), a.c_str());
    else if (a == "--hint-left")
      c.config.hint_left = share(val(), a.c_str());
    else if (a == "--pcie-gbps")
      c.config.tiers.pcie_bytes_per_s = number(val(), a.c_str()) * 1e9;
    else if (a == "--ssd-read-gbps")
      c.config.tiers.ssd_read_bytes_per_s = number(val(), a.c_str()) * 1e9;
    else if (a == "--ssd-write-gbps")
      c.config.tiers.ssd_write_bytes_per_s = number(val(), a.c_str()) * 1e9;
    else if (a == "--context")
      c.config.engine.context_tokens = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--max-batch")
      c.config.engine.max_batch = std::uint32_t(number(val(), a.c_str()));
    else if (a == "--nodes") {
      c.config.cluster.nodes = std::uint32_t(number(val(), a.c_str()));
      if (c.config.cluster.nodes < 1 || c.config.cluster.nodes > 4096) usage("--nodes must be 1..4096");
    } else if (a == "--routing") {
      const std::string r = val();
      const auto k = sim::parse_routing(r);
      if (!k) usage("unknown routing '" + r + "' (sticky, round-robin, random)");
      c.config.cluster.route = *k;
    } else if (a == "--route-seed")
      c.config.cluster.route_seed = std::uint64_t(number(val(), a.c_str()));
    else if (a == "--shared-tier-bytes")
      c.config.cluster.shared_tier_bytes = bytes_value(val(), a.c_str());
    else if (a == "--shared-tier-ratio")
      c.shared_tier_ratio = number(val(), a.c_str());
    else if (a == "--shared-tier-gbps") {
      c.config.cluster.shared_tier_bytes_per_s = number(val(), a.c_str()) * 1e9;
      if (c.config.cluster.shared_tier_bytes_per_s <= 0) usage("--shared-tier-gbps must be > 0");
    } else if (a == "--shared-tier-latency-us")
      c.config.cluster.shared_tier_latency_s = number(val(), a.c_str()) * 1e-6;
    else if (a == "--shared-write-inflight-gb")
      c.config.cluster.shared_write_bytes_in_flight = number(val(), a.c_str()) * 1e9;
    else if (a == "--sweep")
      c.sweep = true;
    else if (a == "--bound")
      c.bound = true;
    else if (a == "--svg")
      c.svg = val();
    else if (a == "--csv")
      c.csv = val();
    else if (a == "--markdown")
      c.markdown = val();
    else if (a == "--threads")
      c.threads = std::max(1u, unsigned(number(val(), a.c_str())));
    else if (a == "--check")
      c.check = true;
    else if (a == "--warmup")
      c.config.warmup_fraction = number(val(), a.c_str());
    else if (a == "--json")
      c.json = true;
    else if (a == "--quiet")
      c.quiet = true;
    else
      usage("unknown option " + a);
  }
  c.config.check = c.check;
  if (c.config.tiers.tokens_per_block == 0 || c.config.tiers.tokens_per_block > 4096)
    usage("--tokens-per-block must be 1..4096");
  if (c.config.engine.context_tokens < 2 * c.config.tiers.tokens_per_block) usage("--context too small");
  if (c.requests == 0) usage("--requests must be at least 1");
  return c;
}

/// Runs the policies, `threads` at a time.
std::vector<sim::sim_result> run_all(const trace::workload& w, const std::vector<policy_kind>& kinds,
                                     const sim::sim_config& c, unsigned threads) {
  std::vector<sim::sim_result> out(kinds.size());
  std::atomic<std::size_t> next{0};
  std::vector<std::string> errors(kinds.size());
  auto worker = [&] {
    for (std::size_t i; (i = next.fetch_add(1)) < kinds.size();) {
      try {
        sim::engine_sim e(w, kinds[i], c);
        out[i] = e.run();
      } catch (const std::exception& ex) {
        errors[i] = ex.what();
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < std::min<std::size_t>(threads, kinds.size()); ++t) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  for (std::size_t i = 0; i < kinds.size(); ++i)
    if (!errors[i].empty()) {
      std::fprintf(stderr, "sim: %s: %s\n", std::string(sim::to_string(kinds[i])).c_str(), errors[i].c_str());
      std::exit(1);
    }
  return out;
}

double working_set(const trace::workload& w, const sim::sim_config& c) {
  sim::engine_sim e(w, policy_kind::none, c, sim::run_mode::ideal);
  return e.run().working_set_bytes;
}

/// DRAM + SSD = ratio x working set (all nodes together; each node has its share), split
/// as the paper's 128 GB : 10 TB, with DRAM
/// at least enough for two longest sessions plus the watermark.
void scale_capacity(sim::sim_config& c, double ratio, double ws) {
  const double total = ratio * ws / double(c.cluster.nodes);  // per node
  const double share = 128e9 / (128e9 + 10e12);
  const double block = c.tiers.tokens_per_block * c.model.kv_bytes_per_token;
  const double min_dram =
      (2.0 * (c.engine.context_tokens / c.tiers.tokens_per_block + 2) + 4) * block / (1 - c.tiers.watermark);
  c.tiers.dram_bytes = std::max(total * share, min_dram);
  c.tiers.ssd_bytes = std::max(total - c.tiers.dram_bytes, block);
}

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e12)
    std::snprintf(buf, sizeof buf, "%.2f TB", b / 1e12);
  else if (b >= 1e9)
    std::snprintf(buf, sizeof buf, "%.1f GB", b / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.0f MB", b / 1e6);
  return buf;
}

void print_table(const std::vector<sim::sim_result>& rs, std::FILE* f) {
  std::fprintf(f,
               "| policy | hit rate | DRAM hits | SSD hits | prefill saved | TTFT mean | TTFT p50 | TTFT p99 |"
               " HBM->DRAM | DRAM->HBM | SSD->HBM | SSD->DRAM | DRAM->SSD | dropped | wall s |\n");
  std::fprintf(f, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rs) {
    const double total_prefill = double(r.history_tokens + r.input_tokens);
    std::fprintf(
        f,
        "| %s | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.3f s | %.3f s | %.3f s | %s | %s | %s | %s | %s | %s | %.1f |\n",
        std::string(sim::to_string(r.kind)).c_str(), 100 * r.hit_rate(), 100 * r.dram_hit_rate(),
        100 * r.ssd_hit_rate(), total_prefill ? 100.0 * double(r.reused_tokens) / total_prefill : 0.0, r.ttft_mean,
        r.ttft_p50, r.ttft_p99, human_bytes(r.bytes_hbm_to_dram).c_str(), human_bytes(r.bytes_dram_to_hbm).c_str(),
        human_bytes(r.bytes_ssd_to_hbm).c_str(), human_bytes(r.bytes_ssd_to_dram).c_str(),
        human_bytes(r.bytes_dram_to_ssd).c_str(), human_bytes(r.bytes_dropped).c_str(), r.wall_seconds);
  }
}

/// Whether OPT's figures are an upper bound (see json_result).
bool opt_is_bound(const sim::sim_result& r) {
  return !r.prefix_sharing && (r.nodes == 1 || (r.route == sim::routing::sticky && r.shared_tier_bytes == 0));
}

/// Several nodes: where the history was found, how turns were routed, the shared tier.
void print_cluster(const std::vector<sim::sim_result>& rs, std::FILE* f) {
  std::fprintf(f,
               "\ncluster (hits / history; same node: turns after the first routed to the node that served the "
               "turn before; bytes over the measured window):\n"
               "| policy | hit rate | local | shared tier | same node | turns per node | to shared | from shared | "
               "skipped | declined (typing) | shared stored mean | shared evicted | TTFT mean | TTFT p50 | TTFT p99 |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rs) {
    std::string per;
    for (auto n : r.node_requests) per += (per.empty() ? "" : " / ") + std::to_string(n);
    std::fprintf(f,
                 "| %s | %.2f%% | %.2f%% | %.2f%% | %.1f%% | %s | %s | %s | %s | %llu (%llu) | %s | %s | %.3f s | %.3f "
                 "s | %.3f s |\n",
                 std::string(sim::to_string(r.kind)).c_str(), 100 * r.hit_rate(), 100 * r.hit_rate_local(),
                 100 * r.hit_rate_shared(), 100 * r.same_node_rate(), per.c_str(),
                 human_bytes(r.bytes_to_shared).c_str(), human_bytes(r.bytes_from_shared).c_str(),
                 human_bytes(r.bytes_shared_skipped).c_str(), (unsigned long long)r.publishes_declined,
                 (unsigned long long)r.publishes_after_hint, human_bytes(r.shared_tier_stored_bytes).c_str(),
                 human_bytes(r.shared_tier_evicted_bytes).c_str(), r.ttft_mean, r.ttft_p50, r.ttft_p99);
  }
  for (const auto& r : rs)
    if (r.kind == policy_kind::opt && !opt_is_bound(r))
      std::fprintf(f,
                   "NOTE: opt is Belady's MIN per node, told when each session next comes to that node; across nodes "
                   "(other than sticky routing without a shared tier) it is a heuristic, not an upper bound "
                   "(\"opt_bound\": false)\n");
}

/// Storage and shared-prefix figures (traces with system prompts).
void print_storage(const std::vector<sim::sim_result>& rs, std::FILE* f) {
  std::fprintf(f,
               "\nstorage over the measured window (DRAM + SSD; each copy of a shared block once):\n"
               "| policy | prefix sharing | hit rate | shared-block hits | stored mean | stored peak | DRAM mean | "
               "SSD mean | held by sessions (mean, a shared block per holder) | writes saved | prompts cut |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rs) {
    if (r.kind == policy_kind::none) continue;
    std::fprintf(f, "| %s | %s | %.2f%% | %.2f%% | %s | %s | %s | %s | %s | %s | %llu |\n",
                 std::string(sim::to_string(r.kind)).c_str(), r.prefix_sharing ? "on" : "off", 100 * r.hit_rate(),
                 100 * r.shared_hit_rate(), human_bytes(r.bytes_stored).c_str(),
                 human_bytes(r.bytes_stored_peak).c_str(), human_bytes(r.bytes_stored_dram).c_str(),
                 human_bytes(r.bytes_stored_ssd).c_str(), human_bytes(r.bytes_referenced).c_str(),
                 human_bytes(r.bytes_dedup).c_str(), (unsigned long long)r.prefix_cuts);
  }
  for (const auto& r : rs)
    if (r.kind == policy_kind::opt && r.prefix_sharing)
      std::fprintf(f,
                   "NOTE: opt is Belady's MIN per session; a shared block is worth its holders' and future "
                   "sessions' earliest use, which it does not see: with prefix sharing it is a heuristic, not an "
                   "upper bound (\"opt_bound\": false)\n");
}

/// What the trace really holds, for the learned estimates to be compared with.
struct trace_truth {
  double think_median = 0, think_mean = 0, think_p90 = 0;  ///< seconds, turns after the first
  double mean_turns = 0;
  double continuation_1 = 0;  ///< P(a second turn)
  double continuation_5 = 0;  ///< P(another turn | at least 5 so far)
};

trace_truth truth_of(const trace::workload& w) {
  trace_truth t;
  std::vector<double> th;
  double sum = 0;
  for (const auto& r : w.requests)
    if (r.turn > 0) {
      th.push_back(r.think);
      sum += r.think;
    }
  if (!th.empty()) {
    std::sort(th.begin(), th.end());
    t.think_median = th[th.size() / 2];
    t.think_p90 = th[std::min(th.size() - 1, th.size() * 9 / 10)];
    t.think_mean = sum / double(th.size());
  }
  double multi = 0, more5 = 0, at5 = 0;
  for (std::uint32_t s = 0; s < w.sessions(); ++s) {
    const double n = double(w.session(s).size());
    multi += n > 1;
    more5 += std::max(0.0, n - 5);
    at5 += std::max(0.0, n - 4);
  }
  if (w.sessions()) {
    t.mean_turns = double(w.requests.size()) / w.sessions();
    t.continuation_1 = multi / w.sessions();
  }
  t.continuation_5 = at5 > 0 ? more5 / at5 : 0;
  return t;
}

void json_learned(std::ostream& o, const sim::sim_result& r, const trace_truth& t) {
  char buf[512];
  std::snprintf(
      buf, sizeof buf,
      ", \"true_think_median_s\": %.3f, \"true_think_mean_s\": %.3f, \"true_think_p90_s\": %.3f, "
      "\"true_mean_turns\": %.4f, \"true_continuation_1\": %.4f, \"true_continuation_5\": %.4f, \"learned\": [",
      t.think_median, t.think_mean, t.think_p90, t.mean_turns, t.continuation_1, t.continuation_5);
  o << buf;
  for (std::size_t i = 0; i < r.learned.size(); ++i) {
    const auto& x = r.learned[i];
    std::snprintf(buf, sizeof buf,
                  "%s{\"at_s\": %.0f, \"requests\": %llu, \"returns\": %llu, \"in_use\": %s, "
                  "\"think_median_s\": %.3f, \"think_mean_s\": %.3f, \"think_p90_s\": %.3f, \"mean_turns\": %.4f, "
                  "\"continuation_1\": %.4f, \"continuation_5\": %.4f, \"horizon_dram_s\": %.2f, "
                  "\"horizon_ssd_s\": %.2f}",
                  i ? ", " : "", x.at_s, (unsigned long long)x.requests, (unsigned long long)x.returns,
                  x.learned ? "true" : "false", x.think_median_s, x.think_mean_s, x.think_p90_s, x.mean_turns,
                  x.continuation_1, x.continuation_5, x.horizon_dram_s, x.horizon_ssd_s);
    o << buf;
  }
  o << "]";
}

void json_result(std::ostream& o, const sim::sim_result& r, double ws) {
  char buf[4096];
  std::snprintf(
      buf, sizeof buf,
      "{\"requests\": %llu, \"measured_requests\": %llu, \"sessions\": %llu, \"hit_rate\": %.6f, \"dram_hit_rate\": "
      "%.6f, "
      "\"ssd_hit_rate\": %.6f, \"reuse_rate\": %.6f, \"history_tokens\": %llu, \"hit_tokens\": %llu, "
      "\"prefill_tokens\": %llu, "
      "\"prefill_tokens_saved\": %llu, \"ttft_mean_s\": %.6f, \"ttft_p50_s\": %.6f, \"ttft_p90_s\": %.6f, "
      "\"ttft_p99_s\": %.6f, \"bytes_hbm_to_dram\": %.0f, \"bytes_dram_to_hbm\": %.0f, \"bytes_ssd_to_hbm\": %.0f, "
      "\"bytes_ssd_to_dram\": %.0f, \"bytes_dram_to_ssd\": %.0f, \"bytes_dropped\": %.0f, "
      "\"evicted_sessions\": %llu, \"bypassed_blocks\": %llu, \"truncations\": %llu, "
      "\"prefetch_started\": %llu, \"prefetch_cancelled\": %llu, \"prefetch_waits\": %llu, "
      "\"prefetch_peak_bytes\": %.0f, \"prefetch_bound_bytes\": %.0f, \"dram_bytes\": %.0f, \"ssd_bytes\": %.0f, "
      "\"working_set_bytes\": %.0f, \"capacity_ratio\": %.4f, \"mean_queue\": %.2f, \"sim_seconds\": %.1f, "
      "\"wall_seconds\": %.2f, \"prefill_work_saved\": %.6f, \"bytes_moved\": %.0f, \"prefix_sharing\": %s, "
      "\"bytes_stored\": %.0f, \"bytes_stored_peak\": %.0f, \"bytes_stored_dram\": %.0f, \"bytes_stored_ssd\": %.0f, "
      "\"bytes_referenced\": %.0f, \"shared_hit_rate\": %.6f, \"bytes_dedup\": %.0f, \"prefix_cuts\": %llu, "
      "\"invariants_ok\": %s",
      (unsigned long long)r.requests, (unsigned long long)r.measured_requests, (unsigned long long)r.sessions,
      r.hit_rate(), r.dram_hit_rate(), r.ssd_hit_rate(), r.reuse_rate(), (unsigned long long)r.history_tokens,
      (unsigned long long)r.hit_tokens, (unsigned long long)r.prefill_tokens, (unsigned long long)r.reused_tokens,
      r.ttft_mean, r.ttft_p50, r.ttft_p90, r.ttft_p99, r.bytes_hbm_to_dram, r.bytes_dram_to_hbm, r.bytes_ssd_to_hbm,
      r.bytes_ssd_to_dram, r.bytes_dram_to_ssd, r.bytes_dropped, (unsigned long long)r.evicted_sessions,
      (unsigned long long)r.bypassed_blocks, (unsigned long long)r.truncations, (unsigned long long)r.prefetch_started,
      (unsigned long long)r.prefetch_cancelled, (unsigned long long)r.prefetch_waits, r.prefetch_peak_bytes,
      r.prefetch_bound_bytes, r.dram_bytes, r.ssd_bytes, ws, ws > 0 ? (r.dram_bytes + r.ssd_bytes) * r.nodes / ws : 0.0,
      r.mean_queue, r.sim_seconds, r.wall_seconds, r.work_saved(), r.bytes_moved(), r.prefix_sharing ? "true" : "false",
      r.bytes_stored, r.bytes_stored_peak, r.bytes_stored_dram, r.bytes_stored_ssd, r.bytes_referenced,
      r.shared_hit_rate(), r.bytes_dedup, (unsigned long long)r.prefix_cuts, r.invariants_ok ? "true" : "false");
  o << buf;
  // Several nodes and the shared tier (docs/sim.md, "Several nodes"); dram_bytes and
  // ssd_bytes above are per node.
  std::snprintf(buf, sizeof buf,
                ", \"nodes\": %u, \"routing\": \"%s\", \"shared_tier_bytes\": %.0f, \"hit_rate_local\": %.6f, "
                "\"hit_rate_shared\": %.6f, \"bytes_to_shared\": %.0f, \"bytes_from_shared\": %.0f, "
                "\"bytes_shared_skipped\": %.0f, \"bytes_shared_touched\": %.0f, \"shared_tier_stored_bytes\": %.0f, "
                "\"shared_tier_evicted_bytes\": %.0f, \"same_node_rate\": %.6f, \"later_turns\": %llu, "
                "\"share_by_policy\": %s, \"publishes_declined\": %llu, \"publishes_after_hint\": %llu, "
                "\"node_requests\": [",
                r.nodes, std::string(sim::to_string(r.route)).c_str(), r.shared_tier_bytes, r.hit_rate_local(),
                r.hit_rate_shared(), r.bytes_to_shared, r.bytes_from_shared, r.bytes_shared_skipped,
                r.bytes_shared_touched, r.shared_tier_stored_bytes, r.shared_tier_evicted_bytes, r.same_node_rate(),
                (unsigned long long)r.later_turns, r.share_by_policy ? "true" : "false",
                (unsigned long long)r.publishes_declined, (unsigned long long)r.publishes_after_hint);
  o << buf;
  for (std::size_t i = 0; i < r.node_requests.size(); ++i) o << (i ? ", " : "") << r.node_requests[i];
  o << "]";
  // OPT knows each session's next use; a block shared by several sessions is worth its
  // holders' and future sessions' earliest use, which it does not see: with sharing it
  // is a heuristic, not a bound. Across nodes it is MIN per node, told when the session
  // next comes to that node: a bound only when every session stays on one node and no
  // tier is shared (then each node is the one-node case).
  if (r.kind == policy_kind::opt) o << ", \"opt_bound\": " << (opt_is_bound(r) ? "true" : "false");
}

// ---------------------------------------------------------------- sweep and plot

struct sweep_point {
  std::string sweep;  // "total" or "dram"
  double x = 0;       // capacity ratio, or DRAM GB
  sim::sim_result r;
};

std::string svg_plot(const std::vector<sweep_point>& pts, double paper_ratio, const std::string& title) {
  // Two panels (total capacity, DRAM) when the DRAM sweep ran, else one.
  const bool two = std::any_of(pts.begin(), pts.end(), [](const sweep_point& p) { return p.sweep == "dram"; });
  const int H = 420, ml = 60, mr = 20, mt = 40, mb = 55, gap = 70, W = two ? 960 : 560;
  const int pw = two ? (W - ml - mr - gap) / 2 : W - ml - mr, ph = H - mt - mb;
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n";
  s << "<text x='" << W / 2 << "' y='18' text-anchor='middle' font-size='14'>" << title << "</text>\n";
  const char* colors[] = {"#999999", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"};
  const char* names[] = {"none", "lru", "scheduler_aware", "opt", "predictive"};
  constexpr int kinds = 5;
  auto panel = [&](int x0, const std::string& which, const std::string& xlabel, bool dram_hits,
                   const std::string& ylabel) {
    std::vector<double> xs;
    for (auto& p : pts)
      if (p.sweep == which) xs.push_back(p.x);
    if (xs.empty()) return;
    const double lo = std::log(*std::min_element(xs.begin(), xs.end()));
    const double hi = std::log(*std::max_element(xs.begin(), xs.end()));
    auto X = [&](double x) { return x0 + (hi > lo ? (std::log(x) - lo) / (hi - lo) : 0.5) * pw; };
    auto Y = [&](double y) { return mt + (1 - y) * ph; };
    s << "<rect x='" << x0 << "' y='" << mt << "' width='" << pw << "' height='" << ph
      << "' fill='none' stroke='#333'/>\n";
    for (int k = 0; k <= 10; k += 2) {
      s << "<line x1='" << x0 << "' x2='" << x0 + pw << "' y1='" << Y(k / 10.0) << "' y2='" << Y(k / 10.0)
        << "' stroke='#eee'/>\n<text x='" << x0 - 6 << "' y='" << Y(k / 10.0) + 4 << "' text-anchor='end'>" << k * 10
        << "%</text>\n";
    }
    std::vector<double> ticks = xs;
    std::sort(ticks.begin(), ticks.end());
    ticks.erase(std::unique(ticks.begin(), ticks.end()), ticks.end());
    for (double t : ticks) {
      char b[32];
      std::snprintf(b, sizeof b, t == std::floor(t) && t >= 1 ? "%.0f" : "%.2g", t);
      s << "<text x='" << X(t) << "' y='" << mt + ph + 16 << "' text-anchor='middle'>" << b << "</text>\n";
    }
    s << "<text x='" << x0 + pw / 2 << "' y='" << H - 18 << "' text-anchor='middle'>" << xlabel << "</text>\n";
    s << "<text transform='translate(" << x0 - 44 << "," << mt + ph / 2 << ") rotate(-90)' text-anchor='middle'>"
      << ylabel << "</text>\n";
    if (which == "total" && paper_ratio > 0 && std::log(paper_ratio) >= lo && std::log(paper_ratio) <= hi) {
      s << "<line x1='" << X(paper_ratio) << "' x2='" << X(paper_ratio) << "' y1='" << mt << "' y2='" << mt + ph
        << "' stroke='#888' stroke-dasharray='4,3'/>\n";
      const bool right = X(paper_ratio) > x0 + 0.7 * pw;  // label on the inner side of the line
      s << "<text x='" << X(paper_ratio) + (right ? -4 : 4) << "' y='" << mt + ph / 2 << "' text-anchor='"
        << (right ? "end" : "start") << "' fill='#666'>paper capacities</text>\n";
    }
    for (int k = 1; k < kinds; ++k) {
      std::vector<std::pair<double, double>> line;
      for (auto& p : pts)
        if (p.sweep == which && int(p.r.kind) == k)
          line.emplace_back(p.x, dram_hits ? p.r.dram_hit_rate() : p.r.hit_rate());
      std::sort(line.begin(), line.end());
      if (line.empty()) continue;
      s << "<polyline fill='none' stroke='" << colors[k] << "' stroke-width='2' points='";
      for (auto& [x, y] : line) s << X(x) << "," << Y(y) << " ";
      s << "'/>\n";
      for (auto& [x, y] : line)
        s << "<circle cx='" << X(x) << "' cy='" << Y(y) << "' r='3' fill='" << colors[k] << "'/>\n";
    }
    int ly = mt + 14;
    for (int k = 1; k < kinds; ++k, ly += 16) {
      s << "<line x1='" << x0 + 10 << "' x2='" << x0 + 30 << "' y1='" << ly - 4 << "' y2='" << ly - 4 << "' stroke='"
        << colors[k] << "' stroke-width='2'/><text x='" << x0 + 34 << "' y='" << ly << "'>" << names[k] << "</text>\n";
    }
  };
  panel(ml, "total", "(DRAM + SSD) / working set (log scale)", false, "hit rate (history tokens found in the cache)");
  panel(ml + pw + gap, "dram", "DRAM GB, SSD fixed at the paper point (log scale)", true,
        "hits served from DRAM (/ history)");
  s << "</svg>\n";
  return s.str();
}

/// Results at one capacity point, by policy kind.
using point_results = std::map<int, const sim::sim_result*>;

std::map<std::pair<int, double>, point_results> by_point(const std::vector<sweep_point>& pts) {
  std::map<std::pair<int, double>, point_results> by;  // the total sweep first
  for (auto& p : pts) by[{p.sweep == "total" ? 0 : 1, p.x}][int(p.r.kind)] = &p.r;
  return by;
}

/// "lru / SA / predictive / opt" of one figure, "-" where a policy was not run.
std::string per_policy(const point_results& m, const char* format, double (*figure)(const sim::sim_result&)) {
  std::string out;
  for (policy_kind k : {policy_kind::lru, policy_kind::scheduler_aware, policy_kind::predictive, policy_kind::opt}) {
    char b[32] = "-";
    if (auto it = m.find(int(k)); it != m.end()) std::snprintf(b, sizeof b, format, figure(*it->second));
    out += (out.empty() ? "" : " / ") + std::string(b);
  }
  return out;
}

/// One row per capacity point, policies side by side.
std::string sweep_markdown(const std::vector<sweep_point>& pts, double ws) {
  std::ostringstream md;
  md << "| sweep | (DRAM+SSD) / WS | DRAM | SSD | hit rate lru / SA / pred / opt | PRED - SA | gap closed |"
        " reused history lru / SA / pred / opt | prefill work saved lru / SA / pred / opt |"
        " TTFT mean s lru / SA / pred / opt | TB moved lru / SA / pred / opt |\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|\n";
  double worst = 1e9;
  std::string worst_at, notes;
  for (auto& [k, m] : by_point(pts)) {
    auto get = [&](policy_kind kind) { return m.count(int(kind)) ? m.at(int(kind)) : nullptr; };
    const sim::sim_result *a = get(policy_kind::scheduler_aware), *o = get(policy_kind::opt),
                          *p = get(policy_kind::predictive);
    const sim::sim_result* any = m.begin()->second;
    char diff[32] = "-", closed[32] = "-";
    if (p && a) std::snprintf(diff, sizeof diff, "%+.2f pp", 100 * (p->hit_rate() - a->hit_rate()));
    if (p && a && o && o->hit_rate() - a->hit_rate() > 0.001)
      std::snprintf(closed, sizeof closed, "%.0f%%",
                    100 * (p->hit_rate() - a->hit_rate()) / (o->hit_rate() - a->hit_rate()));
    const std::string where = std::string(k.first == 0 ? "total " : "dram ") + std::to_string(k.second);
    if (p && a && p->hit_rate() - a->hit_rate() < worst) {
      worst = p->hit_rate() - a->hit_rate();
      worst_at = where;
    }
    if (o)
      for (auto& [kind, r] : m)
        if (r->hit_rate() > o->hit_rate() + 1e-9)
          notes += "NOTE: " + std::string(sim::to_string(r->kind)) + " above opt at " + where +
                   " (timing differs per policy; see docs/sim.md)\n";
    char row[256];
    std::snprintf(row, sizeof row, "| %s | %.3f | %s | %s | ", k.first == 0 ? "total" : "dram",
                  (any->dram_bytes + any->ssd_bytes) * any->nodes / ws, human_bytes(any->dram_bytes).c_str(),
                  human_bytes(any->ssd_bytes).c_str());
    md << row << per_policy(m, "%.2f%%", [](const sim::sim_result& r) { return 100 * r.hit_rate(); }) << " | " << diff
       << " | " << closed << " | "
       << per_policy(m, "%.2f%%", [](const sim::sim_result& r) { return 100 * r.reuse_rate(); }) << " | "
       << per_policy(m, "%.2f%%", [](const sim::sim_result& r) { return 100 * r.work_saved(); }) << " | "
       << per_policy(m, "%.3g", [](const sim::sim_result& r) { return r.ttft_mean; }) << " | "
       << per_policy(m, "%.1f", [](const sim::sim_result& r) { return r.bytes_moved() / 1e12; }) << " |\n";
  }
  if (worst < 1e9) {
    char b[160];
    std::snprintf(b, sizeof b, "\nsmallest predictive - scheduler_aware over the sweep: %+.4f pp (at %s)\n",
                  100 * worst, worst_at.c_str());
    md << b;
  }
  md << notes;
  return md.str();
}

/// Every figure of every point.
std::string sweep_csv(const std::vector<sweep_point>& pts, double ws) {
  std::ostringstream csv;
  csv << "sweep,x,policy,capacity_ratio,dram_bytes,ssd_bytes,hit_rate,dram_hit_rate,ssd_hit_rate,reuse_rate,"
         "prefill_saved,prefill_work_saved,ttft_mean,ttft_p99,bytes_moved,mean_queue\n";
  for (auto& p : pts) {
    char b[512];
    const double total_prefill = double(p.r.history_tokens + p.r.input_tokens);
    std::snprintf(b, sizeof b, "%s,%g,%s,%.4f,%.0f,%.0f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.0f,%.2f\n",
                  p.sweep.c_str(), p.x, std::string(sim::to_string(p.r.kind)).c_str(),
                  (p.r.dram_bytes + p.r.ssd_bytes) * p.r.nodes / ws, p.r.dram_bytes, p.r.ssd_bytes, p.r.hit_rate(),
                  p.r.dram_hit_rate(), p.r.ssd_hit_rate(), p.r.reuse_rate(),
                  total_prefill ? double(p.r.reused_tokens) / total_prefill : 0.0, p.r.work_saved(), p.r.ttft_mean,
                  p.r.ttft_p99, p.r.bytes_moved(), p.r.mean_queue);
    csv << b;
  }
  return csv.str();
}

}  // namespace

int main(int argc, char** argv) {
  cli c = parse(argc, argv);
  trace::workload w;
  try {
    if (!c.trace_file.empty()) {
      std::ifstream in(c.trace_file);
      if (!in) usage("cannot open " + c.trace_file);
      std::string err;
      auto r = trace::read_jsonl(in, &err);
      if (!r) {
        std::fprintf(stderr, "sim: %s: %s\n", c.trace_file.c_str(), err.c_str());
        return 1;
      }
      w = std::move(*r);
      w.name = c.trace_file;
    } else {
      trace::generator_options g = trace::preset(c.preset);
      g.requests = c.requests;
      g.seed = c.seed;
      if (c.session_rate > 0) g.session_rate = c.session_rate;
      w = trace::generate(g);
    }
  } catch (const std::exception& e) {
    usage(e.what());
  }
  if (c.open_loop) w.open_loop = true;
  if (!c.write_trace.empty()) {
    std::ofstream out(c.write_trace);
    trace::write_jsonl(w, out);
  }
  const trace::workload_stats st = trace::describe(w);
  if (!c.quiet || c.stats_only) {
    std::fprintf(stdout,
                 "trace %s: %llu sessions, %llu requests, %.2f turns/session, %.0f%% multi-turn, mean prompt %.0f, "
                 "reply %.0f tokens, mean session %.0f tokens (%.0f%% > 2K, %.0f%% > 4K), mean think %.0f s, "
                 "%.0f s of arrivals, %s loop\n",
                 w.name.c_str(), (unsigned long long)st.sessions, (unsigned long long)st.requests, st.mean_turns,
                 100 * st.multi_turn_fraction, st.mean_input, st.mean_output, st.mean_session_tokens,
                 100 * st.sessions_over_2k, 100 * st.sessions_over_4k, st.mean_think, st.duration,
                 w.open_loop ? "open" : "closed");
    if (st.prefixes > 0)
      std::fprintf(stdout,
                   "system prompts: %llu distinct, %.0f%% of sessions start with one, mean %.0f tokens, %.1f%% of "
                   "their tokens repeat a prompt an earlier session used; prefix sharing %s\n",
                   (unsigned long long)st.prefixes, 100 * st.sessions_with_prefix, st.mean_prefix_tokens,
                   100 * st.repeated_prefix_fraction, c.config.prefix_sharing ? "on" : "off (--no-prefix-sharing)");
  }
  if (c.stats_only) return 0;
  if (c.bound) {
    const sim::fluid_bound fb(w, c.config.engine.context_tokens);
    std::vector<double> ratios = c.ratios;
    if (ratios.empty()) ratios = default_ratios();
    std::fprintf(stdout,
                 "\nfluid model (bench/sim/fluid_bound.hpp): share of returning history kept, and the share of "
                 "the gap from holding all to OPT that the best policy knowing class and age closes\n"
                 "| capacity / working set | hold all (LRU) | bound: age only | bound: store's classes | bound: "
                 "store's, reply for added | bound: + reply length | OPT | gap closed: age / store / store reply / "
                 "+ reply | hold time |\n"
                 "|---|---|---|---|---|---|---|---|---|\n");
    for (double r : ratios) {
      const sim::fluid_result x = fb.at(r);
      std::fprintf(stdout,
                   "| %.3f | %.2f%% | %.2f%% | %.2f%% | %.2f%% | %.2f%% | %.2f%% | %.0f%% / %.0f%% / %.0f%% / %.0f%% | "
                   "%.1f s |\n",
                   r, 100 * x.hold_all, 100 * x.class_age[0], 100 * x.class_age[1], 100 * x.class_age[2],
                   100 * x.class_age[3], 100 * x.opt, 100 * x.gap_closed(sim::knowledge::age),
                   100 * x.gap_closed(sim::knowledge::store), 100 * x.gap_closed(sim::knowledge::store_reply),
                   100 * x.gap_closed(sim::knowledge::reply), x.hold_s);
    }
    return 0;
  }

  sim::sim_config cfg = c.config;
  const double ws = working_set(w, cfg);
  if (c.capacity_ratio > 0) scale_capacity(cfg, c.capacity_ratio, ws);
  if (c.shared_tier_ratio > 0) cfg.cluster.shared_tier_bytes = c.shared_tier_ratio * ws;
  const double ratio = ws > 0 ? (cfg.tiers.dram_bytes + cfg.tiers.ssd_bytes) * cfg.cluster.nodes / ws : 0;
  const bool cluster = cfg.cluster.nodes > 1 || cfg.cluster.shared_tier_bytes > 0;
  if (!c.quiet) {
    std::fprintf(stdout,
                 "model %s (%.2f MiB/token KV), DRAM %s, SSD %s%s, working set %s (time average of the KV of "
                 "sessions between turns): capacity / working set = %.3f\n",
                 cfg.model.name.c_str(), cfg.model.kv_bytes_per_token / 1048576.0,
                 human_bytes(cfg.tiers.dram_bytes).c_str(), human_bytes(cfg.tiers.ssd_bytes).c_str(),
                 cfg.cluster.nodes > 1 ? " per node" : "", human_bytes(ws).c_str(), ratio);
    if (cluster)
      std::fprintf(stdout,
                   "cluster: %u nodes, %s routing; shared tier %s (%.2f x working set), %.1f GB/s per node link and "
                   "direction, %.0f us per request, %.1f GB write-behind in flight per node\n",
                   cfg.cluster.nodes, std::string(sim::to_string(cfg.cluster.route)).c_str(),
                   cfg.cluster.shared_tier_bytes > 0 ? human_bytes(cfg.cluster.shared_tier_bytes).c_str() : "none",
                   ws > 0 ? cfg.cluster.shared_tier_bytes / ws : 0.0, cfg.cluster.shared_tier_bytes_per_s / 1e9,
                   cfg.cluster.shared_tier_latency_s * 1e6, cfg.cluster.shared_write_bytes_in_flight / 1e9);
  }

  std::vector<sweep_point> points;
  if (c.sweep) {
    std::vector<policy_kind> kinds;
    for (auto k : c.policies)
      if (k != policy_kind::none) kinds.push_back(k);
    // Capacity / working set from starved to ample, plus the configured point itself
    // (the paper's 128 GB + 10 TB by default).
    std::vector<double> ratios = c.ratios;
    if (ratios.empty()) {
      ratios = default_ratios();
      if (ratio > 0 && std::find(ratios.begin(), ratios.end(), ratio) == ratios.end()) ratios.push_back(ratio);
    }
    for (double r : ratios) {
      sim::sim_config sc = cfg;
      if (r != ratio) scale_capacity(sc, r, ws);
      auto rs = run_all(w, kinds, sc, c.threads);
      for (auto& x : rs) points.push_back({"total", r, x});
      if (!c.quiet) std::fprintf(stdout, "swept total capacity ratio %.3f\n", r);
    }
    for (double gb : {16.0, 32.0, 64.0, 128.0, 256.0, 512.0}) {
      if (!c.dram_sweep) break;
      sim::sim_config sc = cfg;
      sc.tiers.dram_bytes = gb * 1e9;
      auto rs = run_all(w, kinds, sc, c.threads);
      for (auto& x : rs) points.push_back({"dram", gb, x});
      if (!c.quiet) std::fprintf(stdout, "swept DRAM %.0f GB\n", gb);
    }
    const std::string md = sweep_markdown(points, ws);
    if (!c.quiet) std::cout << md;
    if (!c.markdown.empty()) std::ofstream(c.markdown) << md;
    if (!c.csv.empty()) std::ofstream(c.csv) << sweep_csv(points, ws);
    if (!c.svg.empty()) {
      char t[256];
      std::snprintf(t, sizeof t, "attnstore sim: preset %s, %llu requests, %s%s",
                    c.trace_file.empty() ? c.preset.c_str() : "imported", (unsigned long long)w.requests.size(),
                    cfg.model.name.c_str(),
                    cfg.tiers.queue_window ? (", queue window " + std::to_string(cfg.tiers.queue_window)).c_str() : "");
      std::ofstream(c.svg) << svg_plot(points, ratio, t);
    }
  }
  auto results = run_all(w, c.policies, cfg, c.threads);
  if (!c.quiet) {
    std::fprintf(stdout, "\n");
    print_table(results, stdout);
    for (auto& r : results) {
      std::fprintf(stdout,
                   "%s: %llu sessions dropped, %llu blocks bypassed, %llu truncations, prefetch %llu started / %llu "
                   "cancelled / %llu waited on, peak %s in flight (bound %s), mean queue %.1f, sim %.0f s%s%s\n",
                   std::string(sim::to_string(r.kind)).c_str(), (unsigned long long)r.evicted_sessions,
                   (unsigned long long)r.bypassed_blocks, (unsigned long long)r.truncations,
                   (unsigned long long)r.prefetch_started, (unsigned long long)r.prefetch_cancelled,
                   (unsigned long long)r.prefetch_waits, human_bytes(r.prefetch_peak_bytes).c_str(),
                   human_bytes(r.prefetch_bound_bytes).c_str(), r.mean_queue, r.sim_seconds,
                   r.invariants_ok ? "" : ", INVARIANT BROKEN: ", r.invariant_error.c_str());
    }
    if (w.prefixes > 0) print_storage(results, stdout);
    if (cluster) print_cluster(results, stdout);
  }
  const trace_truth truth = truth_of(w);
  if (!c.quiet) {
    for (auto& r : results) {
      if (r.learned.empty()) continue;
      std::fprintf(stdout,
                   "\npredictive: learned distributions against the trace (think: user think time of turns after "
                   "the first)\n"
                   "| at (sim s) | turns started | returns seen | in use | think median | think mean | think p90 | "
                   "mean turns | P(turn 2) | P(more after 5+) | horizon DRAM / SSD |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|\n");
      for (const auto& x : r.learned)
        std::fprintf(stdout,
                     "| %.0f | %llu | %llu | %s | %.1f s | %.1f s | %.1f s | %.2f | %.3f | %.3f | %.1f / %.1f s |\n",
                     x.at_s, (unsigned long long)x.requests, (unsigned long long)x.returns, x.learned ? "yes" : "no",
                     x.think_median_s, x.think_mean_s, x.think_p90_s, x.mean_turns, x.continuation_1, x.continuation_5,
                     x.horizon_dram_s, x.horizon_ssd_s);
      std::fprintf(stdout, "| trace | | | | %.1f s | %.1f s | %.1f s | %.2f | %.3f | %.3f | |\n", truth.think_median,
                   truth.think_mean, truth.think_p90, truth.mean_turns, truth.continuation_1, truth.continuation_5);
    }
  }
  bool ok = true;
  for (auto& r : results) ok = ok && r.invariants_ok;
  if (c.json) {
    std::ostringstream o;
    o << "{";
    for (std::size_t i = 0; i < results.size(); ++i) {
      o << (i ? ", " : "") << "\"" << sim::to_string(results[i].kind) << "\": ";
      json_result(o, results[i], ws);
      if (results[i].kind == policy_kind::predictive) json_learned(o, results[i], truth);
      o << "}";
    }
    o << "}\n";
    std::cout << o.str();
  }
  return ok ? 0 : 1;
}
