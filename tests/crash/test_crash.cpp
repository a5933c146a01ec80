// Crash recovery with a SIGKILLed writer.
//
// A child process opens a write-through store and keeps putting, extending, replacing
// and dropping conversations; before every operation it writes an intent line to a pipe
// and after every successful one a commit line (write(2), unbuffered). The parent kills
// it at a random moment, reopens the store on the same directory and checks what
// recovery serves against what was committed:
//   - a committed session (not dropped, no operation in flight on it) is found with
//     exactly its committed tokens, and get() returns every block bit-exact;
//   - a session with an operation in flight is in one of the states that operation
//     allows (old state, new state, or for an extension a prefix in between);
//   - a confirmed drop is never served again;
//   - nothing else exists: recovery counters, session count and SSD usage match.
// Then the next child continues on the recovered state, on the same directory.
//
// Data of block i of conversation (session s, generation g) is make_blocks(.., s, i, 1,
// g+1) and its tokens make_tokens(s, n, g+1) with token 0 made unique per (s, g), so
// every served byte has exactly one correct value.
//
// ATTNSTORE_CRASH_KILLS=N sets the number of kills (default 50),
// ATTNSTORE_CRASH_SEED=S the random seed, ATTNSTORE_CRASH_NO_DRAIN=1 skips waiting for
// the killed writer's in-flight I/O before reopening (see the drain finding below).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/io/fault_device.hpp"
#include "attnstore/io/forwarding_device.hpp"
#include "attnstore/store.hpp"
#include "support/env.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::make_blocks;
using attnstore::testing::make_tokens;
using attnstore::testing::temp_dir;

namespace {

constexpr std::uint32_t tpb = 32;
const kv_geometry geom{4, 2, 64, dtype::f16, tpb};  // 64 KiB blocks

using attnstore::testing::env_u64;

std::size_t slot_bytes() { return format::slot_bytes(geom.validated()); }
std::size_t block_bytes() { return geom.validated().block_bytes(); }

store_config crash_config(const std::string& dir, std::size_t dram_blocks, std::size_t ssd_blocks,
                          unsigned queue_depth = 8) {
  store_config c;
  c.geometry = geom;
  c.model_name = "crash-model";
  c.dram_bytes = dram_blocks * slot_bytes();
  c.ssd_directory = dir;
  c.ssd_bytes = ssd_blocks * slot_bytes();
  c.write_through = true;
  c.queue_depth = queue_depth;
  c.log = logger{&logger::quiet, nullptr};
  return c;
}

// ---- deterministic conversations

struct session_names {
  std::vector<std::string> names;
  explicit session_names(std::uint32_t n) {
    for (std::uint32_t i = 0; i < n; ++i) names.push_back("conv-" + std::to_string(i));
  }
  session_key key(std::uint32_t s) const { return {"crash-tenant", names[s]}; }
};

std::vector<token_id> conv_tokens(std::uint32_t s, std::uint32_t gen, std::size_t n) {
  auto t = make_tokens(s, n, gen + 1);
  if (n) t[0] = 0x40000000u | (s << 20) | (gen & 0xFFFFFu);  // generations never share a prefix
  return t;
}

std::vector<std::byte> conv_blocks(std::uint32_t s, std::uint32_t gen, std::uint32_t first, std::uint32_t count) {
  return make_blocks(block_bytes(), s, first, count, gen + 1);
}

// ---- the child's side: unbuffered line protocol

void emit(int fd, const std::string& line) {
  std::string l = line + "\n";
  const char* p = l.data();
  std::size_t left = l.size();
  while (left > 0) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      ::_exit(9);
    }
    p += w;
    left -= std::size_t(w);
  }
}

[[noreturn]] void child_fail(int fd, const std::string& why) {
  emit(fd, "F " + why);
  ::_exit(3);
}

// In-flight I/O of a killed writer. A SIGKILLed process is reaped before the writes it
// had in flight on its io_uring rings complete (exit cancels only "tracked" requests;
// the rest finish in the ring's asynchronous teardown), so a write of a dead writer can
// land after its parent reopened the store. The writer therefore takes a flock on its
// own open file description of the first data file: that description lives until the
// rings' file references are dropped, i.e. until all of the writer's I/O is over, and
// the parent waits for that lock before it looks at the directory.
void take_io_probe(const ssd_space& space) {
  if (!space.fds().empty()) (void)::flock(space.fds()[0], LOCK_EX | LOCK_NB);
}
std::string data_file(const std::string& dir) { return dir + "/blocks-0000.dat"; }
// True when the dead writer's file description (and so its I/O) is still alive.
bool io_probe_busy(const std::string& dir) {
  int fd = ::open(data_file(dir).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool busy = ::flock(fd, LOCK_EX | LOCK_NB) != 0;
  ::close(fd);
  return busy;
}
// Waits until the probe lock is free; returns how long that took.
std::chrono::microseconds wait_io_drained(const std::string& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!io_probe_busy(dir)) return std::chrono::microseconds(0);
  while (io_probe_busy(dir)) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(20)) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
}

// What the writer believes a session holds (and what the parent verified it holds).
struct conv_state {
  bool present = false;
  std::uint32_t gen = 0;
  std::uint32_t tokens = 0;
};

