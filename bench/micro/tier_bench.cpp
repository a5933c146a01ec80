// tier_bench: the store's DRAM and SSD tiers next to their limits, measured in the
// same run on the same machine. scripts/bench-tier.sh runs it and prints the ratios.
//
//   BM_SsdWrite/<block_kib>/<qd>         store::demote() of a 64 MiB session (DRAM -> SSD),
//                                        sessions demoted back to back (the puts that
//                                        refill DRAM, every ~900 MiB, are untimed)
//   BM_SsdRead/<block_kib>/<qd>          store::get() of an SSD-only session with DRAM full
//                                        (pinned sessions): reads go through staging
//   BM_SsdReadPromote/<block_kib>/<qd>   store::get() of an SSD-only session with DRAM room:
//                                        blocks are promoted (DRAM copies dropped untimed)
//   BM_UringLimitWrite/<kib>/<qd>        bare liburing O_DIRECT loop, same transfer size
//   BM_UringLimitRead/<kib>/<qd>         (slot bytes: block + 4 KiB header), same directory
//   BM_DramPut/<block_kib>               store::put() into DRAM (copy + XXH3)
//   BM_DramGet/<block_kib>               store::get() from DRAM (copy + XXH3 verify)
//   BM_DramGetNoVerify/<block_kib>       the same with verify_dram_reads = false
//   BM_Memcpy/<kib>                      memcpy of the same blocks: the DRAM limit
//   BM_Lookup, BM_LookupCold             lookup of an 8192-token prompt, 256 tokens per
//                                        block (one session; 1024 sessions in turn)
//   BM_LookupBatch                       async_requests::lookup_batch of one scheduler
//                                        step: 256 requests of distinct sessions, against
//                                        the same 256 store::lookup calls one by one
//                                        (ratio_to_single: single-call time / batch time)
//   BM_MetricsPerCall                    what the latency histograms add to each call
//
// Block sizes: SSD 1024, 256, 64 KiB at QD 32; DRAM 4096, 1024, 256 and 4 KiB (4 KiB:
// the copy is negligible, so the time per block is the per-block overhead).
// Bytes: the store benchmarks report payload bytes (what the caller gets: block_kib per
// block); the io_uring limit loop reports the bytes it transfers (slot bytes). The SSD
// benchmarks also give `slot_bytes_per_second` (what the store moved to or from the
// device). `sec_per_block` is the time per block (per-block overhead = store - memcpy).
// Times: the SSD benchmarks use wall-clock time (UseRealTime: they wait on the device;
// the names carry no "/real_time" suffix); the DRAM and lookup ones, CPU-bound on one
// thread, use the thread's CPU time, which leaves out time the 2 shared vCPUs spend
// on other jobs.
//
// The SSD files live under $ATTNSTORE_BENCH_DIR (default /tmp) in a directory of their
// own, removed at exit. Every working set is >= 1 GiB of distinct blocks.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/async_requests.hpp"
#include "attnstore/detail/latency_histogram.hpp"
#include "attnstore/store.hpp"

namespace {

using namespace attnstore;

constexpr std::size_t KiB = 1024, MiB = KiB * KiB, GiB = MiB * KiB;
constexpr std::size_t session_payload = 64 * MiB;   // one put / demote / get call
constexpr std::size_t dram_working_set = 1 * GiB;   // distinct payload cycled over (DRAM)
constexpr std::size_t ssd_sessions = 32;            // 32 x 64 MiB = 2 GiB on SSD
constexpr std::size_t user_buffer_bytes = 1 * GiB;  // engine-side source and destination

// ---------------------------------------------------------------- environment

std::string& bench_root() {
  static std::string root = [] {
    const char* d = std::getenv("ATTNSTORE_BENCH_DIR");
    std::string base = d && *d ? d : "/tmp";
    return base + "/attnstore-tier-bench." + std::to_string(::getpid());
  }();
  return root;
}

void bench_log(void*, log_level level, std::string_view message) noexcept {
  if (level < log_level::info) return;
  std::fprintf(stderr, "attnstore: %.*s\n", int(message.size()), message.data());
}

struct mapped {
  std::byte* p = nullptr;
  std::size_t n = 0;
  explicit mapped(std::size_t bytes) : n(bytes) {
    void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    p = static_cast<std::byte*>(m);
  }
  mapped(const mapped&) = delete;
  mapped& operator=(const mapped&) = delete;
  ~mapped() { ::munmap(p, n); }
};

void fill_random(std::byte* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed;
  for (std::size_t i = 0; i + 8 <= n; i += 8) {
    x += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(p + i, &z, 8);
  }
}

// The engine's buffers: 1 GiB of KV to store, 1 GiB to load into. Faulted in up front.
std::byte* user_src() {
  static mapped m(user_buffer_bytes);
  static const bool filled = (fill_random(m.p, m.n, 42), true);
  (void)filled;
  return m.p;
}
std::byte* user_dst() {
  static mapped m(user_buffer_bytes);
  return m.p;
}
// Called before every timed loop: the first call maps and faults in 2 GiB (seconds).
void prepare_user_buffers() {
  (void)user_src();
  (void)user_dst();
}

// kv geometry whose block payload is `kib` KiB: 8 layers x 8 KV heads x 128 dims x f16
// is 32 KiB per token (256 KiB = 8 tokens, 1 MiB = 32); smaller blocks use 1 layer x
// 1 head x 64 dims (256 B per token, 4 KiB = 16 tokens).
kv_geometry geometry_for(std::size_t kib) {
  kv_geometry g{8, 8, 128, dtype::f16, 0};
  if ((kib * KiB) % g.token_bytes() != 0) g = kv_geometry{1, 1, 64, dtype::f16, 0};
  g.tokens_per_block = std::uint32_t(kib * KiB / g.token_bytes());
  if (g.tokens_per_block == 0 || g.block_bytes() != kib * KiB)
    throw std::invalid_argument("no geometry for " + std::to_string(kib) + " KiB blocks");
  return g;
}

std::vector<token_id> make_tokens(std::uint64_t session, std::size_t n) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id(session * 1000003u + i * 7u + 1u);
  return t;
}

