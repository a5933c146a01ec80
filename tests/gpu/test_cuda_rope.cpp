// GPU check: the CUDA re-rotation kernel and the CUDA copy backend give the same bytes
// as the CPU path. Exits 77 (ctest: skipped) without a usable CUDA device.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/detail/host_memory.hpp"
#include "attnstore/rope.hpp"

using namespace attnstore;

int main() {
  std::string why;
  if (!detail::cuda_device_present(&why)) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  auto copier = make_cuda_copy_backend(&why);
  if (!copier) {
    std::printf("FAILED: a device is present but the CUDA copy backend is not: %s\n", why.c_str());
    return 1;
  }
  int failures = 0;
  for (dtype dt : {dtype::f32, dtype::f16, dtype::bf16}) {
    const std::uint32_t tokens = 300, heads = 8, dim = 128;
    const std::size_t elem = dtype_size(dt), bytes = std::size_t(tokens) * heads * dim * elem;
    std::vector<std::byte> host(bytes), cpu, gpu(bytes);
    std::mt19937 rng(1);
    std::normal_distribution<float> n;
    for (std::size_t i = 0; i < std::size_t(tokens) * heads * dim; ++i)
      detail::store_elem(host.data(), dt == dtype::f32 ? 0 : dt == dtype::f16 ? 1 : 2, std::uint32_t(i), n(rng));
    cpu = host;
    rope_spec spec{rope_style::neox, dim};
    rope_angles a(spec, tokens);
    a.fill(1234, 1, tokens);
    (void)rerotate(cpu.data(), dt, tokens, heads, heads * dim * elem, dim * elem, a);
    // Device: keys and angle rows uploaded through the copy backend, kernel on its stream.
    const std::size_t rows = std::size_t(tokens) * (dim / 2) * sizeof(float);
    auto* dkeys = static_cast<std::byte*>(copier->allocate_device(bytes));
    auto* dang = static_cast<float*>(copier->allocate_device(2 * rows));
    stream_ref s = copier->create_stream();
    copy_segment up[3] = {
        {host.data(), dkeys, bytes}, {a.cos_row(0), dang, rows}, {a.sin_row(0), dang + rows / 4, rows}};
    event_id e = copier->acquire_event();
    errc st = copier->copy_async(up, s);
    if (st == errc::ok)
      st = rerotate_cuda(dkeys, dt, tokens, heads, heads * dim * elem, dim * elem, dang, dang + rows / 4, false, spec,
                         s.get());
    copy_segment down[1] = {{dkeys, gpu.data(), bytes}};
    if (st == errc::ok) st = copier->copy_async(down, s);
    if (st == errc::ok) st = copier->record(e, s);
    if (st == errc::ok) st = copier->synchronize(e);
    const bool same = st == errc::ok && std::memcmp(cpu.data(), gpu.data(), bytes) == 0;
    std::printf("%s: %s\n", std::string(to_string(dt)).c_str(),
                st != errc::ok ? to_string(st).data()
                : same         ? "GPU bytes equal CPU bytes"
                               : "MISMATCH");
    failures += !same;
    copier->release_event(e);
    copier->destroy_stream(s);
    copier->free_device(dkeys);
    copier->free_device(dang);
  }
  std::printf(failures ? "FAILED\n" : "passed\n");
  return failures ? 1 : 0;
}