// ---- the parent's model of what may be on disk

struct expectation {
  conv_state committed;
  enum class pending_kind { none, put, drop } pending = pending_kind::none;
  std::uint32_t pgen = 0, ptokens = 0;
};

struct crash_stats {
  std::uint64_t lines = 0, puts_committed = 0, drops_committed = 0, puts_failed = 0;
  std::uint64_t in_flight_puts = 0, in_flight_drops = 0;
  std::uint64_t partial_replacements = 0;  // committed data lost to an unfinished replacing put
  std::uint64_t recovered_blocks = 0, recovery_dropped_blocks = 0, killed_before_ready = 0;
  std::string put_failure_codes;         // "no_space no_space ..." (first few)
  std::uint64_t io_still_in_flight = 0;  // kills after which the dead writer's I/O was still running
  std::chrono::microseconds longest_drain{0};
};

// Applies the complete lines the child wrote. Returns child failure text, if any.
std::string apply_lines(const std::string& text, std::vector<expectation>& exp, std::vector<std::uint32_t>& next_gen,
                        crash_stats& st, bool* ready) {
  std::string failure;
  std::size_t pos = 0;
  while (true) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) break;  // an incomplete last line is ignored
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++st.lines;
    std::istringstream in(line);
    char kind = 0;
    in >> kind;
    std::uint32_t s = 0, g = 0, n = 0, fb = 0;
    switch (kind) {
      case 'R':
        *ready = true;
        break;
      case 'W':  // the scripted writer's write count
        break;
      case 'p':
        in >> s >> g >> n >> fb;
        exp.at(s).pending = expectation::pending_kind::put;
        exp[s].pgen = g;
        exp[s].ptokens = n;
        next_gen[s] = std::max(next_gen[s], g + 1);
        break;
      case 'P':
        in >> s >> g >> n;
        exp.at(s).committed = {true, g, n};
        exp[s].pending = expectation::pending_kind::none;
        ++st.puts_committed;
        break;
      case 'f': {
        std::string code;
        in >> s >> g >> n >> code;
        exp.at(s).pending = expectation::pending_kind::none;  // a failed put leaves the old state
        ++st.puts_failed;
        if (st.put_failure_codes.size() < 200) st.put_failure_codes += code + " ";
        break;
      }
      case 'd':
        in >> s;
        exp.at(s).pending = expectation::pending_kind::drop;
        break;
      case 'D':
        in >> s;
        exp.at(s).committed = {};
        exp[s].pending = expectation::pending_kind::none;
        ++st.drops_committed;
        break;
      case 'F':
        failure += line + "\n";
        break;
      default:
        failure += "unparsable line: " + line + "\n";
    }
  }
  return failure;
}

