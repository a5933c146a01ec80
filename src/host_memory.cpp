#include "attnstore/detail/host_memory.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "attnstore/config.hpp"

#if ATTNSTORE_HAS_CUDA
namespace attnstore::detail {
bool cuda_probe_device(std::string* why);
void* cuda_pinned_alloc(std::size_t bytes, std::string* why);
void cuda_pinned_free(void* p) noexcept;
}  // namespace attnstore::detail
#endif

namespace attnstore::detail {

bool cuda_device_present(std::string* why) {
#if ATTNSTORE_HAS_CUDA
  return cuda_probe_device(why);
#else
  if (why) *why = "built without CUDA";
  return false;
#endif
}

host_region allocate_host_region(const host_region_request& r, std::string* note) {
  std::string reason;
#if ATTNSTORE_HAS_CUDA
  if (r.try_cuda) {
    std::string why;
    if (cuda_probe_device(&why)) {
      if (void* p = cuda_pinned_alloc(r.bytes, &why)) {
        std::memset(p, 0, r.bytes);  // pre-fault, as MAP_POPULATE does
        return {p, r.bytes, host_pinning::cuda_pinned};
      }
    }
    reason = "no CUDA pinned memory (" + why + ")";
  }
#endif
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE;
  void* p = MAP_FAILED;
  if (r.huge_pages) {
    p = ::mmap(nullptr, r.bytes, PROT_READ | PROT_WRITE, flags | MAP_HUGETLB, -1, 0);
    if (p == MAP_FAILED) reason += (reason.empty() ? "" : "; ") + std::string("no huge pages: ") + std::strerror(errno);
  }
  if (p == MAP_FAILED) p = ::mmap(nullptr, r.bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  host_region region{p, r.bytes, host_pinning::unlocked};
  if (r.try_lock) {
    if (::mlock(p, r.bytes) == 0) {
      region.pinning = host_pinning::locked;
    } else {
      int err = errno;
      reason += (reason.empty() ? "" : "; ") + std::string("mlock failed: ") + std::strerror(err) +
                (err == ENOMEM || err == EPERM ? " (memlock limit: see ulimit -l)" : "") + "; memory stays pageable";
    }
  } else {
    reason += (reason.empty() ? "" : "; ") + std::string("locking disabled by configuration");
  }
  if (note) *note = reason;
  return region;
}

void free_host_region(const host_region& region) noexcept {
  if (!region.base) return;
#if ATTNSTORE_HAS_CUDA
  if (region.pinning == host_pinning::cuda_pinned) {
    cuda_pinned_free(region.base);
    return;
  }
#endif
  ::munmap(region.base, region.bytes);
}

}  // namespace attnstore::detail
