#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "attnstore/store.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::make_blocks;
using attnstore::testing::make_tokens;
using attnstore::testing::temp_dir;

namespace {
store_config small_config(const std::string& dir, std::size_t dram_blocks, std::size_t ssd_blocks) {
  store_config c;
  c.geometry = kv_geometry{4, 2, 64, dtype::f16, 32};  // 64 KiB blocks
  c.model_name = "test-model";
  const std::size_t slot = format::slot_bytes(c.geometry.validated());
  c.dram_bytes = dram_blocks * slot;
  if (!dir.empty()) {
    c.ssd_directory = dir;
    c.ssd_bytes = ssd_blocks * slot;
  }
  c.queue_depth = 8;
  c.log = logger{&logger::quiet, nullptr};
  return c;
}
}  // namespace

TEST_CASE("store: put, lookup and get from DRAM") {
  store s(small_config("", 16, 0));
  const std::size_t bb = s.block_bytes();
  auto toks = make_tokens(1, 100);  // 4 blocks, last partial (4 tokens)
  auto data = make_blocks(bb, 1, 0, 4);
  REQUIRE(s.put({"t", "s1"}, toks, 0, data) == errc::ok);

  auto prompt = toks;
  prompt.push_back(77);  // next turn: history + new tokens
  block_location locs[8];
  lookup_result r = s.lookup({"t", "s1"}, prompt, locs);
  CHECK(r.tokens == 100);
  CHECK(r.blocks == 4);
  CHECK(r.dram_blocks == 4);
  CHECK(locs[3].tokens == 4);

  std::vector<std::byte> out(4 * bb);
  get_result g = s.get({"t", "s1"}, prompt, 0, 4, out);
  CHECK(g.status == errc::ok);
  CHECK(g.blocks == 4);
  CHECK(g.tokens == 100);
  CHECK(out == data);

  CHECK(s.lookup({"other-tenant", "s1"}, prompt).tokens == 0);
  CHECK(s.lookup({"t", "s2"}, prompt).tokens == 0);
}
