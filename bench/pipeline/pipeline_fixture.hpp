// What the host and CUDA pipeline benchmarks share: the model shape, a store holding
// sessions of history over a >= 1 GiB working set (so copies come from memory, not
// cache), the engine's paged layout for one sequence, and the hook-call loop.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/hash.hpp"
#include "attnstore/hooks.hpp"

namespace pipeline {

using namespace attnstore;
using clock_type = std::chrono::steady_clock;

constexpr std::uint32_t layers = 32;
constexpr std::uint32_t heads = 8, head_dim = 128, tokens_per_block = 64;
constexpr std::size_t history_tokens = 1024;  // 1024 tok x 128 KiB/token = 128 MiB per session
constexpr int sessions = 9;                   // 9 x 128 MiB = 1.1 GiB of history
constexpr std::uint32_t page = 16, pages = history_tokens / page;
constexpr std::size_t token_stride = std::size_t(heads) * head_dim * 2, page_stride = token_stride * page;
constexpr std::size_t layer_side_bytes = page_stride * pages;  // one layer's K (or V) of one sequence
constexpr kv_geometry geometry{layers, heads, head_dim, dtype::f16, tokens_per_block};

inline double us_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
}

/// The store and its sessions, each put once at start-up. `extra_blocks` leaves DRAM
/// room beyond them (saves, truncated copies) so nothing is evicted while benchmarks run.
struct bench_store {
  std::unique_ptr<store> kv;
  std::vector<std::vector<token_id>> tokens;
  std::vector<std::string> names;

  explicit bench_store(std::size_t extra_blocks = 4) {
    store_config c;
    c.geometry = geometry;
    c.model_name = "pipeline-bench";
    c.dram_bytes =
        (std::size_t(sessions) * history_tokens / tokens_per_block + extra_blocks) * format::slot_bytes(geometry);
    c.log = logger{&logger::quiet, nullptr};
    // ATTNSTORE_BENCH_VERIFY_DRAM=0: loads from DRAM skip the payload checksum
    // (store_config::verify_dram_reads), to measure what verification costs.
    if (const char* v = std::getenv("ATTNSTORE_BENCH_VERIFY_DRAM"); v && std::string(v) == "0")
      c.verify_dram_reads = false;
    kv = std::make_unique<store>(c);
    const std::size_t bb = kv->block_bytes();
    std::vector<std::byte> blocks(history_tokens / tokens_per_block * bb);
    for (int s = 0; s < sessions; ++s) {
      names.push_back("s" + std::to_string(s));
      std::memset(blocks.data(), s + 1, blocks.size());  // f16 0x0101..: small finite values
      tokens.push_back(make_tokens(s));
      if (kv->put(key(s), tokens.back(), 0, blocks) != errc::ok) throw std::runtime_error("put failed");
    }
  }
  session_key key(int s) const { return {"bench", names[std::size_t(s)]}; }
  static std::vector<token_id> make_tokens(int s) {
    std::vector<token_id> t(history_tokens);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = token_id(s * 100000 + i);
    return t;
  }
};

/// One sequence's engine memory: per layer [page][16 tokens][heads][dim] f16, K for
/// every layer from `k`, V from `v`, pages scattered through the page table.
struct paged_engine {
  std::vector<std::byte*> kb, vb;
  std::vector<std::uint32_t> table;
  kv_layout layout{};

  paged_engine(std::byte* k, std::byte* v, memory_space where) {
    for (std::uint32_t l = 0; l < layers; ++l) {
      kb.push_back(k + l * layer_side_bytes);
      vb.push_back(v + l * layer_side_bytes);
    }
    for (std::uint32_t p = 0; p < pages; ++p) table.push_back((p * 37) % pages);  // scattered pages
    layout =
        kv_layout{layers, heads, head_dim, dtype::f16, page, page_stride, token_stride, head_dim * 2, kb, vb, where};
  }
  kv_target target() const { return kv_target{&layout, table}; }
};

/// The segments that load layer `l` of the acquired `views` into the engine, appended
/// to `out` from `used` on. Returns the new count.
inline std::size_t layer_load_segments(const std::vector<block_view>& views, std::uint32_t blocks, std::uint32_t l,
                                       const paged_engine& e, std::vector<copy_segment>& out, std::size_t used) {
  for (std::uint32_t b = 0; b < blocks; ++b)
    used += layer_segments(geometry, views[b].payload, l, views[b].first, views[b].position, views[b].tokens,
                           e.target(), copy_direction::to_engine, std::span(out).subspan(used));
  return used;
}

inline hooks_config bench_hooks_config(std::uint32_t preload) {
  hooks_config hc;
  hc.preload_layers = preload;
  hc.max_blocks_per_request = 64;
  hc.max_loads = hc.max_saves = 4;
  return hc;
}

/// What an engine pays per hook call beyond the data movement: wait_layer with every
/// copy already complete (`save` false), or save_layer of a one-token save.
inline void hook_call_loop(benchmark::State& state, bench_store& s, copy_backend& copier, const paged_engine& e,
                           std::optional<stream_ref> compute) {
  hooks hk(*s.kv, copier, bench_hooks_config(layers));  // everything queued at start_load
  const bool save = state.range(0) != 0;
  std::uint32_t l = 0;
  if (!save) {
    load_info li = hk.start_load(s.key(0), s.tokens[0], e.target(), compute);
    for (std::uint32_t k = 0; k < layers; ++k) (void)hk.wait_layer(li.handle, k);
    (void)hk.finish_load(li.handle);  // all copies complete
    li = hk.start_load(s.key(0), s.tokens[0], e.target(), compute);
    for (std::uint32_t k = 0; k < layers; ++k) (void)hk.wait_layer(li.handle, k);
    for (auto _ : state) {
      benchmark::DoNotOptimize(hk.wait_layer(li.handle, l));
      l = (l + 1) % layers;
    }
    (void)hk.finish_load(li.handle);
  } else {
    // A one-token save: the call queues one small segment per layer and K/V.
    std::vector<token_id> one{7};
    errc st;
    save_handle sh = hk.start_save({"bench", "hook-save"}, one, 0, e.target(), compute, &st);
    if (st != errc::ok) state.SkipWithError("start_save failed");
    for (auto _ : state) {
      benchmark::DoNotOptimize(hk.save_layer(sh, l));
      l = (l + 1) % layers;
    }
    (void)hk.finish_save(sh);
  }
}

}  // namespace pipeline