// Reopens the store and checks every session against the expectations. Fills `observed`
// with what is actually there (the next writer continues from it). `strict_atomic`:
// a put in flight must leave either the old state or the complete new one (a prefix of
// an extension is accepted either way: it contains the old state).
void verify_recovery(const std::string& dir, const session_names& names, std::vector<expectation>& exp,
                     std::vector<conv_state>& observed, std::size_t dram_blocks, std::size_t ssd_blocks,
                     std::size_t max_tokens, bool strict_atomic, crash_stats& st, const std::string& context) {
  std::vector<std::string> problems;
  auto problem = [&](const std::string& p) {
    if (problems.size() < 30) problems.push_back(p);
  };
  std::unique_ptr<store> sp;
  try {
    sp = std::make_unique<store>(crash_config(dir, dram_blocks, ssd_blocks));
  } catch (const std::exception& e) {
    FAIL(context << ": reopening the store failed: " << e.what());
  }
  store& s = *sp;
  const store_stats before = s.stats();
  st.recovered_blocks += before.recovered_blocks;
  st.recovery_dropped_blocks += before.recovery_dropped_blocks;
  const std::size_t bb = s.block_bytes();

  const std::uint32_t n = std::uint32_t(exp.size());
  observed.assign(n, conv_state{});
  std::uint64_t found_sessions = 0, found_blocks = 0;
  for (std::uint32_t k = 0; k < n; ++k) {
    const expectation& e = exp[k];
    std::vector<std::uint32_t> gens;
    if (e.committed.present) gens.push_back(e.committed.gen);
    if (e.pending == expectation::pending_kind::put && std::find(gens.begin(), gens.end(), e.pgen) == gens.end())
      gens.push_back(e.pgen);
    std::optional<conv_state> found;
    std::uint32_t found_nblocks = 0;
    for (std::uint32_t g : gens) {
      const auto prompt = conv_tokens(k, g, max_tokens + 2 * tpb);  // longer than anything stored
      std::vector<block_location> locs(prompt.size() / tpb + 2);
      lookup_result r = s.lookup(names.key(k), prompt, locs);
      if (r.tokens == 0) continue;
      if (found) {
        problem("session " + std::to_string(k) + ": two generations found");
        continue;
      }
      found = conv_state{true, g, std::uint32_t(r.tokens)};
      found_nblocks = r.blocks;
      if (r.blocks != geom.blocks_for(r.tokens) || r.dram_blocks + r.ssd_blocks != r.blocks)
        problem("session " + std::to_string(k) + ": lookup blocks " + std::to_string(r.blocks) + " for " +
                std::to_string(r.tokens) + " tokens");
      std::vector<std::byte> out(std::size_t(r.blocks) * bb);
      get_result gr = s.get(names.key(k), prompt, 0, r.blocks, out);
      if (gr.status != errc::ok || gr.blocks != r.blocks || gr.tokens != r.tokens)
        problem("session " + std::to_string(k) + " gen " + std::to_string(g) + ": get returned " +
                std::string(to_string(gr.status)) + " " + std::to_string(gr.blocks) + " blocks " +
                std::to_string(gr.tokens) + " tokens; lookup said " + std::to_string(r.blocks) + " blocks " +
                std::to_string(r.tokens) + " tokens");
      const auto want = conv_blocks(k, g, 0, gr.blocks);
      for (std::uint32_t b = 0; b < gr.blocks; ++b)
        if (std::memcmp(out.data() + std::size_t(b) * bb, want.data() + std::size_t(b) * bb, bb) != 0)
          problem("session " + std::to_string(k) + " gen " + std::to_string(g) + ": block " + std::to_string(b) +
                  " served with wrong bytes");
    }
    if (found) {
      ++found_sessions;
      found_blocks += found_nblocks;
      observed[k] = *found;
    }

    // Which states are allowed?
    const conv_state c = e.committed;
    const bool same_as_committed = found && c.present && found->gen == c.gen && found->tokens == c.tokens;
    bool ok = false;
    std::string allowed;
    switch (e.pending) {
      case expectation::pending_kind::none:
        ok = c.present ? same_as_committed : !found;
        allowed = c.present ? "exactly the committed state" : "absent";
        break;
      case expectation::pending_kind::drop:
        ok = !found || same_as_committed;
        // A drop invalidates block by block; an interrupted one may leave a prefix.
        if (!ok && found && c.present && found->gen == c.gen && found->tokens < c.tokens) {
          ok = true;
          ++st.in_flight_drops;
        }
        allowed = "absent, the committed state or a prefix of it (drop in flight)";
        break;
      case expectation::pending_kind::put: {
        ++st.in_flight_puts;
        const bool extension = c.present && e.pgen == c.gen;
        if (same_as_committed) {
          ok = true;
        } else if (found && found->gen == e.pgen && found->tokens <= e.ptokens) {
          if (extension) {
            ok = found->tokens >= c.tokens;  // old blocks are never lost to an extension
          } else if (found->tokens == e.ptokens) {
            ok = true;  // the complete new version
          } else {
            // A prefix of a replacing (or first) put: the old committed version is gone
            // although the new one never completed.
            if (c.present) ++st.partial_replacements;
            ok = !(strict_atomic && c.present);
          }
        } else if (!found && !c.present) {
          ok = true;  // a first put that did not land
        }
        allowed = "committed state, or gen " + std::to_string(e.pgen) + " with up to " + std::to_string(e.ptokens) +
                  " tokens (put in flight)";
        break;
      }
    }
    if (!ok) {
      std::ostringstream m;
      m << "session " << k << ": found ";
      if (found)
        m << "gen " << found->gen << " with " << found->tokens << " tokens";
      else
        m << "nothing";
      m << "; committed ";
      if (c.present)
        m << "gen " << c.gen << " with " << c.tokens << " tokens";
      else
        m << "nothing";
      m << "; allowed: " << allowed;
      problem(m.str());
    }
  }

  const store_stats after = s.stats();
  if (before.recovered_sessions != found_sessions || before.sessions != found_sessions)
    problem("recovered_sessions " + std::to_string(before.recovered_sessions) + ", live sessions " +
            std::to_string(before.sessions) + ", sessions found by lookup " + std::to_string(found_sessions));
  if (before.recovered_blocks != found_blocks)
    problem("recovered_blocks " + std::to_string(before.recovered_blocks) + " but lookups found " +
            std::to_string(found_blocks) + " blocks");
  if (before.ssd_used_bytes != before.recovered_blocks * slot_bytes())
    problem("ssd_used_bytes " + std::to_string(before.ssd_used_bytes) + " != recovered blocks x slot (" +
            std::to_string(before.recovered_blocks * slot_bytes()) + ")");
  if (before.dram_used_bytes != 0) problem("DRAM in use right after recovery");
  if (after.checksum_failures != 0 || after.io_errors != 0 || after.miss_checksum != 0 || after.miss_io_error != 0)
    problem("verification reads saw checksum failures " + std::to_string(after.checksum_failures) + " / io errors " +
            std::to_string(after.io_errors));
  if (after.dram_used_bytes > after.dram_capacity_bytes) problem("DRAM used > capacity");

  std::string all;
  for (const auto& p : problems) all += p + "\n";
  INFO(context << "\n" << all);
  CHECK(problems.empty());
}

// ---- random kills

constexpr std::uint32_t rk_sessions = 12;
constexpr std::size_t rk_max_tokens = 12 * tpb;  // 12 blocks a conversation at most
constexpr std::size_t rk_dram_blocks = 8;        // small: DRAM copies are demoted constantly
constexpr std::size_t rk_ssd_blocks = 200;       // > 12 x 12 + one put in flight: no eviction

