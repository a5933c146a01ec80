// CUDA runtime calls used by the host side: device probe and pinned host memory.
// The one place CUDA errors become text for the host allocator.
#include <cuda_runtime_api.h>

#include <string>

namespace attnstore::detail {

bool cuda_probe_device(std::string* why) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky-free error so later probes start clean
    return false;
  }
  if (count == 0) {
    if (why) *why = "no CUDA device";
    return false;
  }
  return true;
}

void* cuda_pinned_alloc(std::size_t bytes, std::string* why) {
  void* p = nullptr;
  cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    if (why) *why = std::string("cudaHostAlloc: ") + cudaGetErrorString(e);
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void cuda_pinned_free(void* p) noexcept { cudaFreeHost(p); }

}  // namespace attnstore::detail
