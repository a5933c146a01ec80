// Builds against the installed attnstore::redis: a store with the shared tier as its
// remote tier, on a cluster that is not there: its lookups are misses, its saves local.
#include <attnstore/shared/store_remote.hpp>
#include <attnstore/store.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

int main() {
  attnstore::store_config c;
  c.geometry = {2, 2, 64, attnstore::dtype::bf16, 16};
  c.model_name = "consumer";
  c.dram_bytes = 8 << 20;
  attnstore::shared::shared_tier_config t;
  t.cluster.seeds = {"127.0.0.1:1"};  // nothing listens there
  t.cluster.connect_timeout = std::chrono::milliseconds{50};
  t.cluster.command_timeout = std::chrono::milliseconds{50};
  t.cluster.request_timeout = std::chrono::milliseconds{100};
  t.model = attnstore::store_model_id(c);
  t.fleet_secret = attnstore::hash128{1, 2};
  t.tokens_per_block = 16;
  t.block_bytes = c.geometry.validated().block_bytes();
  c.remote = std::make_shared<attnstore::shared::store_remote>(t);
  attnstore::store s(c);
  std::vector<attnstore::token_id> toks(40, 7);
  std::vector<std::byte> kv(3 * s.block_bytes(), std::byte{0x2a});
  const bool miss = s.lookup({"t", "s"}, toks).tokens == 0;
  const bool saved = s.put({"t", "s"}, toks, 0, kv) == attnstore::errc::ok;
  const bool hit = s.lookup({"t", "s"}, toks).tokens == 40;
  std::printf("attnstore::redis: miss %d, saved %d, hit %d\n", miss, saved, hit);
  return miss && saved && hit ? 0 : 1;
}