// The writer: loops until killed.
[[noreturn]] void random_writer(int fd, const std::string& dir, std::vector<conv_state> state,
                                std::vector<std::uint32_t> next_gen, std::uint64_t seed) {
  ::signal(SIGPIPE, SIG_IGN);
  session_names names(rk_sessions);
  std::unique_ptr<store> sp;
  try {
    store_config cfg = crash_config(dir, rk_dram_blocks, rk_ssd_blocks);
    cfg.wrap_device = [](std::unique_ptr<block_device> inner, const ssd_space& space) {
      take_io_probe(space);
      return inner;
    };
    sp = std::make_unique<store>(cfg);
  } catch (const std::exception& e) {
    child_fail(fd, std::string("open: ") + e.what());
  }
  store& st = *sp;
  emit(fd, "R");
  std::mt19937_64 rng(seed);
  auto rnd = [&](std::uint64_t n) { return std::uint32_t(rng() % n); };
  const std::size_t slot = slot_bytes();
  for (std::uint64_t iter = 0;; ++iter) {
    const std::uint32_t k = rnd(rk_sessions);
    conv_state& c = state[k];
    const session_key key = names.key(k);
    std::uint32_t gen = c.gen, n = 0, fb = 0;
    const std::uint32_t roll = rnd(100);
    if (c.present && roll < 8) {  // drop
      emit(fd, "d " + std::to_string(k));
      errc e = st.drop(key);
      if (e != errc::ok) child_fail(fd, "drop of a present session returned " + std::string(to_string(e)));
      emit(fd, "D " + std::to_string(k));
      c = {};
    } else {
      if (!c.present || roll < 18 || c.tokens + 1 > rk_max_tokens) {
        // A new conversation (first put, or replacing the stored one with other tokens).
        gen = next_gen[k]++;
        n = 1 + rnd(6 * tpb);
        fb = 0;
      } else if (roll < 25) {
        // The whole conversation again (first_block 0), possibly longer.
        n = std::min<std::uint32_t>(std::uint32_t(rk_max_tokens), c.tokens + rnd(2 * tpb));
        n = std::max<std::uint32_t>(n, c.tokens);
        n = std::min<std::uint32_t>(n, 6 * tpb);
        if (n < c.tokens) n = c.tokens;
        fb = 0;
      } else {
        // The next turn: incremental put from the last stored (possibly partial) block,
        // or from the next one when the last is full.
        n = std::min<std::uint32_t>(std::uint32_t(rk_max_tokens), c.tokens + 1 + rnd(40));
        fb = geom.blocks_for(c.tokens) - 1;
        if (c.tokens % tpb == 0 && rnd(2) == 0) fb = c.tokens / tpb;
        if (fb >= geom.blocks_for(n)) fb = geom.blocks_for(n) - 1;
      }
      if (fb == 0 && geom.blocks_for(n) > 6) {
        // Keep a single put within the DRAM tier: new blocks stay in DRAM until published.
        gen = next_gen[k]++;
        n = 1 + rnd(6 * tpb);
      }
      const auto toks = conv_tokens(k, gen, n);
      const std::uint32_t total = geom.blocks_for(n);
      const auto data = conv_blocks(k, gen, fb, total - fb);
      emit(fd,
           "p " + std::to_string(k) + " " + std::to_string(gen) + " " + std::to_string(n) + " " + std::to_string(fb));
      errc e = st.put(key, toks, fb, data);
      if (e == errc::ok) {
        emit(fd, "P " + std::to_string(k) + " " + std::to_string(gen) + " " + std::to_string(n));
        c = {true, gen, n};
      } else {
        emit(fd, "f " + std::to_string(k) + " " + std::to_string(gen) + " " + std::to_string(n) + " " +
                     std::string(to_string(e)));
        if (e == errc::rejected || e == errc::invalid_argument)
          child_fail(fd, "put returned " + std::string(to_string(e)) + " for a consistent incremental put");
      }
    }
    // The live store's own bookkeeping: one SSD slot per stored block, nothing evicted.
    {
      const store_stats ss = st.stats();
      std::uint64_t blocks = 0, sessions = 0;
      for (const auto& x : state)
        if (x.present) {
          blocks += geom.blocks_for(x.tokens);
          ++sessions;
        }
      if (ss.evicted_sessions != 0) child_fail(fd, "a session was evicted although the SSD tier has room");
      if (ss.ssd_used_bytes != blocks * slot || ss.sessions != sessions)
        child_fail(fd, "after op " + std::to_string(iter) + " on session " + std::to_string(k) + ": ssd_used_bytes " +
                           std::to_string(ss.ssd_used_bytes) + " (" + std::to_string(ss.ssd_used_bytes / slot) +
                           " slots) for " + std::to_string(blocks) + " stored blocks, sessions " +
                           std::to_string(ss.sessions) + " for " + std::to_string(sessions) + "; io_errors " +
                           std::to_string(ss.io_errors) + ", no_space " + std::to_string(ss.no_space) +
                           ", put_failed " + std::to_string(ss.put_failed));
      if (ss.dram_used_bytes > ss.dram_capacity_bytes) child_fail(fd, "dram used > capacity");
    }
  }
}

struct child_run {
  std::string output;
  int status = 0;
};

