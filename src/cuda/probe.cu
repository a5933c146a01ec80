// A round trip through a kernel: proves the CUDA part was compiled for this device and
// that pinned host memory reaches it. Used by tests/gpu. Also the spin kernel that
// stands in for a layer's compute in tests/gpu and the GPU benchmarks.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace attnstore::detail {

namespace {
__global__ void add_index_kernel(std::uint32_t* data, std::uint32_t n, std::uint32_t add) {
  std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) data[i] += i + add;
}

// One thread, so copies and other kernels keep the rest of the GPU; %globaltimer (ns)
// rather than clock64, whose rate follows the SM clock.
__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
}  // namespace

/// Queues a kernel on `stream` (a cudaStream_t) that keeps the GPU busy for `ns`
/// nanoseconds. Returns false when the launch fails.
bool cuda_spin_async(std::uint64_t ns, void* stream) noexcept {
  spin_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(ns);
  return cudaGetLastError() == cudaSuccess;
}

/// Copies `n` words host->device, adds (index + add) on the GPU, copies back. Returns
/// an empty string on success, else what failed.
std::string cuda_round_trip(std::uint32_t* host, std::uint32_t n, std::uint32_t add) {
  std::uint32_t* dev = nullptr;
  cudaStream_t stream = nullptr;
  auto check = [](cudaError_t e, const char* what) {
    return e == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(e);
  };
  std::string err = check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  if (err.empty())
    err = check(cudaMallocAsync(reinterpret_cast<void**>(&dev), n * sizeof(std::uint32_t), stream), "cudaMallocAsync");
  if (err.empty())
    err = check(cudaMemcpyAsync(dev, host, n * sizeof(std::uint32_t), cudaMemcpyHostToDevice, stream), "H2D");
  if (err.empty()) {
    add_index_kernel<<<(n + 255) / 256, 256, 0, stream>>>(dev, n, add);
    err = check(cudaGetLastError(), "kernel launch");
  }
  if (err.empty())
    err = check(cudaMemcpyAsync(host, dev, n * sizeof(std::uint32_t), cudaMemcpyDeviceToHost, stream), "D2H");
  if (dev) cudaFreeAsync(dev, stream);
  if (stream) {
    if (err.empty()) err = check(cudaStreamSynchronize(stream), "sync");
    cudaStreamDestroy(stream);
  }
  return err;
}

}  // namespace attnstore::detail
