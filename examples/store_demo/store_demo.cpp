// store_demo: saves synthetic multi-turn conversations through an attnstore store,
// restores them verified from DRAM, then from SSD after the store is closed and
// reopened (as after a restart), and prints what it did and the store's counters.
//
//   store_demo [--dir DIR] [--sessions N] [--turns N] [--keep]
//
// The default configuration is embedded: a LLaMA-7B-like KV geometry scaled down to
// 8 layers (so it runs in seconds), 256 MiB of DRAM, 512 MiB of SSD in a directory under
// /tmp, io_uring with O_DIRECT, write-through so the reopen finds everything.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "attnstore/store.hpp"

using namespace attnstore;

namespace {

std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Stand-in for the model: the "KV" of block b of a session is a pure function of the
// session and the block, so every restored byte can be checked.
void synth_block(std::byte* out, std::size_t bytes, std::uint64_t session, std::uint32_t block) {
  std::uint64_t s = mix(session * 1000003 + block);
  for (std::size_t i = 0; i + 8 <= bytes; i += 8) {
    s = mix(s);
    std::memcpy(out + i, &s, 8);
  }
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

bool verify(store& st, const session_key& key, const std::vector<token_id>& tokens, std::uint64_t session,
            const char* where) {
  const std::uint32_t blocks = st.geometry().blocks_for(tokens.size());
  std::vector<std::byte> out(std::size_t(blocks) * st.block_bytes()), expect(st.block_bytes());
  auto t0 = std::chrono::steady_clock::now();
  get_result g = st.get(key, tokens, 0, blocks, out);
  double ms = ms_since(t0);
  bool ok = g.status == errc::ok && g.blocks == blocks;
  for (std::uint32_t b = 0; ok && b < blocks; ++b) {
    synth_block(expect.data(), expect.size(), session, b);
    ok = std::memcmp(out.data() + std::size_t(b) * st.block_bytes(), expect.data(), expect.size()) == 0;
  }
  std::printf("  %-10s restored %5llu tokens (%3u blocks, %6.1f MiB) from %-8s in %7.2f ms: %s\n", key.session.data(),
              static_cast<unsigned long long>(g.tokens), g.blocks, double(out.size()) / (1 << 20), where, ms,
              ok ? "bit-exact" : "MISMATCH");
  return ok;
}

void print_stats(const store& st) {
  store_stats s = st.stats();
  std::printf(
      "  stats: sessions %llu | lookups %llu (hits %llu, reusable tokens %llu) | puts %llu (%llu blocks)\n"
      "         served: DRAM %llu blocks, SSD %llu blocks | demoted %llu, promoted %llu, evicted %llu sessions\n"
      "         SSD written %.1f MiB, read %.1f MiB | checksum failures %llu, I/O errors %llu\n"
      "         recovered %llu sessions / %llu blocks, dropped %llu torn or stale\n"
      "         DRAM %.1f / %.1f MiB, SSD %.1f / %.1f MiB\n",
      (unsigned long long)s.sessions, (unsigned long long)s.lookups, (unsigned long long)s.lookup_hits,
      (unsigned long long)s.tokens_reusable, (unsigned long long)s.puts, (unsigned long long)s.put_blocks,
      (unsigned long long)s.blocks_served_dram, (unsigned long long)s.blocks_served_ssd,
      (unsigned long long)s.demoted_blocks, (unsigned long long)s.promoted_blocks,
      (unsigned long long)s.evicted_sessions, s.ssd_bytes_written / 1048576.0, s.ssd_bytes_read / 1048576.0,
      (unsigned long long)s.checksum_failures, (unsigned long long)s.io_errors,
      (unsigned long long)s.recovered_sessions, (unsigned long long)s.recovered_blocks,
      (unsigned long long)s.recovery_dropped_blocks, s.dram_used_bytes / 1048576.0, s.dram_capacity_bytes / 1048576.0,
      s.ssd_used_bytes / 1048576.0, s.ssd_capacity_bytes / 1048576.0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir =
      (std::filesystem::temp_directory_path() / ("attnstore-demo-" + std::to_string(::getpid()))).string();
  int sessions = 4, turns = 5;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--dir" && i + 1 < argc)
      dir = argv[++i];
    else if (a == "--sessions" && i + 1 < argc)
      sessions = std::atoi(argv[++i]);
    else if (a == "--turns" && i + 1 < argc)
      turns = std::atoi(argv[++i]);
    else if (a == "--keep")
      keep = true;
    else {
      std::fprintf(stderr, "usage: %s [--dir DIR] [--sessions N] [--turns N] [--keep]\n", argv[0]);
      return 2;
    }
  }
  if (sessions < 1 || turns < 1) {
    std::fprintf(stderr, "store_demo: --sessions and --turns must be at least 1\n");
    return 2;
  }

  store_config cfg;
  cfg.geometry = kv_geometry{8, 32, 128, dtype::f16, 0};  // LLaMA-7B heads, 8 of its 32 layers
  cfg.model_name = "demo-llama-7b-8layers";
  cfg.dram_bytes = 256ull << 20;
  cfg.ssd_directory = dir;
  cfg.ssd_bytes = 512ull << 20;
  cfg.write_through = true;

  std::vector<std::vector<token_id>> history(sessions);
  std::vector<std::string> names;
  for (int s = 0; s < sessions; ++s) names.push_back("chat-" + std::to_string(s));
  bool all_ok = true;
  try {
    store st(cfg);
    const kv_geometry& g = st.geometry();
    std::printf("attnstore demo: %u layers x %u KV heads x %u dims %s, %u tokens per block (%.2f MiB blocks)\n",
                g.num_layers, g.num_kv_heads, g.head_dim, std::string(to_string(g.dtype)).c_str(), g.tokens_per_block,
                double(g.block_bytes()) / (1 << 20));
    std::printf("tiers: DRAM %llu MiB (%s), SSD %llu MiB in %s via %s, write-through\n\n",
                (unsigned long long)(cfg.dram_bytes >> 20), std::string(st.dram_pinning()).c_str(),
                (unsigned long long)(cfg.ssd_bytes >> 20), dir.c_str(), std::string(st.io_backend_name()).c_str());

    std::vector<std::byte> kv;
    for (int turn = 1; turn <= turns; ++turn) {
      std::printf("turn %d\n", turn);
      for (int s = 0; s < sessions; ++s) {
        session_key key{"demo-tenant", names[s]};
        // The new turn: the user's message and the model's reply append to the history.
        auto& h = history[s];
        const std::size_t new_tokens = 40 + (mix(s * 100 + turn) % 200);
        for (std::size_t i = 0; i < new_tokens; ++i) h.push_back(token_id(mix(s * 7777 + h.size()) % 32000));
        auto t0 = std::chrono::steady_clock::now();
        lookup_result r = st.lookup(key, h);
        double lookup_us = ms_since(t0) * 1000;
        // Save: blocks from the first one not fully stored (the partial last block) on.
        const std::uint32_t first = std::uint32_t(r.tokens / g.tokens_per_block);
        const std::uint32_t total = g.blocks_for(h.size());
        kv.resize(std::size_t(total - first) * st.block_bytes());
        for (std::uint32_t b = first; b < total; ++b)
          synth_block(kv.data() + std::size_t(b - first) * st.block_bytes(), st.block_bytes(), s, b);
        t0 = std::chrono::steady_clock::now();
        errc e = st.put(key, h, first, kv);
        double put_ms = ms_since(t0);
        std::printf(
            "  %-10s %5zu tokens: reusable %5llu (lookup %5.1f us), prefill %4zu, saved %u blocks in %6.2f ms: %s\n",
            names[s].c_str(), h.size(), (unsigned long long)r.tokens, lookup_us, h.size() - r.tokens, total - first,
            put_ms, std::string(to_string(e)).c_str());
        all_ok &= e == errc::ok;
      }
    }
    std::printf("\nrestore from DRAM (and SSD where DRAM was full)\n");
    for (int s = 0; s < sessions; ++s) {
      session_key key{"demo-tenant", names[s]};
      lookup_result r = st.lookup(key, history[s]);
      all_ok &= verify(st, key, history[s], s, r.ssd_blocks ? "DRAM+SSD" : "DRAM");
    }
    print_stats(st);
    std::printf("\nclosing the store (as a restart would)\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "store_demo: %s\n", e.what());
    return 1;
  }
  try {
    store st(cfg);
    std::printf("reopened %s: the index was rebuilt from the SSD tier\n", dir.c_str());
    for (int s = 0; s < sessions; ++s) {
      session_key key{"demo-tenant", names[s]};
      lookup_result r = st.lookup(key, history[s]);
      all_ok &= r.tokens == history[s].size();
      all_ok &= verify(st, key, history[s], s, "SSD");
    }
    print_stats(st);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "store_demo: %s\n", e.what());
    return 1;
  }
  if (!keep) std::filesystem::remove_all(dir);
  std::printf("\n%s\n", all_ok ? "demo: every restored block was verified bit-exact" : "demo: FAILED");
  return all_ok ? 0 : 1;
}
