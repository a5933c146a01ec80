// Steady-state put/get/lookup/demote must not touch the heap: this binary counts every
// global operator new and requires zero inside the measured loops.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>

#include "attnstore/store.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

#include "support/alloc_counter.hpp"

using attnstore::testing::allocations;

using namespace attnstore;

TEST_CASE("steady-state put, get, lookup, demote and SSD reads allocate nothing") {
  attnstore::testing::temp_dir dir("noalloc");
  store_config c;
  c.geometry = kv_geometry{4, 2, 64, dtype::f16, 32};
  c.model_name = "m";
  const std::size_t slot = format::slot_bytes(c.geometry.validated());
  c.dram_bytes = 64 * slot;
  c.ssd_directory = dir.str();
  c.ssd_bytes = 128 * slot;
  c.queue_depth = 8;
  c.log = logger{&logger::quiet, nullptr};
  store s(c);
  const std::size_t bb = s.block_bytes();

  constexpr int sessions = 8;
  std::vector<std::vector<token_id>> toks;
  std::vector<std::string> names;
  for (int i = 0; i < sessions; ++i) {
    toks.push_back(attnstore::testing::make_tokens(i, 100));  // 4 blocks, last partial
    names.push_back("session-" + std::to_string(i));
  }
  auto blocks = attnstore::testing::make_blocks(bb, 1, 0, 4);
  std::vector<std::byte> out(4 * bb);
  block_location locs[8];

  auto round = [&](int r) {
    for (int i = 0; i < sessions; ++i) {
      session_key key{"tenant", names[i]};
      REQUIRE(s.put(key, toks[i], 3, std::span(blocks).subspan(3 * bb)) == errc::ok);  // re-save last block
      REQUIRE(s.lookup(key, toks[i], locs).tokens == 100);
      REQUIRE(s.get(key, toks[i], 0, 4, out).blocks == 4);
      if ((i + r) % 3 == 0) REQUIRE(s.demote(key) == errc::ok);  // next get reads SSD and promotes
    }
  };
  for (int i = 0; i < sessions; ++i) REQUIRE(s.put({"tenant", names[i]}, toks[i], 0, blocks) == errc::ok);
  for (int r = 0; r < 3; ++r) round(r);  // warm-up: I/O channels are made on first use

  const long before = allocations.load();
  for (int r = 0; r < 20; ++r) round(r);
  const long during = allocations.load() - before;
  CHECK(during == 0);
  // The counter itself works: a real allocation is seen.
  const long probe = allocations.load();
  auto* volatile v = new std::vector<int>(100);
  delete v;
  CHECK(allocations.load() - probe == 2);
  CHECK(s.stats().blocks_served_ssd > 0);
  CHECK(s.stats().demoted_blocks > 0);
}
