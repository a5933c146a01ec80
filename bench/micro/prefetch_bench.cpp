// prefetch_bench: scheduler-aware prefetching through the real store, on the real SSD.
//
// An engine serves turns of sessions whose KV lives on SSD (DRAM holds a few sessions
// only). Before each turn it publishes its queue (the next --queue sessions) and spends
// --gap-ms computing the previous turn; then the turn's load asks the store to make the
// session resident in DRAM (store::acquire, what hooks::start_load does first). The
// time acquire takes is the load's wait before the first layer can copy.
//
// Three modes, same sessions and turn order, in the same process, taking turns
// --repeat times (figures: the median of each mode's per-run mean acquire time):
//   no_prefetch   the store reads the session from SSD when the turn asks (config.prefetch off)
//   prefetch      the store's background thread promotes queued sessions during the gap
//   all_dram      every session already in DRAM: the floor of acquire (the bound)
// hidden = (no_prefetch - prefetch) / (no_prefetch - all_dram): the share of the SSD
// wait that prefetching removed, against the limit of a session already in DRAM (1 =
// at the limit). With a gap G shorter than a session's SSD read time R the SSD cannot
// keep up, and about max(0, R - G) of each wait stays (`estimate_ms`, with R the
// no_prefetch wait; the background path's own read time differs, so it is a guide,
// not a bound).
//
//   build/bench/prefetch_bench [--sessions 24] [--tokens 1024] [--dram-sessions 4]
//       [--queue 4] [--turns 48] [--gap-ms 100] [--dir /tmp] [--json]
// Model: Llama-3-8B KV (32 layers, 8 KV heads x 128, f16: 128 KiB per token), blocks of
// 16 tokens (2 MiB). Defaults: 24 sessions x 128 MiB = 3 GiB on SSD, DRAM 512 MiB.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/store.hpp"

namespace {

using namespace attnstore;
using clock_type = std::chrono::steady_clock;

struct options {
  unsigned sessions = 24, tokens = 1024, dram_sessions = 4, queue = 4, turns = 48, repeat = 3;
  double gap_ms = 100;
  std::string dir = "/tmp";
  bool json = false;
};

const kv_geometry geometry{32, 8, 128, dtype::f16, 16};

struct run_result {
  std::vector<double> acquire_ms;
  store_stats stats;
  double median_mean = 0;  // over repeated runs (set by main)
  double mean() const {
    double s = 0;
    for (double v : acquire_ms) s += v;
    return acquire_ms.empty() ? 0 : s / double(acquire_ms.size());
  }
  double quantile(double q) const {
    std::vector<double> v = acquire_ms;
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[std::min(v.size() - 1, std::size_t(q * double(v.size())))];
  }
};

std::vector<token_id> tokens_of(unsigned session, unsigned n) {
  std::vector<token_id> t(n);
  for (unsigned i = 0; i < n; ++i) t[i] = token_id(session * 100003u + i * 7u + 1u);
  return t;
}

std::string name_of(unsigned s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "session-%u", s);
  return buf;
}

// The turn order: sessions drawn at random, never the same twice in a row.
std::vector<unsigned> turn_order(const options& o) {
  std::mt19937_64 rng(42);
  std::vector<unsigned> order;
  while (order.size() < o.turns + o.queue) {
    unsigned s = unsigned(rng() % o.sessions);
    if (!order.empty() && order.back() == s) continue;
    order.push_back(s);
  }
  return order;
}