// Forks `body(write_fd)`; kills it `kill_after` after it printed "R" (or after fork when
// `before_ready`), or lets it finish when kill_after is negative. Returns its output.
template <class Body>
child_run run_child(Body&& body, std::chrono::microseconds kill_after, bool before_ready) {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    body(fds[1]);
    ::_exit(0);
  }
  ::close(fds[1]);
  child_run run;
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  std::optional<clock::time_point> deadline;
  if (kill_after.count() >= 0 && before_ready) deadline = start + kill_after;
  const auto give_up = start + std::chrono::seconds(60);
  bool ready = false, eof = false;
  char buf[4096];
  while (!eof) {
    auto now = clock::now();
    if (deadline && now >= *deadline) break;
    if (now >= give_up) break;
    int wait_ms = 50;
    if (deadline)
      wait_ms = int(
          std::max<long long>(0, std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - now).count() + 1));
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, std::min(wait_ms, 50));
    if (r > 0) {
      ssize_t got = ::read(fds[0], buf, sizeof(buf));
      if (got > 0) {
        run.output.append(buf, std::size_t(got));
        if (!ready && run.output.find("R\n") != std::string::npos) {
          ready = true;
          if (kill_after.count() >= 0 && !deadline) deadline = clock::now() + kill_after;
        }
      } else if (got == 0) {
        eof = true;
      }
    }
  }
  ::kill(pid, SIGKILL);
  for (;;) {  // the rest of what it wrote before dying
    ssize_t got = ::read(fds[0], buf, sizeof(buf));
    if (got > 0)
      run.output.append(buf, std::size_t(got));
    else if (got == 0 || errno != EINTR)
      break;
  }
  ::close(fds[0]);
  ::waitpid(pid, &run.status, 0);
  return run;
}

}  // namespace

