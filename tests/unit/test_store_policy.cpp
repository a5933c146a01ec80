// The store under its policies: victims chosen by the eviction policy, scheduler-aware
// prefetch of queued sessions (byte bound, cancellation, room only from unqueued
// sessions), background demotion at the watermark, and the session TTL.
#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/store.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::conversation;
using attnstore::testing::put_all;
using attnstore::testing::require_exact;
using attnstore::testing::small_config;
using attnstore::testing::temp_dir;

namespace {
// session_key holds views: the names live here for the whole test run.
const std::string& name_of(std::uint64_t id) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (int i = 0; i < 64; ++i) v.push_back(std::string("s").append(std::to_string(i)));
    return v;
  }();
  return names.at(id);
}
session_key key_of(const conversation& c) { return {"t", name_of(c.id)}; }

lookup_result look(store& s, const conversation& c) {
  auto t = c.toks();
  return s.lookup(key_of(c), t);
}
}  // namespace

TEST_CASE("store policy: chosen by name or made by the embedder; unknown names are refused") {
  store_config c = small_config("", 8, 0);
  CHECK(store(c).policy_name() == "scheduler_aware");
  c.eviction_policy = "lru";
  CHECK(store(c).policy_name() == "lru");
  c.eviction_policy = "predictive";
  CHECK(store(c).policy_name() == "predictive");
  c.eviction_policy = "clock";
  CHECK_THROWS_WITH(store(c), Catch::Contains("eviction_policy is \"clock\""));
  c.make_policy = [](std::uint32_t n) { return std::make_unique<policy::lru>(n); };
  CHECK(store(c).policy_name() == "lru");
  c.make_policy = [](std::uint32_t) { return std::unique_ptr<policy::eviction_policy>{}; };
  CHECK_THROWS_WITH(store(c), Catch::Contains("make_policy returned no policy"));
}

TEST_CASE("store policy: LRU evicts a queued session that scheduler-aware (and predictive) keeps") {
  // predictive has seen no returns yet: it ranks idle sessions by age, queued ones last.
  for (const char* name : {"lru", "scheduler_aware", "predictive"}) {
    store_config c = small_config("", 6, 0);
    c.eviction_policy = name;
    store s(c);
    conversation a{1, 64}, b{2, 64}, d{3, 64}, e{4, 64};  // 2 blocks each
    REQUIRE(put_all(s, a) == errc::ok);
    REQUIRE(put_all(s, b) == errc::ok);
    REQUIRE(put_all(s, d) == errc::ok);
    session_key queue[] = {key_of(a)};
    s.set_queue(queue);
    REQUIRE(put_all(s, e) == errc::ok);  // DRAM is full: one session goes
    INFO(name);
    if (std::string(name) == "lru") {
      CHECK(look(s, a).tokens == 0);  // the oldest, queued or not
      CHECK(look(s, b).tokens == 64);
    } else {
      CHECK(look(s, a).tokens == 64);  // protected by the queue
      CHECK(look(s, b).tokens == 0);   // the oldest unqueued
    }
  }
}

TEST_CASE("store prefetch: the paper's window rule covers DRAM for prefetch / mean session size") {
  temp_dir dir("pfw");
  store_config c = small_config(dir.str(), 16, 64);
  c.dram_for_prefetch_bytes = 8 * c.geometry.validated().block_bytes();  // 8 blocks: 2 sessions of 4
  store s(c);
  conversation a{1, 128}, b{2, 128}, d{3, 128};
  for (const auto& x : {a, b, d}) {
    REQUIRE(put_all(s, x) == errc::ok);
    REQUIRE(s.demote(key_of(x)) == errc::ok);
  }
  session_key queue[] = {key_of(a), key_of(b), key_of(d)};
  s.set_queue(queue);
  (void)s.run_background();
  CHECK(look(s, a).dram_blocks == 4);
  CHECK(look(s, b).dram_blocks == 4);
  CHECK(look(s, d).dram_blocks == 0);  // third in the queue: outside the window
}

