// open_bench: how long opening a full store takes, against reading it whole.
//
// Fills a store of --gib GiB on SSD (Llama-3-8B KV, 2 MiB blocks, write-through), closes
// it, then times, in the same run:
//   open_clean     the store opened after a clean close: it reads each slot's header
//                  (4 KiB of every 2 MiB slot) and rebuilds the index
//   open_crash     the store opened with no clean-close mark, as after a crash: it reads
//                  and checks every slot whole
//   read_whole     the limit of reading it whole: every slot file read with O_DIRECT,
//                  1 MiB requests, queue depth 32, through the same io_uring device
// and checks both opens recovered every block. Prints one JSON object.
//
//   build/bench/open_bench [--gib 8] [--dir /tmp]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "attnstore/io/uring_device.hpp"
#include "attnstore/store.hpp"
#include "attnstore/tier/host_arena.hpp"

namespace {

using namespace attnstore;
using clock_type = std::chrono::steady_clock;

const kv_geometry geometry{32, 8, 128, dtype::f16, 16};  // 2 MiB blocks

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

store_config config_for(const std::string& dir, std::uint64_t ssd_bytes) {
  store_config c;
  c.geometry = geometry;
  c.model_name = "open-bench";
  c.dram_bytes = 64 * format::slot_bytes(geometry.validated());
  c.ssd_directory = dir;
  c.ssd_bytes = ssd_bytes;
  c.write_through = true;
  c.prefetch = false;
  c.max_sessions = 8192;
  c.log = logger{&logger::quiet, nullptr};
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  double gib = 8;
  std::string base = "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--gib" && i + 1 < argc) gib = std::atof(argv[++i]);
    else if (a == "--dir" && i + 1 < argc) base = argv[++i];
    else {
      std::fprintf(stderr, "usage: open_bench [--gib 8] [--dir /tmp]\n");
      return 2;
    }
  }
  const std::string dir = base + "/attnstore-open-bench";
  std::filesystem::remove_all(dir);
  const std::size_t slot = format::slot_bytes(geometry.validated());
  const std::uint64_t slots = std::uint64_t(gib * double(1ull << 30)) / slot;
  const std::uint64_t ssd_bytes = slots * slot;
  const std::uint32_t per_session = 64;  // 1024 tokens, 128 MiB each
  const std::uint64_t sessions = slots / per_session;

  // ---- fill
  const auto t_fill = clock_type::now();
  {
    store s(config_for(dir, ssd_bytes));
    std::vector<std::byte> data(std::size_t(per_session) * s.block_bytes());
    for (std::size_t i = 0; i < data.size(); i += 4096) data[i] = std::byte(i >> 12);
    std::vector<token_id> toks(std::size_t(per_session) * geometry.tokens_per_block);
    for (std::uint64_t k = 0; k < sessions; ++k) {
      for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = token_id(k * 7919 + i);
      if (s.put({"bench", std::to_string(k)}, toks, 0, data) != errc::ok) {
        std::fprintf(stderr, "open_bench: put %llu failed\n", (unsigned long long)k);
        return 1;
      }
    }
  }  // close: CLEAN is written
  const double fill_s = seconds_since(t_fill);
  const std::uint64_t blocks = sessions * per_session;

  // ---- open after a clean close
  // Opening = allocating the DRAM and staging arenas (the same whatever is on disk) +
  // recovery; recovery (store_stats::recovery_ns) is what depends on the store's size.
  auto timed_open = [&](std::uint64_t* recovered, double* recovery_s) {
    const auto t0 = clock_type::now();
    store_config c = config_for(dir, ssd_bytes);
    c.close_flush_ms = 0;
    store s(c);
    const double t = seconds_since(t0);
    *recovered = s.stats().recovered_blocks;
    *recovery_s = double(s.stats().recovery_ns) / 1e9;
    return t;
  };
  std::uint64_t rec_clean = 0, rec_crash = 0;
  double recovery_clean = 0, recovery_crash = 0;
  const double open_clean = timed_open(&rec_clean, &recovery_clean);
  // The store just closed wrote CLEAN again; without it the open is a crash recovery.
  std::filesystem::remove(dir + "/CLEAN");
  const double open_crash = timed_open(&rec_crash, &recovery_crash);

  // ---- the limit: read every slot file whole, O_DIRECT, 1 MiB, QD 32
  double read_whole = 0;
  {
    std::vector<int> fds;
    std::uint64_t bytes = 0;
    for (unsigned f = 0;; ++f) {
      char name[32];
      std::snprintf(name, sizeof(name), "/blocks-%04u.dat", f);
      int fd = ::open((dir + name).c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
      if (fd < 0) break;
      fds.push_back(fd);
    }
    std::string why;
    auto dev = make_uring_device(fds, uring_options{64, true, false, 4096}, &why);
    if (!dev) {
      std::fprintf(stderr, "open_bench: io_uring: %s\n", why.c_str());
      return 1;
    }
    constexpr std::uint32_t chunk = 1u << 20;
    constexpr unsigned depth = 32;
    void* buf = std::aligned_alloc(4096, std::size_t(chunk) * depth);
    const auto t0 = clock_type::now();
    for (unsigned f = 0; f < fds.size(); ++f) {
      const std::uint64_t size = std::uint64_t(::lseek(fds[f], 0, SEEK_END));
      for (std::uint64_t off = 0; off < size;) {
        io_request reqs[depth];
        unsigned n = 0;
        for (; n < depth && off < size; ++n, off += chunk)
          reqs[n] = io_request{io_op::read, f, off, static_cast<char*>(buf) + std::size_t(n) * chunk,
                               std::uint32_t(std::min<std::uint64_t>(chunk, size - off)), -1, 0};
        if (dev->execute(std::span(reqs, n), depth) != errc::ok) {
          std::fprintf(stderr, "open_bench: read failed\n");
          return 1;
        }
        for (unsigned i = 0; i < n; ++i) bytes += std::uint64_t(reqs[i].result);
      }
    }
    read_whole = seconds_since(t0);
    std::free(buf);
    dev.reset();
    for (int fd : fds) ::close(fd);
    if (bytes < ssd_bytes) std::fprintf(stderr, "open_bench: read %llu of %llu bytes\n", (unsigned long long)bytes,
                                        (unsigned long long)ssd_bytes);
  }
  std::filesystem::remove_all(dir);
  const bool ok = rec_clean == blocks && rec_crash == blocks;
  std::printf(
      "{\"ssd_gib\": %.2f, \"slots\": %llu, \"blocks\": %llu, \"fill_s\": %.2f, \"open_clean_s\": %.3f, "
      "\"recovery_clean_s\": %.4f, \"open_crash_s\": %.3f, \"recovery_crash_s\": %.3f, \"read_whole_s\": %.3f, "
      "\"clean_recovery_vs_read_whole\": %.4f, \"crash_recovery_vs_read_whole\": %.3f, "
      "\"recovered_clean\": %llu, \"recovered_crash\": %llu, \"all_recovered\": %s}\n",
      double(ssd_bytes) / double(1ull << 30), (unsigned long long)slots, (unsigned long long)blocks, fill_s,
      open_clean, recovery_clean, open_crash, recovery_crash, read_whole, recovery_clean / read_whole,
      recovery_crash / read_whole, (unsigned long long)rec_clean,
      (unsigned long long)rec_crash, ok ? "true" : "false");
  return ok ? 0 : 1;
}
