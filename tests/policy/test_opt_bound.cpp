// OPT (Belady's MIN with block-granular, tail-first eviction and bypass) is never
// beaten by any policy on random traces. Replayed sequentially (each turn starts, then
// saves, in trace order), so that every policy sees the same requests in the same order:
// then MIN is optimal for the tokens found in the cache, and the test is exact.
// Token counts are multiples of the block size (no partial blocks), as the proof needs.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "tiered_cache.hpp"

using namespace attnstore;

namespace {

struct turn {
  std::uint32_t session;
  std::uint32_t new_blocks;
};

struct outcome {
  std::uint64_t hit = 0, dram_hit = 0, history = 0;
};

std::vector<token_id> tokens_for(std::uint32_t session, std::size_t n) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id(session * 7919u + i * 31u + 1);
  return t;
}

/// Replays `trace` through a tiered_cache. `lookahead`: how many upcoming turns the
/// engine queue shows (scheduler_aware uses it; the others ignore it).
outcome replay(sim::policy_kind kind, const std::vector<turn>& trace, std::uint32_t tpb, std::uint32_t dram,
               std::uint32_t ssd, std::uint32_t max_blocks, std::uint32_t lookahead, bool prefetch) {
  sim::cache_options o;
  o.kind = kind;
  o.tokens_per_block = tpb;
  o.dram_blocks = dram;
  o.ssd_blocks = ssd;
  o.max_session_blocks = max_blocks;
  o.block_bytes = 1;
  o.watermark = 0.05;
  o.prefetch = prefetch;
  o.prefetch_window = 3;
  o.prefetch_bytes_in_flight = 4;
  sim::tiered_cache c(o);
  const std::size_t n = trace.size();
  // next[i]: index of the session's next turn after i (n: none).
  std::vector<std::size_t> next(n, n), last_seen(4096, n);
  for (std::size_t i = n; i-- > 0;) {
    next[i] = last_seen[trace[i].session];
    last_seen[trace[i].session] = i;
  }
  auto when = [&](std::size_t i) { return i < n ? std::uint64_t(i) : policy::belady::never; };
  std::vector<std::size_t> length(4096, 0);
  outcome out;
  for (std::size_t i = 0; i < n; ++i) {
    // The queue shows turns i .. i + lookahead - 1.
    if (lookahead && i == 0)
      for (std::size_t j = 0; j < std::min<std::size_t>(lookahead, n); ++j)
        c.enqueue(sim::sim_session_hash(trace[j].session), j, i);
    else if (lookahead && i + lookahead - 1 < n) {
      const std::size_t j = i + lookahead - 1;
      c.enqueue(sim::sim_session_hash(trace[j].session), j, i);
    }
    c.plan_prefetch();
    const std::uint32_t s = trace[i].session;
    const auto key = sim::sim_session_hash(s);
    const auto history = tokens_for(s, length[s]);
    const sim::hit h = c.admit(key, history, i);
    out.hit += h.tokens;
    out.dram_hit += h.dram_tokens;
    out.history += history.size();
    c.set_next_use(h.record, when(next[i]));
    length[s] += std::size_t(trace[i].new_blocks) * tpb;
    c.save(key, tokens_for(s, length[s]), i, when(next[i]));
    // The session's next turn, if the queue shows it already, is queued again.
    if (lookahead && next[i] < n && next[i] < i + lookahead) c.enqueue(key, next[i], i);
    std::string why;
    INFO("turn " << i << ": " << why);
    if (i % 16 == 0) REQUIRE(c.check(&why));
  }
  std::string why;
  INFO(why);
  REQUIRE(c.check(&why));
  return out;
}