TEST_CASE("store prefetch: a queued session on SSD is promoted to DRAM before it runs") {
  temp_dir dir("pf");
  store_config c = small_config(dir.str(), 16, 64);
  c.prefetch_window = 4;  // the paper's rule would cover 1 session of this tiny DRAM
  store s(c);
  conversation a{1, 200}, b{2, 64};  // 7 and 2 blocks
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  CHECK(look(s, a).dram_blocks == 0);
  session_key queue[] = {key_of(b), key_of(a)};
  s.set_queue(queue);
  CHECK(s.stats().prefetch_started == 1);  // b is in DRAM already: only a
  CHECK(s.run_background() >= 1);
  const lookup_result r = look(s, a);
  CHECK(r.dram_blocks == a.blocks());
  CHECK(r.ssd_blocks == 0);
  const store_stats st = s.stats();
  CHECK(st.prefetched_blocks == a.blocks());
  CHECK(st.prefetch_completed == 1);
  require_exact(s, a);
  CHECK(s.stats().blocks_served_ssd == 0);  // the turn's load came from DRAM
}

TEST_CASE("store prefetch: bytes in flight stay within the bound") {
  temp_dir dir("pfb");
  store_config c = small_config(dir.str(), 16, 64);
  c.prefetch_bytes_in_flight = 2 * c.geometry.validated().block_bytes();  // exactly 2 blocks
  store s(c);
  conversation a{1, 6 * 32};  // 6 blocks
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  session_key queue[] = {key_of(a)};
  s.set_queue(queue);
  CHECK(s.stats().prefetch_started == 1);  // one piece of 2 blocks
  (void)s.run_background();                // each completed piece starts the next one
  const store_stats st = s.stats();
  CHECK(st.prefetch_started == 3);
  CHECK(st.prefetched_blocks == 6);
  CHECK(look(s, a).dram_blocks == 6);
}

TEST_CASE("store prefetch: a session dropped or evicted while queued for promotion leaks nothing") {
  temp_dir dir("pfc");
  store s(small_config(dir.str(), 8, 16));
  conversation a{1, 128};  // 4 blocks
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  session_key queue[] = {key_of(a)};
  s.set_queue(queue);
  REQUIRE(s.stats().prefetch_started == 1);
  REQUIRE(s.drop(key_of(a)) == errc::ok);
  CHECK(s.stats().prefetch_cancelled == 1);
  (void)s.run_background();  // the stale job does nothing
  store_stats st = s.stats();
  CHECK(st.prefetched_blocks == 0);
  CHECK(st.dram_used_bytes == 0);
  CHECK(st.ssd_used_bytes == 0);
  CHECK(st.sessions == 0);

  // The same session id again, prefetched for real: the old ticket cannot complete it.
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  s.set_queue(queue);
  (void)s.run_background();
  CHECK(look(s, a).dram_blocks == 4);
  require_exact(s, a);
}

TEST_CASE("store prefetch: room comes only from sessions outside the queue") {
  temp_dir dir("pfr");
  store_config c = small_config(dir.str(), 6, 32);
  c.prefetch_window = 4;
  store s(c);
  conversation a{1, 128}, b{2, 64}, d{3, 64};  // 4, 2, 2 blocks
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(put_all(s, d) == errc::ok);  // DRAM: b and d (4 of 6 blocks)
  session_key queue[] = {key_of(b), key_of(a)};
  s.set_queue(queue);
  (void)s.run_background();
  CHECK(look(s, b).dram_blocks == 2);  // queued ahead of a: kept
  CHECK(look(s, d).dram_blocks == 0);  // not queued: demoted to make room
  CHECK(look(s, d).ssd_blocks == 2);
  CHECK(look(s, a).dram_blocks == 4);
  require_exact(s, d);
}

