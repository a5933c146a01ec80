// shared_tier against real clusters that scripts/redis-cluster.sh starts (ctest fixtures;
// the server is never mocked). Two or more shared_tier instances stand for the stores of
// different serving nodes; hostile values are planted with a plain cluster client.
// Exits 77 (skipped) when redis-server is not installed. Environment: redis_test_support.hpp.
//   [cluster]   3 masters: round trip between tiers, dedup, model mismatch, hostile values,
//               a missing block, manifest versions, the publish bound under a hung node,
//               a wrong password, a master killed mid-run and restarted
//   [failover]  3 masters + 3 replicas: a master killed mid-run; hits resume on its replica
#define CATCH_CONFIG_RUNNER
#include <signal.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/hash.hpp"
#include "attnstore/shared/records.hpp"
#include "attnstore/shared/shared_tier.hpp"
#include "redis_test_support.hpp"

using namespace attnstore;
using namespace attnstore::shared;
using namespace redis_test;
using std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

namespace {

const model_id model_a{{0xa11ce5eed0000001ull, 0x00000000000000a1ull}};
const model_id model_b{{0xb0b5eed000000002ull, 0x00000000000000b2ull}};
const hash128 fleet{0x5ec7e7f1ee7ull, 0x0123456789ull};
constexpr std::uint32_t tpb = 16;
constexpr std::size_t block_bytes = 1 << 20;  // 1 MiB payloads: records of 1 MiB + 4 KiB

redis_cluster_config cluster_config() { return test_cluster_config(); }

shared_tier_config tier_config(const model_id& model = model_a) {
  shared_tier_config c;
  c.cluster = cluster_config();
  c.model = model;
  c.fleet_secret = fleet;
  c.tokens_per_block = tpb;
  c.block_bytes = block_bytes;
  c.block_ttl = milliseconds{600000};
  c.manifest_ttl = milliseconds{600000};
  return c;
}

/// Tight time bounds, for the tests of failures.
shared_tier_config tight(shared_tier_config c) {
  c.cluster.connect_timeout = milliseconds{200};
  c.cluster.command_timeout = milliseconds{300};
  c.cluster.request_timeout = milliseconds{600};
  return c;
}

std::vector<std::byte> payload(std::uint64_t seed) {
  std::vector<std::byte> v(block_bytes);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 12345;
  auto* w = reinterpret_cast<std::uint64_t*>(v.data());
  for (std::size_t i = 0; i < block_bytes / 8; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    w[i] = x;
  }
  return v;
}

/// A session's history as a store would hold it: tokens and one payload per block.
struct history {
  std::string tenant, id;
  std::vector<token_id> tokens;
  std::vector<std::vector<std::byte>> payloads;

