// Stores on separate directories sharing one Redis Cluster through store_remote (issue
// 15): a session saved on node A is served on node B byte-identically; B's next turn is
// found by C; drops, another model, another tenant and hostile manifests are misses.
// Runs against the [cluster] fixture (scripts/redis-cluster.sh, see CMakeLists.txt).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attnstore/shared/records.hpp"
#include "attnstore/shared/store_remote.hpp"
#include "attnstore/store.hpp"
#include "store_remote_support.hpp"
#include "support/kv_data.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::shared;
using namespace attnstore::testing;
using namespace redis_test;
using std::chrono::milliseconds;

namespace {

const hash128 fleet{0xf1ee7f1ee7ull, 0x5707e5ull};

// One node: its own DRAM and SSD, the shared cluster underneath.
struct node {
  temp_dir dir;
  std::shared_ptr<store_remote> remote;
  std::unique_ptr<store> kv;
  explicit node(const std::string& tag, const std::string& model = "test-model",
                std::function<void(store_config&)> tweak = {})
      : dir(tag) {
    store_config c = small_config(dir.str(), 64, 64);
    c.model_name = model;
    if (tweak) tweak(c);
    remote = std::make_shared<store_remote>(remote_config(c, fleet));
    c.remote = remote;
    kv = std::make_unique<store>(c);
  }
  // Runs the store's background work (small_config has no thread of its own: a publish
  // a hint asked for is done there) and waits for the write-behind to reach the cluster.
  void settle() {
    (void)kv->run_background();
    REQUIRE(remote->tier().flush(milliseconds{10000}) == shared_status::ok);
  }
};

// A conversation under a unique name per run: the cluster outlives a test binary.
std::string unique(const std::string& base) {
  return base + "-" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
}

std::uint64_t served(store& s, const session_key& key, const conversation& c, std::size_t tokens) {
  const auto toks = c.toks();
  const std::span<const token_id> prompt(toks.data(), tokens);
  const std::uint32_t blocks = test_geometry.blocks_for(tokens);
  std::vector<std::byte> out(std::size_t(blocks) * s.block_bytes());
  const get_result g = s.get(key, prompt, 0, blocks, out);
  const auto want = c.data(s.block_bytes());
  REQUIRE(std::equal(out.begin(), out.begin() + std::ptrdiff_t(std::size_t(g.blocks) * s.block_bytes()),
                     want.begin()));  // whatever is served is exact
  return g.tokens;
}

/// An embedder's policy that shares a session only when told to (`share`); victims in
/// record order (the test makes no room).
class choosy final : public policy::eviction_policy {
 public:
  choosy(std::uint32_t n, std::shared_ptr<std::atomic<bool>> share) : eviction_policy(n), share_(std::move(share)) {}
  std::string_view name() const noexcept override { return "choosy"; }

 protected:
  void reposition(std::uint32_t) noexcept override {}
  void forget(std::uint32_t) noexcept override {}
  std::uint32_t victim(policy::level l, policy::victim_filter accept, void* context) noexcept override {
    for (std::uint32_t r = 0; r < max_sessions(); ++r)
      if (live(r) && blocks(r, l) > 0 && accept(context, r)) return r;
    return policy::no_record;
  }
  bool sharing_worth(std::uint32_t) const noexcept override { return share_->load(); }

 private:
  std::shared_ptr<std::atomic<bool>> share_;
};

}  // namespace