TEST_CASE("crash: SIGKILLed write-through writer, repeated restarts on one directory", "[crash]") {
  const std::uint64_t kills = env_u64("ATTNSTORE_CRASH_KILLS", 50);
  const std::uint64_t seed = env_u64("ATTNSTORE_CRASH_SEED", 20240611);
  // ATTNSTORE_CRASH_NO_DRAIN=1 reopens right after waitpid(), as a restarted engine
  // would: it reproduces the late-write finding (rarely: 2 kills in 800 here).
  const bool no_drain = env_u64("ATTNSTORE_CRASH_NO_DRAIN", 0) != 0;
  temp_dir dir("crash");
  session_names names(rk_sessions);
  std::vector<expectation> exp(rk_sessions);
  std::vector<conv_state> state(rk_sessions);
  std::vector<std::uint32_t> next_gen(rk_sessions, 0);
  crash_stats st;
  std::mt19937_64 rng(seed);
  const auto t0 = std::chrono::steady_clock::now();

  for (std::uint64_t round = 0; round < kills; ++round) {
    // Mostly kill while it writes; sometimes while it opens (recovery itself rewrites headers).
    const bool before_ready = rng() % 8 == 0;
    const auto kill_after = std::chrono::microseconds(before_ready ? rng() % 30000 : 5000 + rng() % 55000);
    const std::uint64_t child_seed = seed * 1000003 + round;
    child_run run =
        run_child([&](int fd) { random_writer(fd, dir.str(), state, next_gen, child_seed); }, kill_after, before_ready);
    INFO("round " << round << " seed " << seed);
    bool ready = false;
    const std::string failure = apply_lines(run.output, exp, next_gen, st, &ready);
    INFO("writer: " << failure << "last lines:\n"
                    << run.output.substr(run.output.size() > 400 ? run.output.size() - 400 : 0));
    REQUIRE(failure.empty());
    INFO("writer exit status " << (WIFEXITED(run.status) ? WEXITSTATUS(run.status) : -1) << ", signal "
                               << (WIFSIGNALED(run.status) ? WTERMSIG(run.status) : 0));
    REQUIRE(WIFSIGNALED(run.status));
    REQUIRE(WTERMSIG(run.status) == SIGKILL);
    if (!ready) ++st.killed_before_ready;
    const auto drained = no_drain ? std::chrono::microseconds(0) : wait_io_drained(dir.str());
    REQUIRE(drained < std::chrono::seconds(20));
    if (drained.count() > 0) ++st.io_still_in_flight;
    st.longest_drain = std::max(st.longest_drain, drained);

    std::vector<conv_state> observed;
    verify_recovery(dir.str(), names, exp, observed, rk_dram_blocks, rk_ssd_blocks, rk_max_tokens, false, st,
                    "round " + std::to_string(round));
    // The next writer continues from what is really there.
    state = observed;
    for (std::uint32_t k = 0; k < rk_sessions; ++k) {
      exp[k] = expectation{};
      exp[k].committed = observed[k];
      if (observed[k].present) next_gen[k] = std::max(next_gen[k], observed[k].gen + 1);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "crash: %llu kills in %.1f s (%llu before the store was open): %llu lines, %llu puts and %llu drops "
      "committed, %llu puts failed, %llu puts and %llu drops in flight at a kill; recovery kept %llu blocks and "
      "dropped %llu torn/stale; %llu unfinished replacing puts had already destroyed the committed version\n",
      (unsigned long long)kills, secs, (unsigned long long)st.killed_before_ready, (unsigned long long)st.lines,
      (unsigned long long)st.puts_committed, (unsigned long long)st.drops_committed, (unsigned long long)st.puts_failed,
      (unsigned long long)st.in_flight_puts, (unsigned long long)st.in_flight_drops,
      (unsigned long long)st.recovered_blocks, (unsigned long long)st.recovery_dropped_blocks,
      (unsigned long long)st.partial_replacements);
  std::printf(
      "crash: after %llu of %llu kills the reaped writer's files were still held by its io_uring rings "
      "(longest wait for them %.1f ms)\n",
      (unsigned long long)st.io_still_in_flight, (unsigned long long)kills, double(st.longest_drain.count()) / 1000.0);
  if (!st.put_failure_codes.empty()) std::printf("crash: failed puts returned: %s\n", st.put_failure_codes.c_str());
  CHECK(st.puts_committed > kills);  // the writers did real work between kills
}

// ---- deterministic crash points: kill the writer at its k-th SSD write

namespace {

// Forwards to the real device; on the k-th write piece it (optionally) writes the first
// half of that piece straight to the file, a torn write, then SIGKILLs the process.
// With queue_depth 1 every earlier piece has completed when a piece is submitted.
class crash_device final : public forwarding_device {
 public:
  crash_device(std::unique_ptr<block_device> inner, std::vector<int> fds, std::uint64_t kill_at, bool torn)
      : forwarding_device(std::move(inner)), fds_(std::move(fds)), kill_at_(kill_at), torn_(torn) {}
  std::string_view name() const noexcept override { return "crash"; }
  std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> in) override {
    return std::make_unique<channel>(*this, std::move(in));
  }
  std::uint64_t writes() const noexcept { return writes_.load(); }

 private:
  class channel final : public io_channel {
   public:
    channel(crash_device& dev, std::unique_ptr<io_channel> inner) : dev_(dev), inner_(std::move(inner)) {}
    void submit(const io_piece& p) noexcept override {
      if (p.op == io_op::write && ++dev_.writes_ == dev_.kill_at_) {
        const std::uint32_t half = p.bytes / 2 / 4096 * 4096;
        if (dev_.torn_ && half > 0) (void)!::pwrite(dev_.fds_[p.file], p.buffer, half, off_t(p.offset));
        ::raise(SIGKILL);
      }
      inner_->submit(p);
    }
    int reap(io_completion* out, int max, int min_wait) noexcept override { return inner_->reap(out, max, min_wait); }
    void flush() noexcept override { inner_->flush(); }
    unsigned depth() const noexcept override { return inner_->depth(); }

   private:
    crash_device& dev_;
    std::unique_ptr<io_channel> inner_;
  };
  std::vector<int> fds_;
  std::uint64_t kill_at_;
  bool torn_;
  std::atomic<std::uint64_t> writes_{0};
};

constexpr std::uint32_t sw_sessions = 3;
constexpr std::size_t sw_dram_blocks = 12;
constexpr std::size_t sw_ssd_blocks = 32;
constexpr std::size_t sw_max_tokens = 8 * tpb;

// A fixed script touching every kind of put and drop; reports "W <writes>" at the end.
void scripted_writer(int fd, const std::string& dir, std::uint64_t kill_at, bool torn) {
  session_names names(sw_sessions);
  crash_device* dev = nullptr;
  store_config cfg = crash_config(dir, sw_dram_blocks, sw_ssd_blocks, 1);
  cfg.wrap_device = [&](std::unique_ptr<block_device> inner, const ssd_space& space) -> std::unique_ptr<block_device> {
    take_io_probe(space);
    auto d = std::make_unique<crash_device>(std::move(inner), std::vector<int>(space.fds().begin(), space.fds().end()),
                                            kill_at, torn);
    dev = d.get();
    return d;
  };
  std::unique_ptr<store> sp;
  try {
    sp = std::make_unique<store>(cfg);
  } catch (const std::exception& e) {
    child_fail(fd, std::string("open: ") + e.what());
  }
  store& st = *sp;
  emit(fd, "R");
  auto put = [&](std::uint32_t k, std::uint32_t gen, std::uint32_t n, std::uint32_t fb) {
    const auto toks = conv_tokens(k, gen, n);
    const auto data = conv_blocks(k, gen, fb, geom.blocks_for(n) - fb);
    emit(fd, "p " + std::to_string(k) + " " + std::to_string(gen) + " " + std::to_string(n) + " " + std::to_string(fb));
    errc e = st.put(names.key(k), toks, fb, data);
    if (e != errc::ok) child_fail(fd, "scripted put returned " + std::string(to_string(e)));
    emit(fd, "P " + std::to_string(k) + " " + std::to_string(gen) + " " + std::to_string(n));
  };
  auto drop = [&](std::uint32_t k) {
    emit(fd, "d " + std::to_string(k));
    errc e = st.drop(names.key(k));
    if (e != errc::ok) child_fail(fd, "scripted drop returned " + std::string(to_string(e)));
    emit(fd, "D " + std::to_string(k));
  };
  put(0, 1, 70, 0);   // A: 3 blocks, the last partial
  put(1, 1, 40, 0);   // B: 2 blocks
  put(0, 1, 140, 2);  // A: next turn from the partial block
  put(0, 2, 100, 0);  // A: replaced by another conversation (other tokens)
  drop(1);            // B gone
  put(1, 2, 33, 0);   // B again, new conversation
  put(1, 2, 96, 1);   // B: next turn, ends on a full block
  put(2, 1, 64, 0);   // C: 2 full blocks
  put(2, 1, 90, 2);   // C: next turn from the next (new) block
  put(0, 2, 128, 3);  // A: next turn
  put(1, 2, 96, 0);   // B: the same conversation rewritten whole
  drop(0);            // A gone
  put(2, 3, 50, 0);   // C: replaced again
  emit(fd, "W " + std::to_string(dev ? dev->writes() : 0));
}

struct sweep_result {
  std::uint64_t runs = 0, partial_replacements = 0;
};

sweep_result crash_point_sweep(bool strict_atomic) {
  session_names names(sw_sessions);
  // Count the script's writes in a run without a kill.
  std::uint64_t total_writes = 0;
  {
    temp_dir dir("crash-count");
    child_run run =
        run_child([&](int fd) { scripted_writer(fd, dir.str(), ~0ull, false); }, std::chrono::microseconds(-1), false);
    INFO(run.output);
    REQUIRE(WIFEXITED(run.status));
    REQUIRE(WEXITSTATUS(run.status) == 0);
    auto w = run.output.rfind("W ");
    REQUIRE(w != std::string::npos);
    total_writes = std::strtoull(run.output.c_str() + w + 2, nullptr, 10);
    REQUIRE(total_writes > 20);
  }
  sweep_result res;
  crash_stats st;
  for (int torn = 0; torn < 2; ++torn) {
    for (std::uint64_t k = 1; k <= total_writes + 1; ++k) {
      temp_dir dir("crash-point");
      child_run run = run_child([&](int fd) { scripted_writer(fd, dir.str(), k, torn != 0); },
                                std::chrono::microseconds(-1), false);
      const std::string ctx =
          "killed at write " + std::to_string(k) + " of " + std::to_string(total_writes) + (torn ? " (torn)" : "");
      INFO(ctx);
      INFO(run.output);
      if (k <= total_writes) {
        REQUIRE(WIFSIGNALED(run.status));
        REQUIRE(WTERMSIG(run.status) == SIGKILL);
      } else {
        REQUIRE(WIFEXITED(run.status));
      }
      REQUIRE(wait_io_drained(dir.str()) < std::chrono::seconds(20));
      std::vector<expectation> exp(sw_sessions);
      std::vector<std::uint32_t> next_gen(sw_sessions, 0);
      bool ready = false;
      const std::string failure = apply_lines(run.output, exp, next_gen, st, &ready);
      REQUIRE(failure.empty());
      std::vector<conv_state> observed, again;
      const std::uint64_t partial_before = st.partial_replacements;
      verify_recovery(dir.str(), names, exp, observed, sw_dram_blocks, sw_ssd_blocks, sw_max_tokens, strict_atomic, st,
                      ctx);
      res.partial_replacements += st.partial_replacements - partial_before;
      // A second restart (after the first one cleaned up) finds exactly the same state.
      std::vector<expectation> settled(sw_sessions);
      for (std::uint32_t i = 0; i < sw_sessions; ++i) settled[i].committed = observed[i];
      verify_recovery(dir.str(), names, settled, again, sw_dram_blocks, sw_ssd_blocks, sw_max_tokens, true, st,
                      ctx + ", second restart");
      ++res.runs;
    }
  }
  return res;
}

}  // namespace

