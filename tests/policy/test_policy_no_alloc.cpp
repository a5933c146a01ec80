// Policy events and decisions allocate nothing in steady state: this binary counts every
// global operator new and requires zero inside the measured loop (predictive's refits,
// which rank its cells, and the prefetcher's candidate pass included).
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>

#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/policy/prefetcher.hpp"
#include "attnstore/policy/scheduler_aware.hpp"

#include "belady.hpp"

#include "support/alloc_counter.hpp"

using attnstore::testing::allocations;

using namespace attnstore::policy;

namespace {
struct counting_target {
  std::uint32_t ssd[256] = {};
  std::uint32_t ssd_only_blocks(std::uint32_t r) noexcept { return ssd[r]; }
  std::uint32_t start_promotion(std::uint32_t, std::uint32_t n, std::uint64_t) noexcept { return n; }
  void abort_promotion(std::uint32_t, std::uint64_t) noexcept {}
};
}  // namespace

TEST_CASE("steady-state policy events, decisions and prefetch planning allocate nothing") {
  constexpr std::uint32_t n = 256;
  lru a(n);
  scheduler_aware b({n, 0, 4000});
  belady c(n);
  predictive_options po;
  po.max_sessions = n;
  po.capacity_blocks = 4000;
  po.ticks_per_second = 100;  // the loop's clock: 100 ticks a second
  po.min_samples = 50;
  po.refit_every = 16;  // refits (ranking the cells) inside the measured loop too
  predictive d(po);
  prefetcher pf({n, 64, 64 * 100, 0, 64 * 1000});
  prefetcher pf2({n, 64, 64 * 100, 4, 0});
  counting_target t;
  eviction_policy* ps[] = {&a, &b, &c, &d};
  std::mt19937_64 rng(3);
  std::uint32_t queue[32];
  auto step = [&](std::uint64_t i) {
    const std::uint32_t r = std::uint32_t(rng() % n);
    for (auto* p : ps) {
      switch (rng() % 8) {
        case 0:
          p->on_insert(r, i);
          break;
        case 1:
          p->on_erase(r);
          break;
        case 2:
          p->on_access(r, i);
          break;
        case 3:
          p->on_blocks(r, level(1 + rng() % 2), std::uint32_t(rng() % 50));
          break;
        case 4:
          p->enqueue(r, i, i);
          break;
        case 5:
          p->dequeue(r);
          break;
        case 6:
          for (auto& q : queue) q = std::uint32_t(rng() % n);
          p->set_queue(queue, i);
          break;
        default: {
          // A decision whose filter rejects a few candidates first.
          int rejects = int(rng() % 4);
          (void)p->pick_victim(level(1 + rng() % 2), [&](std::uint32_t) { return rejects-- <= 0; });
          (void)p->next_expired(i, 100);
        }
      }
    }
    c.set_next_use(r, rng() % 100000);
    b.refresh_window();
    d.refresh_window();
    d.advance(i);
    (void)d.score(r, level::ssd);
    t.ssd[r] = std::uint32_t(rng() % 20);
    pf.plan(b, t);
    pf2.plan(d, t, [&](auto&& visit) { d.for_each_likely(8, visit); });
    if (pf2.in_flight(r)) (void)pf2.complete(r, pf2.ticket(r));
    if (pf.in_flight(r)) {
      if (rng() % 2)
        (void)pf.complete(r, pf.ticket(r));
      else
        (void)pf.cancel(r, t);
    }
  };
  for (std::uint64_t i = 0; i < 20000; ++i) step(i);  // warm up: nothing is sized lazily, but be fair
  const long before = allocations.load();
  const std::uint64_t refits = d.refits();
  for (std::uint64_t i = 20000; i < 120000; ++i) step(i);
  CHECK(allocations.load() - before == 0);
  for (auto* p : ps) CHECK(p->check());
  CHECK(d.refits() - refits > 20);
  CHECK(d.learned());
  CHECK(d.check_cells());
}
