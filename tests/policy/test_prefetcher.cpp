// The prefetcher: the byte bound is never exceeded, promotions follow the queue, and a
// promoted session that is evicted, demoted, saved or closed mid-flight leaves no leaked
// block (checked against the real cache_index through the simulator's tiered_cache).
#include <catch2/catch.hpp>

#include <map>
#include <random>
#include <vector>

#include "attnstore/policy/prefetcher.hpp"
#include "attnstore/policy/scheduler_aware.hpp"
#include "tiered_cache.hpp"

using namespace attnstore;
using namespace attnstore::policy;

namespace {

// A target whose DRAM is a counter: reserve on start, release on abort or completion.
struct fake_target {
  std::map<std::uint32_t, std::uint32_t> ssd_only;  // record -> blocks only on SSD
  std::map<std::uint32_t, std::uint32_t> reserved;  // record -> DRAM reserved
  std::uint32_t dram_free = 1000;
  std::vector<std::pair<std::uint32_t, std::uint64_t>> started;  // (record, ticket)
  std::uint32_t max_ask = 0;

  std::uint32_t ssd_only_blocks(std::uint32_t r) noexcept { return ssd_only.count(r) ? ssd_only[r] : 0; }
  std::uint32_t start_promotion(std::uint32_t r, std::uint32_t max_blocks, std::uint64_t ticket) noexcept {
    max_ask = std::max(max_ask, max_blocks);
    const std::uint32_t n = std::min(max_blocks, dram_free);
    if (n == 0) return 0;
    dram_free -= n;
    reserved[r] += n;
    started.emplace_back(r, ticket);
    return n;
  }
  void abort_promotion(std::uint32_t r, std::uint64_t) noexcept {
    dram_free += reserved[r];
    reserved[r] = 0;
  }
  void land(std::uint32_t r, std::uint32_t n) {
    reserved[r] -= n;
    ssd_only[r] -= std::min(ssd_only[r], n);
  }
};

void make_queue(scheduler_aware& p, std::uint32_t n, std::uint32_t blocks_each) {
  for (std::uint32_t r = 0; r < n; ++r) {
    p.on_insert(r, r);
    p.on_blocks(r, level::ssd, blocks_each);
    p.enqueue(r, r + 1, r);
  }
}

}  // namespace

TEST_CASE("prefetcher: promotes the queue front first within the window and the byte bound") {
  scheduler_aware p({64, 64, 0});
  make_queue(p, 6, 4);
  fake_target t;
  for (std::uint32_t r = 0; r < 6; ++r) t.ssd_only[r] = 4;
  prefetcher pf({64, 100, 1000, 3, 0});  // 100-byte blocks, 1000 bytes in flight, window 3
  CHECK(pf.plan(p, t) == 3);             // sessions 0, 1, 2: 12 blocks = 1200 bytes > 1000
  CHECK(pf.bytes_in_flight() <= 1000);
  CHECK(pf.blocks_in_flight(0) == 4);
  CHECK(pf.blocks_in_flight(1) == 4);
  CHECK(pf.blocks_in_flight(2) == 2);  // the rest of the bound
  CHECK_FALSE(pf.in_flight(3));        // outside the window
  CHECK(pf.plan(p, t) == 0);           // bound reached, one promotion per session
  // Completion frees the bound; a stale ticket is ignored.
  CHECK(pf.complete(0, pf.ticket(0) + 999) == 0);
  const std::uint64_t t0 = pf.ticket(0);
  CHECK(pf.complete(0, t0) == 4);
  t.land(0, 4);
  CHECK(pf.complete(0, t0) == 0);  // twice: stale
  CHECK(pf.bytes_in_flight() == 600);
  // Session 2 still needs 2 more blocks but has one promotion in flight already.
  CHECK(pf.plan(p, t) == 0);
  CHECK(pf.complete(2, pf.ticket(2)) == 2);
  t.land(2, 2);
  CHECK(pf.plan(p, t) == 1);  // its remaining 2 blocks (the window is 0, 1, 2)
  CHECK(pf.blocks_in_flight(2) == 2);
  // Cancel: the target releases the DRAM; the late completion is ignored.
  const std::uint64_t t1 = pf.ticket(1);
  const std::uint32_t free_before = t.dram_free;
  CHECK(pf.cancel(1, t) == 4);
  CHECK(t.dram_free == free_before + 4);
  CHECK(pf.complete(1, t1) == 0);
  CHECK(pf.cancel(1, t) == 0);
  CHECK(pf.bytes_in_flight() == 200);
  CHECK(pf.peak_bytes_in_flight() <= pf.max_bytes_in_flight());
}