run_result run(const options& o, const char* mode) {
  const bool all_dram = std::strcmp(mode, "all_dram") == 0;
  const std::string dir = o.dir + "/attnstore-prefetch-bench-" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const kv_geometry g = geometry.validated();
  const std::size_t session_bytes = std::size_t(g.blocks_for(o.tokens)) * g.block_bytes();
  store_config c;
  c.geometry = g;
  c.model_name = "llama-3-8b";
  const std::uint64_t session_slots = std::uint64_t(g.blocks_for(o.tokens)) * format::slot_bytes(g);
  c.dram_bytes = (all_dram ? o.sessions + 1 : o.dram_sessions) * session_slots;
  c.ssd_directory = dir;
  c.ssd_bytes = std::uint64_t(o.sessions + 2) * session_slots;
  c.prefetch = std::strcmp(mode, "prefetch") == 0;
  c.prefetch_window = o.queue;
  if (all_dram) c.demote_low_watermark = c.demote_high_watermark = 0;  // the floor: nothing leaves DRAM
  c.log = logger{&logger::quiet, nullptr};
  run_result r;
  {
    store s(c);
    std::vector<std::string> names;
    for (unsigned i = 0; i < o.sessions; ++i) names.push_back(name_of(i));
    // Fill: every session saved once; then all on SSD (except in the all-DRAM run).
    std::vector<std::byte> payload(session_bytes);
    for (unsigned i = 0; i < o.sessions; ++i) {
      for (std::size_t k = 0; k < payload.size(); k += 4096) payload[k] = std::byte(i + k / 4096);
      const auto t = tokens_of(i, o.tokens);
      if (errc e = s.put({"bench", names[i]}, t, 0, payload); e != errc::ok) {
        std::fprintf(stderr, "prefetch_bench: put failed: %s\n", std::string(to_string(e)).c_str());
        std::exit(1);
      }
      if (!all_dram) (void)s.demote({"bench", names[i]});
    }
    s.drain();
    (void)s.flush();
    // The SSD files are opened with O_DIRECT: reads come from the device, not the page cache.
    const std::vector<unsigned> order = turn_order(o);
    std::vector<block_view> views(g.blocks_for(o.tokens));
    read_lease lease(std::uint32_t(views.size()));
    std::vector<session_key> queue(o.queue);
    for (unsigned turn = 0; turn < o.turns; ++turn) {
      for (unsigned q = 0; q < o.queue; ++q) queue[q] = {"bench", names[order[turn + q]]};
      s.set_queue(queue);  // the engine's queue: this turn's session first
      std::this_thread::sleep_for(std::chrono::microseconds(long(o.gap_ms * 1000)));  // the previous turn computes
      const unsigned id = order[turn];
      const auto t = tokens_of(id, o.tokens);
      const auto t0 = clock_type::now();
      get_result gr = s.acquire({"bench", names[id]}, t, views, lease);
      const auto t1 = clock_type::now();
      if (gr.status != errc::ok || gr.blocks != views.size()) {
        std::fprintf(stderr, "prefetch_bench: acquire %s: %u of %zu blocks\n",
                     std::string(to_string(gr.status)).c_str(), gr.blocks, views.size());
        std::exit(1);
      }
      lease.release();
      r.acquire_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    r.stats = s.stats();
  }
  std::filesystem::remove_all(dir);
  return r;
}

bool parse(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--json") {
      o.json = true;
    } else if ((a == "--sessions" || a == "--tokens" || a == "--dram-sessions" || a == "--queue" || a == "--turns" ||
                a == "--gap-ms" || a == "--dir" || a == "--repeat") &&
               (v = next())) {
      if (a == "--dir") {
        o.dir = v;
        continue;
      }
      char* end = nullptr;
      const double x = std::strtod(v, &end);
      if (!end || *end || x < 0) {
        std::fprintf(stderr, "prefetch_bench: %s needs a non-negative number, got \"%s\"\n", a.c_str(), v);
        return false;
      }
      if (a == "--sessions") o.sessions = unsigned(x);
      if (a == "--tokens") o.tokens = unsigned(x);
      if (a == "--dram-sessions") o.dram_sessions = unsigned(x);
      if (a == "--queue") o.queue = unsigned(x);
      if (a == "--turns") o.turns = unsigned(x);
      if (a == "--gap-ms") o.gap_ms = x;
      if (a == "--repeat") o.repeat = unsigned(x);
    } else {
      std::fprintf(stderr,
                   "usage: prefetch_bench [--sessions N] [--tokens N] [--dram-sessions N] [--queue N] [--turns N] "
                   "[--gap-ms MS] [--repeat N] [--dir DIR] [--json]\n");
      return false;
    }
  }
  if (o.sessions < 2 || o.tokens == 0 || o.dram_sessions == 0 || o.queue == 0 || o.turns == 0 || o.repeat == 0) {
    std::fprintf(stderr, "prefetch_bench: need sessions >= 2 and tokens, dram-sessions, queue, turns, repeat >= 1\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (!parse(argc, argv, o)) return 2;
  const kv_geometry g = geometry.validated();
  const double session_mib = double(g.blocks_for(o.tokens)) * double(g.block_bytes()) / (1 << 20);
  std::printf(
      "prefetch_bench: %u sessions x %.0f MiB (%.2f GiB on SSD), DRAM for %u sessions, queue %u, gap %.0f ms, "
      "%u turns\n",
      o.sessions, session_mib, o.sessions * session_mib / 1024, o.dram_sessions, o.queue, o.gap_ms, o.turns);
  // The modes take turns, --repeat times: the shared disk's speed drifts over minutes,
  // so each mode's figure is the median of its runs' means, and all modes see the drift.
  run_result off, on, floor;
  std::vector<double> off_means, on_means, floor_means;
  auto add = [](run_result& into, std::vector<double>& means, run_result r) {
    means.push_back(r.mean());
    into.acquire_ms.insert(into.acquire_ms.end(), r.acquire_ms.begin(), r.acquire_ms.end());
    into.stats.ssd_bytes_read += r.stats.ssd_bytes_read;
    into.stats.prefetched_blocks += r.stats.prefetched_blocks;
  };
  for (unsigned rep = 0; rep < o.repeat; ++rep) {
    add(off, off_means, run(o, "no_prefetch"));
    add(on, on_means, run(o, "prefetch"));
    add(floor, floor_means, run(o, "all_dram"));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  off.median_mean = median(off_means);
  on.median_mean = median(on_means);
  floor.median_mean = median(floor_means);
  const double estimate = std::max(floor.median_mean, off.median_mean - o.gap_ms);
  const double hidden = off.median_mean > floor.median_mean
                            ? (off.median_mean - on.median_mean) / (off.median_mean - floor.median_mean)
                            : 0;
  std::printf("%-12s %10s %10s %10s %12s %12s\n", "mode", "mean_ms", "p50_ms", "p90_ms", "ssd_read_MiB", "prefetched");
  for (auto [name, r] : {std::pair{"no_prefetch", &off}, std::pair{"prefetch", &on}, std::pair{"all_dram", &floor}})
    std::printf("%-12s %10.3f %10.3f %10.3f %12.0f %12lu\n", name, r->median_mean, r->quantile(0.5), r->quantile(0.9),
                double(r->stats.ssd_bytes_read) / (1 << 20), (unsigned long)r->stats.prefetched_blocks);
  std::printf("hidden %.3f of the SSD wait (limit: all in DRAM); prefetch %.3f ms, estimate max(0, R - gap) %.3f ms\n",
              hidden, on.median_mean, estimate);
  if (o.json)
    std::printf(
        "{\"sessions\": %u, \"session_mib\": %.1f, \"gap_ms\": %.1f, \"queue\": %u, \"turns\": %u, "
        "\"no_prefetch_ms\": %.4f, \"prefetch_ms\": %.4f, \"all_dram_ms\": %.4f, \"estimate_ms\": %.4f, "
        "\"prefetch_p90_ms\": %.4f, \"no_prefetch_p90_ms\": %.4f, \"hidden\": %.4f, \"prefetched_blocks\": %lu}\n",
        o.sessions, session_mib, o.gap_ms, o.queue, o.turns, off.median_mean, on.median_mean, floor.median_mean,
        estimate, on.quantile(0.9), off.quantile(0.9), hidden, (unsigned long)on.stats.prefetched_blocks);
  return 0;
}
