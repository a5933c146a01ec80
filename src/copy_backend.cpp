// Choosing a copy backend at run time.
#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/config.hpp"

namespace attnstore {
#if ATTNSTORE_HAS_CUDA
namespace detail {
std::unique_ptr<copy_backend> make_cuda_copy_backend_impl(std::string* why);
}
std::unique_ptr<copy_backend> make_cuda_copy_backend(std::string* why) {
  return detail::make_cuda_copy_backend_impl(why);
}
#else
std::unique_ptr<copy_backend> make_cuda_copy_backend(std::string* why) {
  if (why) *why = "attnstore was built without CUDA";
  return nullptr;
}
#endif

std::unique_ptr<copy_backend> make_copy_backend(std::string* why) {
  std::string reason;
  if (auto b = make_cuda_copy_backend(&reason)) return b;
  if (why) *why = "using the host copy backend: " + reason;
  return make_host_copy_backend();
}
}  // namespace attnstore