TEST_CASE("prefetcher: stops at the first session without room and sizes its window by the paper's rule") {
  scheduler_aware p({64, 64, 0});
  make_queue(p, 8, 5);
  fake_target t;
  for (std::uint32_t r = 0; r < 8; ++r) t.ssd_only[r] = 5;
  t.dram_free = 7;
  // Window 0: C_mem / mean session KV = 2000 bytes / (5 blocks x 100 bytes) = 4 sessions.
  prefetcher pf({64, 100, 100000, 0, 2000});
  CHECK(pf.window(p) == 4);
  CHECK(pf.plan(p, t) == 2);  // 5 blocks for session 0, then 2 for session 1, then no room
  CHECK(pf.blocks_in_flight(0) == 5);
  CHECK(pf.blocks_in_flight(1) == 2);
  CHECK_FALSE(pf.in_flight(2));
  CHECK_THROWS_AS(prefetcher({64, 100, 99, 1, 0}), std::invalid_argument);  // bound < a block
  CHECK_THROWS_AS(prefetcher({64, 0, 100, 1, 0}), std::invalid_argument);
  CHECK_THROWS_AS(prefetcher({64, 100, 100, 0, 0}), std::invalid_argument);
}

TEST_CASE("prefetcher: the byte bound holds under random queues, completions and cancels") {
  std::mt19937_64 rng(11);
  scheduler_aware p({128, 16, 0});
  fake_target t;
  t.dram_free = 1 << 20;
  prefetcher pf({128, 64, 64 * 37, 0, 64 * 200});
  std::vector<std::uint32_t> flying;
  std::uint64_t position = 0;
  for (int step = 0; step < 20000; ++step) {
    const std::uint32_t r = std::uint32_t(rng() % 128);
    switch (rng() % 6) {
      case 0:
        if (!p.live(r)) p.on_insert(r, step);
        t.ssd_only[r] = std::uint32_t(rng() % 40);
        p.on_blocks(r, level::ssd, t.ssd_only[r]);
        break;
      case 1:
        p.enqueue(r, ++position, step);
        break;
      case 2:
        p.dequeue(r);
        break;
      case 3:
        pf.cancel(r, t);
        p.on_erase(r);
        t.ssd_only[r] = 0;
        break;
      case 4:
        if (pf.in_flight(r)) {
          const std::uint32_t n = pf.complete(r, pf.ticket(r));
          t.land(r, n);
          p.on_blocks(r, level::ssd, t.ssd_only[r]);
        }
        break;
      default:
        pf.plan(p, t);
        break;
    }
    REQUIRE(pf.bytes_in_flight() <= pf.max_bytes_in_flight());
    std::uint64_t reserved = 0;
    for (auto& [rec, n] : t.reserved) {
      REQUIRE(n == pf.blocks_in_flight(rec));
      reserved += n;
    }
    REQUIRE(reserved * 64 == pf.bytes_in_flight());
  }
  CHECK(pf.peak_bytes_in_flight() <= pf.max_bytes_in_flight());
  CHECK(t.max_ask * 64 <= pf.max_bytes_in_flight());
}

// ---- against the real index: the simulator's tiered_cache

namespace {

struct pending_read {
  std::uint32_t record;
  std::uint32_t blocks;
  std::uint64_t ticket;
};

struct io_log {
  std::vector<pending_read> reads;
  static void read(void* c, std::uint32_t r, std::uint32_t n, std::uint64_t ticket) {
    static_cast<io_log*>(c)->reads.push_back({r, n, ticket});
  }
};

std::vector<token_id> tokens_for(std::uint32_t session, std::size_t n) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id(session * 100003u + i);
  return t;
}

