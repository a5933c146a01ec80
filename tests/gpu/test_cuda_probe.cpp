// GPU check: pinned DRAM-tier memory reaches the device and comes back through a
// kernel. Exits 77 (ctest: skipped) when no CUDA device is usable, saying why.
#include <cstdio>
#include <string>

#include "attnstore/detail/host_memory.hpp"
#include "attnstore/tier/host_arena.hpp"

namespace attnstore::detail {
std::string cuda_round_trip(std::uint32_t* host, std::uint32_t n, std::uint32_t add);
}

int main() {
  std::string why;
  if (!attnstore::detail::cuda_device_present(&why)) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  attnstore::host_arena arena(attnstore::host_arena_options{1 << 20, 4 << 20});
  std::printf("DRAM tier memory: %s\n", std::string(arena.pinning()).c_str());
  if (arena.pinning() != "cuda_pinned") {
    std::printf("FAILED: a GPU is present but the arena is not CUDA-pinned: %s\n", arena.pinning_note().c_str());
    return 1;
  }
  const std::uint32_t n = (1 << 20) / 4;
  auto* words = reinterpret_cast<std::uint32_t*>(arena.data(arena.allocate()));
  for (std::uint32_t i = 0; i < n; ++i) words[i] = 3 * i;
  std::string err = attnstore::detail::cuda_round_trip(words, n, 11);
  if (!err.empty()) {
    std::printf("FAILED: %s\n", err.c_str());
    return 1;
  }
  for (std::uint32_t i = 0; i < n; ++i)
    if (words[i] != 4 * i + 11) {
      std::printf("FAILED: word %u is %u, expected %u\n", i, words[i], 4 * i + 11);
      return 1;
    }
  std::printf("passed: %u words through the GPU and back\n", n);
  return 0;
}
