// pipeline_bench: layer-wise loading overlapped with (synthetic) per-layer compute,
// through the real hooks, store and host copy backend, against its bound.
//
// Per case: L layers, each with a history slice to copy from the DRAM tier into paged
// engine memory, and a busy compute of ratio x (one layer's transfer time). The
// transfer time is measured in the same run: the same copies, done directly on one
// thread without hooks or pipelining. Reported per case:
//   ratio_to_bound  = measured / (max(L*compute, L*transfer) + min(compute, transfer))
//   ratio_to_serial = measured / (L * (compute + transfer))      (no overlap)
// Sessions rotate over a >= 1 GiB working set so the copies come from memory, not cache.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attnstore/hooks.hpp"

using namespace attnstore;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr std::uint32_t layers = 32;
constexpr std::uint32_t heads = 8, head_dim = 128, tokens_per_block = 64;
constexpr std::size_t history_tokens = 1024;  // 1024 tok x 128 KiB/token = 128 MiB per session
constexpr int sessions = 9;                   // 9 x 128 MiB = 1.1 GiB of history

void spin_for(double us) {
  const auto end = clock_type::now() + std::chrono::duration<double, std::micro>(us);
  while (clock_type::now() < end) {
  }
}

struct fixture {
  kv_geometry g{layers, heads, head_dim, dtype::f16, tokens_per_block};
  std::unique_ptr<store> kv;
  std::unique_ptr<copy_backend> copier;
  std::unique_ptr<hooks> hk;
  std::vector<std::vector<token_id>> tokens;
  std::vector<std::string> names;
  // Engine memory: one sequence's pages, [page][16 tokens][heads][dim] f16 per layer.
  std::vector<std::byte> k, v;
  std::vector<std::byte*> kb, vb;
  std::vector<std::uint32_t> table;
  kv_layout layout{};
  double layer_transfer_us = 0;

  fixture() {
    store_config c;
    c.geometry = g;
    c.model_name = "pipeline-bench";
    c.dram_bytes = (std::size_t(sessions) * history_tokens / tokens_per_block + 4) * format::slot_bytes(g.validated());
    c.log = logger{&logger::quiet, nullptr};
    kv = std::make_unique<store>(c);
    copier = make_host_copy_backend();
    hooks_config hc;
    hc.preload_layers = 2;
    hc.max_blocks_per_request = 64;
    hc.max_loads = hc.max_saves = 4;
    hk = std::make_unique<hooks>(*kv, *copier, hc);
    const std::size_t bb = kv->block_bytes();
    std::vector<std::byte> blocks(history_tokens / tokens_per_block * bb);
    for (int s = 0; s < sessions; ++s) {
      names.push_back("s" + std::to_string(s));
      std::vector<token_id> t(history_tokens);
      for (std::size_t i = 0; i < t.size(); ++i) t[i] = token_id(s * 100000 + i);
      std::memset(blocks.data(), s + 1, blocks.size());
      if (kv->put({"bench", names.back()}, t, 0, blocks) != errc::ok) throw std::runtime_error("put failed");
      tokens.push_back(std::move(t));
    }
    const std::uint32_t page = 16, pages = history_tokens / page;
    const std::size_t token_stride = std::size_t(heads) * head_dim * 2, page_stride = token_stride * page;
    k.resize(page_stride * pages * layers);
    v.resize(k.size());
    for (std::uint32_t l = 0; l < layers; ++l) {
      kb.push_back(k.data() + l * page_stride * pages);
      vb.push_back(v.data() + l * page_stride * pages);
    }
    for (std::uint32_t p = 0; p < pages; ++p) table.push_back((p * 37) % pages);  // scattered pages
    layout = kv_layout{layers,       heads, head_dim, dtype::f16,        page, page_stride, token_stride,
                       head_dim * 2, kb,    vb,       memory_space::host};
    std::memset(k.data(), 0, k.size());
    std::memset(v.data(), 0, v.size());
    // The transfer limit, measured now: the same bytes from the same DRAM-tier blocks
    // to the same engine pages, copied directly on one thread with nothing else going
    // on (no hooks, no pipeline): what the pipeline has to hide. Averaged over every
    // layer of several sessions, so sources and destinations are as cold as in the run.
    const kv_geometry gv = g.validated();
    std::vector<block_view> views(64);
    std::vector<copy_segment> segs(max_layer_segments(gv, layout) * 64);
    double total = 0;
    int layers_timed = 0;
    for (int s = 0; s < sessions; ++s) {
      get_result got = kv->acquire({"bench", names[s]}, tokens[s], views);
      for (std::uint32_t l = 0; l < layers; ++l) {
        auto t0 = clock_type::now();
        std::size_t n = 0;
        for (std::uint32_t b = 0; b < got.blocks; ++b)
          n += layer_segments(gv, views[b].payload, l, views[b].first, views[b].position, views[b].tokens,
                              kv_target{&layout, table}, copy_direction::to_engine, std::span(segs).subspan(n));
        for (std::size_t i = 0; i < n; ++i) std::memcpy(segs[i].dst, segs[i].src, segs[i].bytes);
        total += std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
        ++layers_timed;
      }
      kv->release({"bench", names[s]});
    }
    layer_transfer_us = total / layers_timed;
  }
};

