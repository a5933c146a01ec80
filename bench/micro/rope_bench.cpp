// rope_bench: CPU re-rotation of stored keys on one core, next to memcpy of the same
// bytes in the same binary. Keys: 8 KV heads x 128 dims per token, rotated by one
// shared delta (the truncation case) over a 1 GiB working set in place.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "attnstore/rope.hpp"

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
BENCHMARK(BM_Rerotate)->ArgName("dtype")->Arg(int(dtype::f16))->Arg(int(dtype::bf16))->Arg(int(dtype::f32));

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
BENCHMARK(BM_Memcpy);

}  // namespace

BENCHMARK_MAIN();