TEST_CASE("store watermark: background demotion keeps free DRAM for the next saves") {
  temp_dir dir("wm");
  store_config c = small_config(dir.str(), 20, 64);
  c.demote_low_watermark = 0.25;  // 5 blocks
  c.demote_high_watermark = 0.5;  // 10 blocks
  store s(c);
  conversation a{1, 128}, b{2, 128}, d{3, 128}, e{4, 128};                // 4 blocks each
  for (const auto& x : {a, b, d, e}) REQUIRE(put_all(s, x) == errc::ok);  // 16 of 20: 4 free < 5
  CHECK(s.stats().watermark_demoted_blocks == 0);                         // nothing happens on the save path
  CHECK(s.run_background() >= 1);
  const store_stats st = s.stats();
  const std::uint64_t slot = st.dram_capacity_bytes / 20;
  CHECK(st.dram_capacity_bytes - st.dram_used_bytes >= 10 * slot);
  CHECK(st.watermark_demoted_blocks == 8);  // the two oldest sessions
  CHECK(look(s, a).dram_blocks == 0);
  CHECK(look(s, b).dram_blocks == 0);
  CHECK(look(s, e).dram_blocks == 4);
  for (const auto& x : {a, b, d, e}) require_exact(s, x);
  CHECK(s.stats().evicted_sessions == 0);  // nothing lost
}