TEST_CASE("store remote: a session saved on one node is served on another, byte for byte", "[cluster]") {
  node a("remote-a"), b("remote-b"), c("remote-c");
  const std::string name = unique("chat");
  const session_key key{"acme", name};
  const conversation conv{4242, 200};  // 7 blocks, the last partial
  const auto toks = conv.toks();
  const std::size_t bb = a.kv->block_bytes();

  // Turn 1 on A: 130 tokens.
  REQUIRE(a.kv->put(key, std::span(toks).first(130), 0, make_blocks(bb, conv.id, 0, 5)) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 1);
  // Turn 2 lands on B, which never saw the session: its lookup fetches it from the
  // cluster into DRAM, and the load is served locally, exactly.
  const lookup_result r = b.kv->lookup(key, std::span(toks).first(180));
  CHECK(r.tokens == 130);
  CHECK(r.dram_blocks == 5);
  CHECK(served(*b.kv, key, conv, 130) == 130);
  CHECK(b.kv->stats().remote_blocks_fetched == 5);
  // B saves turn 2 (blocks 4.. of 200 tokens); C then finds the longer history.
  REQUIRE(b.kv->put(key, toks, 4, make_blocks(bb, conv.id, 4, 3)) == errc::ok);
  b.settle();
  CHECK(c.kv->lookup(key, toks).tokens == 200);
  CHECK(served(*c.kv, key, conv, 200) == 200);
  // Turn 3 lands on A again, which holds only turn 1: it keeps its blocks and takes the
  // rest of the history from the cluster.
  const auto fetched_before = a.kv->stats().remote_blocks_fetched;
  CHECK(a.kv->lookup(key, toks).tokens == 200);
  CHECK(a.kv->stats().remote_blocks_fetched - fetched_before == 3);  // blocks 4-6 only
  CHECK(served(*a.kv, key, conv, 200) == 200);
  // An edit inside block 2: C's next prompt reuses the blocks before it only.
  auto edited = toks;
  edited[2 * 32 + 3] ^= 1;
  CHECK(c.kv->lookup(key, edited).tokens == 2 * 32 + 3);

  // The engine's queue drives a prefetch from the cluster: a node that never saw the
  // session has it in DRAM before its turn, and the turn's load fetches no block.
  node e("remote-e");
  e.kv->set_queue(std::vector<session_key>{key});
  e.kv->run_background();
  CHECK(e.kv->stats().remote_prefetches == 1);
  CHECK(e.kv->stats().remote_blocks_fetched == 7);
  CHECK(served(*e.kv, key, conv, 200) == 200);
  CHECK(e.kv->stats().remote_blocks_fetched == 7);
  CHECK(e.kv->stats().blocks_served_dram == 7);

  // Another tenant with the same session name, another model: nothing.
  CHECK(c.kv->lookup({"other", name}, toks).tokens == 0);
  node m("remote-model", "another-model");
  CHECK(m.kv->lookup(key, toks).tokens == 0);
  CHECK(m.kv->stats().remote_misses + m.kv->stats().remote_fetches >= 1);

  // A drop anywhere ends it for nodes that do not hold it locally.
  REQUIRE(b.kv->drop(key) == errc::ok);
  node d("remote-d");
  CHECK(d.kv->lookup(key, toks).tokens == 0);
  // Also when the drop comes right behind a save whose write-behind is still queued.
  const std::string quick_name = unique("quick");
  const session_key quick{"acme", quick_name};
  REQUIRE(a.kv->put(quick, toks, 0, conv.data(bb)) == errc::ok);
  REQUIRE(a.kv->drop(quick) == errc::ok);
  a.settle();
  CHECK(d.kv->lookup(quick, toks).tokens == 0);
}

TEST_CASE("store remote: the policy decides which sessions are published; a user seen typing is", "[cluster]") {
  auto share = std::make_shared<std::atomic<bool>>(false);
  node a("remote-choosy-a", "test-model", [&](store_config& c) {
    c.make_policy = [share](std::uint32_t n) { return std::make_unique<choosy>(n, share); };
  });
  node b("remote-choosy-b");
  const conversation conv{5150, 130};
  const auto toks = conv.toks();
  const std::size_t bb = a.kv->block_bytes();
  const std::string name = unique("choosy"), second_name = unique("choosy-second"), nobody = unique("nobody");
  const session_key key{"acme", name};  // (a session_key views its strings)
  REQUIRE(a.kv->policy_name() == "choosy");

  // Not worth it: the save is local only.
  REQUIRE(a.kv->put(key, toks, 0, conv.data(bb)) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 0);
  CHECK(a.kv->stats().remote_publishes_declined == 1);
  CHECK(b.kv->lookup(key, toks).tokens == 0);
  // A user seen leaving changes nothing; one seen typing is asked about again (still no).
  CHECK(a.kv->hint(key, policy::session_hint::left) == errc::ok);
  CHECK(a.kv->hint(key, policy::session_hint::composing) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 0);
  CHECK(a.kv->stats().remote_publishes_declined == 2);
  // Now worth it: the typing user's session goes out ahead of the turn, and the node the
  // turn lands on serves it, exactly.
  share->store(true);
  CHECK(a.kv->hint(key, policy::session_hint::composing) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 1);
  node c("remote-choosy-c");
  CHECK(c.kv->lookup(key, toks).tokens == 130);
  CHECK(served(*c.kv, key, conv, 130) == 130);
  // Once published, another hint sends nothing more.
  CHECK(a.kv->hint(key, policy::session_hint::composing) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 1);
  // A save the policy finds worth it is published at once.
  const session_key second{"acme", second_name};
  REQUIRE(a.kv->put(second, toks, 0, conv.data(bb)) == errc::ok);
  a.settle();
  CHECK(a.kv->stats().remote_publishes == 2);
  CHECK(c.kv->lookup(second, toks).tokens == 130);
  // A hint for a session this store does not hold is not_found.
  CHECK(a.kv->hint({"acme", nobody}, policy::session_hint::composing) == errc::not_found);
}