// ---------------------------------------------------------------- fixture cache
// Google Benchmark calls a benchmark function several times (iteration estimate,
// repetitions, random interleaving); the expensive setup (1-2 GiB of data) is kept
// across calls. Three pools: the SSD stores (all kept together, so interleaved SSD
// benchmarks do not rebuild them), the io_uring limit files (all kept), and up to two
// DRAM or lookup stores (one block size: with and without verification). Taking from
// the SSD pool frees the DRAM one and back.

struct fixture {
  virtual ~fixture() = default;
};

using fixture_pool = std::map<std::string, std::unique_ptr<fixture>>;
fixture_pool g_ssd_pool, g_limit_pool, g_dram_pool;

template <class F, class... A>
F& fixture_for(fixture_pool& pool, const std::string& key, A... args) {
  auto it = pool.find(key);
  if (it == pool.end()) {
    // Free memory and disk before building: the pools that cannot coexist go first.
    if (&pool == &g_ssd_pool) g_dram_pool.clear();
    if (&pool == &g_dram_pool) {
      if (g_dram_pool.size() >= 2) g_dram_pool.clear();
      g_ssd_pool.clear();
    }
    it = pool.emplace(key, std::make_unique<F>(args...)).first;
  }
  return static_cast<F&>(*it->second);
}

// ---------------------------------------------------------------- store fixtures

struct session_set {
  std::vector<std::string> names;
  std::vector<std::vector<token_id>> tokens;
  void add(const std::string& prefix, std::size_t id, std::size_t ntokens) {
    names.push_back(prefix + std::to_string(id));
    tokens.push_back(make_tokens(id + (prefix == "filler" ? 1000000 : 0), ntokens));
  }
  session_key key(std::size_t i) const { return {"bench", names[i]}; }
  std::size_t size() const { return names.size(); }
};

struct store_fixture : fixture {
  kv_geometry geom;
  std::size_t bb = 0, slot = 0;
  std::uint32_t blocks_per_session = 0;
  std::size_t payload = 0;  // bytes per session
  session_set sessions;
  std::unique_ptr<store> st;
  std::string dir;
  std::size_t next = 0;

  std::span<const std::byte> src_of(std::size_t s) const {
    return {user_src() + (s * payload) % user_buffer_bytes, payload};
  }
  std::span<std::byte> dst_of(std::size_t s) const { return {user_dst() + (s * payload) % user_buffer_bytes, payload}; }