TEST_CASE("store TTL: sessions idle past the TTL are dropped; queued and pinned ones are not") {
  std::atomic<std::uint64_t> clock{1'000'000'000};
  store_config c = small_config("", 32, 0);
  c.session_ttl_ms = 1000;
  c.clock = [&] { return clock.load(); };
  store s(c);
  conversation a{1, 64}, b{2, 64}, d{3, 64};
  REQUIRE(put_all(s, a) == errc::ok);
  clock += 500'000'000;
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(put_all(s, d) == errc::ok);
  REQUIRE(s.pin(key_of(d)) == errc::ok);
  clock += 700'000'000;  // a idle 1.2 s, b and d 0.7 s
  CHECK(s.expire_idle() == 1);
  CHECK(look(s, a).tokens == 0);
  CHECK(look(s, b).tokens == 64);  // (this lookup is a use)
  session_key queue[] = {key_of(b)};
  s.set_queue(queue);
  clock += 5'000'000'000;
  CHECK(s.expire_idle() == 0);  // b is queued, d is pinned
  CHECK(s.stats().expired_sessions == 1);
  s.set_queue({});
  REQUIRE(s.unpin(key_of(d)) == errc::ok);
  clock += 1'100'000'000;
  CHECK(s.expire_idle() == 2);
  CHECK(s.stats().sessions == 0);
}

TEST_CASE("store background thread: prefetch and demotion run by themselves; drain waits for them") {
  temp_dir dir("bg");
  store_config c = small_config(dir.str(), 20, 64);
  c.background_thread = true;
  c.demote_low_watermark = 0.25;
  c.demote_high_watermark = 0.5;
  store s(c);
  conversation a{1, 128}, b{2, 128}, d{3, 128}, e{4, 128};
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  session_key queue[] = {key_of(a)};
  s.set_queue(queue);
  s.drain();
  CHECK(look(s, a).dram_blocks == 4);
  for (const auto& x : {b, d, e}) REQUIRE(put_all(s, x) == errc::ok);  // 16 of 20
  s.drain();
  const store_stats st = s.stats();
  CHECK(st.dram_capacity_bytes - st.dram_used_bytes >= 10 * (st.dram_capacity_bytes / 20));
  CHECK(look(s, a).dram_blocks == 4);  // queued: the watermark never demotes it
  for (const auto& x : {a, b, d, e}) require_exact(s, x);
}

TEST_CASE("store background thread: concurrent saves, loads, queue changes and drops stay consistent") {
  // Runs under TSan (label concurrency). Catch2 is not thread-safe: threads count problems.
  temp_dir dir("bgc");
  store_config c = small_config(dir.str(), 24, 96);
  c.background_thread = true;
  c.demote_low_watermark = 0.2;
  c.demote_high_watermark = 0.4;
  c.prefetch_bytes_in_flight = 4 * c.geometry.validated().block_bytes();
  auto policy_name = GENERATE(as<std::string>{}, "scheduler_aware", "predictive");
  c.eviction_policy = policy_name;
  store s(c);
  INFO(policy_name);
  std::atomic<int> bad{0};
  std::atomic<bool> stop{false};
  auto worker = [&](int t) {
    for (int i = 0; i < 150; ++i) {
      conversation x{std::uint64_t(1 + (t * 7 + i) % 12), std::size_t(32 + 32 * ((i + t) % 4))};
      if (put_all(s, x) != errc::ok) continue;  // no_space is allowed under contention
      std::vector<std::byte> out(std::size_t(x.blocks()) * s.block_bytes());
      auto toks = x.toks();
      get_result g = s.get(key_of(x), toks, 0, x.blocks(), out);
      // Another thread may have replaced or dropped it meanwhile: only delivered data is checked.
      if (g.status == errc::ok && g.blocks == x.blocks() && out != x.data(s.block_bytes())) {
        // same id, other length: the other thread's version; compare by prefix
        auto want = x.data(s.block_bytes());
        if (!std::equal(out.begin(), out.begin() + std::ptrdiff_t(s.block_bytes()), want.begin())) ++bad;
      }
      if (i % 9 == 0) (void)s.drop(key_of(x));
    }
  };
  std::thread queue_feeder([&] {
    std::uint64_t k = 0;
    while (!stop.load()) {
      session_key q[3] = {
          {"t", name_of(1 + k % 12)}, {"t", name_of(1 + (k + 5) % 12)}, {"t", name_of(1 + (k + 9) % 12)}};
      s.set_queue(q);
      ++k;
      std::this_thread::yield();
    }
  });
  std::thread w1(worker, 0), w2(worker, 1);
  w1.join();
  w2.join();
  stop = true;
  queue_feeder.join();
  s.drain();
  CHECK(bad.load() == 0);
  s.set_queue({});
  // Everything still indexed is served exact, and nothing leaked: dropping all frees all.
  for (std::uint64_t id = 1; id <= 12; ++id) (void)s.drop({"t", name_of(id)});
  s.drain();
  const store_stats st = s.stats();
  CHECK(st.sessions == 0);
  CHECK(st.dram_used_bytes == 0);
  CHECK(st.ssd_used_bytes == 0);
}

TEST_CASE("store HBM lending: the engine gives back HBM copies in the policy's order") {
  store s(small_config("", 32, 0));
  conversation a{1, 64}, b{2, 64}, d{3, 64};
  for (const auto& x : {a, b, d}) REQUIRE(put_all(s, x) == errc::ok);
  session_hash victim{};
  CHECK_FALSE(s.hbm_victim(victim));  // nothing kept in HBM yet
  for (const auto& x : {a, b, d}) REQUIRE(s.keep_in_hbm(key_of(x), 2) == errc::ok);
  session_key queue[] = {key_of(a)};
  s.set_queue(queue);
  REQUIRE(s.hbm_victim(victim));
  CHECK(victim == s.session_of(key_of(b)));  // a is queued: b is the oldest unprotected
  REQUIRE(s.keep_in_hbm(key_of(b), 0) == errc::ok);
  REQUIRE(s.pin(key_of(d)) == errc::ok);  // in use: never offered
  REQUIRE(s.hbm_victim(victim));
  CHECK(victim == s.session_of(key_of(a)));  // only the protected one is left
  REQUIRE(s.drop(key_of(a)) == errc::ok);    // dropping a session forgets its HBM copy
  CHECK_FALSE(s.hbm_victim(victim));
  CHECK(s.keep_in_hbm({"t", "nobody"}, 1) == errc::not_found);
}

TEST_CASE("store background work never drops data to make room on a full SSD") {
  temp_dir dir("full");
  store_config c = small_config(dir.str(), 20, 8);  // SSD: 8 blocks
  c.demote_low_watermark = 0.25;
  c.demote_high_watermark = 0.5;
  store s(c);
  conversation a{1, 128}, b{2, 128}, d{3, 128}, e{4, 128};  // 4 blocks each
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  REQUIRE(s.demote(key_of(b)) == errc::ok);  // SSD full
  REQUIRE(put_all(s, d) == errc::ok);
  REQUIRE(put_all(s, e) == errc::ok);
  REQUIRE(put_all(s, conversation{5, 128}) == errc::ok);
  REQUIRE(put_all(s, conversation{6, 128}) == errc::ok);  // 16 of 20 in DRAM: below the watermark
  (void)s.run_background();
  CHECK(s.stats().evicted_sessions == 0);  // the watermark found no free SSD slot and stopped
  CHECK(s.stats().watermark_demoted_blocks == 0);
  for (const auto& x : {a, b, d, e}) require_exact(s, x);
}

TEST_CASE("store TTL: skipping a pinned session does not make it recently used") {
  std::atomic<std::uint64_t> clock{1'000'000'000};
  store_config c = small_config("", 6, 0);
  c.session_ttl_ms = 1000;
  c.eviction_policy = "lru";
  c.clock = [&] { return clock.load(); };
  store s(c);
  conversation a{1, 64}, b{2, 64}, d{3, 64}, e{4, 64};
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.pin(key_of(a)) == errc::ok);
  clock += 600'000'000;
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(put_all(s, d) == errc::ok);
  clock += 600'000'000;         // a idle 1.2 s (pinned), b and d 0.6 s
  CHECK(s.expire_idle() == 0);  // a is in use
  REQUIRE(s.unpin(key_of(a)) == errc::ok);
  REQUIRE(put_all(s, e) == errc::ok);  // DRAM full: the least recently used goes
  CHECK(look(s, a).tokens == 0);       // still a, not b
  CHECK(look(s, b).tokens == 64);
}

TEST_CASE("store HBM lending: the hash hbm_victim names is what keep_in_hbm takes back") {
  store s(small_config("", 32, 0));
  conversation a{1, 64};
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.keep_in_hbm(key_of(a), 2) == errc::ok);
  session_hash victim{};
  REQUIRE(s.hbm_victim(victim));
  REQUIRE(s.keep_in_hbm(victim, 0) == errc::ok);
  CHECK_FALSE(s.hbm_victim(victim));
}