TEST_CASE("store remote: a new session whose opening is shared here takes the rest of its history from the tier",
          "[cluster]") {
  node a("remote-opening-a"), c("remote-opening-c");
  const conversation conv{6060, 224};  // 7 whole blocks; the first 4 are an app's system prompt
  const auto toks = conv.toks();
  const std::size_t bb = a.kv->block_bytes();
  const std::string name = unique("opening"), other_name = unique("opening-other");
  const session_key key{"acme", name}, other{"acme", other_name};
  // C holds another session of the app: only the system prompt.
  REQUIRE(c.kv->put(other, std::span(toks).first(128), 0, make_blocks(bb, conv.id, 0, 4)) == errc::ok);
  // The conversation ran on A.
  REQUIRE(a.kv->put(key, toks, 0, conv.data(bb)) == errc::ok);
  a.settle();
  // Its next turn lands on C: the system prompt is taken from C's own copy, the turns
  // after it from the tier; all of it is served, exactly.
  CHECK(c.kv->lookup(key, toks).tokens == 224);
  CHECK(c.kv->stats().adopted_blocks == 4);
  CHECK(c.kv->stats().remote_blocks_fetched == 3);
  CHECK(served(*c.kv, key, conv, 224) == 224);
  CHECK(c.kv->stats().blocks_served_dram == 7);
}

TEST_CASE("store remote: hostile manifests and blocks in the cluster are misses, never served", "[cluster]") {
  node a("remote-hostile-a"), b("remote-hostile-b");
  const conversation conv{777, 96};
  const std::size_t bb = a.kv->block_bytes();
  const std::string name = unique("victim");
  const session_key key{"acme", name};
  REQUIRE(a.kv->put(key, conv.toks(), 0, conv.data(bb)) == errc::ok);
  a.settle();
  // Overwrite the session's manifest with garbage, then with another session's manifest.
  redis_cluster raw(test_cluster_config());
  const remote_session id = a.remote->identify(key);
  const record_key mk = manifest_key(store_model_id(small_config("", 1, 0)).value, id.session);
  std::vector<std::byte> junk(300, std::byte{0x5a});
  REQUIRE(raw.set(mk.view(), junk) == redis_status::ok);
  CHECK(b.kv->lookup(key, conv.toks()).tokens == 0);
  CHECK(b.kv->stats().remote_misses >= 1);

  const std::string other_name = unique("other");
  const session_key other{"acme", other_name};
  REQUIRE(a.kv->put(other, conv.toks(), 0, conv.data(bb)) == errc::ok);
  a.settle();
  const record_key ok = manifest_key(store_model_id(small_config("", 1, 0)).value, a.remote->identify(other).session);
  const redis_get_result got = raw.get(ok.view());
  REQUIRE(got.status == redis_status::ok);
  REQUIRE(raw.set(mk.view(), got.value.bytes()) == redis_status::ok);  // other's manifest under the victim's key
  node c("remote-hostile-c");
  CHECK(c.kv->lookup(key, conv.toks()).tokens == 0);     // names another session: refused
  CHECK(c.kv->lookup(other, conv.toks()).tokens == 96);  // the real one still serves
}

TEST_CASE("store remote: a tier that does not answer is a miss within its bound; local work goes on", "[cluster]") {
  temp_dir dir("remote-dead");
  store_config c = small_config(dir.str(), 64, 64);
  shared_tier_config t = remote_config(c, fleet);
  t.cluster.seeds = {"127.0.0.1:1"};  // nothing listens there
  t.cluster.connect_timeout = milliseconds{100};
  t.cluster.command_timeout = milliseconds{100};
  t.cluster.request_timeout = milliseconds{300};
  c.remote = std::make_shared<store_remote>(t);
  store s(c);
  const conversation conv{99, 100};
  const std::string name = unique("dead");
  const session_key key{"acme", name};
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(s.lookup(key, conv.toks()).tokens == 0);  // not here, and the tier is a miss
  REQUIRE(s.put(key, conv.toks(), 0, conv.data(s.block_bytes())) == errc::ok);
  CHECK(s.lookup(key, conv.toks()).tokens == 100);  // local hits are not held up
  CHECK(served(s, key, conv, 100) == 100);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(ms < 3 * 300 + 400);  // each remote call within request_timeout (and slack)
  CHECK(s.stats().remote_misses >= 1);
}

int main(int argc, char** argv) { return run_with_cluster(argc, argv, "test_store_remote"); }