sim::cache_options small_cache(sim::policy_kind kind) {
  sim::cache_options o;
  o.kind = kind;
  o.tokens_per_block = 4;
  o.dram_blocks = 24;
  o.ssd_blocks = 64;
  o.max_session_blocks = 8;
  o.block_bytes = 1000;
  o.watermark = 0.1;
  o.prefetch_window = 4;
  o.prefetch_bytes_in_flight = 6000;  // 6 blocks
  return o;
}

}  // namespace

TEST_CASE("tiered_cache: a prefetched session closed or evicted mid-flight leaks nothing") {
  io_log io;
  sim::tiered_cache c(small_cache(sim::policy_kind::scheduler_aware), {&io, &io_log::read});
  std::string why;
  // Sessions 0..3 with 6 blocks each: 24 blocks, DRAM holds 24 minus the watermark, so
  // the older ones end up on SSD.
  for (std::uint32_t s = 0; s < 4; ++s) {
    c.save(sim::sim_session_hash(s), tokens_for(s, 24), s);
    REQUIRE(c.check(&why));
  }
  for (std::uint32_t s = 0; s < 6; ++s) c.save(sim::sim_session_hash(10 + s), tokens_for(10 + s, 24), 10 + s);
  REQUIRE(c.check(&why));
  const std::uint32_t r0 = c.record_of(sim::sim_session_hash(0));
  const std::uint32_t r1 = c.record_of(sim::sim_session_hash(1));
  REQUIRE(r0 != no_slot);
  REQUIRE(r1 != no_slot);
  REQUIRE(c.policy().blocks(r0, level::ssd) > 0);
  // Sessions 0 and 1 are queued: the prefetcher promotes them.
  c.enqueue(sim::sim_session_hash(0), 1, 100);
  c.enqueue(sim::sim_session_hash(1), 2, 100);
  c.plan_prefetch();
  auto* pf = c.prefetcher();
  REQUIRE(pf != nullptr);
  REQUIRE(pf->in_flight(r0));
  CHECK(pf->bytes_in_flight() <= pf->max_bytes_in_flight());
  REQUIRE(c.check(&why));
  INFO(why);

  SECTION("closed mid-flight") {
    const std::uint32_t dram_before = c.dram_used();
    const std::uint32_t flying = pf->blocks_in_flight(r0);
    REQUIRE(c.close(sim::sim_session_hash(0)));
    CHECK_FALSE(pf->in_flight(r0));
    CHECK(c.dram_used() <= dram_before - flying);  // reserved DRAM given back
    REQUIRE(c.check(&why));
    // The read's completion arrives late: ignored.
    for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);
    REQUIRE(c.check(&why));
    CHECK(c.record_of(sim::sim_session_hash(0)) == no_slot);
  }
  SECTION("evicted mid-flight by a burst of new sessions") {
    // Dequeue them (they are no longer protected) and flood the cache.
    c.dequeue(r0);
    c.dequeue(r1);
    for (std::uint32_t s = 0; s < 40; ++s) {
      c.save(sim::sim_session_hash(100 + s), tokens_for(100 + s, 24), 200 + s);
      REQUIRE(c.check(&why));
    }
    CHECK(c.record_of(sim::sim_session_hash(0)) == no_slot);  // evicted
    CHECK(pf->bytes_in_flight() == 0);
    for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);
    REQUIRE(c.check(&why));
  }
  SECTION("saved mid-flight (its turn ended): cancelled, then stored again") {
    const std::uint64_t old_ticket = pf->ticket(r0);
    c.save(sim::sim_session_hash(0), tokens_for(0, 28), 300);
    // Cancelled; still queued, so the next plan may promote it again (a new ticket).
    CHECK(pf->ticket(r0) != old_ticket);
    REQUIRE(c.check(&why));
    for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);
    REQUIRE(c.check(&why));
  }
  SECTION("completed: the blocks land in DRAM and SSD slots are freed") {
    const std::uint32_t ssd_blocks = c.policy().blocks(r0, level::ssd);
    const std::uint32_t dram_blocks = c.policy().blocks(r0, level::dram);
    const std::uint32_t flying = pf->blocks_in_flight(r0);
    c.io_complete(r0, pf->ticket(r0));
    CHECK(c.policy().blocks(r0, level::ssd) == ssd_blocks - flying);  // its SSD slots are freed
    CHECK(c.policy().blocks(r0, level::dram) == dram_blocks + flying);
    REQUIRE(c.check(&why));
    // Its turn starts: a DRAM hit for the promoted blocks.
    const sim::hit h = c.admit(sim::sim_session_hash(0), tokens_for(0, 24), 400);
    CHECK(h.tokens == 24);
    CHECK(h.dram_tokens >= flying * 4);
  }
  SECTION("turn starts mid-flight: counted as SSD hits being promoted, finished") {
    const std::uint32_t flying = pf->blocks_in_flight(r0);
    const sim::hit h = c.admit(sim::sim_session_hash(0), tokens_for(0, 24), 400);
    CHECK(h.tokens == 24);
    CHECK(h.inflight_tokens == flying * 4);
    CHECK(h.waited_ticket != 0);
    CHECK_FALSE(pf->in_flight(r0));
    REQUIRE(c.check(&why));
    for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);  // stale now
    REQUIRE(c.check(&why));
  }
  // Whatever happened, dropping everything returns every slot and block entry.
  for (std::uint32_t s : {0u, 1u, 2u, 3u, 10u, 11u, 12u, 13u, 14u, 15u}) c.close(sim::sim_session_hash(s));
  for (std::uint32_t s = 0; s < 40; ++s) c.close(sim::sim_session_hash(100 + s));
  for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);
  REQUIRE(c.check(&why));
  CHECK(c.dram_used() == 0);
  CHECK(c.ssd_used() == 0);
  CHECK(c.index().live_sessions() == 0);
}