TEST_CASE("crash: kill at every SSD write of a scripted writer, whole and torn", "[crash]") {
  const auto t0 = std::chrono::steady_clock::now();
  sweep_result r = crash_point_sweep(false);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "crash points: %llu runs in %.1f s; %llu left a prefix of an unfinished replacing put instead of the "
      "committed version\n",
      (unsigned long long)r.runs, secs, (unsigned long long)r.partial_replacements);
}

// Regression (found by this test, fixed): a put that replaces a session's blocks from first_block 0 with
// other tokens is not atomic across a crash. Recovery takes, per block index, the newest
// version whose chain verifies, so once block 0 of the new version is on disk, the old
// blocks 1.. no longer chain and are discarded: after the restart the session holds a
// prefix of the unfinished put and the committed version is lost.
TEST_CASE("crash: a replacing put interrupted by a crash leaves the old or the whole new version", "[crash]") {
  sweep_result r = crash_point_sweep(true);
  CHECK(r.partial_replacements == 0);
}

// Regression (found by this test, fixed): drop() releases a block's SSD slot even when zeroing its header
// failed, and still returns ok; the header stays valid on disk and the next restart
// recovers the dropped session.
TEST_CASE("crash: a dropped session stays dropped after restart even if invalidating its headers failed", "[crash]") {
  temp_dir dir("drop-eio");
  session_names names(1);
  const auto toks = conv_tokens(0, 0, 100);
  const auto data = conv_blocks(0, 0, 0, geom.blocks_for(100));
  {
    fault_device* faults = nullptr;
    store_config cfg = crash_config(dir.str(), 8, 16);
    cfg.wrap_device = [&](std::unique_ptr<block_device> inner, const ssd_space&) -> std::unique_ptr<block_device> {
      auto d = std::make_unique<fault_device>(std::move(inner));
      faults = d.get();
      return d;
    };
    store s(cfg);
    REQUIRE(s.put(names.key(0), toks, 0, data) == errc::ok);
    fault_config every_write_fails;
    every_write_fails.error_rate = 1.0;
    every_write_fails.fail_reads = false;
    faults->set_faults(every_write_fails);
    const errc e = s.drop(names.key(0));
    INFO("drop returned " << to_string(e));
    CHECK((e == errc::ok || e == errc::device_error));
    faults->set_faults(fault_config{});
    CHECK(s.lookup(names.key(0), toks).tokens == 0);
  }
  store s(crash_config(dir.str(), 8, 16));
  CHECK(s.stats().recovered_sessions == 0);
  CHECK(s.lookup(names.key(0), toks).tokens == 0);
}

