// pipeline_bench: layer-wise loading overlapped with (synthetic) per-layer compute,
// through the real hooks and store, against its bound.
//
// --backend host (default): the host copy backend and engine memory in DRAM. Per case:
// L layers, each with a history slice to copy from the DRAM tier into paged engine
// memory, and a busy compute of ratio x (one layer's transfer time). The transfer time
// is measured in the same run: the same copies, done directly on one thread without
// hooks or pipelining. Reported per case:
//   ratio_to_bound  = measured / (max(L*compute, L*transfer) + min(compute, transfer))
//   ratio_to_serial = measured / (L * (compute + transfer))      (no overlap)
// BM_Save: a 128 MiB turn saved through the hooks against its copies alone
// (ratio_to_copy), with the checksums hashed at commit (hash_lanes 0) or layer by layer
// while the copies run (1, 2 lanes).
// --backend cuda: engine memory on the GPU, the DRAM tier CUDA-pinned; see
// pipeline_bench_cuda.cpp.
// Sessions rotate over a >= 1 GiB working set so the copies come from memory, not cache.

#include "../bench_main.hpp"
#include "attnstore/config.hpp"
#include "pipeline_fixture.hpp"

using namespace pipeline;

#if ATTNSTORE_HAS_CUDA
namespace pipeline {
bool register_cuda_benchmarks(std::string* why);
}
#endif

namespace {

void spin_for(double us) {
  const auto end = clock_type::now() + std::chrono::duration<double, std::micro>(us);
  while (clock_type::now() < end) {
  }
}

struct fixture {
  bench_store s{history_tokens / tokens_per_block + 4};  // room for BM_Save's 128 MiB turn
  std::unique_ptr<copy_backend> copier = make_host_copy_backend();
  // Engine memory: one sequence's pages, K of every layer then V of every layer.
  std::vector<std::byte> k = std::vector<std::byte>(layer_side_bytes * layers),
                         v = std::vector<std::byte>(layer_side_bytes * layers);
  paged_engine engine{k.data(), v.data(), memory_space::host};
  double layer_transfer_us = 0;

  fixture() {
    // The transfer limit, measured now: the same bytes from the same DRAM-tier blocks
    // to the same engine pages, copied directly on one thread with nothing else going
    // on (no hooks, no pipeline): what the pipeline has to hide. Averaged over every
    // layer of several sessions, so sources and destinations are as cold as in the run.
    std::vector<block_view> views(64);
    read_lease lease(64);
    std::vector<copy_segment> segs(max_layer_segments(geometry, engine.layout) * 64);
    double total = 0;
    int layers_timed = 0;
    for (int i = 0; i < sessions; ++i) {
      get_result got = s.kv->acquire(s.key(i), s.tokens[std::size_t(i)], views, lease);
      for (std::uint32_t l = 0; l < layers; ++l) {
        auto t0 = clock_type::now();
        const std::size_t n = layer_load_segments(views, got.blocks, l, engine, segs, 0);
        for (std::size_t j = 0; j < n; ++j) std::memcpy(segs[j].dst, segs[j].src, segs[j].bytes);
        total += us_since(t0);
        ++layers_timed;
      }
      lease.release();
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
  hooks hk(*f.s.kv, *f.copier, bench_hooks_config(std::uint32_t(state.range(1))));
  const double t = f.layer_transfer_us, c = ratio * t;
  double total_us = 0;
  int session = 0;
  for (auto _ : state) {
    const int i = session;
    session = (session + 1) % sessions;
    auto t0 = clock_type::now();
    load_info li = hk.start_load(f.s.key(i), f.s.tokens[std::size_t(i)], f.engine.target());
    if (li.status != errc::ok || li.tokens != history_tokens) state.SkipWithError("load failed");
    for (std::uint32_t l = 0; l < layers; ++l) {
      (void)hk.wait_layer(li.handle, l);
      spin_for(c);  // layer l's compute
    }
    total_us += us_since(t0);
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
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(history_tokens * geometry.token_bytes()));
}

// A 128 MiB turn (1024 tokens, 32 layers) saved from paged engine memory through the
// hooks, layer by layer, against the same save's copies alone (start_save, save_layer,
// abort_save: no checksums, nothing published), timed in the same iterations and taking
// turns at going first. Arg: hash lanes (0: the store hashes every block at commit,
// after the copies; n: each layer is hashed on n lanes as it lands).
//   ratio_to_copy = copies alone / whole save  (1.0: the checksums cost nothing)
void BM_Save(benchmark::State& state) {
  fixture& f = fix();
  hooks_config hc = bench_hooks_config(2);
  hc.hash_lanes = std::uint32_t(state.range(0));
  hooks hk(*f.s.kv, *f.copier, hc);
  const std::vector<token_id> toks = bench_store::make_tokens(97);
  const session_key key{"bench", "save"};
  double save_us = 0, copy_us = 0;
  std::int64_t n = 0;
  // Starts the save and queues every layer; then `publish` finishes it or gives it up.
  auto timed_save = [&](bool publish) {
    errc st;
    const auto t0 = clock_type::now();
    save_handle sh = hk.start_save(key, toks, 0, f.engine.target(), std::nullopt, &st);
    if (st != errc::ok) return -1.0;
    for (std::uint32_t l = 0; l < layers; ++l) (void)hk.save_layer(sh, l);
    if (!publish) {
      hk.abort_save(sh);  // waits for the copies
      return us_since(t0);
    }
    if (hk.finish_save(sh) != errc::ok) return -1.0;
    const double us = us_since(t0);
    (void)hk.close_session(key);  // its blocks go back for the next save
    return us;
  };
  auto copies = [&] { return timed_save(false); };
  auto whole = [&] { return timed_save(true); };
  for (auto _ : state) {
    double c, w;
    if (n++ % 2) {
      c = copies();
      w = whole();
    } else {
      w = whole();
      c = copies();
    }
    if (c < 0 || w < 0) {
      state.SkipWithError("save failed");
      return;
    }
    copy_us += c;
    save_us += w;
    state.SetIterationTime(w / 1e6);
  }
  const double turn_bytes = double(history_tokens * geometry.token_bytes());
  state.counters["GBps"] = turn_bytes / (save_us / double(n)) / 1e3;
  state.counters["copy_GBps"] = turn_bytes / (copy_us / double(n)) / 1e3;
  state.counters["ratio_to_copy"] = copy_us / save_us;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(turn_bytes));
}

// Cost of the hook calls themselves on the host path, with the copies already done:
// what an engine pays per call beyond the data movement.
void BM_HookCall(benchmark::State& state) {
  fixture& f = fix();
  hook_call_loop(state, f.s, *f.copier, f.engine, std::nullopt);
}

void register_host_benchmarks() {
  benchmark::RegisterBenchmark("BM_Pipeline", BM_Pipeline)
      ->ArgNames({"compute_pct", "preload"})
      ->ArgsProduct({{25, 50, 100, 200, 400}, {1, 2, 4}})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("BM_Save", BM_Save)
      ->ArgName("hash_lanes")
      ->Arg(0)
      ->Arg(1)
      ->Arg(2)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  benchmark::RegisterBenchmark("BM_HookCall", BM_HookCall)
      ->ArgName("save")
      ->Arg(0)
      ->Arg(1)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
#if ATTNSTORE_HAS_CUDA
  return run_benchmarks(argc, argv, "pipeline_bench", register_host_benchmarks, pipeline::register_cuda_benchmarks);
#else
  return run_benchmarks(argc, argv, "pipeline_bench", register_host_benchmarks, nullptr);
#endif
}
