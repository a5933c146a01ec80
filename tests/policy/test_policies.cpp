// The eviction policies against small hand-worked traces with known answers.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/scheduler_aware.hpp"

#include "belady.hpp"

using namespace attnstore::policy;

namespace {

// Sessions 0..n-1, each inserted (and so accessed) in id order with `blocks` DRAM blocks.
template <class P>
void fill(P& p, std::uint32_t n, std::uint32_t blocks = 2) {
  for (std::uint32_t r = 0; r < n; ++r) {
    p.on_insert(r, r);
    p.on_blocks(r, level::dram, blocks);
  }
}

// The victim order in a level: repeatedly pick, reject what was picked before.
template <class P>
std::vector<std::uint32_t> order(P& p, level l) {
  std::vector<std::uint32_t> out;
  for (;;) {
    const std::uint32_t v = p.pick_victim(l, [&](std::uint32_t r) {
      for (auto x : out)
        if (x == r) return false;
      return true;
    });
    if (v == no_record) return out;
    out.push_back(v);
  }
}

using V = std::vector<std::uint32_t>;

}  // namespace

TEST_CASE("lru: the oldest access goes first, per level") {
  lru p(8);
  fill(p, 4);  // accessed 0, 1, 2, 3
  CHECK(order(p, level::dram) == V{0, 1, 2, 3});
  p.on_access(0, 10);  // 0 becomes the most recent
  CHECK(order(p, level::dram) == V{1, 2, 3, 0});
  // 1 is demoted: it leaves the DRAM order and enters the SSD order by its own recency.
  p.on_blocks(1, level::dram, 0);
  p.on_blocks(1, level::ssd, 2);
  p.on_blocks(3, level::ssd, 1);  // 3 also holds an SSD block
  CHECK(order(p, level::dram) == V{2, 3, 0});
  CHECK(order(p, level::ssd) == V{1, 3});
  // An accepting filter decides: the first candidate it accepts is the victim.
  CHECK(p.pick_victim(level::dram, [](std::uint32_t r) { return r != 2; }) == 3);
  CHECK(p.pick_victim(level::hbm, [](std::uint32_t) { return true; }) == no_record);
  p.on_erase(2);
  CHECK(order(p, level::dram) == V{3, 0});
  CHECK(p.check());
  // The queue does not matter to lru.
  p.enqueue(3, 1, 11);
  p.set_window(4);
  CHECK(order(p, level::dram) == V{3, 0});
  CHECK(p.check());
}

TEST_CASE("lru: the plain-function filter form") {
  lru p(4);
  fill(p, 3);
  struct ctx_t {
    std::uint32_t reject;
  } ctx{0};
  victim_filter f = [](void* c, std::uint32_t r) noexcept { return r != static_cast<ctx_t*>(c)->reject; };
  CHECK(p.pick_victim(level::dram, f, &ctx) == 1);
}

TEST_CASE("scheduler_aware: the queued session LRU would evict is protected") {
  // The paper's case: A waited longest in the queue, so its last access is the oldest;
  // LRU evicts it just before it runs. The window protects it.
  scheduler_aware p({8, 2, 0});  // window of 2 queued sessions
  fill(p, 4);                    // A=0, B=1, C=2, D=3, accessed in that order
  p.enqueue(0, 1, 5);            // queue: A, C, D -> A and C protected
  p.enqueue(2, 2, 5);
  p.enqueue(3, 3, 5);
  CHECK(p.in_window(0));
  CHECK(p.in_window(2));
  CHECK_FALSE(p.in_window(3));
  // Unprotected by oldest access (B, then D which is queued beyond the window), then
  // the protected farthest back in the queue (C before A).
  CHECK(order(p, level::dram) == V{1, 3, 2, 0});
  lru l(8);
  fill(l, 4);
  CHECK(order(l, level::dram) == V{0, 1, 2, 3});
  CHECK(p.check());

  // A is scheduled: it leaves the queue and D moves into the window.
  p.dequeue(0);
  CHECK_FALSE(p.in_window(0));
  CHECK(p.in_window(3));
  CHECK(order(p, level::dram) == V{0, 1, 3, 2});
  p.on_access(0, 6);  // its turn loads it
  CHECK(order(p, level::dram) == V{1, 0, 3, 2});
  CHECK(p.check());

  // The same order applies to SSD victims (drops).
  for (std::uint32_t r = 0; r < 4; ++r) p.on_blocks(r, level::ssd, 1);
  CHECK(order(p, level::ssd) == V{1, 0, 3, 2});
}

