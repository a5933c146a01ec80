// pipeline_bench --backend cuda: the layer-wise pipeline with the engine's KV in GPU
// memory (cudaMalloc) and the DRAM tier CUDA-pinned, through the real hooks, store and
// CUDA copy backend, against limits measured in the same run (at start-up, medians
// over the sessions):
//   peak_h2d / peak_d2h: one 256 MiB cudaMemcpyAsync between pinned memory and the GPU
//     (the PCIe peak);
//   direct: the segments a load (save) of one session moves, one cudaMemcpyAsync each
//     on one stream, no hooks;
//   backend: the same segments through copy_backend::copy_async, one call per layer as
//     the hooks issue them, no hooks.
// Cases (each reports GBps and its ratios to those limits):
//   BM_CudaLoad/preload:P     start_load, wait_layer for every layer, compute stream done
//   BM_CudaSave               start_save, save_layer for every layer, finish_save; that
//                             includes the store's checksums (commit_us, measured alone);
//                             copy_GBps and ratio_to_copy against the same save aborted
//                             after its copies, in the same iterations
//   BM_CudaOverlap/compute_pct:C/preload:P   a spin kernel of C% of one layer's transfer
//                             after each wait_layer, against max(compute, transfer)
//   BM_CudaTruncatedLoad      a truncated view: copies plus one re-rotation kernel per layer
//   BM_CudaHookCall/save:S    the cost of one wait_layer (S=0) or save_layer (S=1)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "attnstore/detail/host_memory.hpp"
#include "attnstore/truncate.hpp"
#include "pipeline_fixture.hpp"

namespace attnstore::detail {
bool cuda_spin_async(std::uint64_t ns, void* stream) noexcept;
}