fixture& fix() {
  static fixture f;
  return f;
}

void BM_Pipeline(benchmark::State& state) {
  fixture& f = fix();
  const double ratio = double(state.range(0)) / 100.0;
  const std::uint32_t preload = std::uint32_t(state.range(1));
  hooks_config hc;
  hc.preload_layers = preload;
  hc.max_blocks_per_request = 64;
  hc.max_loads = hc.max_saves = 4;
  hooks hk(*f.kv, *f.copier, hc);
  const double t = f.layer_transfer_us, c = ratio * t;
  double total_us = 0;
  int session = 0;
  for (auto _ : state) {
    const std::string& name = f.names[session];
    const auto& toks = f.tokens[session];
    session = (session + 1) % sessions;
    auto t0 = clock_type::now();
    load_info li = hk.start_load({"bench", name}, toks, kv_target{&f.layout, f.table});
    if (li.status != errc::ok || li.tokens != history_tokens) state.SkipWithError("load failed");
    for (std::uint32_t l = 0; l < layers; ++l) {
      (void)hk.wait_layer(li.handle, l);
      spin_for(c);  // layer l's compute
    }
    total_us += std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
    (void)hk.finish_load(li.handle);
  }
  const double measured = total_us / double(state.iterations());
  const double bound = std::max(layers * c, layers * t) + std::min(c, t);
  state.counters["ratio_to_bound"] = measured / bound;
  state.counters["ratio_to_serial"] = measured / (layers * (c + t));
  state.counters["layer_transfer_us"] = t;
  state.counters["layer_compute_us"] = c;
  state.counters["measured_us"] = measured;
  state.counters["bound_us"] = bound;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(history_tokens * f.g.token_bytes()));
}
BENCHMARK(BM_Pipeline)
    ->ArgNames({"compute_pct", "preload"})
    ->ArgsProduct({{25, 50, 100, 200, 400}, {1, 2, 4}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Cost of the hook calls themselves on the host path, with the copies already done:
// what an engine pays per call beyond the data movement.
void BM_HookCall(benchmark::State& state) {
  fixture& f = fix();
  hooks_config hc;
  hc.preload_layers = layers;  // everything queued at start_load
  hc.max_blocks_per_request = 64;
  hc.max_loads = hc.max_saves = 4;
  hooks hk(*f.kv, *f.copier, hc);
  const int which = int(state.range(0));  // 0: wait_layer, 1: save_layer
  load_info li = hk.start_load({"bench", f.names[0]}, f.tokens[0], kv_target{&f.layout, f.table});
  (void)hk.wait_layer(li.handle, layers - 1);
  (void)hk.finish_load(li.handle);
  std::vector<token_id> one{7};
  std::uint32_t l = 0;
  if (which == 0) {
    li = hk.start_load({"bench", f.names[0]}, f.tokens[0], kv_target{&f.layout, f.table});
    for (std::uint32_t k = 0; k < layers; ++k) (void)hk.wait_layer(li.handle, k);  // all copies complete
    for (auto _ : state) {
      benchmark::DoNotOptimize(hk.wait_layer(li.handle, l));
      l = (l + 1) % layers;
    }
    (void)hk.finish_load(li.handle);
  } else {
    // A one-token save: the call queues one small segment per layer and K/V.
    errc st;
    save_handle sh = hk.start_save({"bench", "hook-save"}, one, 0, kv_source{&f.layout, f.table}, std::nullopt, &st);
    for (auto _ : state) {
      benchmark::DoNotOptimize(hk.save_layer(sh, l));
      l = (l + 1) % layers;
    }
    (void)hk.finish_save(sh);
  }
}
BENCHMARK(BM_HookCall)->ArgName("save")->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