TEST_CASE("scheduler_aware: window size changes and a queue replaced at once") {
  scheduler_aware p({16, 3, 0});
  fill(p, 6);
  for (std::uint32_t r = 0; r < 6; ++r) p.enqueue(r, 10 + r, 7);
  CHECK(p.queue_length() == 6);
  for (std::uint32_t r = 0; r < 6; ++r) CHECK(p.in_window(r) == (r < 3));
  p.set_window(5);
  for (std::uint32_t r = 0; r < 6; ++r) CHECK(p.in_window(r) == (r < 5));
  p.set_window(1);
  for (std::uint32_t r = 0; r < 6; ++r) CHECK(p.in_window(r) == (r == 0));
  CHECK(p.check());
  // A session queued in the middle (its record was created while its turn waited).
  p.set_window(3);
  p.dequeue(1);
  p.enqueue(1, 10, 8);  // before 2 (position 12): back in the protected prefix
  CHECK(p.in_window(0));
  CHECK(p.in_window(1));
  CHECK(p.in_window(2));
  CHECK_FALSE(p.in_window(3));
  CHECK(p.check());
  // A later position than its current one is ignored (the earliest request counts).
  p.enqueue(0, 100, 8);
  CHECK(p.queue_position(0) == 10);
  // set_queue replaces everything; duplicates and unknown records are skipped.
  const std::uint32_t q[] = {5, 4, 5, no_record, 3};
  p.set_queue(q, 9);
  CHECK(p.queue_length() == 3);
  CHECK(p.in_window(5));
  CHECK(p.in_window(4));
  CHECK(p.in_window(3));
  CHECK_FALSE(p.in_window(0));
  CHECK_FALSE(p.queued(0));
  CHECK(p.check());
  // Unprotected first (0, 1, 2 by access), then the protected farthest back: 3, 4, 5.
  CHECK(order(p, level::dram) == V{0, 1, 2, 3, 4, 5});
  // An erased session leaves the queue and the next one moves into the window.
  p.set_window(2);
  CHECK_FALSE(p.in_window(3));
  p.on_erase(5);
  CHECK(p.in_window(3));
  CHECK(p.check());
}

TEST_CASE("scheduler_aware: the automatic window follows the paper's rule") {
  // Capacity 100 blocks, sessions of 10 blocks: window = 100 / 10 = 10 sessions.
  scheduler_aware p({64, 0, 100});
  fill(p, 20, 10);
  p.refresh_window();
  CHECK(p.window() == 10);
  for (std::uint32_t r = 0; r < 20; ++r) p.enqueue(r, r + 1, 30);
  std::uint32_t protected_count = 0;
  for (std::uint32_t r = 0; r < 20; ++r) protected_count += p.in_window(r);
  CHECK(protected_count == 10);
  // Sessions grow to 25 blocks: the window shrinks to 4.
  for (std::uint32_t r = 0; r < 20; ++r) p.on_blocks(r, level::ssd, 15);
  p.refresh_window();
  CHECK(p.window() == 4);
  protected_count = 0;
  for (std::uint32_t r = 0; r < 20; ++r) protected_count += p.in_window(r);
  CHECK(protected_count == 4);
  CHECK(p.check());
  CHECK(paper_prefetch_window(128'000'000'000, 2'000'000'000) == 64);
  CHECK(paper_eviction_window(128'000'000'000, 10'000'000'000'000, 2'000'000'000) == 5064);
  CHECK(paper_prefetch_window(1, 2) == 1);
  CHECK(paper_prefetch_window(5, 0) == 0);
  CHECK_THROWS_AS(scheduler_aware({8, 0, 0}), std::invalid_argument);
  CHECK_THROWS_AS(lru(0), std::invalid_argument);
}