std::vector<turn> random_trace(std::mt19937_64& rng, std::uint32_t sessions, std::uint32_t turns, std::uint32_t max_new,
                               std::uint32_t cap_blocks) {
  std::vector<turn> t;
  std::vector<std::uint32_t> size(sessions, 0), id(sessions);
  std::uint32_t next_id = 0;
  for (auto& x : id) x = next_id++;
  // Skewed popularity: a few conversation slots are busy, most are quiet.
  std::vector<double> w(sessions);
  for (std::uint32_t s = 0; s < sessions; ++s) w[s] = 1.0 / (1.0 + s);
  std::discrete_distribution<std::uint32_t> pick(w.begin(), w.end());
  while (t.size() < turns) {
    const std::uint32_t s = pick(rng);
    const std::uint32_t add = 1 + std::uint32_t(rng() % max_new);
    if (size[s] + add > cap_blocks) {  // the conversation ends; a new one takes the slot
      id[s] = next_id++;
      size[s] = 0;
    }
    size[s] += add;
    t.push_back({id[s], add});
  }
  return t;
}

}  // namespace

TEST_CASE("OPT is never beaten: random traces, several capacities, with and without prefetch") {
  std::mt19937_64 rng(2024);
  int cases = 0;
  for (int round = 0; round < 40; ++round) {
    const std::uint32_t tpb = 1 + std::uint32_t(rng() % 4);
    const std::uint32_t max_blocks = 12;
    const std::uint32_t sessions = 4 + std::uint32_t(rng() % 30);
    const auto trace = random_trace(rng, sessions, 300, 4, max_blocks);
    const std::uint32_t dram = max_blocks + 1 + std::uint32_t(rng() % 20);
    const std::uint32_t ssd = std::uint32_t(rng() % 80);
    const std::uint32_t lookahead = 1 + std::uint32_t(rng() % 8);
    const outcome opt = replay(sim::policy_kind::opt, trace, tpb, dram, ssd, max_blocks, lookahead, false);
    const outcome opt_pf = replay(sim::policy_kind::opt, trace, tpb, dram, ssd, max_blocks, lookahead, true);
    const outcome lru = replay(sim::policy_kind::lru, trace, tpb, dram, ssd, max_blocks, 0, false);
    const outcome sa = replay(sim::policy_kind::scheduler_aware, trace, tpb, dram, ssd, max_blocks, lookahead, false);
    const outcome sa_pf = replay(sim::policy_kind::scheduler_aware, trace, tpb, dram, ssd, max_blocks, lookahead, true);
    INFO("round " << round << " dram " << dram << " ssd " << ssd << " sessions " << sessions);
    REQUIRE(opt.history == lru.history);
    CHECK(opt.hit >= lru.hit);
    CHECK(opt.hit >= sa.hit);
    CHECK(opt.hit >= sa_pf.hit);
    // Prefetching moves blocks between tiers; its reservations may cost OPT a little
    // capacity, never more hits than that.
    CHECK(opt_pf.hit <= opt.hit);
    CHECK(opt.hit <= opt.history);
    ++cases;
  }
  CHECK(cases == 40);
}

TEST_CASE("hand-worked: the queue-head session LRU evicts is kept by scheduler_aware; OPT keeps the right one") {
  // tpb 1; DRAM 9 blocks (the longest session is 8), no SSD: 9 blocks in all.
  // Turns: A+4, B+4 (A and B stored: 8 blocks), then C+4: one must go. The queue shows
  // the next turn is A's. LRU evicts A (oldest) and misses 4 on A's turn; scheduler_aware
  // evicts B (not queued) and hits A's 4; OPT likewise.
  const std::vector<turn> trace{{0, 4}, {1, 4}, {2, 4}, {0, 1}, {1, 1}};
  const outcome lru = replay(sim::policy_kind::lru, trace, 1, 9, 0, 8, 0, false);
  const outcome sa = replay(sim::policy_kind::scheduler_aware, trace, 1, 9, 0, 8, 2, false);
  const outcome opt = replay(sim::policy_kind::opt, trace, 1, 9, 0, 8, 0, false);
  // History at each turn: 0, 0, 0, 4 (A), 4 (B).
  CHECK(lru.history == 8);
  // LRU: C's save evicts A; then A's save (5 blocks) evicts B... both turns miss.
  CHECK(lru.hit == 0);
  // scheduler_aware: A is queued when C saves, so B goes; A hits 4; B misses.
  CHECK(sa.hit == 4);
  // OPT: when C saves, C (never used again) is the farthest: bypassed; A and B both hit.
  CHECK(opt.hit == 8);
}
