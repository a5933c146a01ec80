// GPU check: the CUDA re-rotation kernels give the CPU path's bytes, bit for bit:
// rerotate_cuda (one run) and rerotate_runs_cuda (a table of runs in one launch), for
// every dtype and style, shared and per-position angle rows, aligned heads (16-byte
// vectors) and unaligned ones (pair by pair), a partial rotary dimension, and every
// finite f16 and bf16 value as a key. Bytes the rotation must not touch (head padding,
// tokens outside the runs) are compared too. Exits 77 (ctest: skipped) without a
// usable CUDA device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/host_memory.hpp"
#include "attnstore/rope.hpp"

using namespace attnstore;

namespace {

void cuda_call(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Device memory holding a copy of `host`.
struct device_copy {
  void* p = nullptr;
  device_copy(const void* host, std::size_t bytes) {
    cuda_call(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
    cuda_call(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice), "upload");
  }
  ~device_copy() { cudaFree(p); }
  device_copy(const device_copy&) = delete;
  device_copy& operator=(const device_copy&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

struct rope_case {
  const char* what;
  dtype dt;
  rope_spec spec;
  std::uint32_t tokens, heads;
  std::size_t head_pad = 0;  // bytes after each head
  std::size_t skew = 0;      // bytes before the first token
  std::uint32_t row_step = 1;
  bool single = false;       // rerotate_cuda over all tokens, else a shuffled run table
  bool every_value = false;  // keys: every finite 16-bit pattern, in order
};

// Returns true when the GPU bytes equal the CPU bytes.
bool check(const rope_case& c, cudaStream_t stream) {
  const std::size_t elem = dtype_size(c.dt), dim = c.spec.head_dim, pairs = c.spec.rotary() / 2;
  const std::size_t head_stride = dim * elem + c.head_pad, token_stride = head_stride * c.heads;
  const std::size_t bytes = c.skew + c.tokens * token_stride;
  std::mt19937 rng(11);
  std::vector<std::byte> host(bytes);
  for (auto& b : host) b = std::byte(rng());  // padding keeps its random bytes
  std::normal_distribution<float> normal;
  std::uint32_t pattern = 0;
  for (std::size_t t = 0; t < c.tokens; ++t)
    for (std::size_t h = 0; h < c.heads; ++h)
      for (std::uint32_t i = 0; i < dim; ++i) {
        std::byte* head = host.data() + c.skew + t * token_stride + h * head_stride;
        if (!c.every_value) {
          detail::store_elem(head, detail::dtype_code(c.dt), i, normal(rng));
          continue;
        }
        std::uint16_t v = std::uint16_t(pattern++);
        if (!std::isfinite(detail::load_elem(&v, detail::dtype_code(c.dt), 0))) v = 0;  // NaN payloads differ by design
        std::memcpy(head + i * elem, &v, 2);
      }
  // Runs: the single one, or lengths 1..64 covering most tokens, in a shuffled order.
  std::vector<rope_run> runs;
  std::uint32_t rows = c.tokens + 8;
  if (c.single) {
    runs.push_back({0, c.tokens, 0});
  } else {
    const std::uint32_t lengths[] = {1, 5, 16, 3, 64, 2, 9, 31};
    std::uint32_t k = 0;
    for (std::uint32_t t = 0; t < c.tokens; ++k) {
      const std::uint32_t n = std::min(lengths[k % 8], c.tokens - t);
      if (c.every_value || k % 7 != 3)  // leave some tokens out: they must stay as they are
        runs.push_back({t * token_stride, n, c.row_step ? t + k % 8 : std::uint32_t(rng() % 16)});
      t += n;
    }
    std::shuffle(runs.begin(), runs.end(), rng);
    if (c.row_step == 0) rows = 16;
  }
  rope_angles angles(c.spec, rows);
  angles.fill(c.row_step ? 1234 : -4096, c.row_step ? 1 : 37, rows);  // per-position rows, or 16 "shifts"
  std::uint32_t longest = 0;
  for (const auto& r : runs) longest = std::max(longest, r.tokens);

  std::vector<std::byte> cpu = host, gpu(bytes);
  rope_runs_view view;
  view.base = cpu.data() + c.skew;
  view.runs = runs.data();
  view.count = std::uint32_t(runs.size());
  view.max_tokens = longest;
  view.row_step = c.row_step;
  view.cos = angles.cos_row(0);
  view.sin = angles.sin_row(0);
  view.dt = c.dt;
  view.heads = c.heads;
  view.token_stride = token_stride;
  view.head_stride = head_stride;
  if (rerotate_runs(view, c.spec) != errc::ok) throw std::runtime_error("rerotate_runs failed");

  device_copy dkeys(host.data(), bytes), dcos(angles.cos_row(0), rows * pairs * sizeof(float)),
      dsin(angles.sin_row(0), rows * pairs * sizeof(float)), druns(runs.data(), runs.size() * sizeof(rope_run));
  errc st;
  if (c.single) {
    st = rerotate_cuda(dkeys.as<std::byte>() + c.skew, c.dt, c.tokens, c.heads, token_stride, head_stride,
                       dcos.as<float>(), dsin.as<float>(), c.row_step == 0, c.spec, stream);
  } else {
    view.base = dkeys.as<std::byte>() + c.skew;
    view.runs = druns.as<rope_run>();
    view.cos = dcos.as<float>();
    view.sin = dsin.as<float>();
    st = rerotate_runs_cuda(view, c.spec, stream);
  }
  cuda_call(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  cuda_call(cudaMemcpy(gpu.data(), dkeys.p, bytes, cudaMemcpyDeviceToHost), "download");
  std::string detail;
  if (st != errc::ok) detail = std::string(to_string(st));
  for (std::size_t i = 0; i < bytes && detail.empty(); ++i)
    if (cpu[i] != gpu[i]) {
      const std::size_t at = i < c.skew ? 0 : i - c.skew;
      detail = "first difference at byte " + std::to_string(i) + " (token " + std::to_string(at / token_stride) +
               ", byte " + std::to_string(at % token_stride) + " of the token)";
    }
  const std::string name = std::string(c.what) + ", " + std::string(to_string(c.dt)) +
                           (c.spec.style == rope_style::neox ? " neox " : " gptj ") + std::to_string(c.spec.rotary()) +
                           "/" + std::to_string(dim) + (c.row_step ? ", per-position rows" : ", shared rows") + ", " +
                           std::to_string(runs.size()) + " run(s)";
  std::printf("%s: %s\n", detail.empty() ? "ok" : "FAILED", (name + (detail.empty() ? "" : ": " + detail)).c_str());
  return detail.empty();
}

}  // namespace

int main() {
  std::string why;
  if (!detail::cuda_device_present(&why)) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  cudaStream_t stream = nullptr;
  int failures = 0, checks = 0;
  try {
    cuda_call(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    std::vector<rope_case> cases;
    for (dtype dt : {dtype::f32, dtype::f16, dtype::bf16})
      for (rope_style style : {rope_style::neox, rope_style::gptj}) {
        rope_spec full;
        full.style = style;
        full.head_dim = 128;
        const std::size_t e = dtype_size(dt);
        rope_spec partial40 = full, partial64 = full;
        partial40.head_dim = 96, partial40.rotary_dim = 40;  // 20 pairs: no 16-byte groups
        partial64.rotary_dim = 64;
        // what, dtype, spec, tokens, heads, head_pad, skew, row_step, single, every_value
        cases.push_back({"one run", dt, full, 300, 8, 0, 0, 1, true, false});
        cases.push_back({"one run, shared row", dt, full, 300, 8, 0, 0, 0, true, false});
        cases.push_back({"run table", dt, full, 400, 8, 0, 0, 1, false, false});
        cases.push_back({"run table", dt, full, 400, 8, 0, 0, 0, false, false});
        cases.push_back({"run table, unaligned heads and base", dt, full, 200, 3, e, e, 1, false, false});
        cases.push_back({"run table, unaligned heads and base", dt, full, 200, 3, 3 * e, 2 * e, 0, false, false});
        cases.push_back({"run table, partial rotary", dt, partial40, 200, 4, 0, 0, 1, false, false});
        cases.push_back({"run table, partial rotary", dt, partial64, 200, 4, 0, 0, 0, false, false});
        if (dt != dtype::f32) cases.push_back({"every finite value", dt, full, 512, 1, 0, 0, 1, false, true});
      }
    for (const auto& c : cases) {
      ++checks;
      failures += !check(c, stream);
    }
    cuda_call(cudaDeviceSynchronize(), "no CUDA error left behind");
  } catch (const std::exception& e) {
    std::printf("FAILED: %s\n", e.what());
    ++failures;
  }
  if (stream) cudaStreamDestroy(stream);
  std::printf("%s: %d of %d checks failed\n", failures ? "FAILED" : "passed", failures, checks);
  return failures ? 1 : 0;
}
