// prefix_bench: sessions that start with one long system prompt, through a real store with
// prefix sharing on and off, against the limits measured in the same run.
//
//   prefix_bench [--sessions N] [--prompt-tokens T] [--own-tokens M] [--dir PATH] [--no-verify]
//
// Geometry: Llama-3-8B (32 layers, 8 KV heads x 128, f16: 128 KiB per token), 16 tokens per
// block (2 MiB blocks). Each session is the prompt then M tokens of its own.
//
// Storage: DRAM (after the saves) and SSD (after every session is demoted) bytes held,
// with sharing and without, against the bytes of the distinct blocks (the prompt once,
// each session's own blocks): stored_over_distinct is 1.0 at the limit.
//
// A new session's first turn: it loads the prompt other sessions hold (store::get of the
// prompt's blocks, served from the shared DRAM copy) into its own buffer, against memcpy
// of the same bytes into the same buffers (the limit), in the same run; the buffers
// rotate over more than 1 GiB so neither side is served by the CPU caches.
//
// The last line printed is one JSON object.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "attnstore/store.hpp"

using namespace attnstore;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<token_id> tokens(std::uint64_t seed, std::size_t n) {
  std::vector<token_id> t(n);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : t) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v = token_id(x % 128000);
  }
  return t;
}

void fill(std::byte* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0xD1B54A32D192ED03ull + 7;
  for (std::size_t i = 0; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
}

struct run_figures {
  double dram_bytes = 0, ssd_bytes = 0;
  double save_s = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::uint32_t sessions = 16;
  std::size_t prompt_tokens = 2048, own_tokens = 40;
  std::string dir = "/tmp/attnstore-prefix-bench";
  bool verify = true;
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--no-verify") {
      verify = false;  // store_config::verify_dram_reads off: copies without the checksum pass
      --i;
      continue;
    }
    if (i + 1 >= argc) break;
    if (a == "--sessions")
      sessions = std::uint32_t(std::strtoul(argv[i + 1], nullptr, 10));
    else if (a == "--prompt-tokens")
      prompt_tokens = std::strtoull(argv[i + 1], nullptr, 10);
    else if (a == "--own-tokens")
      own_tokens = std::strtoull(argv[i + 1], nullptr, 10);
    else if (a == "--dir")
      dir = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: prefix_bench [--sessions N] [--prompt-tokens T] [--own-tokens M] [--dir PATH]\n");
      return 2;
    }
  }
  store_config base;
  base.geometry = kv_geometry{32, 8, 128, dtype::f16, 16};
  base.model_name = "llama-3-8b-bench";
  base.log = logger{&logger::quiet, nullptr};
  base.background_thread = false;
  base.prefetch = false;
  base.demote_low_watermark = 0;
  base.pin_host_memory = false;
  base.verify_dram_reads = verify;
  const kv_geometry g = base.geometry.validated();
  const std::size_t bb = g.block_bytes(), slot = format::slot_bytes(g);
  const std::uint32_t tpb = g.tokens_per_block;
  const std::size_t total_tokens = prompt_tokens + own_tokens;
  const std::uint32_t blocks = std::uint32_t((total_tokens + tpb - 1) / tpb);
  const std::uint32_t prompt_blocks = std::uint32_t(prompt_tokens / tpb);
  const std::uint32_t own_blocks = blocks - prompt_blocks;
  const auto prompt = tokens(424242, prompt_tokens);
  std::vector<std::byte> prompt_kv(std::size_t(prompt_blocks) * bb);
  for (std::uint32_t b = 0; b < prompt_blocks; ++b) fill(prompt_kv.data() + std::size_t(b) * bb, bb, 1000 + b);
  auto history = [&](std::uint32_t i) {
    auto t = prompt;
    const auto own = tokens(i + 1, own_tokens);
    t.insert(t.end(), own.begin(), own.end());
    return t;
  };
  std::vector<std::byte> kv(std::size_t(blocks) * bb);
  auto session_kv = [&](std::uint32_t i) {
    std::memcpy(kv.data(), prompt_kv.data(), prompt_kv.size());
    for (std::uint32_t b = prompt_blocks; b < blocks; ++b)
      fill(kv.data() + std::size_t(b) * bb, bb, (std::uint64_t(i) << 32) + b);
  };
  const std::string names_tenant = "bench";
  std::vector<std::string> names(sessions + 1);
  for (std::uint32_t i = 0; i <= sessions; ++i) names[i] = "s" + std::to_string(i);

  const double distinct_bytes = double(prompt_blocks + std::uint64_t(sessions) * own_blocks) * double(slot);
  run_figures on, off;
  double load_s = 0, memcpy_s = 0, load_bytes = 0, own_s = 0;
  for (const bool sharing : {true, false}) {
    std::filesystem::remove_all(dir);
    store_config c = base;
    c.share_prefixes = sharing ? prefix_sharing::within_tenant : prefix_sharing::off;
    const std::uint64_t need =
        (sharing ? prompt_blocks + std::uint64_t(sessions) * own_blocks : std::uint64_t(sessions) * blocks) +
        2 * blocks;
    c.dram_bytes = need * slot;
    c.ssd_directory = dir;
    c.ssd_bytes = need * slot;
    run_figures& f = sharing ? on : off;
    store s(c);
    const double t0 = now_s();
    for (std::uint32_t i = 0; i < sessions; ++i) {
      session_kv(i);
      const auto h = history(i);
      if (s.put({names_tenant, names[i]}, h, 0, kv) != errc::ok) {
        std::fprintf(stderr, "prefix_bench: save of session %u failed\n", i);
        return 1;
      }
    }
    f.save_s = now_s() - t0;
    f.dram_bytes = double(s.stats().dram_used_bytes);
    if (sharing) {
      // A new session's first turn: the prompt from the shared DRAM copy, into buffers
      // rotating over > 1 GiB, next to memcpy of the same bytes into the same buffers.
      const std::size_t out_bytes = std::size_t(prompt_blocks) * bb;
      const std::size_t rotate = std::max<std::size_t>(2, ((std::size_t(1) << 30) + out_bytes - 1) / out_bytes + 1);
      std::vector<std::vector<std::byte>> outs(rotate, std::vector<std::byte>(out_bytes));
      for (auto& o : outs) std::memset(o.data(), 1, o.size());  // faulted in before timing
      const int rounds = 8;
      for (int r = 0; r < rounds; ++r) {
        auto& o = outs[std::size_t(r) % rotate];
        const auto h = history(sessions + 1 + std::uint32_t(r));
        const std::string name = "new" + std::to_string(r);
        double t = now_s();
        const get_result gr = s.get({names_tenant, name}, h, 0, prompt_blocks, o);
        load_s += now_s() - t;
        if (gr.status != errc::ok || gr.blocks != prompt_blocks ||
            std::memcmp(o.data(), prompt_kv.data(), out_bytes) != 0) {
          std::fprintf(stderr, "prefix_bench: a new session was not served the shared prompt exactly\n");
          return 1;
        }
        (void)s.drop({names_tenant, name});
        // The same blocks loaded by a session that saved them (no adoption), same buffers.
        auto& o1 = outs[std::size_t(r + 1) % rotate];
        const auto h0 = history(std::uint32_t(r) % sessions);
        t = now_s();
        const get_result g0 = s.get({names_tenant, names[std::uint32_t(r) % sessions]}, h0, 0, prompt_blocks, o1);
        own_s += now_s() - t;
        if (g0.status != errc::ok || g0.blocks != prompt_blocks) {
          std::fprintf(stderr, "prefix_bench: a saved session was not served its prompt\n");
          return 1;
        }
        auto& o2 = outs[std::size_t(r + rounds / 2) % rotate];
        t = now_s();
        std::memcpy(o2.data(), prompt_kv.data(), out_bytes);
        memcpy_s += now_s() - t;
        load_bytes += double(out_bytes);
      }
    }
    for (std::uint32_t i = 0; i < sessions; ++i) (void)s.demote({names_tenant, names[i]});
    f.ssd_bytes = double(s.stats().ssd_used_bytes);
    (void)s.close();
  }
  std::filesystem::remove_all(dir);
  const double gib = double(1ull << 30);
  std::printf("prefix_bench: %u sessions, %zu-token prompt + %zu own tokens, %zu-byte blocks\n", sessions,
              prompt_tokens, own_tokens, bb);
  std::printf("  DRAM held: sharing %.2f GiB, no sharing %.2f GiB; distinct blocks %.2f GiB\n", on.dram_bytes / gib,
              off.dram_bytes / gib, distinct_bytes / gib);
  std::printf("  SSD held:  sharing %.2f GiB, no sharing %.2f GiB\n", on.ssd_bytes / gib, off.ssd_bytes / gib);
  std::printf("  saves: sharing %.2f s, no sharing %.2f s\n", on.save_s, off.save_s);
  std::printf(
      "  new session's prompt load: %.2f GB/s; the same by a session that saved it: %.2f GB/s; memcpy %.2f GB/s\n",
      load_bytes / load_s / 1e9, load_bytes / own_s / 1e9, load_bytes / memcpy_s / 1e9);
  std::printf(
      "{\"sessions\": %u, \"prompt_tokens\": %zu, \"own_tokens\": %zu, \"block_bytes\": %zu, \"distinct_bytes\": %.0f, "
      "\"dram_bytes_shared\": %.0f, \"dram_bytes_unshared\": %.0f, \"ssd_bytes_shared\": %.0f, \"ssd_bytes_unshared\": "
      "%.0f, \"stored_over_distinct_dram\": %.4f, \"stored_over_distinct_ssd\": %.4f, \"unshared_over_shared\": %.3f, "
      "\"save_seconds_shared\": %.3f, \"save_seconds_unshared\": %.3f, \"new_session_load_gbps\": %.3f, "
      "\"own_session_load_gbps\": %.3f, \"memcpy_gbps\": %.3f, \"load_over_memcpy\": %.3f, \"load_over_own\": %.3f}\n",
      sessions, prompt_tokens, own_tokens, bb, distinct_bytes, on.dram_bytes, off.dram_bytes, on.ssd_bytes,
      off.ssd_bytes, on.dram_bytes / distinct_bytes, on.ssd_bytes / distinct_bytes, off.ssd_bytes / on.ssd_bytes,
      on.save_s, off.save_s, load_bytes / load_s / 1e9, load_bytes / own_s / 1e9, load_bytes / memcpy_s / 1e9,
      memcpy_s / load_s, own_s / load_s);
  return 0;
}
