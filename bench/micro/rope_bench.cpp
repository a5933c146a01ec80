// rope_bench: CPU re-rotation of stored keys on one core, next to memcpy of the same
// bytes in the same binary. Keys: 8 KV heads x 128 dims per token, rotated by one
// shared delta (the truncation case) over a 1 GiB working set in place.
// --backend cuda: the CUDA kernel on a 1 GiB device buffer, next to a device-to-device
// cudaMemcpyAsync of the same bytes, both timed with CUDA events:
//   BM_CudaRerotate      one launch per run of run_tokens tokens (rerotate_cuda)
//   BM_CudaRerotateRuns  `runs` runs of run_tokens tokens scattered over a region (a
//                        shuffled page table), one launch for all (rerotate_runs_cuda,
//                        as the hooks rotate a loaded layer); runs:28 is one layer of
//                        pipeline_bench's truncated load
#include <benchmark/benchmark.h>

#include <cstring>
#include <string>
#include <vector>

#include "../bench_main.hpp"
#include "attnstore/config.hpp"
#include "attnstore/rope.hpp"

#if ATTNSTORE_HAS_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "attnstore/detail/host_memory.hpp"
#endif

using namespace attnstore;

namespace {
constexpr std::size_t working_set = std::size_t(1) << 30;
constexpr std::uint32_t heads = 8, head_dim = 128;
constexpr std::size_t chunk_tokens = 4096;  // rotated per call

std::vector<std::byte>& buffer() {
  static std::vector<std::byte> b = [] {
    std::vector<std::byte> v(working_set);
    for (std::size_t i = 0; i < v.size(); i += 2)
      v[i] = std::byte(i * 7), v[i + 1] = std::byte(0x3c);  // finite f16/bf16
    return v;
  }();
  return b;
}

void BM_Rerotate(benchmark::State& state) {
  const dtype dt = dtype(state.range(0));
  rope_spec spec{rope_style::neox, head_dim};
  rope_angles angles(spec, 1);
  angles.fill(-4096, 0, 1);
  auto& buf = buffer();
  const std::size_t token_bytes = std::size_t(heads) * head_dim * dtype_size(dt);
  const std::size_t chunk = chunk_tokens * token_bytes;
  std::size_t off = 0;
  for (auto _ : state) {
    if (off + chunk > buf.size()) off = 0;
    benchmark::DoNotOptimize(
        rerotate(buf.data() + off, dt, chunk_tokens, heads, token_bytes, head_dim * dtype_size(dt), angles));
    off += chunk;
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(chunk));
  state.SetLabel(std::string(to_string(dt)));
}

// The limit: memcpy of the same chunk size within the same working set, cold source
// and cold destination, as the in-place rotation reads and writes each byte once.
void BM_Memcpy(benchmark::State& state) {
  auto& buf = buffer();
  const std::size_t chunk = chunk_tokens * heads * head_dim * 2;
  const std::size_t half = buf.size() / 2;
  std::size_t off = 0;
  for (auto _ : state) {
    if (off + chunk > half) off = 0;
    std::memcpy(buf.data() + half + off, buf.data() + off, chunk);
    benchmark::ClobberMemory();
    off += chunk;
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(chunk));
}
void register_host_benchmarks() {
  benchmark::RegisterBenchmark("BM_Rerotate", BM_Rerotate)
      ->ArgName("dtype")
      ->Arg(int(dtype::f16))
      ->Arg(int(dtype::bf16))
      ->Arg(int(dtype::f32));
  benchmark::RegisterBenchmark("BM_Memcpy", BM_Memcpy);
}

#if ATTNSTORE_HAS_CUDA
// ---- GPU: one pass = up to max_calls kernel launches (or copies), walking the working
// set; the CUDA events around a pass give its time, so host launch gaps count.
constexpr std::size_t max_calls = 4096;
constexpr std::uint32_t table_rows = 4096;  // per-token angle rows (keys stored before RoPE)

struct gpu_state {
  std::byte* keys = nullptr;
  float* angles = nullptr;  // cos rows, then sin rows
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
};
gpu_state gpu;

bool cuda_ok(cudaError_t e, std::string* why, const char* what) {
  if (e != cudaSuccess && why) *why = std::string(what) + ": " + cudaGetErrorString(e);
  return e == cudaSuccess;
}

// Exits (a failure, not a skip) when a GPU is there and set-up breaks.
void setup_gpu() {
  std::string why;
  rope_spec spec{rope_style::neox, head_dim};
  rope_angles rows(spec, table_rows);
  rows.fill(0, 1, table_rows);
  const std::size_t row_bytes = std::size_t(table_rows) * (head_dim / 2) * sizeof(float);
  const bool ok =
      cuda_ok(cudaMalloc(reinterpret_cast<void**>(&gpu.keys), working_set), &why, "cudaMalloc keys") &&
      cuda_ok(cudaMemset(gpu.keys, 0x3c, working_set), &why, "cudaMemset") &&  // finite in f16, bf16, f32
      cuda_ok(cudaMalloc(reinterpret_cast<void**>(&gpu.angles), 2 * row_bytes), &why, "cudaMalloc angles") &&
      cuda_ok(cudaMemcpy(gpu.angles, rows.cos_row(0), row_bytes, cudaMemcpyHostToDevice), &why, "upload cos") &&
      cuda_ok(cudaMemcpy(gpu.angles + row_bytes / sizeof(float), rows.sin_row(0), row_bytes, cudaMemcpyHostToDevice),
              &why, "upload sin") &&
      cuda_ok(cudaStreamCreateWithFlags(&gpu.stream, cudaStreamNonBlocking), &why, "cudaStreamCreate") &&
      cuda_ok(cudaEventCreate(&gpu.start), &why, "cudaEventCreate") &&
      cuda_ok(cudaEventCreate(&gpu.stop), &why, "cudaEventCreate") &&
      cuda_ok(cudaDeviceSynchronize(), &why, "cudaDeviceSynchronize");
  if (!ok) {
    std::fprintf(stderr, "rope_bench: FAILED: set-up: %s\n", why.c_str());
    std::exit(1);
  }
}

// Seconds of one pass of `work(offset)` calls over chunks of `chunk` bytes within `span`.
template <class Work>
double timed_pass(std::size_t chunk, std::size_t span, Work&& work) {
  const std::size_t calls = std::min(max_calls, span / chunk);
  cudaEventRecord(gpu.start, gpu.stream);
  for (std::size_t i = 0; i < calls; ++i) work(i * chunk);
  cudaEventRecord(gpu.stop, gpu.stream);
  cudaEventSynchronize(gpu.stop);
  float ms = 0;
  cudaEventElapsedTime(&ms, gpu.start, gpu.stop);
  return ms / 1e3;
}

// The limit: device-to-device copies of the same chunks, first half of the working set
// to the second (each byte read and written once, as the in-place rotation does).
double memcpy_pass(std::size_t chunk) {
  const std::size_t half = working_set / 2;
  return timed_pass(chunk, half, [&](std::size_t off) {
    cudaMemcpyAsync(gpu.keys + half + off, gpu.keys + off, chunk, cudaMemcpyDeviceToDevice, gpu.stream);
  });
}

void BM_CudaMemcpy(benchmark::State& state) {
  const std::size_t chunk = std::size_t(state.range(0)) * heads * head_dim * 2;
  std::size_t bytes = 0;
  for (auto _ : state) {
    state.SetIterationTime(memcpy_pass(chunk));
    bytes += std::min(max_calls, working_set / 2 / chunk) * chunk;
  }
  state.SetBytesProcessed(std::int64_t(bytes));
}

// The timed passes of `rotate` (one call per chunk of `chunk` bytes), reported as GBps
// and against a device-to-device copy of the same chunks. Returns seconds per call.
template <class Rotate>
double rotation_passes(benchmark::State& state, std::size_t chunk, Rotate&& rotate, const errc& status) {
  const std::size_t calls = std::min(max_calls, working_set / chunk);
  double total = 0;
  for (auto _ : state) {
    const double s = timed_pass(chunk, working_set, rotate);
    state.SetIterationTime(s);
    total += s;
  }
  if (status != errc::ok) state.SkipWithError(std::string(to_string(status)).c_str());
  const std::size_t bytes = std::size_t(state.iterations()) * calls * chunk;
  double copy = 0;
  for (int rep = 0; rep < 3; ++rep) copy += memcpy_pass(chunk);
  const std::size_t copied = std::min(max_calls, working_set / 2 / chunk) * chunk;
  const double rotate_GBps = double(bytes) / total / 1e9, copy_GBps = 3 * double(copied) / copy / 1e9;
  state.counters["GBps"] = rotate_GBps;
  state.counters["memcpy_GBps"] = copy_GBps;
  state.counters["ratio_to_memcpy"] = rotate_GBps / copy_GBps;
  state.SetBytesProcessed(std::int64_t(bytes));
  return total / double(std::max<std::size_t>(1, bytes / chunk));
}

void BM_CudaRerotate(benchmark::State& state) {
  const dtype dt = dtype(state.range(0));
  const bool per_token = state.range(1) != 0;  // keys stored before RoPE: a row per position
  const std::uint32_t run = std::uint32_t(state.range(2));
  const rope_spec spec{rope_style::neox, head_dim};
  const std::size_t token_bytes = std::size_t(heads) * head_dim * dtype_size(dt), chunk = run * token_bytes;
  const float* cos = gpu.angles;
  const float* sin = gpu.angles + std::size_t(table_rows) * (head_dim / 2);
  errc status = errc::ok;
  auto rotate = [&](std::size_t off) {
    errc e = rerotate_cuda(gpu.keys + off, dt, run, heads, token_bytes, head_dim * dtype_size(dt), cos, sin, !per_token,
                           spec, gpu.stream);
    if (e != errc::ok) status = e;
  };
  const double call = rotation_passes(state, chunk, rotate, status);
  state.counters["us_per_call"] = call * 1e6;
  state.SetLabel(std::string(to_string(dt)) + (per_token ? " per-token rows" : " shared row"));
}

// One launch rotates `runs` runs of run_tokens tokens, run r at page perm[r] of a
// region of `runs` pages; each launch of a pass takes the next region. The limit: one
// device-to-device copy of a region's bytes per launch (memcpy_pass).
void BM_CudaRerotateRuns(benchmark::State& state) {
  const dtype dt = dtype(state.range(0));
  const bool per_token = state.range(1) != 0;
  const std::uint32_t run = std::uint32_t(state.range(2)), runs = std::uint32_t(state.range(3));
  const rope_spec spec{rope_style::neox, head_dim};
  const std::size_t token_bytes = std::size_t(heads) * head_dim * dtype_size(dt), run_bytes = run * token_bytes;
  const std::size_t span = std::size_t(runs) * run_bytes;
  std::vector<std::uint32_t> perm(runs);
  for (std::uint32_t r = 0; r < runs; ++r) perm[r] = r;
  std::shuffle(perm.begin(), perm.end(), std::mt19937(5));
  std::vector<rope_run> table(runs);
  for (std::uint32_t r = 0; r < runs; ++r)
    table[r] = {perm[r] * run_bytes, run, per_token ? (r * run) % (table_rows - run) : 0};
  rope_run* dtable = nullptr;
  std::string why;
  if (!cuda_ok(cudaMalloc(reinterpret_cast<void**>(&dtable), runs * sizeof(rope_run)), &why, "cudaMalloc runs") ||
      !cuda_ok(cudaMemcpy(dtable, table.data(), runs * sizeof(rope_run), cudaMemcpyHostToDevice), &why,
               "upload runs")) {
    state.SkipWithError(why.c_str());
    cudaFree(dtable);
    return;
  }
  rope_runs_view view;
  view.runs = dtable;
  view.count = runs;
  view.max_tokens = run;
  view.row_step = per_token ? 1 : 0;
  view.cos = gpu.angles;
  view.sin = gpu.angles + std::size_t(table_rows) * (head_dim / 2);
  view.dt = dt;
  view.heads = heads;
  view.token_stride = token_bytes;
  view.head_stride = head_dim * dtype_size(dt);
  errc status = errc::ok;
  auto rotate = [&](std::size_t off) {
    view.base = gpu.keys + off;
    if (errc e = rerotate_runs_cuda(view, spec, gpu.stream); e != errc::ok) status = e;
  };
  const double launch = rotation_passes(state, span, rotate, status);
  cudaFree(dtable);
  state.counters["us_per_launch"] = launch * 1e6;
  state.counters["ns_per_run"] = launch / runs * 1e9;
  state.SetLabel(std::string(to_string(dt)) + (per_token ? " per-token rows" : " shared row"));
}

bool register_cuda_benchmarks(std::string* why) {
  if (!detail::cuda_device_present(why)) return false;
  setup_gpu();
  auto* r = benchmark::RegisterBenchmark("BM_CudaRerotate", BM_CudaRerotate)
                ->ArgNames({"dtype", "per_token", "run_tokens"})
                ->UseManualTime()
                ->Unit(benchmark::kMicrosecond);
  for (dtype dt : {dtype::f16, dtype::bf16, dtype::f32}) r->Args({int(dt), 0, 4096});
  r->Args({int(dtype::f16), 1, 4096});
  r->Args({int(dtype::f16), 0, 16});  // one page run of 16 tokens per launch (the hooks before run tables)
  r->Args({int(dtype::f16), 1, 16});
  auto* b = benchmark::RegisterBenchmark("BM_CudaRerotateRuns", BM_CudaRerotateRuns)
                ->ArgNames({"dtype", "per_token", "run_tokens", "runs"})
                ->UseManualTime()
                ->MinTime(0.2)
                ->Unit(benchmark::kMicrosecond);
  b->Args({int(dtype::f16), 0, 16, 28});
  for (dtype dt : {dtype::f16, dtype::bf16, dtype::f32}) b->Args({int(dt), 0, 16, 4096});
  b->Args({int(dtype::f16), 1, 16, 4096});
  benchmark::RegisterBenchmark("BM_CudaMemcpy", BM_CudaMemcpy)
      ->ArgName("run_tokens")
      ->Arg(4096)
      ->Arg(16)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  return true;
}
#endif

}  // namespace

int main(int argc, char** argv) {
#if ATTNSTORE_HAS_CUDA
  return run_benchmarks(argc, argv, "rope_bench", register_host_benchmarks, register_cuda_benchmarks);
#else
  return run_benchmarks(argc, argv, "rope_bench", register_host_benchmarks, nullptr);
#endif
}