TEST_CASE("store predictive: a session likely to return soon is prefetched from SSD into free DRAM") {
  // Twenty users who each come back 10 s after their last turn, one turn every 0.5 s.
  // DRAM holds about 16 of their 30 blocks, so blocks keep leaving it: that gives the
  // policy its DRAM horizon (how long a block stays).
  temp_dir dir("pred");
  std::atomic<std::uint64_t> clock{1'000'000'000};
  store_config c = small_config(dir.str(), 24, 256);
  c.eviction_policy = "predictive";
  c.clock = [&] { return clock.load(); };
  store s(c);
  std::vector<conversation> users;
  for (std::uint64_t id = 1; id <= 20; ++id) users.push_back({id, 32});
  for (int turn = 0; turn < 1196; ++turn) {  // users[0] took turns 0, 20, ..., 1180: idle 8 s at the end
    conversation& u = users[std::size_t(turn) % users.size()];
    u.tokens = 32 + 32 * std::size_t(turn / 20 % 2);  // one or two blocks
    (void)look(s, u);                                 // the user is back
    REQUIRE(put_all(s, u) == errc::ok);               // the turn ends
    clock += 500'000'000;
  }
  // users[0] is due in 2 s; make sure it is on SSD, as DRAM pressure would.
  REQUIRE(s.demote(key_of(users[0])) == errc::ok);  // (no lookup here: a lookup is a return)
  const std::uint64_t prefetched_before = s.stats().prefetched_blocks;
  (void)s.run_background();  // the periodic plan starts promotions of likely returners
  (void)s.run_background();  // and runs them
  INFO("prefetched " << s.stats().prefetched_blocks - prefetched_before);
  CHECK(s.stats().prefetched_blocks > prefetched_before);  // some of the users due soon (DRAM has room for few)
  // Never into the share the watermark keeps free for saves.
  const store_stats st = s.stats();
  CHECK(st.dram_capacity_bytes - st.dram_used_bytes >= std::uint64_t(0.10 * 24) * (st.dram_capacity_bytes / 24));
}

TEST_CASE("store predictive: it learns returns from the store's events (a lookup returns, a save ends a turn)") {
  // The same users with lru and predictive: after learning, predictive keeps the users
  // who are about to return, LRU the ones who just left; count the DRAM and SSD hits.
  std::uint64_t hits[2] = {0, 0};
  int k = 0;
  for (const char* name : {"lru", "predictive"}) {
    std::atomic<std::uint64_t> clock{1'000'000'000};
    store_config c = small_config("", 24, 0);  // DRAM only: whatever does not fit is dropped
    c.eviction_policy = name;
    c.clock = [&] { return clock.load(); };
    store s(c);
    std::vector<conversation> users;
    for (std::uint64_t id = 1; id <= 20; ++id) users.push_back({id, 32});
    for (int turn = 0; turn < 4000; ++turn) {
      conversation& u = users[std::size_t(turn) % users.size()];
      u.tokens = 32 + 32 * std::size_t(turn / 20 % 2);
      if (turn >= 2000) hits[k] += look(s, u).tokens > 0;
      REQUIRE(put_all(s, u) == errc::ok);
      clock += 500'000'000;
    }
    ++k;
  }
  INFO("hits lru " << hits[0] << ", predictive " << hits[1] << " of 2000");
  CHECK(hits[1] > hits[0]);
  // Learning right gives 1533 (2026-11-26); with the events misread (blocks reported
  // after the access: every lookup looked like a turn's end) it was 990.
  CHECK(hits[1] >= 1300);
}

TEST_CASE("store predictive: a session it evicted and the engine asks for again is a return (ghost)") {
  std::atomic<std::uint64_t> clock{1'000'000'000};
  store_config c = small_config("", 6, 0);  // DRAM only: 6 blocks
  policy::predictive* pred = nullptr;
  c.make_policy = [&](std::uint32_t max_sessions) {
    policy::predictive_options o;
    o.max_sessions = max_sessions;
    o.eviction_window = 4;
    auto p = std::make_unique<policy::predictive>(o);
    pred = p.get();
    return p;
  };
  c.clock = [&] { return clock.load(); };
  store s(c);
  REQUIRE(pred != nullptr);
  conversation a{1, 64}, b{2, 64}, d{3, 64};  // two blocks each
  REQUIRE(put_all(s, a) == errc::ok);
  clock += 1'000'000'000;
  REQUIRE(put_all(s, b) == errc::ok);
  clock += 1'000'000'000;
  REQUIRE(put_all(s, d) == errc::ok);
  clock += 1'000'000'000;
  conversation e{4, 64};
  REQUIRE(put_all(s, e) == errc::ok);  // DRAM is full: the policy names an idle victim
  const std::uint32_t ghosts = pred->ghosts();
  REQUIRE(ghosts == 1);
  // Whichever it evicted, the engine asking for it again is a return it learns from:
  // a lookup that misses, or the queue naming it.
  std::uint64_t misses = 0;
  for (const conversation* u : {&a, &b, &d}) misses += look(s, *u).tokens == 0;
  REQUIRE(misses == 1);
  CHECK(pred->ghost_returns() == 1);
  const session_key queued[] = {key_of(a), key_of(b), key_of(d)};
  s.set_queue(queued);  // the same session again: counted once
  CHECK(pred->ghost_returns() == 1);
  CHECK(pred->ghosts() == 1);  // remembered until it is stored again
  for (const conversation* u : {&a, &b, &d}) REQUIRE(put_all(s, *u) == errc::ok);
  CHECK(pred->check_cells());
}

TEST_CASE("store hint: the engine says a user is typing or left; unknown sessions are not_found") {
  for (const char* name : {"lru", "scheduler_aware", "predictive"}) {
    store_config c = small_config("", 8, 0);
    c.eviction_policy = name;
    store s(c);
    conversation a{1, 64};
    CHECK(s.hint(key_of(a), policy::session_hint::composing) == errc::not_found);
    REQUIRE(put_all(s, a) == errc::ok);
    CHECK(s.hint(key_of(a), policy::session_hint::composing) == errc::ok);
    CHECK(s.hint(key_of(a), policy::session_hint::left) == errc::ok);
    // A hint changes no data: the session is served as saved.
    CHECK(look(s, a).tokens == a.tokens);
  }
}