TEST_CASE("belady: the session used farthest in the future goes first") {
  belady p(8);
  fill(p, 4);
  p.set_next_use(0, 50);
  p.set_next_use(1, belady::never);  // never used again
  p.set_next_use(2, 10);
  p.set_next_use(3, 30);
  CHECK(order(p, level::dram) == V{1, 0, 3, 2});
  p.set_next_use(1, 5);
  CHECK(order(p, level::dram) == V{0, 3, 2, 1});
  p.on_blocks(2, level::dram, 0);
  p.on_blocks(2, level::ssd, 4);
  CHECK(order(p, level::ssd) == V{2});
  CHECK(p.pick_farthest([](std::uint32_t) { return true; }) == 0);
  CHECK(p.pick_farthest([](std::uint32_t r) { return r != 0; }) == 3);
  p.on_erase(0);
  CHECK(p.next_use(0) == belady::never);
  CHECK(p.pick_farthest([](std::uint32_t) { return true; }) == 3);
  CHECK(p.check());
}

TEST_CASE("ttl: sessions idle for the TTL expire, oldest first; queued ones do not") {
  lru p(8);
  p.on_insert(0, 100);
  p.on_insert(1, 200);
  p.on_insert(2, 300);
  CHECK(p.next_expired(250, 100) == 0);
  CHECK(p.next_expired(199, 100) == no_record);
  p.enqueue(0, 1, 300);  // queued: its idle clock restarts and it is skipped while queued
  CHECK(p.next_expired(300, 100) == 1);
  p.on_erase(1);
  CHECK(p.next_expired(300, 100) == no_record);
  CHECK(p.next_expired(1000, 100) == 2);  // 0 is still queued
  p.dequeue(0);
  p.on_erase(2);
  CHECK(p.next_expired(1000, 100) == 0);
  p.on_access(0, 1000);
  CHECK(p.next_expired(1000, 100) == no_record);
  CHECK(p.check());
}

TEST_CASE("policies keep their invariants under random events") {
  std::mt19937_64 rng(7);
  constexpr std::uint32_t n = 64;
  lru a(n);
  scheduler_aware b({n, 8, 0});
  belady c(n);
  eviction_policy* ps[] = {&a, &b, &c};
  std::uint64_t now = 0, position = 0;
  for (int step = 0; step < 20000; ++step) {
    const std::uint32_t r = std::uint32_t(rng() % n);
    const int op = int(rng() % 9);
    ++now;
    for (auto* p : ps) {
      switch (op) {
        case 0:
          p->on_insert(r, now);
          break;
        case 1:
          p->on_erase(r);
          break;
        case 2:
          p->on_access(r, now);
          break;
        case 3:
          p->on_blocks(r, level(rng() % 3), std::uint32_t(rng() % 4));
          break;
        case 4:
          p->enqueue(r, ++position, now);
          break;
        case 5:
          p->dequeue(r);
          break;
        case 6:
          p->set_window(std::uint32_t(rng() % 12));
          break;
        case 7: {
          std::uint32_t q[6];
          for (auto& x : q) x = std::uint32_t(rng() % n);
          p->set_queue(q, now);
          position = 100 + position;
          break;
        }
        default: {
          const level l = level(rng() % 3);
          const std::uint32_t v = p->pick_victim(l, [](std::uint32_t) { return true; });
          if (v != no_record) {
            REQUIRE(p->live(v));
            REQUIRE(p->blocks(v, l) > 0);
          }
        }
      }
      if (op == 3 && p == &c) c.set_next_use(r, rng() % 1000);
    }
    if (step % 97 == 0)
      for (auto* p : ps) REQUIRE(p->check());
    // Victims are always live and hold blocks in the level; scheduler_aware never picks
    // a protected session while an unprotected one holds blocks there.
    const std::uint32_t v = b.pick_victim(level::dram, [](std::uint32_t) { return true; });
    if (v != no_record && b.in_window(v)) {
      for (std::uint32_t x = 0; x < n; ++x)
        if (b.live(x) && b.blocks(x, level::dram) > 0) REQUIRE(b.in_window(x));
    }
  }
  for (auto* p : ps) CHECK(p->check());
}