TEST_CASE("tiered_cache: random turns, queues, completions and closes never leak or overrun the bound") {
  for (auto kind : {sim::policy_kind::scheduler_aware, sim::policy_kind::opt, sim::policy_kind::lru}) {
    io_log io;
    sim::tiered_cache c(small_cache(kind), {&io, &io_log::read});
    std::mt19937_64 rng(std::uint64_t(kind) * 977 + 5);
    std::vector<std::size_t> length(12, 0);
    std::uint64_t position = 0;
    std::string why;
    for (int step = 0; step < 6000; ++step) {
      const std::uint32_t s = std::uint32_t(rng() % length.size());
      const auto key = sim::sim_session_hash(s);
      switch (rng() % 7) {
        case 0:
        case 1: {  // a turn: start, then save the longer history
          (void)c.admit(key, tokens_for(s, length[s]), step);
          length[s] = std::min<std::size_t>(length[s] + 1 + rng() % 9, 30);
          c.save(key, tokens_for(s, length[s]), step, rng() % 50000);
          break;
        }
        case 2:
          c.enqueue(key, ++position, step);
          break;
        case 3:
          c.plan_prefetch();
          break;
        case 4:
          if (!io.reads.empty()) {  // completions arrive in any order
            const std::size_t i = rng() % io.reads.size();
            const auto rd = io.reads[i];
            io.reads.erase(io.reads.begin() + std::ptrdiff_t(i));
            c.io_complete(rd.record, rd.ticket);
          }
          break;
        case 5:
          if (rng() % 4 == 0) {
            c.close(key);
            length[s] = 0;
          } else if (length[s] > 8) {  // context overflow: keep the last blocks
            const std::uint32_t drop = 1;
            auto all = tokens_for(s, length[s]);
            // The simulator's token ids are positional; re-create the kept slice.
            std::vector<token_id> kept(all.begin() + 4, all.end());
            c.truncate_front(key, drop, kept);
            c.close(key);  // the next turns restart this session from scratch
            length[s] = 0;
          }
          break;
        default:
          c.set_next_use(c.record_of(key), rng() % 50000);
          break;
      }
      if (auto* pf = c.prefetcher()) REQUIRE(pf->bytes_in_flight() <= pf->max_bytes_in_flight());
      if (step % 7 == 0) {
        INFO("step " << step << " kind " << int(kind));
        REQUIRE(c.check(&why));
      }
    }
    for (std::uint32_t s = 0; s < length.size(); ++s) c.close(sim::sim_session_hash(s));
    for (auto& rd : io.reads) c.io_complete(rd.record, rd.ticket);
    REQUIRE(c.check(&why));
    CHECK(c.dram_used() == 0);
    CHECK(c.ssd_used() == 0);
  }
}
