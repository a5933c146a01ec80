// GPU check: the layer-wise pipeline end to end through the real store, hooks and CUDA
// copy backend, with the engine's paged KV in GPU memory (cudaMalloc):
//  1. saves from device pages, checks what DRAM holds, loads into other device pages
//     layer by layer and compares bitwise (and that nothing else was written); the same
//     through the SSD tier, and with pageable host engine memory on the CUDA backend;
//  2. truncated views re-rotated by the kernel (keys stored after and before RoPE; one
//     launch per layer, and one per run past the run table) against the host backend's
//     bytes for the same inputs (bitwise, as test_cuda_rope);
//  3. stream order: a save behind compute that writes late, a load whose layers the
//     compute stream reads as soon as wait_layer returns, while another stream writes
//     other pages.
// Prints "ok:" per check and "FAILED:" with the first difference. Exits 77 (ctest:
// skipped) when no CUDA device is usable, saying why. --host-dry-run runs the same
// steps on the host backend with host memory (no GPU needed): it checks this test's own
// logic, and the hooks with these layouts, wherever the suite runs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/host_memory.hpp"
#include "attnstore/hooks.hpp"
#include "attnstore/truncate.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

namespace attnstore::detail {
bool cuda_spin_async(std::uint64_t ns, void* stream) noexcept;
}

using namespace attnstore;