  void init_sizes(std::size_t kib, std::uint32_t max_blocks_per_session) {
    geom = geometry_for(kib);
    bb = geom.block_bytes();
    slot = format::slot_bytes(geom);
    blocks_per_session = std::uint32_t(std::min<std::size_t>(session_payload / bb, max_blocks_per_session));
    payload = std::size_t(blocks_per_session) * bb;
  }
  store_config base_config() const {
    store_config c;
    c.geometry = geom;
    c.model_name = "tier-bench";
    c.log = logger{&bench_log, nullptr};
    // The tier's copy path: BM_DramPut saves each session's same blocks again, which with
    // prefix sharing is a hashing pass and no copy (prefix_bench measures sharing).
    c.share_prefixes = prefix_sharing::off;
    return c;
  }
  void put_or_throw(std::size_t s) {
    errc e = st->put(sessions.key(s), sessions.tokens[s], 0, src_of(s));
    if (e != errc::ok) throw std::runtime_error("put failed: " + std::string(to_string(e)));
  }
  ~store_fixture() override {
    st.reset();
    if (!dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  }
};

// DRAM-only store holding dram_working_set of distinct payload, every session stored.
struct dram_fixture : store_fixture {
  dram_fixture(std::size_t kib, bool verify) {
    init_sizes(kib, kib >= 64 ? ~0u : 256);  // small blocks: 256 per call
    const std::size_t n = dram_working_set / payload;
    store_config c = base_config();
    c.verify_dram_reads = verify;
    c.max_sessions = std::uint32_t(std::max<std::size_t>(4096, n + 16));
    c.dram_bytes = (n + 1) * blocks_per_session * slot + slot;  // +1 session: a put replaces
    st = std::make_unique<store>(std::move(c));
    for (std::size_t s = 0; s < n; ++s) sessions.add("s", s, std::size_t(blocks_per_session) * geom.tokens_per_block);
    for (std::size_t s = 0; s < n; ++s) put_or_throw(s);
  }
};

// Store with an SSD tier of ssd_sessions x 64 MiB (>= 2 GiB) and a 1 GiB DRAM tier;
// every session is written to SSD once at setup (so the files' extents are written, as
// the limit loop's are), then lives on SSD only.
struct ssd_fixture : store_fixture {
  enum class mode { write, read_staging, read_promote };
  session_set fillers;
  bool dram_full = false;
  std::vector<std::size_t> pending;  // write mode: sessions put in DRAM, not yet demoted
  std::size_t pending_pos = 0, pending_max = 0, next_write = 0;

  ssd_fixture(std::size_t kib, unsigned qd) {
    init_sizes(kib, ~0u);
    dir = bench_root() + "/store-" + std::to_string(kib) + "k-qd" + std::to_string(qd);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    std::filesystem::create_directories(bench_root());
    store_config c = base_config();
    c.dram_bytes = 1 * GiB;
    c.ssd_directory = dir;
    c.ssd_bytes = ssd_sessions * blocks_per_session * slot;
    c.backend = io_backend::io_uring;
    c.direct_io = true;
    c.queue_depth = qd;
    st = std::make_unique<store>(std::move(c));
    // DRAM holds this many pending sessions, one session's room to spare.
    pending_max = std::size_t(st->stats().dram_capacity_bytes / slot) / blocks_per_session - 1;
    for (std::size_t s = 0; s < ssd_sessions; ++s)
      sessions.add("s", s, std::size_t(blocks_per_session) * geom.tokens_per_block);
    for (std::size_t s = 0; s < ssd_sessions; ++s) {
      put_or_throw(s);
      demote_or_throw(s);
    }
  }

  void demote_or_throw(std::size_t s) {
    if (errc e = st->demote(sessions.key(s)); e != errc::ok)
      throw std::runtime_error("demote failed: " + std::string(to_string(e)));
  }

  void set_mode(mode m) {
    if (m != mode::write) {  // readers need every session on SSD only
      for (; pending_pos < pending.size(); ++pending_pos) demote_or_throw(pending[pending_pos]);
      pending.clear();
      pending_pos = 0;
    }
    set_dram_full(m == mode::read_staging);
  }

  // Write mode: the next sessions (oldest SSD copies dropped) are put into DRAM, up to
  // what DRAM holds, so that the timed demotes run back to back.
  void refill() {
    pending.clear();
    pending_pos = 0;
    for (std::size_t k = 0; k < pending_max; ++k) {
      const std::size_t s = next_write++ % sessions.size();
      (void)st->drop(sessions.key(s));
      put_or_throw(s);
      pending.push_back(s);
    }
  }