namespace pipeline {
namespace {

constexpr std::size_t peak_bytes = std::size_t(256) << 20;
constexpr std::size_t session_bytes = history_tokens * geometry.token_bytes();
constexpr std::uint64_t truncated_sink = 64, truncated_drop = 512;  // kept: 512 tokens, 448 of them moved
constexpr int truncated_sessions = 2;

void cuda_try(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
template <class T>
T* device_alloc(std::size_t bytes) {
  void* p = nullptr;
  cuda_try(cudaMalloc(&p, bytes), "cudaMalloc");
  return static_cast<T*>(p);
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double gbps(std::size_t bytes, double us) { return double(bytes) / (us * 1e3); }

struct cuda_fixture {
  bench_store s{2 * history_tokens / tokens_per_block * (1 + truncated_sessions) + 4};
  std::unique_ptr<copy_backend> copier;
  cudaStream_t compute = nullptr;  // the engine's stream; also carries the direct copies
  std::byte* kv_dev = device_alloc<std::byte>(2 * layer_side_bytes * layers);
  paged_engine engine{kv_dev, kv_dev + std::size_t(layers) * layer_side_bytes, memory_space::device};
  std::byte* peak_dev = device_alloc<std::byte>(peak_bytes);
  std::byte* peak_host = nullptr;
  std::vector<std::vector<copy_segment>> segs;          // per session: every layer's load segments
  std::vector<read_lease> leases;                       // keep those blocks as they are for the run
  std::vector<std::vector<std::size_t>> layer_end;      // per session: segment count after layer l
  std::vector<std::vector<token_id>> truncated_tokens;  // per truncated session: its kept view
  double peak_h2d_GBps = 0, peak_d2h_GBps = 0;
  double direct_load_us = 0, direct_save_us = 0, backend_load_us = 0, hooks_load_us = 0, commit_us = 0;

  cuda_fixture() {
    std::string why;
    copier = make_cuda_copy_backend(&why);
    if (!copier) throw std::runtime_error("no CUDA copy backend: " + why);
    cuda_try(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_try(cudaHostAlloc(reinterpret_cast<void**>(&peak_host), peak_bytes, cudaHostAllocDefault), "cudaHostAlloc");
    std::memset(peak_host, 1, peak_bytes);
    cuda_try(cudaMemset(kv_dev, 0, 2 * layer_side_bytes * layers), "cudaMemset");
    cuda_try(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    build_segments();
    measure_limits();
    make_truncated_sessions();
  }

  // Each session's blocks stay leased for the run, so the views' payload pointers the
  // segments hold stay valid.
  void build_segments() {
    std::vector<block_view> views(64);
    for (int i = 0; i < sessions; ++i) {
      leases.emplace_back(64);  // kept for the run: the segments point into the leased blocks
      get_result got = s.kv->acquire(s.key(i), s.tokens[std::size_t(i)], views, leases.back());
      if (got.tokens != history_tokens) throw std::runtime_error("acquire failed");
      std::vector<copy_segment> all(max_layer_segments(geometry, engine.layout) * 64 * layers);
      std::vector<std::size_t> ends;
      std::size_t n = 0;
      for (std::uint32_t l = 0; l < layers; ++l)
        ends.push_back(n = layer_load_segments(views, got.blocks, l, engine, all, n));
      all.resize(n);
      segs.push_back(std::move(all));
      layer_end.push_back(std::move(ends));
    }
  }

  double timed_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
    const auto t0 = clock_type::now();
    cuda_try(cudaMemcpyAsync(dst, src, bytes, kind, compute), "cudaMemcpyAsync");
    cuda_try(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    return us_since(t0);
  }
  double direct_pass(int i, bool to_device) {
    const auto t0 = clock_type::now();
    for (const copy_segment& g : segs[std::size_t(i)])
      cuda_try(to_device ? cudaMemcpyAsync(g.dst, g.src, g.bytes, cudaMemcpyHostToDevice, compute)
                         : cudaMemcpyAsync(const_cast<void*>(g.src), g.dst, g.bytes, cudaMemcpyDeviceToHost, compute),
               "cudaMemcpyAsync segment");
    cuda_try(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    return us_since(t0);
  }

  void measure_limits() {
    std::vector<double> h2d, d2h, load, save, backend, hooked, commit;
    for (int rep = 0; rep < 5; ++rep) {
      h2d.push_back(timed_copy(peak_dev, peak_host, peak_bytes, cudaMemcpyHostToDevice));
      d2h.push_back(timed_copy(peak_host, peak_dev, peak_bytes, cudaMemcpyDeviceToHost));
    }
    peak_h2d_GBps = gbps(peak_bytes, median(h2d));
    peak_d2h_GBps = gbps(peak_bytes, median(d2h));
    // Two passes over every session; the first warms up.
    for (int pass = 0; pass < 2; ++pass) {
      load.clear(), save.clear();
      for (int i = 0; i < sessions; ++i) {
        load.push_back(direct_pass(i, true));
        save.push_back(direct_pass(i, false));  // writes back the bytes just loaded
      }
    }
    direct_load_us = median(load);
    direct_save_us = median(save);
    // The backend: one copy_async per layer on its own stream, as the hooks issue them.
    stream_ref bs = copier->create_stream();
    event_id e = copier->acquire_event();
    for (int i = 0; i < sessions; ++i) {
      const auto t0 = clock_type::now();
      std::size_t from = 0;
      for (std::uint32_t l = 0; l < layers; ++l) {
        const std::size_t to = layer_end[std::size_t(i)][l];
        if (copier->copy_async(std::span(segs[std::size_t(i)]).subspan(from, to - from), bs) != errc::ok)
          throw std::runtime_error("copy_async failed");
        from = to;
      }
      if (copier->record(e, bs) != errc::ok || copier->synchronize(e) != errc::ok)
        throw std::runtime_error("record/synchronize failed");
      backend.push_back(us_since(t0));
    }
    copier->release_event(e);
    copier->destroy_stream(bs);
    backend_load_us = median(backend);
    // The hooks, every layer queued at once, nothing else on the GPU.
    {
      hooks hk(*s.kv, *copier, bench_hooks_config(layers));
      for (int i = 0; i < sessions; ++i) hooked.push_back(hooks_load(hk, i));
    }
    hooks_load_us = median(hooked);
    // The store's part of a save: checksums and publication of a session's blocks.
    const std::vector<token_id> toks = bench_store::make_tokens(99);
    std::vector<std::byte*> payloads(history_tokens / tokens_per_block);
    for (int rep = 0; rep < 3; ++rep) {
      save_reservation r;
      if (s.kv->reserve({"bench", "commit"}, toks, 0, payloads, r) != errc::ok)
        throw std::runtime_error("reserve failed");
      const auto t0 = clock_type::now();
      if (s.kv->commit(r) != errc::ok) throw std::runtime_error("commit failed");
      commit.push_back(us_since(t0));
      (void)s.kv->drop({"bench", "commit"});
    }
    commit_us = median(commit);
  }

  // One whole load through the hooks, until the compute stream may use every layer.
  double hooks_load(hooks& hk, int i) {
    const auto t0 = clock_type::now();
    load_info li = hk.start_load(s.key(i), s.tokens[std::size_t(i)], engine.target(), stream_ref(compute));
    if (li.status != errc::ok || li.tokens != history_tokens) throw std::runtime_error("start_load failed");
    for (std::uint32_t l = 0; l < layers; ++l)
      if (hk.wait_layer(li.handle, l) != errc::ok) throw std::runtime_error("wait_layer failed");
    cuda_try(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    const double us = us_since(t0);
    (void)hk.finish_load(li.handle);
    return us;
  }

  // Sessions whose views are truncated: the first 64 tokens stay, the next 512 go, the
  // last 448 move back by 512 and need re-rotation on load.
  void make_truncated_sessions() {
    const std::size_t bb = s.kv->block_bytes();
    std::vector<std::byte> blocks(history_tokens / tokens_per_block * bb);
    std::memset(blocks.data(), 0x21, blocks.size());
    for (int t = 0; t < truncated_sessions; ++t) {
      const std::string name = "truncated" + std::to_string(t);
      std::vector<token_id> toks = bench_store::make_tokens(50 + t);
      if (s.kv->put({"bench", name}, toks, 0, blocks) != errc::ok) throw std::runtime_error("put failed");
      truncation_plan plan =
          plan_truncation(history_tokens, truncated_drop, history_tokens, truncated_sink, tokens_per_block, 0.0);
      if (!plan.needed || plan.drop != truncated_drop || s.kv->truncate({"bench", name}, toks, plan) != errc::ok)
        throw std::runtime_error("truncate failed");
      std::vector<token_id> kept(toks.begin(), toks.begin() + truncated_sink);
      kept.insert(kept.end(), toks.begin() + std::ptrdiff_t(truncated_sink + truncated_drop), toks.end());
      truncated_tokens.push_back(std::move(kept));
    }
  }

  void add_context() const {
    cudaDeviceProp prop{};
    (void)cudaGetDeviceProperties(&prop, 0);
    benchmark::AddCustomContext("gpu", prop.name);
    benchmark::AddCustomContext("dram_pinning", std::string(s.kv->dram_pinning()));
    benchmark::AddCustomContext("peak_h2d_GBps", std::to_string(peak_h2d_GBps));
    benchmark::AddCustomContext("peak_d2h_GBps", std::to_string(peak_d2h_GBps));
    benchmark::AddCustomContext("direct_load_GBps", std::to_string(gbps(session_bytes, direct_load_us)));
    benchmark::AddCustomContext("direct_save_GBps", std::to_string(gbps(session_bytes, direct_save_us)));
    benchmark::AddCustomContext("backend_load_GBps", std::to_string(gbps(session_bytes, backend_load_us)));
    benchmark::AddCustomContext("hooks_load_GBps", std::to_string(gbps(session_bytes, hooks_load_us)));
    benchmark::AddCustomContext("commit_us", std::to_string(commit_us));
    benchmark::AddCustomContext("hash_kernel", std::string(hash_kernel_name()));
    const char* verify = std::getenv("ATTNSTORE_BENCH_VERIFY_DRAM");
    benchmark::AddCustomContext("verify_dram_reads", verify && std::string(verify) == "0" ? "off" : "on");
    benchmark::AddCustomContext("segments_per_session", std::to_string(segs[0].size()));
    std::fprintf(stderr,
                 "pipeline_bench cuda: %s, DRAM tier %s, %zu segments per session (%zu KiB each)\n"
                 "  limits: peak H2D %.1f GB/s, peak D2H %.1f GB/s; one session (%zu MiB): direct load %.1f GB/s, "
                 "direct save %.1f GB/s, backend load %.1f GB/s, hooks load %.1f GB/s; commit %.0f us\n",
                 prop.name, std::string(s.kv->dram_pinning()).c_str(), segs[0].size(), segs[0][0].bytes >> 10,
                 peak_h2d_GBps, peak_d2h_GBps, session_bytes >> 20, gbps(session_bytes, direct_load_us),
                 gbps(session_bytes, direct_save_us), gbps(session_bytes, backend_load_us),
                 gbps(session_bytes, hooks_load_us), commit_us);
    if (s.kv->dram_pinning() != "cuda_pinned")
      std::fprintf(stderr, "WARNING: the DRAM tier is not CUDA-pinned: these are not the pinned-path figures\n");
  }
};

cuda_fixture* fixture = nullptr;

void BM_CudaLoad(benchmark::State& state) {
  cuda_fixture& f = *fixture;
  hooks hk(*f.s.kv, *f.copier, bench_hooks_config(std::uint32_t(state.range(0))));
  double total = 0;
  int i = 0;
  for (auto _ : state) {
    const double us = f.hooks_load(hk, i);
    i = (i + 1) % sessions;
    state.SetIterationTime(us / 1e6);
    total += us;
  }
  const double us = total / double(state.iterations()), g = gbps(session_bytes, us);
  state.counters["GBps"] = g;
  state.counters["ratio_to_peak"] = g / f.peak_h2d_GBps;
  state.counters["ratio_to_direct"] = f.direct_load_us / us;
  state.counters["ratio_to_backend"] = f.backend_load_us / us;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(session_bytes));
}

void BM_CudaSave(benchmark::State& state) {
  cuda_fixture& f = *fixture;
  hooks hk(*f.s.kv, *f.copier, bench_hooks_config(2));
  const std::vector<token_id> toks = bench_store::make_tokens(98);
  double total = 0, copies_total = 0;
  for (auto _ : state) {
    // The same save's copies alone, in the same iteration (not in its timed part):
    // start_save + save_layer as below, then abort_save, which waits for the copies and
    // publishes nothing. What a save costs beyond this is the store's checksums and
    // publication. (The first version subtracted a commit timed apart, on other blocks,
    // and could come out negative.)
    {
      errc st;
      const auto c0 = clock_type::now();
      save_handle sh = hk.start_save({"bench", "save"}, toks, 0, f.engine.target(), stream_ref(f.compute), &st);
      if (st != errc::ok) {
        state.SkipWithError("start_save failed");
        break;
      }
      for (std::uint32_t l = 0; l < layers; ++l) (void)hk.save_layer(sh, l);
      hk.abort_save(sh);
      copies_total += us_since(c0);
    }
    const auto t0 = clock_type::now();
    errc st;
    save_handle sh = hk.start_save({"bench", "save"}, toks, 0, f.engine.target(), stream_ref(f.compute), &st);
    if (st != errc::ok) {
      state.SkipWithError("start_save failed");
      break;
    }
    for (std::uint32_t l = 0; l < layers; ++l) (void)hk.save_layer(sh, l);
    if (hk.finish_save(sh) != errc::ok) {
      state.SkipWithError("finish_save failed");
      break;
    }
    const double us = us_since(t0);
    state.SetIterationTime(us / 1e6);
    total += us;
    (void)hk.close_session({"bench", "save"});  // its blocks go back for the next save
  }
  const double n = double(std::max<std::int64_t>(1, state.iterations()));
  const double us = total / n, copy_us = copies_total / n, g = gbps(session_bytes, us);
  state.counters["GBps"] = g;
  state.counters["ratio_to_peak"] = g / f.peak_d2h_GBps;
  state.counters["ratio_to_direct"] = f.direct_save_us / us;
  state.counters["commit_us"] = f.commit_us;
  // The copies alone, measured in the same iterations: to hold against the PCIe peak,
  // and what the whole save costs against them (1.0: the checksums are hidden).
  state.counters["copy_GBps"] = gbps(session_bytes, copy_us);
  state.counters["copy_ratio_to_peak"] = gbps(session_bytes, copy_us) / f.peak_d2h_GBps;
  state.counters["ratio_to_copy"] = copy_us / us;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(session_bytes));
}

void BM_CudaOverlap(benchmark::State& state) {
  cuda_fixture& f = *fixture;
  const double t = std::min(f.direct_load_us, f.backend_load_us) / layers;  // one layer's fastest transfer
  const double c = double(state.range(0)) / 100.0 * t;
  const auto spin_ns = std::uint64_t(c * 1000);
  hooks hk(*f.s.kv, *f.copier, bench_hooks_config(std::uint32_t(state.range(1))));
  // The compute alone, as the GPU runs it (launch gaps included).
  std::vector<double> alone;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = clock_type::now();
    for (std::uint32_t l = 0; l < layers; ++l) (void)detail::cuda_spin_async(spin_ns, f.compute);
    cuda_try(cudaStreamSynchronize(f.compute), "cudaStreamSynchronize");
    alone.push_back(us_since(t0));
  }
  const double compute_us = median(alone);
  double total = 0;
  int i = 0;
  for (auto _ : state) {
    const auto t0 = clock_type::now();
    load_info li = hk.start_load(f.s.key(i), f.s.tokens[std::size_t(i)], f.engine.target(), stream_ref(f.compute));
    i = (i + 1) % sessions;
    if (li.status != errc::ok) {
      state.SkipWithError("start_load failed");
      break;
    }
    for (std::uint32_t l = 0; l < layers; ++l) {
      (void)hk.wait_layer(li.handle, l);
      (void)detail::cuda_spin_async(spin_ns, f.compute);  // layer l's compute
    }
    cuda_try(cudaStreamSynchronize(f.compute), "cudaStreamSynchronize");
    const double us = us_since(t0);
    (void)hk.finish_load(li.handle);
    state.SetIterationTime(us / 1e6);
    total += us;
  }
  const double measured = total / double(std::max<std::int64_t>(1, state.iterations()));
  const double bound = std::max(compute_us, layers * t) + std::min(c, t);
  state.counters["ratio_to_bound"] = measured / bound;
  state.counters["ratio_to_serial"] = measured / (compute_us + layers * t);
  state.counters["layer_transfer_us"] = t;
  state.counters["layer_compute_us"] = c;
  state.counters["compute_alone_us"] = compute_us;
  state.counters["measured_us"] = measured;
  state.counters["bound_us"] = bound;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(session_bytes));
}

void BM_CudaTruncatedLoad(benchmark::State& state) {
  cuda_fixture& f = *fixture;
  hooks_config hc = bench_hooks_config(layers);
  hc.rope = rope_spec{rope_style::neox, head_dim};
  hooks hk(*f.s.kv, *f.copier, hc);
  const std::size_t kept = history_tokens - truncated_drop, bytes = kept * geometry.token_bytes();
  double total = 0;
  int t = 0;
  for (auto _ : state) {
    const std::string name = "truncated" + std::to_string(t);
    const std::vector<token_id>& toks = f.truncated_tokens[std::size_t(t)];
    t = (t + 1) % truncated_sessions;
    const auto t0 = clock_type::now();
    load_info li = hk.start_load({"bench", name}, toks, f.engine.target(), stream_ref(f.compute));
    if (li.status != errc::ok || li.tokens != kept) {
      state.SkipWithError("start_load of the truncated view failed");
      break;
    }
    for (std::uint32_t l = 0; l < layers; ++l) (void)hk.wait_layer(li.handle, l);
    cuda_try(cudaStreamSynchronize(f.compute), "cudaStreamSynchronize");
    const double us = us_since(t0);
    (void)hk.finish_load(li.handle);
    state.SetIterationTime(us / 1e6);
    total += us;
  }
  const double us = total / double(std::max<std::int64_t>(1, state.iterations()));
  const double plain_us = f.hooks_load_us * double(kept) / double(history_tokens);  // same bytes, nothing moved
  state.counters["GBps"] = gbps(bytes, us);
  state.counters["rotated_tokens"] = double(kept - truncated_sink);
  state.counters["plain_load_us"] = plain_us;
  state.counters["rerotate_overhead_us"] = us - plain_us;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(bytes));
}

void BM_CudaHookCall(benchmark::State& state) {
  hook_call_loop(state, fixture->s, *fixture->copier, fixture->engine, stream_ref(fixture->compute));
  cuda_try(cudaStreamSynchronize(fixture->compute), "cudaStreamSynchronize");
}

}  // namespace

bool register_cuda_benchmarks(std::string* why) {
  if (!detail::cuda_device_present(why)) return false;  // before the store's 1 GiB of puts
  try {
    static cuda_fixture f;  // set up once, before any case runs: its limits are every case's reference
    fixture = &f;
    f.add_context();
  } catch (const std::exception& e) {
    // A GPU is there and set-up broke: a failure, not a skip (exit 77).
    std::fprintf(stderr, "pipeline_bench: FAILED: set-up: %s\n", e.what());
    std::exit(1);
  }
  benchmark::RegisterBenchmark("BM_CudaLoad", BM_CudaLoad)
      ->ArgName("preload")
      ->Arg(2)
      ->Arg(layers)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  benchmark::RegisterBenchmark("BM_CudaSave", BM_CudaSave)->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::RegisterBenchmark("BM_CudaOverlap", BM_CudaOverlap)
      ->ArgNames({"compute_pct", "preload"})
      ->ArgsProduct({{25, 50, 100, 200, 400}, {1, 2, 4}})
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  benchmark::RegisterBenchmark("BM_CudaTruncatedLoad", BM_CudaTruncatedLoad)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  benchmark::RegisterBenchmark("BM_CudaHookCall", BM_CudaHookCall)
      ->ArgName("save")
      ->Arg(0)
      ->Arg(1)
      ->Unit(benchmark::kMicrosecond);
  return true;
}

}  // namespace pipeline