namespace {

int checks = 0, failures = 0;
bool dry_run = false;  // --host-dry-run: host backend, host memory, no CUDA call

bool expect(bool ok, const std::string& what, const std::string& detail = {}) {
  ++checks;
  failures += !ok;
  if (ok)
    std::printf("ok: %s\n", what.c_str());
  else
    std::printf("FAILED: %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
  return ok;
}

bool expect_ok(errc e, const std::string& what) { return expect(e == errc::ok, what, std::string(to_string(e))); }

// Test set-up failures end the part (main catches), not the program.
void cuda_call(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

void print_log(void*, log_level level, std::string_view m) noexcept {
  if (level >= log_level::info) std::printf("  store log: %.*s\n", int(m.size()), m.data());
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// An engine's paged KV: per layer K then V, each `pages` pages of `page_size` tokens,
// heads padded by `head_pad` bytes (not attnstore's layout). In GPU memory, or in
// pageable host memory.
struct engine_kv {
  kv_geometry g;
  std::uint32_t pages, page_size;
  std::size_t head_bytes, head_stride, token_stride, page_stride, bytes;
  memory_space where;
  std::byte* base = nullptr;
  std::unique_ptr<std::byte[]> host_memory;
  std::vector<std::byte*> kb, vb;
  kv_layout layout{};

  engine_kv(const kv_geometry& geom, std::uint32_t npages, std::uint32_t psize, std::size_t head_pad, memory_space w)
      : g(geom), pages(npages), page_size(psize), where(w) {
    head_bytes = std::size_t(g.head_dim) * g.element_bytes();
    head_stride = head_bytes + head_pad;
    token_stride = head_stride * g.num_kv_heads;
    page_stride = token_stride * page_size;
    bytes = 2 * std::size_t(g.num_layers) * pages * page_stride;
    if (where == memory_space::device) {
      cuda_call(cudaMalloc(reinterpret_cast<void**>(&base), bytes), "cudaMalloc engine KV");
    } else {
      host_memory = std::make_unique<std::byte[]>(bytes);  // pageable, as most engines' CPU caches
      base = host_memory.get();
    }
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      kb.push_back(region(l, 0));
      vb.push_back(region(l, 1));
    }
    layout = kv_layout{g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, page_size, page_stride,
                       token_stride, head_stride,    kb,         vb,      where};
  }
  ~engine_kv() {
    if (where == memory_space::device) cudaFree(base);
  }
  engine_kv(const engine_kv&) = delete;
  engine_kv& operator=(const engine_kv&) = delete;

  // All pages of one layer's K (side 0) or V (side 1).
  std::byte* region(std::uint32_t l, int side) const {
    return base + (2 * std::size_t(l) + side) * pages * page_stride;
  }
  std::size_t region_bytes() const { return std::size_t(pages) * page_stride; }
  // Byte offset of (layer, side, position, head) through a page table.
  std::size_t offset(std::uint32_t l, int side, const std::vector<std::uint32_t>& table, std::uint64_t pos,
                     std::uint32_t h) const {
    return std::size_t(region(l, side) - base) + std::size_t(table[pos / page_size]) * page_stride +
           std::size_t(pos % page_size) * token_stride + std::size_t(h) * head_stride;
  }
  // Device writes end with a device sync: cudaMemcpy from pageable memory and
  // cudaMemset may return before the GPU is done, and non-blocking streams do not wait.
  void upload(const std::vector<std::byte>& from) {
    if (where == memory_space::host) {
      std::memcpy(base, from.data(), bytes);
      return;
    }
    cuda_call(cudaMemcpy(base, from.data(), bytes, cudaMemcpyHostToDevice), "upload engine KV");
    cuda_call(cudaDeviceSynchronize(), "sync after upload");
  }
  std::vector<std::byte> download() const {
    std::vector<std::byte> out(bytes);
    if (where == memory_space::host)
      std::memcpy(out.data(), base, bytes);
    else
      cuda_call(cudaMemcpy(out.data(), base, bytes, cudaMemcpyDeviceToHost), "download engine KV");
    return out;
  }
  void fill(int value) {
    if (where == memory_space::host) {
      std::memset(base, value, bytes);
      return;
    }
    cuda_call(cudaMemset(base, value, bytes), "cudaMemset engine KV");
    cuda_call(cudaDeviceSynchronize(), "sync after fill");
  }
};

// `count` distinct pages of `pages`, in a shuffled order: the engine's page table.
std::vector<std::uint32_t> scattered_pages(std::uint32_t count, std::uint32_t pages, std::uint32_t seed) {
  std::vector<std::uint32_t> t(pages);
  for (std::uint32_t i = 0; i < pages; ++i) t[i] = i;
  std::shuffle(t.begin(), t.end(), std::mt19937(seed));
  t.resize(count);
  return t;
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  attnstore::testing::fill_block(v, seed);
  return v;
}

// Token positions [0, tokens) of `b` (pages tb) equal those of `a` (pages ta), K and V of
// every layer and head. Returns the first difference, empty when equal.
std::string compare_tokens(const engine_kv& a, const std::vector<std::byte>& abytes,
                           const std::vector<std::uint32_t>& ta, const engine_kv& b,
                           const std::vector<std::byte>& bbytes, const std::vector<std::uint32_t>& tb,
                           std::uint64_t tokens) {
  for (std::uint32_t l = 0; l < a.g.num_layers; ++l)
    for (int side = 0; side < 2; ++side)
      for (std::uint64_t p = 0; p < tokens; ++p)
        for (std::uint32_t h = 0; h < a.g.num_kv_heads; ++h)
          if (std::memcmp(abytes.data() + a.offset(l, side, ta, p, h), bbytes.data() + b.offset(l, side, tb, p, h),
                          a.head_bytes) != 0)
            return "layer " + std::to_string(l) + (side ? " V" : " K") + " position " + std::to_string(p) + " head " +
                   std::to_string(h) + " differs";
  return {};
}

// Every byte that positions [0, tokens) do not cover (other pages, the tail of the
// last page, head padding) still holds `fill`. Returns the first byte that does not.
std::string untouched_elsewhere(const engine_kv& e, const std::vector<std::byte>& bytes,
                                const std::vector<std::uint32_t>& table, std::uint64_t tokens, std::byte fill) {
  std::vector<bool> covered(e.bytes);
  for (std::uint32_t l = 0; l < e.g.num_layers; ++l)
    for (int side = 0; side < 2; ++side)
      for (std::uint64_t p = 0; p < tokens; ++p)
        for (std::uint32_t h = 0; h < e.g.num_kv_heads; ++h) {
          const std::size_t o = e.offset(l, side, table, p, h);
          for (std::size_t i = 0; i < e.head_bytes; ++i) covered[o + i] = true;
        }
  for (std::size_t i = 0; i < e.bytes; ++i)
    if (!covered[i] && bytes[i] != fill)
      return "byte " + std::to_string(i) + " outside the loaded tokens was written (" + std::to_string(int(bytes[i])) +
             ")";
  return {};
}

// What the store holds for the session (store::get, checksums verified) equals the
// engine bytes it was saved from, token by token in attnstore's block layout.
std::string compare_stored(store& kv, const session_key& key, const std::vector<token_id>& toks, const engine_kv& e,
                           const std::vector<std::byte>& bytes, const std::vector<std::uint32_t>& table) {
  const kv_geometry g = kv.geometry();
  const std::uint32_t blocks = g.blocks_for(toks.size());
  std::vector<std::byte> out(std::size_t(blocks) * kv.block_bytes());
  get_result got = kv.get(key, toks, 0, blocks, out);
  if (got.status != errc::ok || got.blocks != blocks)
    return "store::get: " + std::string(to_string(got.status)) + ", " + std::to_string(got.blocks) + " blocks";
  for (std::uint32_t b = 0; b < blocks; ++b)
    for (std::uint32_t l = 0; l < g.num_layers; ++l)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t t = 0; t < g.tokens_per_block && std::uint64_t(b) * g.tokens_per_block + t < toks.size();
             ++t)
          for (std::uint32_t h = 0; h < g.num_kv_heads; ++h) {
            const std::byte* stored = out.data() + std::size_t(b) * kv.block_bytes() + l * g.layer_bytes() +
                                      side * g.half_layer_bytes() +
                                      (std::size_t(t) * g.num_kv_heads + h) * e.head_bytes;
            const std::uint64_t pos = std::uint64_t(b) * g.tokens_per_block + t;
            if (std::memcmp(stored, bytes.data() + e.offset(l, side, table, pos, h), e.head_bytes) != 0)
              return "block " + std::to_string(b) + " layer " + std::to_string(l) + (side ? " V" : " K") + " token " +
                     std::to_string(t) + " head " + std::to_string(h) + " differs from the engine's";
          }
  return {};
}

store_config config_for(const kv_geometry& g, std::size_t dram_blocks) {
  store_config c;
  c.geometry = g;
  c.model_name = "gpu-pipeline-test";
  c.dram_bytes = dram_blocks * format::slot_bytes(g.validated());
  c.log = logger{&print_log, nullptr};
  return c;
}

// GPU engine memory, or host memory in a dry run.
memory_space engine_space() { return dry_run ? memory_space::host : memory_space::device; }

// A cudaStream_t the test owns, as an engine's compute stream; none in a dry run (the
// host thread is the compute stream).
struct own_stream {
  cudaStream_t s = nullptr;
  own_stream() {
    if (!dry_run) cuda_call(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~own_stream() {
    if (!s) return;
    cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
  }
  std::optional<stream_ref> ref() const { return s ? std::optional(stream_ref(s)) : std::nullopt; }
  void sync() const {
    if (s) cuda_call(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  }
};

// ---------------------------------------------------------------- 1. round trips

struct round_trip_case {
  const char* name;
  memory_space where;
  std::uint32_t page_size;
  std::size_t head_pad;
  std::uint64_t tokens;
  bool via_ssd;
};

void round_trip(copy_backend& cuda, const round_trip_case& rc, std::uint64_t session) {
  const std::string n = rc.name;
  const kv_geometry g{4, 4, 64, dtype::f16, 16};
  attnstore::testing::temp_dir dir("gpu-pipeline");
  store_config c = config_for(g, 64);
  if (rc.via_ssd) {
    c.ssd_directory = dir.str();
    c.ssd_bytes = 64 * format::slot_bytes(g.validated());
    c.require_direct_io = false;  // tmpfs has no O_DIRECT; the test is about the copies
  }
  store kv(c);
  if (!dry_run)
    expect(kv.dram_pinning() == "cuda_pinned", n + ": DRAM tier is CUDA-pinned",
           "it is " + std::string(kv.dram_pinning()));
  if (rc.via_ssd) std::printf("  %s: SSD tier through %s\n", rc.name, std::string(kv.io_backend_name()).c_str());
  hooks_config hc;
  hc.preload_layers = 2;
  hooks hk(kv, cuda, hc);
  own_stream compute;
  const std::uint32_t used_pages = std::uint32_t((rc.tokens + rc.page_size - 1) / rc.page_size);
  engine_kv src(g, used_pages + 5, rc.page_size, rc.head_pad, rc.where);
  engine_kv dst(g, used_pages + 11, rc.page_size, rc.head_pad, rc.where);
  const auto ts = scattered_pages(used_pages, src.pages, 1), td = scattered_pages(used_pages, dst.pages, 2);
  const std::vector<std::byte> src_bytes = random_bytes(src.bytes, session);
  src.upload(src_bytes);
  const std::string name = "s" + std::to_string(session);
  const session_key key{"gpu", name};
  const std::vector<token_id> toks = attnstore::testing::make_tokens(session, rc.tokens);

  errc st = errc::ok;
  save_handle sh = hk.start_save(key, toks, 0, kv_source{&src.layout, ts}, compute.ref(), &st);
  if (!expect_ok(st, n + ": start_save")) return;
  bool saved = true;
  for (std::uint32_t l = 0; l < g.num_layers; ++l) saved &= hk.save_layer(sh, l) == errc::ok;
  expect(saved, n + ": save_layer for every layer");
  if (!expect_ok(hk.finish_save(sh), n + ": finish_save")) return;
  std::string diff = compare_stored(kv, key, toks, src, src_bytes, ts);
  expect(diff.empty(), n + ": DRAM holds the device bytes (store::get, checksums verified)", diff);

  const std::uint64_t ssd_reads_before = kv.stats().blocks_served_ssd;
  if (rc.via_ssd) {
    if (!expect_ok(kv.demote(key), n + ": demote to SSD")) return;
    expect(kv.stats().ssd_used_bytes > 0, n + ": the session is on SSD");
  }
  dst.fill(0xEE);
  load_info li = hk.start_load(key, toks, kv_target{&dst.layout, td}, compute.ref());
  if (!expect(li.status == errc::ok && li.tokens == rc.tokens, n + ": start_load finds every token",
              std::string(to_string(li.status)) + ", " + std::to_string(li.tokens) + " tokens"))
    return;
  bool waited = true;
  for (std::uint32_t l = 0; l < g.num_layers; ++l) waited &= hk.wait_layer(li.handle, l) == errc::ok;
  expect(waited, n + ": wait_layer for every layer");
  expect_ok(hk.finish_load(li.handle), n + ": finish_load");
  compute.sync();
  const std::vector<std::byte> got = dst.download();
  diff = compare_tokens(src, src_bytes, ts, dst, got, td, rc.tokens);
  expect(diff.empty(), n + ": loaded pages equal the saved ones bitwise", diff);
  diff = untouched_elsewhere(dst, got, td, rc.tokens, std::byte{0xEE});
  expect(diff.empty(), n + ": nothing outside the loaded tokens was written", diff);
  if (rc.via_ssd)
    expect(kv.stats().blocks_served_ssd - ssd_reads_before == g.blocks_for(rc.tokens), n + ": blocks came from SSD",
           std::to_string(kv.stats().blocks_served_ssd - ssd_reads_before) + " SSD reads");
}

// ---------------------------------------------------------------- 2. truncated views

// One store + hooks + engine memory on a copy backend; the GPU one and the host one
// get the same inputs.
struct rope_rig {
  kv_geometry g;
  store kv;
  hooks hk;
  engine_kv src, dst;
  std::vector<std::uint32_t> pages;
  rope_rig(copy_backend& copier, memory_space where, const kv_geometry& geom, const rope_spec& spec, bool pre_rope,
           std::uint32_t max_runs)
      : g(geom),
        kv([&] {
          store_config c = config_for(geom, 64);
          c.keys_pre_rope = pre_rope;
          return c;
        }()),
        hk(kv, copier,
           [&] {
             hooks_config hc;
             hc.rope = spec;
             hc.keys_pre_rope = pre_rope;
             hc.max_positions = 4096;
             hc.max_rotated_runs = max_runs;
             return hc;
           }()),
        src(geom, 24, 8, 0, where),
        dst(geom, 24, 8, 0, where),
        pages(scattered_pages(24, 24, 3)) {}
};

std::string describe_difference(const std::vector<std::byte>& a, const std::vector<std::byte>& b, dtype dt) {
  const int code = detail::dtype_code(dt);
  const std::size_t n = a.size() / dtype_size(dt);
  std::size_t differ = 0;
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const float x = detail::load_elem(a.data(), code, std::uint32_t(i)),
                y = detail::load_elem(b.data(), code, std::uint32_t(i));
    if (std::memcmp(a.data() + i * dtype_size(dt), b.data() + i * dtype_size(dt), dtype_size(dt)) != 0) {
      ++differ;
      worst = std::max(worst, double(std::fabs(x - y)));
    }
  }
  return std::to_string(differ) + " of " + std::to_string(n) + " elements differ, max abs difference " +
         std::to_string(worst);
}

// max_runs: hooks_config::max_rotated_runs of the GPU side (1: one kernel per run,
// the fallback past the run table; 0: one kernel per layer).
void truncated_view(copy_backend& cuda, copy_backend& host, const rope_spec& spec, dtype dt, bool pre_rope,
                    std::uint32_t max_runs = 0) {
  const std::string n = std::string("truncated ") + (spec.style == rope_style::neox ? "neox " : "gptj ") +
                        std::to_string(spec.rotary()) + "/" + std::to_string(spec.head_dim) + " " +
                        std::string(to_string(dt)) + (pre_rope ? ", keys before RoPE" : ", keys after RoPE") +
                        (max_runs == 1 ? ", one kernel per run" : "");
  const kv_geometry g{2, 2, spec.head_dim, dt, 16};
  rope_rig gpu(cuda, engine_space(), g, spec, pre_rope, max_runs), cpu(host, memory_space::host, g, spec, pre_rope, 0);
  // Finite keys and values: normal floats in the engine's dtype.
  std::vector<std::byte> values(gpu.src.bytes);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int code = detail::dtype_code(dt);
  for (std::size_t i = 0; i < values.size() / dtype_size(dt); ++i)
    detail::store_elem(values.data(), code, std::uint32_t(i), normal(rng));
  gpu.src.upload(values);
  cpu.src.upload(values);
  std::vector<token_id> toks;
  for (std::uint64_t p = 0; p < 150; ++p) toks.push_back(token_id(1000 + p));
  const truncation_plan plan = plan_truncation(150, 30, 120, 20, g.tokens_per_block, 0.0);  // sink 20, drop 64
  std::vector<token_id> kept(toks.begin(), toks.begin() + 20);
  kept.insert(kept.end(), toks.begin() + 84, toks.end());
  own_stream compute;
  std::vector<std::byte> loaded[2];
  for (int r = 0; r < 2; ++r) {
    rope_rig& R = r == 0 ? gpu : cpu;
    const std::optional<stream_ref> cs = r == 0 ? compute.ref() : std::nullopt;
    const std::string who = n + (r == 0 ? " (cuda)" : " (host)");
    errc st = errc::ok;
    save_handle sh = R.hk.start_save({"t", "s"}, toks, 0, kv_source{&R.src.layout, R.pages}, cs, &st);
    if (!expect_ok(st, who + ": start_save")) return;
    for (std::uint32_t l = 0; l < g.num_layers; ++l) (void)R.hk.save_layer(sh, l);
    if (!expect_ok(R.hk.finish_save(sh), who + ": finish_save")) return;
    if (!expect_ok(R.kv.truncate({"t", "s"}, toks, plan), who + ": truncate")) return;
    R.dst.fill(0);
    load_info li = R.hk.start_load({"t", "s"}, kept, kv_target{&R.dst.layout, R.pages}, cs);
    if (!expect(li.status == errc::ok && li.tokens == kept.size(), who + ": start_load of the truncated view",
                std::string(to_string(li.status)) + ", " + std::to_string(li.tokens) + " tokens"))
      return;
    for (std::uint32_t l = 0; l < g.num_layers; ++l) (void)R.hk.wait_layer(li.handle, l);
    if (!expect_ok(R.hk.finish_load(li.handle), who + ": finish_load")) return;
    if (r == 0) compute.sync();
    loaded[r] = R.dst.download();
  }
  const bool same = loaded[0] == loaded[1];
  expect(same, n + ": GPU re-rotation gives the host backend's bytes",
         same ? std::string() : describe_difference(loaded[0], loaded[1], dt));
}

// ---------------------------------------------------------------- 3. stream order

// Work an engine queues on its own streams; in a dry run it happens now on this thread.
void late_layer_write(engine_kv& e, std::uint32_t l, int value, cudaStream_t s) {
  if (!s) {
    for (int side = 0; side < 2; ++side) std::memset(e.region(l, side), value, e.region_bytes());
    return;
  }
  if (!detail::cuda_spin_async(1000000, s)) throw std::runtime_error("spin kernel launch failed");  // 1 ms
  for (int side = 0; side < 2; ++side)
    cuda_call(cudaMemsetAsync(e.region(l, side), value, e.region_bytes(), s), "cudaMemsetAsync layer");
}
void copy_on(void* dst, const void* src, std::size_t bytes, cudaStream_t s) {
  if (!s)
    std::memcpy(dst, src, bytes);
  else
    cuda_call(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
}
void set_on(void* dst, int value, std::size_t bytes, cudaStream_t s) {
  if (!s)
    std::memset(dst, value, bytes);
  else
    cuda_call(cudaMemsetAsync(dst, value, bytes, s), "cudaMemsetAsync");
}

void stream_order(copy_backend& cuda, std::uint32_t preload) {
  const std::string n = "stream order, preload " + std::to_string(preload);
  // 8 MiB per layer (K+V): a layer's copy takes far longer than the host needs to
  // queue the next step, so a missing event shows as wrong bytes.
  const kv_geometry g{8, 8, 128, dtype::f16, 64};
  const std::uint64_t tokens = 2048;
  const std::uint32_t used = std::uint32_t(tokens / 16), spare = 32;
  store kv(config_for(g, 40));
  hooks_config hc;
  hc.preload_layers = preload;
  hc.max_blocks_per_request = 64;
  hooks hk(kv, cuda, hc);
  own_stream compute, other;
  engine_kv src(g, used + spare, 16, 0, engine_space()), dst(g, used + spare, 16, 0, engine_space());
  const auto ts = scattered_pages(used, used, 4), td = scattered_pages(used, used, 5);
  const std::vector<token_id> toks = attnstore::testing::make_tokens(77, tokens);
  const session_key key{"gpu", "order"};

  // Save behind compute that writes each layer late: 1 ms of spin, then the layer's bytes.
  src.fill(0);
  errc st = errc::ok;
  auto t0 = std::chrono::steady_clock::now();
  save_handle sh = hk.start_save(key, toks, 0, kv_source{&src.layout, ts}, compute.ref(), &st);
  if (!expect_ok(st, n + ": start_save")) return;
  bool ok = true;
  for (std::uint32_t l = 0; l < g.num_layers; ++l) {
    late_layer_write(src, l, 0x10 + int(l), compute.s);
    ok &= hk.save_layer(sh, l) == errc::ok;
  }
  const double queued_ms = ms_since(t0);
  expect(ok, n + ": save_layer for every layer");
  if (!expect_ok(hk.finish_save(sh), n + ": finish_save")) return;
  std::printf("  %s: save queued in %.2f ms, done after %.2f ms (compute alone: %u ms)\n", n.c_str(), queued_ms,
              ms_since(t0), dry_run ? 0 : g.num_layers);
  const std::vector<std::byte> src_bytes = src.download();
  std::string diff = compare_stored(kv, key, toks, src, src_bytes, ts);
  expect(diff.empty(), n + ": each layer was saved after the compute that wrote it", diff);

  // Load while the compute stream reads each layer right after wait_layer and another
  // stream writes the spare pages.
  dst.fill(0xEE);
  engine_kv snapshot(g, used + spare, 16, 0, engine_space());
  snapshot.fill(0);
  t0 = std::chrono::steady_clock::now();
  load_info li = hk.start_load(key, toks, kv_target{&dst.layout, td}, compute.ref());
  if (!expect(li.status == errc::ok && li.tokens == tokens, n + ": start_load", std::string(to_string(li.status))))
    return;
  for (std::uint32_t l = 0; l < g.num_layers; ++l)
    for (int side = 0; side < 2; ++side)
      set_on(dst.region(l, side) + std::size_t(used) * dst.page_stride, 0x5A, std::size_t(spare) * dst.page_stride,
             other.s);
  ok = true;
  for (std::uint32_t l = 0; l < g.num_layers; ++l) {
    ok &= hk.wait_layer(li.handle, l) == errc::ok;
    for (int side = 0; side < 2; ++side)
      copy_on(snapshot.region(l, side), dst.region(l, side), dst.region_bytes(), compute.s);
  }
  const double issued_ms = ms_since(t0);
  expect(ok, n + ": wait_layer for every layer");
  compute.sync();
  other.sync();
  const double done_ms = ms_since(t0);
  expect_ok(hk.finish_load(li.handle), n + ": finish_load");
  std::printf("  %s: load issued in %.2f ms, compute stream done after %.2f ms (%.1f GB/s)\n", n.c_str(), issued_ms,
              done_ms, double(tokens * g.token_bytes()) / (done_ms * 1e6));
  const std::vector<std::byte> got = dst.download(), seen = snapshot.download();
  diff = compare_tokens(src, src_bytes, ts, dst, got, td, tokens);
  expect(diff.empty(), n + ": loaded layers equal the saved ones", diff);
  diff = compare_tokens(src, src_bytes, ts, snapshot, seen, td, tokens);
  expect(diff.empty(), n + ": the compute stream saw each layer complete right after wait_layer", diff);
  std::string spare_diff;
  for (std::uint32_t l = 0; l < g.num_layers && spare_diff.empty(); ++l)
    for (int side = 0; side < 2 && spare_diff.empty(); ++side)
      for (std::size_t i = std::size_t(used) * dst.page_stride; i < dst.region_bytes(); ++i)
        if (got[std::size_t(dst.region(l, side) - dst.base) + i] != std::byte{0x5A}) {
          spare_diff =
              "layer " + std::to_string(l) + " spare byte " + std::to_string(i) + " lost the other stream's write";
          break;
        }
  expect(spare_diff.empty(), n + ": the other stream's writes to spare pages stand", spare_diff);
}

template <class Fn>
void part(const char* title, Fn&& fn) {
  std::printf("== %s\n", title);
  try {
    fn();
  } catch (const std::exception& e) {
    expect(false, title, std::string("threw: ") + e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  dry_run = argc > 1 && std::string(argv[1]) == "--host-dry-run";
  std::string why;
  std::unique_ptr<copy_backend> cuda, host = make_host_copy_backend();
  if (dry_run) {
    std::printf("dry run: host copy backend and host memory in place of the GPU\n");
    cuda = make_host_copy_backend();
  } else {
    if (!detail::cuda_device_present(&why)) {
      std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
      return 77;
    }
    cuda = make_cuda_copy_backend(&why);
    if (!cuda) {
      std::printf("FAILED: a device is present but the CUDA copy backend is not: %s\n", why.c_str());
      return 1;
    }
    cudaDeviceProp prop{};
    int driver = 0, runtime = 0;
    (void)cudaGetDeviceProperties(&prop, 0);
    (void)cudaDriverGetVersion(&driver);
    (void)cudaRuntimeGetVersion(&runtime);
    std::printf("device: %s (sm_%d%d), driver %d, runtime %d\n", prop.name, prop.major, prop.minor, driver, runtime);
  }
  const auto t0 = std::chrono::steady_clock::now();

  part("1. save from GPU pages, load into other GPU pages, bitwise", [&] {
    const round_trip_case cases[] = {
        {"device, pages of 8 < blocks of 16, dense heads", engine_space(), 8, 0, 100, false},
        {"device, pages of 32 > blocks, padded heads", engine_space(), 32, 32, 77, false},
        {"device, one block, few segments", engine_space(), 16, 0, 16, false},
        {"pageable host engine memory on the CUDA backend", memory_space::host, 8, 0, 100, false},
        {"device, through the SSD tier", engine_space(), 8, 0, 100, true},
    };
    std::uint64_t session = 1;
    for (const auto& rc : cases) part(rc.name, [&] { round_trip(*cuda, rc, session++); });
  });
  part("2. truncated views re-rotated on the GPU vs the host backend", [&] {
    for (bool pre_rope : {false, true}) {
      truncated_view(*cuda, *host, rope_spec{rope_style::neox, 64}, dtype::f16, pre_rope);
      truncated_view(*cuda, *host, rope_spec{rope_style::gptj, 64}, dtype::bf16, pre_rope);
      truncated_view(*cuda, *host, rope_spec{rope_style::neox, 128, 64}, dtype::f32, pre_rope);
      truncated_view(*cuda, *host, rope_spec{rope_style::neox, 64}, dtype::f16, pre_rope, 1);
    }
  });
  part("3. stream order", [&] {
    stream_order(*cuda, 1);
    stream_order(*cuda, 8);
  });
  if (cudaError_t e = dry_run ? cudaSuccess : cudaDeviceSynchronize(); e != cudaSuccess)
    expect(false, "no CUDA error left behind", cudaGetErrorString(e));
  std::printf("%s: %d of %d checks failed (%.1f s)\n", failures ? "FAILED" : "passed", failures, checks,
              ms_since(t0) / 1000);
  return failures ? 1 : 0;
}