  // DRAM full of pinned sessions: get() cannot promote and reads through staging.
  void set_dram_full(bool full) {
    if (full == dram_full) return;
    if (full) {
      for (std::size_t k = 0;; ++k) {
        store_stats s = st->stats();
        const std::size_t free_slots = (s.dram_capacity_bytes - s.dram_used_bytes) / slot;
        if (free_slots == 0) break;
        const std::size_t blocks = std::min<std::size_t>(free_slots, blocks_per_session);
        fillers.add("filler", k, blocks * geom.tokens_per_block);
        errc e = st->put(fillers.key(k), fillers.tokens[k], 0, {user_src(), blocks * bb});
        if (e != errc::ok) throw std::runtime_error("filler put failed: " + std::string(to_string(e)));
        (void)st->pin(fillers.key(k));
      }
    } else {
      for (std::size_t k = 0; k < fillers.size(); ++k) {
        (void)st->unpin(fillers.key(k));
        (void)st->drop(fillers.key(k));
      }
      fillers = {};
    }
    dram_full = full;
  }
};

std::string to_string_key(const char* kind, std::size_t kib, unsigned qd = 0) {
  return std::string(kind) + "/" + std::to_string(kib) + "/" + std::to_string(qd);
}

void set_block_counters(benchmark::State& state, std::size_t blocks) {
  state.counters["sec_per_block"] =
      benchmark::Counter(double(blocks), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// ---------------------------------------------------------------- SSD store benchmarks

// Timed: store::demote() of one 64 MiB session. Untimed, once per 14 sessions: the
// next sessions' old SSD copies are dropped and the sessions put into DRAM again, so
// the demotes run back to back (~900 MiB between pauses).
void BM_SsdWrite(benchmark::State& state) {
  prepare_user_buffers();
  const std::size_t kib = std::size_t(state.range(0));
  const unsigned qd = unsigned(state.range(1));
  ssd_fixture* fx;
  try {
    fx = &fixture_for<ssd_fixture>(g_ssd_pool, to_string_key("ssd", kib, qd), kib, qd);
    fx->set_mode(ssd_fixture::mode::write);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  store& st = *fx->st;
  const std::uint64_t written0 = st.stats().ssd_bytes_written;
  std::size_t sessions_done = 0;
  for (auto _ : state) {
    if (fx->pending_pos == fx->pending.size()) {
      state.PauseTiming();
      try {
        fx->refill();
      } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        break;
      }
      state.ResumeTiming();
    }
    errc e = st.demote(fx->sessions.key(fx->pending[fx->pending_pos++]));
    if (e != errc::ok) {
      state.SkipWithError(("demote failed: " + std::string(to_string(e))).c_str());
      break;
    }
    ++sessions_done;
  }
  const std::uint64_t written = st.stats().ssd_bytes_written - written0;
  state.SetBytesProcessed(std::int64_t(sessions_done * fx->payload));
  state.SetItemsProcessed(std::int64_t(sessions_done * fx->blocks_per_session));
  state.counters["slot_bytes_per_second"] = benchmark::Counter(double(written), benchmark::Counter::kIsRate);
  set_block_counters(state, sessions_done * fx->blocks_per_session);
}

void ssd_read(benchmark::State& state, bool promote) {
  prepare_user_buffers();
  const std::size_t kib = std::size_t(state.range(0));
  const unsigned qd = unsigned(state.range(1));
  ssd_fixture* fx;
  try {
    fx = &fixture_for<ssd_fixture>(g_ssd_pool, to_string_key("ssd", kib, qd), kib, qd);
    fx->set_mode(promote ? ssd_fixture::mode::read_promote : ssd_fixture::mode::read_staging);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  store& st = *fx->st;
  const store_stats before = st.stats();
  std::size_t sessions_done = 0;
  for (auto _ : state) {
    const std::size_t s = fx->next++ % fx->sessions.size();
    get_result r = st.get(fx->sessions.key(s), fx->sessions.tokens[s], 0, fx->blocks_per_session, fx->dst_of(s));
    if (r.status != errc::ok || r.blocks != fx->blocks_per_session) {
      state.SkipWithError(("get failed: " + std::string(to_string(r.status))).c_str());
      break;
    }
    if (promote) {  // back to SSD-only (drops the DRAM copies: no I/O), untimed
      state.PauseTiming();
      (void)st.demote(fx->sessions.key(s));
      state.ResumeTiming();
    }
    ++sessions_done;
  }
  const store_stats after = st.stats();
  const std::uint64_t blocks = sessions_done * fx->blocks_per_session;
  if (after.blocks_served_ssd - before.blocks_served_ssd != blocks)
    state.SkipWithError("not every block was served from SSD");
  if (promote && after.promoted_blocks - before.promoted_blocks != blocks)
    state.SkipWithError("not every block was promoted");
  if (!promote && after.promoted_blocks != before.promoted_blocks)
    state.SkipWithError("blocks were promoted although DRAM is full");
  state.SetBytesProcessed(std::int64_t(sessions_done * fx->payload));
  state.SetItemsProcessed(std::int64_t(blocks));
  state.counters["slot_bytes_per_second"] =
      benchmark::Counter(double(after.ssd_bytes_read - before.ssd_bytes_read), benchmark::Counter::kIsRate);
  set_block_counters(state, blocks);
}

void BM_SsdRead(benchmark::State& state) { ssd_read(state, false); }
void BM_SsdReadPromote(benchmark::State& state) { ssd_read(state, true); }

// ---------------------------------------------------------------- io_uring limit loop
// liburing directly: one ring of depth qd, the file registered, a 64 MiB buffer pool
// registered when the kernel allows it, O_DIRECT, transfers of the store's slot size,
// sequential over a file as large as the store's SSD tier, pipeline kept full across
// iterations (like fio). Each iteration moves one session's worth of transfers.

struct uring_limit_fixture : fixture {
  std::string path;
  int fd = -1;
  io_uring ring{};
  bool ring_ready = false, fixed_buffer = false;
  std::size_t xfer = 0, nslots = 0, nbuffers = 0;
  std::unique_ptr<mapped> pool;
  std::uint64_t next_io = 0;
  unsigned qd = 0, in_flight = 0;

  uring_limit_fixture(std::size_t kib, unsigned depth) : qd(depth) {
    try {
      setup(kib);
    } catch (...) {
      cleanup();
      throw;
    }
  }
  ~uring_limit_fixture() override { cleanup(); }
  void cleanup() noexcept {
    if (ring_ready) io_uring_queue_exit(&ring);
    ring_ready = false;
    if (fd >= 0) ::close(fd);
    fd = -1;
    if (!path.empty()) ::unlink(path.c_str());
    path.clear();
  }
  void setup(std::size_t kib) {
    const kv_geometry g = geometry_for(kib);
    xfer = format::slot_bytes(g);
    nbuffers = std::max<std::size_t>(session_payload / g.block_bytes(), qd);
    nslots = ssd_sessions * (session_payload / g.block_bytes());
    std::filesystem::create_directories(bench_root());
    path = bench_root() + "/uring-limit-" + std::to_string(kib) + "k-qd" + std::to_string(qd);
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
    if (int err = ::posix_fallocate(fd, 0, off_t(nslots * xfer)); err != 0)
      throw std::runtime_error("fallocate " + path + ": " + std::strerror(err));
    pool = std::make_unique<mapped>(nbuffers * xfer);
    for (std::size_t i = 0; i < nbuffers; ++i)
      std::memcpy(pool->p + i * xfer, user_src() + (i * xfer) % (user_buffer_bytes - xfer), xfer);
    if (int r = io_uring_queue_init(qd, &ring, 0); r < 0)
      throw std::runtime_error(std::string("io_uring_queue_init: ") + std::strerror(-r));
    ring_ready = true;
    if (int r = io_uring_register_files(&ring, &fd, 1); r < 0)
      throw std::runtime_error(std::string("io_uring_register_files: ") + std::strerror(-r));
    iovec iov{pool->p, pool->n};
    fixed_buffer = io_uring_register_buffers(&ring, &iov, 1) == 0;
    // Write the whole file once so the extents are written (as the store's are).
    run(true, nslots);
    drain();
  }

  void submit_one(bool write) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    const std::uint64_t k = next_io++;
    std::byte* buf = pool->p + (k % nbuffers) * xfer;
    const std::uint64_t off = (k % nslots) * xfer;
    if (write) {
      if (fixed_buffer)
        io_uring_prep_write_fixed(sqe, 0, buf, unsigned(xfer), off, 0);
      else
        io_uring_prep_write(sqe, 0, buf, unsigned(xfer), off);
    } else {
      if (fixed_buffer)
        io_uring_prep_read_fixed(sqe, 0, buf, unsigned(xfer), off, 0);
      else
        io_uring_prep_read(sqe, 0, buf, unsigned(xfer), off);
    }
    sqe->flags |= IOSQE_FIXED_FILE;
    ++in_flight;
  }
  // Completes `count` transfers, keeping qd in flight; leaves the pipeline full.
  void run(bool write, std::size_t count) {
    std::size_t done = 0;
    while (done < count) {
      while (in_flight < qd) submit_one(write);
      int r = io_uring_submit_and_wait(&ring, 1);
      if (r < 0 && r != -EINTR) throw std::runtime_error(std::string("io_uring_submit_and_wait: ") + std::strerror(-r));
      io_uring_cqe* cqe;
      unsigned head, n = 0;
      io_uring_for_each_cqe(&ring, head, cqe) {
        if (cqe->res != int(xfer)) throw std::runtime_error("io_uring transfer returned " + std::to_string(cqe->res));
        ++n;
      }
      io_uring_cq_advance(&ring, n);
      in_flight -= n;
      done += n;
    }
  }
  void drain() {
    while (in_flight > 0) {
      io_uring_cqe* cqe;
      if (io_uring_wait_cqe(&ring, &cqe) < 0) break;
      io_uring_cqe_seen(&ring, cqe);
      --in_flight;
    }
  }
};

void uring_limit(benchmark::State& state, bool write) {
  prepare_user_buffers();
  const std::size_t kib = std::size_t(state.range(0));
  const unsigned qd = unsigned(state.range(1));
  uring_limit_fixture* fx;
  try {
    fx = &fixture_for<uring_limit_fixture>(g_limit_pool, to_string_key("uring", kib, qd), kib, qd);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  const std::size_t per_iter = session_payload / geometry_for(kib).block_bytes();
  std::size_t iters = 0;
  try {
    for (auto _ : state) {
      fx->run(write, per_iter);
      ++iters;
    }
    fx->drain();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    g_limit_pool.erase(to_string_key("uring", kib, qd));
    return;
  }
  state.SetBytesProcessed(std::int64_t(iters * per_iter * fx->xfer));
  state.SetItemsProcessed(std::int64_t(iters * per_iter));
  state.counters["fixed_buffers"] = fx->fixed_buffer ? 1 : 0;
  set_block_counters(state, iters * per_iter);
}

void BM_UringLimitWrite(benchmark::State& state) { uring_limit(state, true); }
void BM_UringLimitRead(benchmark::State& state) { uring_limit(state, false); }

// ---------------------------------------------------------------- DRAM benchmarks

void dram_bench(benchmark::State& state, bool is_put, bool verify) {
  prepare_user_buffers();
  const std::size_t kib = std::size_t(state.range(0));
  dram_fixture* fx;
  try {
    fx = &fixture_for<dram_fixture>(g_dram_pool, to_string_key(verify ? "dram" : "dram-noverify", kib), kib, verify);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  store& st = *fx->st;
  const std::size_t n = fx->sessions.size();
  std::size_t sessions_done = 0;
  for (auto _ : state) {
    const std::size_t s = fx->next++ % n;
    if (is_put) {
      errc e = st.put(fx->sessions.key(s), fx->sessions.tokens[s], 0, fx->src_of(s));
      if (e != errc::ok) {
        state.SkipWithError(("put failed: " + std::string(to_string(e))).c_str());
        break;
      }
    } else {
      get_result r = st.get(fx->sessions.key(s), fx->sessions.tokens[s], 0, fx->blocks_per_session, fx->dst_of(s));
      if (r.status != errc::ok || r.blocks != fx->blocks_per_session) {
        state.SkipWithError(("get failed: " + std::string(to_string(r.status))).c_str());
        break;
      }
    }
    ++sessions_done;
  }
  state.SetBytesProcessed(std::int64_t(sessions_done * fx->payload));
  state.SetItemsProcessed(std::int64_t(sessions_done * fx->blocks_per_session));
  set_block_counters(state, sessions_done * fx->blocks_per_session);
}

void BM_DramPut(benchmark::State& state) { dram_bench(state, true, true); }
void BM_DramGet(benchmark::State& state) { dram_bench(state, false, true); }
void BM_DramGetNoVerify(benchmark::State& state) { dram_bench(state, false, false); }

// The DRAM limit: memcpy of the same blocks (same count per call, same 1 GiB cycle).
void BM_Memcpy(benchmark::State& state) {
  prepare_user_buffers();
  const std::size_t bb = std::size_t(state.range(0)) * KiB;
  const std::size_t per_call = bb >= 64 * KiB ? session_payload / bb : 256;
  const std::size_t payload = per_call * bb;
  const std::size_t n = dram_working_set / payload;
  std::byte* src = user_src();
  std::byte* dst = user_dst();
  std::size_t next = 0, calls = 0;
  for (auto _ : state) {
    const std::size_t base = (next++ % n) * payload;
    for (std::size_t b = 0; b < per_call; ++b) std::memcpy(dst + base + b * bb, src + base + b * bb, bb);
    benchmark::ClobberMemory();
    ++calls;
  }
  state.SetBytesProcessed(std::int64_t(calls * payload));
  state.SetItemsProcessed(std::int64_t(calls * per_call));
  set_block_counters(state, calls * per_call);
}

// ---------------------------------------------------------------- lookup

// 8192-token prompts, 256 tokens per block (32 blocks), all in DRAM. Tiny payload
// (8 KiB/block: 1 layer x 1 head x 8 dims x f16): lookup never touches the payload.
struct lookup_fixture : store_fixture {
  static constexpr std::size_t prompt_tokens = 8192, nsessions = 1024;
  lookup_fixture() {
    geom = kv_geometry{1, 1, 8, dtype::f16, 256};
    bb = geom.block_bytes();
    slot = format::slot_bytes(geom);
    blocks_per_session = std::uint32_t(prompt_tokens / geom.tokens_per_block);
    payload = blocks_per_session * bb;
    store_config c = base_config();
    c.dram_bytes = (nsessions + 1) * blocks_per_session * slot;
    st = std::make_unique<store>(std::move(c));
    for (std::size_t s = 0; s < nsessions; ++s) {
      sessions.add("s", s, prompt_tokens);
      put_or_throw(s);
    }
  }
};

/// The lookup fixture, made once; null (the benchmark skipped) when it cannot be.
lookup_fixture* lookup_fixture_or_skip(benchmark::State& state) {
  prepare_user_buffers();
  try {
    return &fixture_for<lookup_fixture>(g_dram_pool, "lookup");
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return nullptr;
  }
}

void lookup_bench(benchmark::State& state, bool cold) {
  lookup_fixture* fx = lookup_fixture_or_skip(state);
  if (!fx) return;
  block_location out[64];
  std::size_t i = 0;
  for (auto _ : state) {
    const std::size_t s = cold ? i++ % lookup_fixture::nsessions : 0;
    lookup_result r = fx->st->lookup(fx->sessions.key(s), fx->sessions.tokens[s], out);
    if (r.tokens != lookup_fixture::prompt_tokens || r.blocks != fx->blocks_per_session) {
      state.SkipWithError("lookup did not find the whole prompt");
      break;
    }
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()));
  state.counters["prompt_tokens"] = double(lookup_fixture::prompt_tokens);
  state.counters["blocks"] = double(fx->blocks_per_session);
}

// One scheduler step's lookups through async_requests::lookup_batch (what a connector
// calls per step), and, timed in the same iterations, the same lookups made one by one.
void BM_LookupBatch(benchmark::State& state) {
  lookup_fixture* fx = lookup_fixture_or_skip(state);
  if (!fx) return;
  constexpr std::size_t batch = 256;
  async_requests requests(*fx->st);
  std::vector<session_key> keys(batch);
  std::vector<std::span<const token_id>> prompts(batch);
  std::vector<lookup_result> results(batch);
  double singles_s = 0, batch_s = 0;
  std::size_t step = 0;
  for (auto _ : state) {
    for (std::size_t i = 0; i < batch; ++i) {  // a different 256 of the 1024 sessions each step
      const std::size_t s = (step * batch + i * 5) % lookup_fixture::nsessions;
      keys[i] = fx->sessions.key(s);
      prompts[i] = fx->sessions.tokens[s];
    }
    // Whichever runs second finds the sessions warm in cache: they take turns.
    auto timed = [&](auto&& run) {
      const auto t0 = std::chrono::steady_clock::now();
      run();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    auto run_batch = [&] { return timed([&] { requests.lookup_batch(keys, prompts, results); }); };
    auto run_singles = [&] {
      return timed([&] {
        for (std::size_t i = 0; i < batch; ++i) results[i] = fx->st->lookup(keys[i], prompts[i]);
      });
    };
    double b, one;
    if (step++ % 2) {
      b = run_batch();
      one = run_singles();
    } else {
      one = run_singles();
      b = run_batch();
    }
    batch_s += b;
    singles_s += one;
    state.SetIterationTime(b);
    for (const lookup_result& r : results)
      if (r.tokens != lookup_fixture::prompt_tokens) {
        state.SkipWithError("lookup did not find the whole prompt");
        return;
      }
  }
  const double n = double(std::max<std::int64_t>(1, state.iterations()));
  state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(batch));
  state.counters["requests"] = double(batch);
  state.counters["us_per_request"] = batch_s / n / double(batch) * 1e6;
  state.counters["ratio_to_single"] = singles_s / batch_s;
}

void BM_Lookup(benchmark::State& state) { lookup_bench(state, false); }
void BM_LookupCold(benchmark::State& state) { lookup_bench(state, true); }

// What store::metrics adds to every timed call (lookup, get, acquire, put, commit): two
// detail::ticks() reads (the TSC) and one histogram observation. Divided by a figure's per-call
// time it bounds the metrics' share of that figure (docs/benchmarks.md).
void BM_MetricsPerCall(benchmark::State& state) {
  static attnstore::detail::latency_histogram h;
  for (auto _ : state) {
    const std::uint64_t t0 = attnstore::detail::ticks();
    benchmark::ClobberMemory();
    h.observe_ticks(attnstore::detail::ticks() - t0);
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()));
}

// ---------------------------------------------------------------- registration
// Adjacent order: each store figure runs right after its limit (the shared disk drifts).

void register_all() {
  const std::vector<std::size_t> ssd_kib = {1024, 256, 64};
  const unsigned qd = 32;
  for (std::size_t kib : ssd_kib) {
    const std::int64_t k = std::int64_t(kib);
    auto b = [&](const char* name, void (*fn)(benchmark::State&)) {
      benchmark::RegisterBenchmark(name, fn)
          ->Args({k, qd})
          ->ArgNames({"block_kib", "qd"})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    };
    b("BM_UringLimitWrite", BM_UringLimitWrite);
    b("BM_SsdWrite", BM_SsdWrite);
    b("BM_UringLimitRead", BM_UringLimitRead);
    b("BM_SsdRead", BM_SsdRead);
    b("BM_SsdReadPromote", BM_SsdReadPromote);
  }
  const std::vector<std::size_t> dram_kib = {4096, 1024, 256, 4};
  for (std::size_t kib : dram_kib) {
    auto b = [&](const char* name, void (*fn)(benchmark::State&)) {
      benchmark::RegisterBenchmark(name, fn)
          ->Arg(std::int64_t(kib))
          ->ArgName("block_kib")
          ->Unit(kib >= 64 ? benchmark::kMillisecond : benchmark::kMicrosecond);
    };
    b("BM_Memcpy", BM_Memcpy);
    b("BM_DramPut", BM_DramPut);
    b("BM_DramGet", BM_DramGet);
    b("BM_DramGetNoVerify", BM_DramGetNoVerify);
  }
  benchmark::RegisterBenchmark("BM_Lookup", BM_Lookup)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_LookupCold", BM_LookupCold)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_LookupBatch", BM_LookupBatch)->UseManualTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_MetricsPerCall", BM_MetricsPerCall)->Unit(benchmark::kNanosecond);
}

// The SSD benchmarks measure wall-clock time (UseRealTime: they wait on the device, and
// rates must be bytes per wall second). Google Benchmark then appends "/real_time" to
// their names; the reporters below drop it so the names stay
// BM_SsdWrite/block_kib:1024/qd:32 etc., as the scripts that parse them expect.
class plain_name_reporter final : public benchmark::BenchmarkReporter {
 public:
  explicit plain_name_reporter(benchmark::BenchmarkReporter* inner) : inner_(inner) {}
  bool ReportContext(const Context& context) override {
    inner_->SetOutputStream(&GetOutputStream());
    inner_->SetErrorStream(&GetErrorStream());
    return inner_->ReportContext(context);
  }
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> renamed(runs);
    for (Run& r : renamed) r.run_name.time_type.clear();
    inner_->ReportRuns(renamed);
  }
  void Finalize() override { inner_->Finalize(); }

 private:
  benchmark::BenchmarkReporter* inner_;
};

}  // namespace