// Regression (found by this test, fixed): put() refuses (no_space) to replace a session's blocks when the
// DRAM tier is mostly held by that same session, although in write-through mode every
// one of those DRAM copies is already durable on SSD and could simply be released.
// alloc_dram() demotes only the session's blocks before first_block; the blocks being
// replaced keep their DRAM slots until publish(), so re-putting a session from block 0
// needs twice its size in DRAM.
TEST_CASE("crash: write-through put replacing a session that fills the DRAM tier succeeds", "[crash]") {
  temp_dir dir("replace-dram");
  session_names names(1);
  store s(crash_config(dir.str(), 6, 32));  // DRAM: 6 blocks
  const auto first = conv_tokens(0, 0, 5 * tpb);
  REQUIRE(s.put(names.key(0), first, 0, conv_blocks(0, 0, 0, 5)) == errc::ok);  // 5 blocks, all on SSD too
  const auto second = conv_tokens(0, 1, 4 * tpb);
  CHECK(s.put(names.key(0), second, 0, conv_blocks(0, 1, 0, 4)) == errc::ok);
  // The same conversation rewritten whole hits the same limit.
  CHECK(s.put(names.key(0), first, 0, conv_blocks(0, 0, 0, 5)) == errc::ok);
}

// A SIGKILLed writer is reaped before its io_uring rings are torn down: requests in
// flight at the kill still complete after waitpid() returned. The store therefore locks
// its data files themselves (ssd_space.cpp): the dead writer's descriptions, and their
// locks, live until its last write landed, so a store reopened at once waits for them
// (bounded) before recovering. Every round reopens right after the kill; a second
// recovery must then find exactly what the first found.
namespace {
[[noreturn]] void flood_writer(int fd, const std::string& dir) {
  session_names names(8);
  std::unique_ptr<store> sp;
  try {
    store_config cfg = crash_config(dir, 8, 64);
    cfg.wrap_device = [](std::unique_ptr<block_device> inner, const ssd_space& space) {
      take_io_probe(space);
      return inner;
    };
    sp = std::make_unique<store>(cfg);
  } catch (const std::exception& e) {
    child_fail(fd, std::string("open: ") + e.what());
  }
  emit(fd, "R");
  for (std::uint32_t i = 0;; ++i) {
    const std::uint32_t k = i % 8;
    (void)sp->put(names.key(k), conv_tokens(k, i, 6 * tpb), 0, conv_blocks(k, i, 0, 6));
  }
}
}  // namespace

TEST_CASE("crash: a store reopened after a SIGKILL does not run while the dead writer's I/O drains", "[crash]") {
  temp_dir dir("drain");
  std::uint64_t opened_while_draining = 0, changed_after_reopen = 0;
  const int rounds = int(env_u64("ATTNSTORE_CRASH_DRAIN_ROUNDS", 10));
  for (int round = 0; round < rounds; ++round) {
    child_run run = run_child([&](int fd) { flood_writer(fd, dir.str()); }, std::chrono::microseconds(10000), false);
    REQUIRE(WIFSIGNALED(run.status));
    bool opened = false;
    std::uint64_t first_blocks = 0;
    try {
      store s(crash_config(dir.str(), 8, 64));  // waits for the dead writer's file locks
      opened = true;
      first_blocks = s.stats().recovered_blocks;
    } catch (const std::exception& e) {
      INFO("reopen failed: " << e.what());
      CHECK(false);
    }
    if (!opened) ++opened_while_draining;
    if (opened) {
      // Nothing wrote since the first recovery (which zeroed every stale header): a second
      // one must find the same blocks, unless writes of the dead writer landed in between.
      store s(crash_config(dir.str(), 8, 64));
      const store_stats st = s.stats();
      if (st.recovered_blocks != first_blocks || st.recovery_dropped_blocks != 0) ++changed_after_reopen;
    }
  }
  std::printf(
      "crash: %llu of %d reopens failed; after %llu of them a second recovery found other blocks than "
      "the first\n",
      (unsigned long long)opened_while_draining, rounds, (unsigned long long)changed_after_reopen);
  INFO(opened_while_draining << " of " << rounds << " reopens failed");
  CHECK(opened_while_draining == 0);
  CHECK(changed_after_reopen == 0);
}