  history(std::string t, std::string s, std::size_t n, std::uint32_t seed) : tenant(std::move(t)), id(std::move(s)) {
    append(n, seed);
  }
  session_key key() const { return {tenant, id}; }
  std::size_t blocks() const { return (tokens.size() + tpb - 1) / tpb; }
  /// Appends n tokens (a turn); the blocks they touch get new payloads.
  void append(std::size_t n, std::uint32_t seed) {
    const std::size_t first_touched = tokens.size() / tpb;
    for (std::size_t i = 0; i < n; ++i) tokens.push_back(token_id((tokens.size() * 7919 + seed * 104729) % 151936));
    payloads.resize(blocks());
    for (std::size_t b = first_touched; b < blocks(); ++b) payloads[b] = payload(seed * 1000 + b);
  }
  /// publish() of the whole history; blocks before `upload_from` are not sent.
  shared_status publish(shared_tier& t, std::uint64_t sequence, std::size_t upload_from = 0) const {
    std::vector<const std::byte*> p(blocks(), nullptr);
    for (std::size_t b = upload_from; b < blocks(); ++b) p[b] = payloads[b].data();
    return t.publish(t.identify(key()),
                     publish_request{.sequence = sequence, .tokens = tokens, .keys = {}, .payloads = p});
  }
};

/// What a store on another node does for a routed turn: manifest, then the blocks.
struct fetched {
  shared_status manifest = shared_status::error;
  session_manifest m;
  fetch_result res;
  std::vector<shared_status> status;
  std::vector<std::vector<std::byte>> out;
  bool sums_match = true;  // the checksums handed back are those of the payloads served
};

/// A fetch with no Catch assertion, for threads other than the test's (Catch is not thread-safe).
fetched fetch_quiet(shared_tier& t, const session_key& key) {
  fetched f;
  f.manifest = t.fetch_manifest(t.identify(key), f.m);
  if (f.manifest != shared_status::ok) return f;
  std::vector<block_ref> refs;
  std::vector<std::byte*> ptrs;
  f.out.assign(f.m.blocks.size(), std::vector<std::byte>(block_bytes));
  for (std::size_t i = 0; i < f.m.blocks.size(); ++i) {
    refs.push_back(f.m.ref(i));
    ptrs.push_back(f.out[i].data());
  }
  f.status.assign(refs.size(), shared_status::error);
  std::vector<std::uint64_t> sums(refs.size(), 0);
  f.res = t.fetch_blocks(refs, ptrs, f.status, sums);
  for (std::size_t i = 0; i < f.res.prefix; ++i)
    f.sums_match = f.sums_match && sums[i] == checksum64(f.out[i].data(), f.out[i].size());
  return f;
}

fetched fetch(shared_tier& t, const session_key& key) {
  fetched f = fetch_quiet(t, key);
  CHECK(f.sums_match);
  if (f.manifest != shared_status::ok) return f;
  std::vector<block_ref> refs;
  std::vector<std::byte*> ptrs;
  for (std::size_t i = 0; i < f.m.blocks.size(); ++i) {
    refs.push_back(f.m.ref(i));
    ptrs.push_back(f.out[i].data());
  }
  if (!refs.empty()) {  // a checksums span of another length is the caller's mistake
    std::vector<std::uint64_t> longer(refs.size() + 1);
    std::vector<shared_status> st(refs.size());
    const fetch_result bad = t.fetch_blocks(refs, ptrs, st, longer);
    CHECK(bad.prefix == 0);
    CHECK(bad.first_miss == shared_status::invalid_argument);
  }
  return f;
}

/// Every block of the prefix equals the history's; none after it is claimed ok.
bool prefix_matches(const fetched& f, const history& h) {
  if (f.manifest != shared_status::ok || !f.sums_match ||
      f.m.tokens != std::vector<token_id>(h.tokens.begin(), h.tokens.begin() + std::ptrdiff_t(f.m.tokens.size())))
    return false;
  for (std::size_t i = 0; i < f.status.size(); ++i) {
    if (i < f.res.prefix) {
      if (f.status[i] != shared_status::ok || f.out[i] != h.payloads[i]) return false;
    } else if (f.status[i] == shared_status::ok) {
      return false;
    }
  }
  return true;
}

std::string unique(const char* what) {
  static std::atomic<int> n{0};
  return std::string(what) + "-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

}  // namespace

int main(int argc, char** argv) { return run_with_cluster(argc, argv, "test_shared_tier"); }

TEST_CASE("a session published by one node is served byte-identically by another", "[cluster]") {
  shared_tier node_a(tier_config()), node_b(tier_config());
  history h("tenant-1", unique("conv"), tpb * 5 + 9, 1);  // 6 blocks, the last partial
  REQUIRE(h.publish(node_a, 10) == shared_status::ok);
  REQUIRE(node_a.flush(milliseconds{20000}) == shared_status::ok);
  CHECK(node_a.stats().blocks_written == 6);
  CHECK(node_a.stats().manifests_written == 1);
  CHECK(node_a.stats().bytes_in_flight == 0);

  fetched f = fetch(node_b, h.key());
  REQUIRE(f.manifest == shared_status::ok);
  CHECK(f.m.sequence == 10);
  CHECK(f.res.prefix == 6);
  CHECK(f.res.first_miss == shared_status::ok);
  CHECK(prefix_matches(f, h));
  auto s = node_b.stats();
  CHECK(s.manifest_hits == 1);
  CHECK(s.block_hits == 6);
  CHECK(s.bytes_read >= 6 * (block_bytes + 4096));

  // The next turn lands on node B: it appends, re-uploads the changed tail only, and
  // node A (or any other) then serves the longer history.
  h.append(39, 2);  // 128 tokens: block 5 completes (a new chain), blocks 6 and 7 are new
  REQUIRE(h.publish(node_b, next_manifest_sequence(f.m.sequence), 5) == shared_status::ok);
  REQUIRE(node_b.flush(milliseconds{20000}) == shared_status::ok);
  CHECK(node_b.stats().blocks_written == 3);
  f = fetch(node_a, h.key());
  REQUIRE(f.manifest == shared_status::ok);
  CHECK(f.m.blocks.size() == 8);
  CHECK(f.res.prefix == 8);
  CHECK(prefix_matches(f, h));

  // Blocks are written once: a third node publishing the same history uploads nothing.
  shared_tier node_c(tier_config());
  REQUIRE(h.publish(node_c, next_manifest_sequence(f.m.sequence)) == shared_status::ok);
  REQUIRE(node_c.flush(milliseconds{20000}) == shared_status::ok);
  CHECK(node_c.stats().blocks_written == 0);
  CHECK(node_c.stats().blocks_present == 8);
  CHECK(node_c.stats().bytes_written < 64 * 1024);  // the manifest only

  // Another tenant with the same session id, or another session id, finds nothing.
  CHECK(fetch(node_b, session_key{"tenant-2", h.id}).manifest == shared_status::not_found);
  CHECK(fetch(node_b, session_key{h.tenant, h.id + "x"}).manifest == shared_status::not_found);
  // Blocks carry the TTL; the servers' LRU may evict them earlier.
  admin a(slot_owners(seed_port())[key_slot(block_key(model_a.value, f.m.blocks[0].chain).view())]);
  const long long pttl =
      a.cmd("PTTL %s", std::string(block_key(model_a.value, f.m.blocks[0].chain).view()).c_str())->integer;
  CHECK(pttl > 500000);
  CHECK(pttl <= 600000);
}

TEST_CASE("a store of another model misses, even on records planted under its keys", "[cluster]") {
  shared_tier tier_a(tier_config(model_a)), tier_b(tier_config(model_b));
  history h("tenant-1", unique("model"), tpb * 3, 3);
  REQUIRE(h.publish(tier_a, 5) == shared_status::ok);
  REQUIRE(tier_a.flush(milliseconds{20000}) == shared_status::ok);
  REQUIRE(fetch(tier_a, h.key()).res.prefix == 3);
  // Model B has its own keys: nothing there.
  fetched f = fetch(tier_b, h.key());
  CHECK(f.manifest == shared_status::not_found);
  // Model A's records copied under model B's keys: the manifest names model A (and its
  // chains hash under A); the blocks' headers name model A.
  redis_cluster raw(cluster_config());
  const auto sa = tier_a.identify(h.key());
  auto man = raw.get(manifest_key(model_a.value, sa.session).view());
  REQUIRE(man.status == redis_status::ok);
  REQUIRE(raw.set(manifest_key(model_b.value, sa.session).view(), man.value.bytes()) == redis_status::ok);
  CHECK(fetch(tier_b, h.key()).manifest == shared_status::verify_failed);
  session_manifest ma;
  REQUIRE(tier_a.fetch_manifest(sa, ma) == shared_status::ok);
  // Model B's view of the same tokens: its own chains, with model A's block records under them.
  session_manifest mb = ma;
  REQUIRE(build_manifest_blocks(mb, model_b, {}) == shared_status::ok);
  for (std::size_t i = 0; i < 3; ++i) {
    auto rec = raw.get(block_key(model_a.value, ma.blocks[i].chain).view());
    REQUIRE(rec.status == redis_status::ok);
    REQUIRE(raw.set(block_key(model_b.value, mb.blocks[i].chain).view(), rec.value.bytes()) == redis_status::ok);
  }
  std::vector<block_ref> refs = {mb.ref(0), mb.ref(1), mb.ref(2)};
  std::vector<std::vector<std::byte>> out(3, std::vector<std::byte>(block_bytes));
  std::vector<std::byte*> ptrs = {out[0].data(), out[1].data(), out[2].data()};
  std::vector<shared_status> st(3);
  const fetch_result r = tier_b.fetch_blocks(refs, ptrs, st);
  CHECK(r.prefix == 0);
  CHECK(r.first_miss == shared_status::verify_failed);
  CHECK(st == std::vector<shared_status>{shared_status::verify_failed, shared_status::skipped, shared_status::skipped});
  CHECK(tier_b.stats().block_hits == 0);
  CHECK(tier_b.stats().block_misses.verify_failed == 1);
  CHECK(tier_b.stats().manifest_misses.verify_failed == 1);
}

TEST_CASE("hostile values planted in the cluster are misses, never served", "[cluster]") {
  shared_tier writer(tier_config()), reader(tier_config());
  redis_cluster raw(cluster_config());
  history h("tenant-1", unique("hostile"), tpb * 6, 4);
  REQUIRE(h.publish(writer, 7) == shared_status::ok);
  REQUIRE(writer.flush(milliseconds{20000}) == shared_status::ok);
  const auto s = reader.identify(h.key());
  const record_key mkey = manifest_key(model_a.value, s.session);
  const std::vector<std::byte> good_manifest = [&] {
    auto v = raw.get(mkey.view());
    REQUIRE(v.status == redis_status::ok);
    return std::vector<std::byte>(v.value.bytes().begin(), v.value.bytes().end());
  }();
  fetched good = fetch(reader, h.key());
  REQUIRE(good.res.prefix == 6);
  std::mt19937_64 rng(99);

  SECTION("manifests") {
    auto plant_and_fetch = [&](std::span<const std::byte> v) {
      REQUIRE(raw.set(mkey.view(), v) == redis_status::ok);
      return fetch(reader, h.key()).manifest;
    };
    std::vector<std::byte> junk(4096);
    for (auto& b : junk) b = std::byte(rng());
    CHECK(plant_and_fetch(junk) == shared_status::verify_failed);
    CHECK(plant_and_fetch(std::span(good_manifest).first(good_manifest.size() - 1)) == shared_status::verify_failed);
    CHECK(plant_and_fetch(std::span(good_manifest).first(100)) == shared_status::verify_failed);
    CHECK(plant_and_fetch(std::span(good_manifest).first(1)) == shared_status::verify_failed);
    // Another tenant's manifest for a session of the same id, copied under this key.
    history other("tenant-2", h.id, tpb * 2, 5);
    REQUIRE(other.publish(writer, 9) == shared_status::ok);
    REQUIRE(writer.flush(milliseconds{20000}) == shared_status::ok);
    auto theirs = raw.get(manifest_key(model_a.value, writer.identify(other.key()).session).view());
    REQUIRE(theirs.status == redis_status::ok);
    CHECK(plant_and_fetch(theirs.value.bytes()) == shared_status::verify_failed);
    CHECK(fetch(reader, other.key()).manifest == shared_status::ok);  // theirs still serves them
    // A manifest of this session and tenant pointing at another model's blocks.
    session_manifest forged;
    REQUIRE(reader.fetch_manifest(reader.identify(other.key()), forged) == shared_status::ok);
    forged.session = s.session;
    forged.tenant = s.tenant;
    REQUIRE(build_manifest_blocks(forged, model_b, {}) == shared_status::ok);
    forged.model = model_a.value;
    std::vector<std::byte> rec;
    REQUIRE(encode_manifest(forged, rec) == shared_status::ok);
    CHECK(plant_and_fetch(rec) == shared_status::verify_failed);
    // An empty value, and a value of the right size with the right magic but random.
    CHECK(plant_and_fetch({}) == shared_status::verify_failed);
    std::vector<std::byte> mimic(good_manifest.size());
    for (auto& b : mimic) b = std::byte(rng());
    std::memcpy(mimic.data(), good_manifest.data(), 16);
    CHECK(plant_and_fetch(mimic) == shared_status::verify_failed);
    CHECK(reader.stats().manifest_misses.verify_failed == 8);
    // The genuine one back: served again.
    CHECK(plant_and_fetch(good_manifest) == shared_status::ok);
  }

  SECTION("blocks: the prefix ends at the first bad one") {
    const record_key k2 = block_key(model_a.value, good.m.blocks[2].chain);
    auto rec2 = raw.get(k2.view());
    REQUIRE(rec2.status == redis_status::ok);
    const std::vector<std::byte> genuine(rec2.value.bytes().begin(), rec2.value.bytes().end());
    auto rec3 = raw.get(block_key(model_a.value, good.m.blocks[3].chain).view());
    REQUIRE(rec3.status == redis_status::ok);
    std::vector<std::vector<std::byte>> plants;
    plants.emplace_back(genuine.size());  // random bytes of the right size
    for (auto& b : plants.back()) b = std::byte(rng());
    plants.emplace_back(genuine.begin(), genuine.end() - 1);                    // truncated by one byte
    plants.emplace_back(genuine.begin(), genuine.begin() + 4096);               // the header alone
    plants.emplace_back(rec3.value.bytes().begin(), rec3.value.bytes().end());  // the next block
    auto flipped = genuine;
    flipped[flipped.size() / 2] ^= std::byte{1};  // one payload bit
    plants.push_back(flipped);
    {
      // A valid record of model B for exactly these tokens and position.
      session_manifest mb = good.m;
      REQUIRE(build_manifest_blocks(mb, model_b, {}) == shared_status::ok);
      std::vector<std::byte> other(genuine.size());
      std::memcpy(other.data() + 4096, h.payloads[2].data(), block_bytes);
      write_block_header(other.data(), reader.shape(), model_b, 2, mb.blocks[2].chain, {}, mb.tokens_of(2),
                         checksum64(h.payloads[2].data(), block_bytes));
      plants.push_back(other);
    }
    {
      // A valid record of model A, position 2, under this key, whose tokens differ: its chain
      // in the header is the expected one, but it does not continue from block 1 through
      // the manifest's tokens.
      std::vector<token_id> wrong(good.m.tokens_of(2).begin(), good.m.tokens_of(2).end());
      wrong[5] ^= 1;
      std::vector<std::byte> other(genuine.size());
      std::memcpy(other.data() + 4096, h.payloads[2].data(), block_bytes);
      write_block_header(other.data(), reader.shape(), model_a, 2, good.m.blocks[2].chain, {}, wrong,
                         checksum64(h.payloads[2].data(), block_bytes));
      plants.push_back(other);
    }
    for (std::size_t p = 0; p < plants.size(); ++p) {
      CAPTURE(p);
      REQUIRE(raw.set(k2.view(), plants[p]) == redis_status::ok);
      const fetched f = fetch(reader, h.key());
      CHECK(f.res.prefix == 2);
      CHECK(f.res.first_miss == shared_status::verify_failed);
      CHECK(f.status[2] == shared_status::verify_failed);
      CHECK(f.status[3] == shared_status::skipped);
      CHECK(prefix_matches(f, h));
    }
    CHECK(reader.stats().block_misses.verify_failed == plants.size());
    CHECK(reader.stats().blocks_skipped == plants.size() * 3);
    // A block deleted (or evicted, or expired): the prefix ends there with not_found.
    REQUIRE(raw.del(k2.view()) == redis_status::ok);
    fetched f = fetch(reader, h.key());
    CHECK(f.res.prefix == 2);
    CHECK(f.res.first_miss == shared_status::not_found);
    CHECK(prefix_matches(f, h));
    // Re-publishing uploads only the missing block; the whole prefix serves again.
    shared_tier again(tier_config());
    REQUIRE(h.publish(again, 8) == shared_status::ok);
    REQUIRE(again.flush(milliseconds{20000}) == shared_status::ok);
    CHECK(again.stats().blocks_written == 1);
    CHECK(again.stats().blocks_present == 5);
    f = fetch(reader, h.key());
    CHECK(f.res.prefix == 6);
    CHECK(prefix_matches(f, h));
  }
}

TEST_CASE("a listed block is kept; one lost ends the manifest and marks the session until a publish carries it",
          "[cluster]") {
  const auto owner = slot_owners(seed_port());
  auto brief = tier_config();
  brief.block_ttl = milliseconds{20000};
  shared_tier first(brief), t(tier_config());
  // 4 whole blocks, of tokens of this run's own (the exact counts below need blocks that
  // no earlier run on the same cluster left there)
  history h("tenant-l", unique("lost"), tpb * 4, std::uint32_t(::getpid()) * 4 + 41);
  const shared_session id = t.identify(h.key());
  REQUIRE(h.publish(first, 1) == shared_status::ok);
  REQUIRE(first.flush(milliseconds{30000}) == shared_status::ok);
  CHECK_FALSE(first.incomplete(id));
  fetched f = fetch(t, h.key());
  REQUIRE(f.res.prefix == 4);
  const auto pttl = [&](std::size_t block) {
    const record_key k = block_key(model_a.value, f.m.blocks[block].chain);
    admin a(owner[key_slot(k.view())]);
    return a.cmd("PTTL %b", k.view().data(), k.view().size())->integer;
  };
  CHECK(pttl(1) <= 20000);
  // The next turn lists the four blocks without payloads: each is kept for the tier's
  // block_ttl again (here 600 s), not sent.
  h.append(tpb, std::uint32_t(::getpid()) * 4 + 42);
  REQUIRE(h.publish(t, 2, 4) == shared_status::ok);
  REQUIRE(t.flush(milliseconds{30000}) == shared_status::ok);
  CHECK(pttl(1) > 500000);
  CHECK(t.stats().blocks_present == 4);
  CHECK(t.stats().blocks_written == 1);
  CHECK_FALSE(t.incomplete(id));
  f = fetch(t, h.key());
  CHECK(f.res.prefix == 5);
  // Block 2 is lost (evicted, expired, or its server restarted empty).
  {
    const record_key k = block_key(model_a.value, f.m.blocks[2].chain);
    admin a(owner[key_slot(k.view())]);
    REQUIRE(a.cmd("DEL %b", k.view().data(), k.view().size())->integer == 1);
  }
  // A turn that does not carry it: the manifest ends before it, and the session is marked.
  h.append(tpb, std::uint32_t(::getpid()) * 4 + 43);
  REQUIRE(h.publish(t, 3, 5) == shared_status::ok);
  REQUIRE(t.flush(milliseconds{30000}) == shared_status::ok);
  CHECK(t.incomplete(id));
  CHECK(t.stats().write_failures.not_found == 1);
  f = fetch(t, h.key());
  CHECK(f.m.blocks.size() == 2);
  CHECK(f.res.prefix == 2);
  CHECK(prefix_matches(f, h));
  // The store's answer: the next publish carries every payload; the tier sends only the
  // lost one, and the session is whole again.
  const auto written = t.stats().blocks_written;
  h.append(tpb, std::uint32_t(::getpid()) * 4 + 44);
  REQUIRE(h.publish(t, 4, 0) == shared_status::ok);
  REQUIRE(t.flush(milliseconds{30000}) == shared_status::ok);
  CHECK_FALSE(t.incomplete(id));
  CHECK(t.stats().blocks_written == written + 2);  // block 2 and the new block 6
  f = fetch(t, h.key());
  CHECK(f.res.prefix == 7);
  CHECK(prefix_matches(f, h));
}

TEST_CASE("a stale manifest never replaces a newer one", "[cluster]") {
  shared_tier a(tier_config()), b(tier_config());
  history newer("tenant-1", unique("seq"), tpb * 4, 6);
  history older = newer;
  older.tokens.resize(tpb * 2 + 3);  // an earlier, shorter state of the conversation
  older.payloads.resize(older.blocks());
  older.payloads.back() = payload(777);
  REQUIRE(newer.publish(a, 200) == shared_status::ok);
  REQUIRE(a.flush(milliseconds{20000}) == shared_status::ok);
  REQUIRE(older.publish(b, 100) == shared_status::ok);  // a write-behind that arrives late
  REQUIRE(b.flush(milliseconds{20000}) == shared_status::ok);
  fetched f = fetch(a, newer.key());
  CHECK(f.m.sequence == 200);
  CHECK(f.res.prefix == 4);
  CHECK(prefix_matches(f, newer));
  CHECK(b.stats().manifests_superseded == 1);
  CHECK(b.stats().manifests_written == 0);
  // A newer one does replace it (shorter is fine: an edit).
  REQUIRE(older.publish(b, 300) == shared_status::ok);
  REQUIRE(b.flush(milliseconds{20000}) == shared_status::ok);
  f = fetch(a, newer.key());
  CHECK(f.m.sequence == 300);
  CHECK(f.m.tokens == older.tokens);
  CHECK(f.res.prefix == 3);

  // Racing writers (manifests only: every block is already there): the largest sequence
  // wins whatever the interleaving.
  std::vector<const std::byte*> none(newer.blocks(), nullptr);
  std::atomic<bool> go{false};
  // a publishes 1000 + the even numbers below 120, b the odd ones, each in a shuffled order.
  auto racer = [&](shared_tier& t, std::uint64_t parity) {
    std::vector<std::uint64_t> seqs;
    for (std::uint64_t i = parity; i < 120; i += 2) seqs.push_back(1000 + i);
    std::shuffle(seqs.begin(), seqs.end(), std::mt19937_64(parity + 17));
    while (!go.load()) std::this_thread::yield();
    for (std::uint64_t seq : seqs) {
      const publish_request r{.sequence = seq, .tokens = newer.tokens, .keys = {}, .payloads = none};
      while (t.publish(t.identify(newer.key()), r) == shared_status::busy) std::this_thread::yield();
    }
  };
  // The largest is b's 1119.
  std::thread ta(racer, std::ref(a), 0), tb(racer, std::ref(b), 1);
  go = true;
  ta.join();
  tb.join();
  REQUIRE(a.flush(milliseconds{30000}) == shared_status::ok);
  REQUIRE(b.flush(milliseconds{30000}) == shared_status::ok);
  f = fetch(a, newer.key());
  CHECK(f.m.sequence == 1119);
  CHECK(f.res.prefix == 4);
  CHECK(a.stats().write_failures.total() == 0);
  CHECK(b.stats().write_failures.total() == 0);
}

TEST_CASE("publish is bounded and never waits for the network, even with a hung node", "[cluster]") {
  auto cfg = tight(tier_config());
  cfg.max_bytes_in_flight = 3 * (block_bytes + 4096) + 64 * 1024;  // three blocks and a manifest
  shared_tier tier(cfg);
  history h("tenant-1", unique("bound"), tpb * 2, 7);
  history h2("tenant-1", unique("bound2"), tpb * 2, 8);
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  // A session whose manifest key the node to hang serves: its read must time out.
  std::string on_hung;
  for (int i = 0; on_hung.empty(); ++i) {
    const std::string id = "probe-" + std::to_string(i);
    if (owner[key_slot(manifest_key(model_a.value, tier.identify({"tenant-1", id}).session).view())] == ms[0])
      on_hung = id;
  }
  const auto probe = tier.identify(session_key{"tenant-1", on_hung});
  hung_node hung(ms[0]);
  REQUIRE(hung.stopped);
  auto t0 = steady::now();
  const shared_status first = h.publish(tier, 1);
  const shared_status second = h2.publish(tier, 1);  // 4 records in flight > 3: refused
  const double publish_ms = ms_since(t0);
  session_manifest m;
  t0 = steady::now();
  const shared_status read = tier.fetch_manifest(probe, m);
  const double read_ms = ms_since(t0);
  hung.resume();
  CHECK(first == shared_status::ok);
  CHECK(second == shared_status::busy);
  CHECK(publish_ms < 100);  // copies 2 MiB and queues; never the network
  CHECK((read == shared_status::timeout || read == shared_status::node_down));
  CHECK(read_ms < double(cfg.cluster.request_timeout.count()) + slack_ms);
  CHECK(tier.flush(milliseconds{20000}) == shared_status::ok);
  CHECK(tier.stats().publishes_refused == 1);
  CHECK(tier.stats().bytes_in_flight == 0);
  REQUIRE(wait_cluster_ok(ms, milliseconds{10000}));
  // Once the node answers again, publishing works (the first publish may or may not have
  // reached it: either way it is there after this one).
  std::this_thread::sleep_for(cfg.cluster.breaker_cooldown);
  REQUIRE(h.publish(tier, 2) == shared_status::ok);
  REQUIRE(tier.flush(milliseconds{20000}) == shared_status::ok);
  shared_tier reader(tier_config());
  const fetched f = fetch(reader, h.key());
  CHECK(f.res.prefix == 2);
  CHECK(prefix_matches(f, h));
}

TEST_CASE("a wrong password is a clean auth_error, for reads and writes", "[cluster]") {
  if (env("ATTNSTORE_REDIS_PASSWORD").empty()) return;
  auto cfg = tier_config();
  cfg.cluster.password = "not-the-password";
  shared_tier tier(cfg);
  history h("tenant-1", unique("auth"), tpb * 2, 9);
  const auto t0 = steady::now();
  fetched f = fetch(tier, h.key());
  CHECK(f.manifest == shared_status::auth_error);
  std::vector<std::byte> out(block_bytes);
  std::byte* ptr = out.data();
  session_manifest m;
  m.tokens = h.tokens;
  m.tokens_per_block = tpb;
  REQUIRE(build_manifest_blocks(m, model_a, {}) == shared_status::ok);
  const block_ref ref = m.ref(0);
  shared_status st = shared_status::ok;
  const fetch_result r = tier.fetch_blocks({&ref, 1}, {&ptr, 1}, {&st, 1});
  CHECK(r.prefix == 0);
  CHECK(r.first_miss == shared_status::auth_error);
  CHECK(ms_since(t0) < 1000);
  REQUIRE(h.publish(tier, 1) == shared_status::ok);
  REQUIRE(tier.flush(milliseconds{20000}) == shared_status::ok);
  CHECK(tier.stats().write_failures.auth_error >= 1);
  CHECK(tier.stats().manifests_written == 0);
  CHECK(to_errc(shared_status::auth_error) == errc::rejected);
}

TEST_CASE("a master killed mid-run gives misses within the bound, never wrong KV, and recovers", "[cluster]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  const int dead = ms[1];
  auto cfg = tight(tier_config());
  shared_tier writer(tier_config()), reader(cfg);
  // Two sessions with a key (manifest or block) on the node to kill, two with none there.
  auto touches = [&](const history& h) {
    session_manifest m;
    m.tokens = h.tokens;
    m.tokens_per_block = tpb;
    REQUIRE(build_manifest_blocks(m, model_a, {}) == shared_status::ok);
    bool on = owner[key_slot(manifest_key(model_a.value, writer.identify(h.key()).session).view())] == dead;
    for (const auto& b : m.blocks) on = on || owner[key_slot(block_key(model_a.value, b.chain).view())] == dead;
    return on;
  };
  std::vector<history> sessions;
  std::vector<bool> on_dead_node;  // worked out here: the loop thread makes no Catch assertion
  int on_dead = 0, elsewhere = 0;
  for (std::uint32_t seed = 20; on_dead < 2 || elsewhere < 2; ++seed) {
    history h("tenant-k", unique("kill"), tpb * 3, seed);
    const bool on = touches(h);
    if (on ? on_dead >= 2 : elsewhere >= 2) continue;
    (on ? on_dead : elsewhere)++;
    sessions.push_back(std::move(h));
    on_dead_node.push_back(on);
  }
  for (auto& h : sessions) REQUIRE(h.publish(writer, 1) == shared_status::ok);
  REQUIRE(writer.flush(milliseconds{30000}) == shared_status::ok);
  for (auto& h : sessions) REQUIRE(fetch(reader, h.key()).res.prefix == h.blocks());

  std::atomic<bool> stop{false}, dead_now{false};
  std::atomic<int> wrong{0}, calls{0}, full{0}, short_fetches{0}, full_elsewhere_while_dead{0},
      full_on_dead_while_dead{0};
  std::atomic<double> worst{0};
  std::map<std::string, int> reasons;
  std::mutex reasons_mu;
  struct joiner {  // stops and joins the loop on every way out (a failed REQUIRE too)
    std::atomic<bool>& stop;
    std::thread t;
    ~joiner() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } loop{stop, std::thread([&] {
           while (!stop.load()) {
             for (std::size_t i = 0; i < sessions.size(); ++i) {
               const history& h = sessions[i];
               const bool was_dead = dead_now.load();
               const auto t0 = steady::now();
               const fetched f = fetch_quiet(reader, h.key());
               const double took = ms_since(t0);
               if (took > worst.load()) worst = took;
               ++calls;
               // Whatever it says, what it calls ok is exactly the history's.
               if (f.manifest == shared_status::ok && !prefix_matches(f, h)) ++wrong;
               if (f.manifest == shared_status::ok && f.res.prefix == h.blocks()) {
                 ++full;
                 if (was_dead && dead_now.load())
                   ++(on_dead_node[i] ? full_on_dead_while_dead : full_elsewhere_while_dead);
               } else {
                 ++short_fetches;
                 std::lock_guard<std::mutex> l(reasons_mu);
                 ++reasons[std::string(to_string(f.manifest != shared_status::ok ? f.manifest : f.res.first_miss))];
               }
             }
           }
         })};
  std::this_thread::sleep_for(milliseconds{300});
  REQUIRE(script("kill-node --node " + std::to_string(dead)) == 0);
  dead_now = true;
  const auto killed = steady::now();
  std::this_thread::sleep_for(milliseconds{2000});
  dead_now = false;
  REQUIRE(script("restart-node --node " + std::to_string(dead)) == 0);
  REQUIRE(wait_cluster_ok(ms, milliseconds{15000}));
  std::this_thread::sleep_for(milliseconds{800});
  stop = true;
  loop.t.join();
  std::string summary;
  for (auto& [k, v] : reasons) summary += k + "=" + std::to_string(v) + " ";
  WARN("kill: " << calls.load() << " fetches, " << full.load() << " full, " << short_fetches.load() << " short ("
                << summary << "); slowest " << worst.load() << " ms; restarted after " << ms_since(killed) << " ms");
  CHECK(wrong.load() == 0);
  CHECK(reasons["node_down"] + reasons["timeout"] > 0);
  CHECK(worst.load() < 2 * double(cfg.cluster.request_timeout.count()) + slack_ms);
  CHECK(full_elsewhere_while_dead.load() > 0);  // the rest of the cluster kept serving
  CHECK(full_on_dead_while_dead.load() == 0);   // nothing of the dead node was served
  // The restarted node came back empty: its keys are misses (not_found) until a turn
  // republishes them. (The first write after the restart may meet the old socket.)
  CHECK(reasons["not_found"] > 0);
  for (auto& h : sessions) {
    fetched f;
    for (int i = 0; i < 10; ++i) {
      REQUIRE(h.publish(writer, 2 + i) == shared_status::ok);
      REQUIRE(writer.flush(milliseconds{30000}) == shared_status::ok);
      f = fetch(reader, h.key());
      if (f.res.prefix == h.blocks()) break;
      std::this_thread::sleep_for(milliseconds{200});
    }
    CHECK(f.res.prefix == h.blocks());
    CHECK(prefix_matches(f, h));
  }
}

TEST_CASE("with replicas, hits resume after a master fails over", "[failover]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  REQUIRE(ms.size() == 3);
  auto cfg = tight(tier_config());
  shared_tier writer(tier_config()), reader(cfg);
  history h("tenant-f", unique("failover"), tpb * 12, 31);
  REQUIRE(h.publish(writer, 1) == shared_status::ok);
  REQUIRE(writer.flush(milliseconds{30000}) == shared_status::ok);
  fetched f = fetch(reader, h.key());
  REQUIRE(f.res.prefix == 12);
  // The master to kill: one holding blocks of the session and having a synced replica.
  int dead = 0, replica = 0;
  for (int p : ms) {
    bool holds = false;
    for (const auto& b : f.m.blocks) holds = holds || owner[key_slot(block_key(model_a.value, b.chain).view())] == p;
    if (!holds || (replica = synced_replica(p)) == 0) continue;
    dead = p;
    break;
  }
  REQUIRE(dead != 0);
  REQUIRE(script("kill-node --node " + std::to_string(dead)) == 0);
  const auto killed = steady::now();
  double worst = 0;
  int wrong = 0;
  std::map<std::string, int> statuses;
  while (ms_since(killed) < 20000) {
    const auto t0 = steady::now();
    f = fetch(reader, h.key());
    worst = std::max(worst, ms_since(t0));
    if (f.manifest == shared_status::ok && !prefix_matches(f, h)) ++wrong;
    const shared_status why = f.manifest != shared_status::ok ? f.manifest : f.res.first_miss;
    ++statuses[std::string(to_string(why))];
    if (f.manifest == shared_status::ok && f.res.prefix == 12) break;
    std::this_thread::sleep_for(milliseconds{50});
  }
  std::string summary;
  for (auto& [k, v] : statuses) summary += k + "=" + std::to_string(v) + " ";
  WARN("failover: full prefix again " << ms_since(killed) << " ms after the kill; " << summary << "; slowest fetch "
                                      << worst << " ms");
  CHECK(wrong == 0);
  REQUIRE(f.res.prefix == 12);
  CHECK(prefix_matches(f, h));
  CHECK(worst < 2 * double(cfg.cluster.request_timeout.count()) + slack_ms);
  CHECK(statuses.size() >= 2);  // misses first, then the hit
  CHECK(reader.stats().block_misses.total() + reader.stats().manifest_misses.total() > 0);
  // The killed node rejoins as its replica's replica, so the cluster is whole again.
  REQUIRE(script("restart-node --node " + std::to_string(dead)) == 0);
  std::vector<int> all = ms;
  all.push_back(replica);
  CHECK(wait_cluster_ok(all, milliseconds{15000}));
}