int main(int argc, char** argv) {
  // --benchmark_out_format is read here because Initialize() consumes it.
  std::string out_format = "json";
  bool has_out = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.starts_with("--benchmark_out_format=")) out_format = std::string(a.substr(23));
    if (a.starts_with("--benchmark_out=")) has_out = true;
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("attnstore_hash_kernel", std::string(hash_kernel_name()));
  benchmark::AddCustomContext("attnstore_bench_dir", bench_root());
  benchmark::AddCustomContext("attnstore_bytes", "store: payload bytes; BM_UringLimit*: transfer (slot) bytes");
  benchmark::AddCustomContext("attnstore_time", "SSD: wall-clock; DRAM and lookup: thread CPU time");
  plain_name_reporter display(benchmark::CreateDefaultDisplayReporter());
  std::unique_ptr<benchmark::BenchmarkReporter> file_inner;
  if (out_format == "console")
    file_inner = std::make_unique<benchmark::ConsoleReporter>(benchmark::ConsoleReporter::OO_None);
  else
    file_inner = std::make_unique<benchmark::JSONReporter>();
  plain_name_reporter file(file_inner.get());
  // CSV (deprecated in Google Benchmark) is left to the library: its names keep the suffix.
  benchmark::RunSpecifiedBenchmarks(&display, has_out && out_format != "csv" ? &file : nullptr);
  benchmark::Shutdown();
  g_ssd_pool.clear();
  g_limit_pool.clear();
  g_dram_pool.clear();
  std::error_code ec;
  std::filesystem::remove_all(bench_root(), ec);
  return 0;
}
