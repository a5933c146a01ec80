// Allocation of large host regions: CUDA-pinned when a GPU is present, else
// mmap(MAP_POPULATE) with best-effort mlock. Compiled in attnstore_io.
#pragma once

#include <cstddef>
#include <string>

namespace attnstore::detail {

enum class host_pinning : unsigned char { cuda_pinned, locked, unlocked };

struct host_region {
  void* base = nullptr;
  std::size_t bytes = 0;
  host_pinning pinning = host_pinning::unlocked;
};

struct host_region_request {
  std::size_t bytes = 0;
  bool try_cuda = true;
  bool try_lock = true;
  bool huge_pages = false;
};

/// Allocates and pre-faults a region. Fills `note` with why it is not pinned when it
/// is not. Throws std::bad_alloc when no memory can be mapped at all.
host_region allocate_host_region(const host_region_request& request, std::string* note);
void free_host_region(const host_region& region) noexcept;

/// True when a CUDA device is usable; fills `why` otherwise. Always false without CUDA.
bool cuda_device_present(std::string* why);

}  // namespace attnstore::detail
