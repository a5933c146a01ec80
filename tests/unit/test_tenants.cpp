// Tenants: usage per tier charged exactly, caps that make a flooding tenant push out its
// own sessions and nobody else's, online purge, and all of it rebuilt after a restart
// from the tenant hash every block header carries.
#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::testing;

namespace {

std::size_t slot_of() { return format::slot_bytes(test_geometry.validated()); }

errc put_as(store& s, const std::string& tenant, const conversation& c) {
  return s.put({tenant, c.name()}, c.toks(), 0, c.data(s.block_bytes()));
}

bool intact(store& s, const std::string& tenant, const conversation& c) {
  std::vector<std::byte> out(std::size_t(c.blocks()) * s.block_bytes());
  const auto toks = c.toks();
  const get_result g = s.get({tenant, c.name()}, toks, 0, c.blocks(), out);
  return g.status == errc::ok && g.blocks == c.blocks() && out == c.data(s.block_bytes());
}

// What the tenants are charged adds up to what the tiers hold (nothing leased or in flight).
void require_accounts_add_up(store& s, const std::vector<std::string>& tenants) {
  std::uint64_t dram = 0, ssd = 0, sessions = 0;
  for (const auto& t : tenants) {
    const tenant_stats u = s.tenant_usage(t);
    dram += u.dram_bytes;
    ssd += u.ssd_bytes;
    sessions += u.sessions;
  }
  const store_stats st = s.stats();
  CHECK(dram == st.dram_used_bytes);
  CHECK(ssd == st.ssd_used_bytes);
  CHECK(sessions == st.sessions);
}

}  // namespace

TEST_CASE("tenants: usage is charged per tier and rebuilt from the headers after a restart", "[tenants]") {
  temp_dir dir("tenants-usage");
  const std::size_t slot = slot_of();
  const conversation a1{1, 100}, a2{2, 64}, b1{3, 33};  // 4, 2 and 2 blocks
  hash128 ta{};
  {
    store s(small_config(dir.str(), 16, 32));
    REQUIRE(put_as(s, "alpha", a1) == errc::ok);
    REQUIRE(put_as(s, "alpha", a2) == errc::ok);
    REQUIRE(put_as(s, "beta", b1) == errc::ok);
    tenant_stats u = s.tenant_usage("alpha");
    ta = u.tenant;
    CHECK(u.tenant == s.tenant_of("alpha"));
    CHECK(!(u.tenant == hash_tenant("alpha")));  // keyed by the store's secret, not guessable
    CHECK(u.sessions == 2);
    CHECK(u.dram_bytes == 6 * slot);
    CHECK(u.ssd_bytes == 0);
    CHECK(s.tenant_usage("beta").dram_bytes == 2 * slot);
    CHECK(s.tenant_usage("nobody").sessions == 0);
    REQUIRE(s.demote({"alpha", a1.name()}) == errc::ok);
    u = s.tenant_usage("alpha");
    CHECK(u.dram_bytes == 2 * slot);
    CHECK(u.ssd_bytes == 4 * slot);
    require_accounts_add_up(s, {"alpha", "beta"});
    REQUIRE(s.drop({"alpha", a2.name()}) == errc::ok);
    CHECK(s.tenant_usage("alpha").sessions == 1);
    CHECK(s.tenant_usage("alpha").dram_bytes == 0);
    REQUIRE(s.close() == errc::ok);
  }
  store s(small_config(dir.str(), 16, 32));
  const tenant_stats u = s.tenant_usage("alpha");
  CHECK(u.tenant == ta);  // the secret is the store's, kept in its MANIFEST
  CHECK(u.sessions == 1);
  CHECK(u.ssd_bytes == 4 * slot);
  CHECK(s.tenant_usage("beta").ssd_bytes == 2 * slot);
  require_accounts_add_up(s, {"alpha", "beta"});
  CHECK(intact(s, "alpha", a1));
  CHECK(intact(s, "beta", b1));
}

TEST_CASE("tenants: a tenant flooding DRAM pushes out its own sessions, not another tenant's within its share",
          "[tenants]") {
  const std::size_t slot = slot_of();
  std::vector<conversation> quiet, flood;
  for (std::uint64_t i = 0; i < 8; ++i) quiet.push_back({100 + i, 64});  // 16 blocks
  for (std::uint64_t i = 0; i < 100; ++i) flood.push_back({1000 + i, 64});
  for (const bool capped : {true, false}) {
    INFO("flooding tenant capped: " << capped);
    store_config c = small_config("", 40, 0);  // DRAM only: what leaves DRAM is gone
    if (capped) c.tenant_quotas = {{"flood", 20 * slot, 0}};
    store s(c);
    for (const auto& q : quiet) REQUIRE(put_as(s, "quiet", q) == errc::ok);
    for (const auto& f : flood) REQUIRE(put_as(s, "flood", f) == errc::ok);
    std::size_t kept = 0;
    for (const auto& q : quiet) kept += intact(s, "quiet", q);
    const tenant_stats fu = s.tenant_usage("flood");
    if (capped) {
      CHECK(kept == quiet.size());
      CHECK(fu.dram_bytes <= 20 * slot);
      CHECK(fu.dram_quota_bytes == 20 * slot);
      CHECK(fu.quota_evicted_sessions >= 80);  // no SSD: its own sessions were dropped, not demoted
      CHECK(fu.quota_demoted_blocks == 0);
      // The newest of its own sessions are the ones it kept.
      CHECK(intact(s, "flood", flood.back()));
    } else {
      CHECK(kept < quiet.size());  // the same flood without a cap does push them out
    }
    require_accounts_add_up(s, {"quiet", "flood"});
  }
}

TEST_CASE("tenants: caps hold on both tiers; the flooding tenant's overflow leaves, the others' stays", "[tenants]") {
  temp_dir dir("tenants-ssd");
  const std::size_t slot = slot_of();
  std::vector<conversation> quiet, flood;
  for (std::uint64_t i = 0; i < 10; ++i) quiet.push_back({100 + i, 96});   // 30 blocks
  for (std::uint64_t i = 0; i < 80; ++i) flood.push_back({1000 + i, 96});  // 240 blocks
  store_config c = small_config(dir.str(), 32, 96);
  c.tenant_quotas = {{"flood", 12 * slot, 36 * slot}};
  store s(c);
  for (const auto& q : quiet) REQUIRE(put_as(s, "quiet", q) == errc::ok);
  for (const auto& f : flood) {
    REQUIRE(put_as(s, "flood", f) == errc::ok);
    const tenant_stats u = s.tenant_usage("flood");
    REQUIRE(u.dram_bytes <= 12 * slot);  // trimmed back at every save
    REQUIRE(u.ssd_bytes <= 36 * slot);
  }
  for (const auto& q : quiet) CHECK(intact(s, "quiet", q));
  CHECK(intact(s, "flood", flood.back()));
  const tenant_stats fu = s.tenant_usage("flood");
  CHECK(fu.quota_demoted_blocks > 0);    // its DRAM overflow went to SSD...
  CHECK(fu.quota_evicted_sessions > 0);  // ...and its SSD overflow was dropped
  CHECK(s.tenant_usage("quiet").quota_evicted_sessions == 0);
  require_accounts_add_up(s, {"quiet", "flood"});
  // A cap set online takes effect at the tenant's next save.
  REQUIRE(s.set_tenant_quota("quiet", 6 * slot, 0) == errc::ok);
  REQUIRE(put_as(s, "quiet", conversation{200, 96}) == errc::ok);
  CHECK(s.tenant_usage("quiet").dram_bytes <= 6 * slot);
  CHECK(s.tenant_usage("quiet").sessions == quiet.size() + 1);  // demoted, not dropped: SSD has room
  for (const auto& q : quiet) CHECK(intact(s, "quiet", q));
}

TEST_CASE("tenants: purge drops every session of one tenant online, durably, and nothing else", "[tenants]") {
  temp_dir dir("tenants-purge");
  std::vector<conversation> convs;
  for (std::uint64_t i = 0; i < 12; ++i) convs.push_back({i + 1, 40 + 13 * i});
  auto tenant_of = [](const conversation& c) { return c.id % 3 == 0 ? std::string("gone") : std::string("stays"); };
  {
    store s(small_config(dir.str(), 24, 64));
    for (const auto& c : convs) REQUIRE(put_as(s, tenant_of(c), c) == errc::ok);
    s.demote({"gone", convs[2].name()});  // one of them on SSD only
    // A load of one of them holds a lease while the purge runs.
    std::vector<block_view> views(8);
    read_lease lease(8);
    const auto toks = convs[5].toks();
    REQUIRE(s.acquire({"gone", convs[5].name()}, toks, views, lease).status == errc::ok);
    const std::vector<std::byte> before(views[0].payload, views[0].payload + s.block_bytes());
    std::uint32_t dropped = 0;
    REQUIRE(s.purge("gone", &dropped) == errc::ok);
    CHECK(dropped == 4);
    CHECK(s.purge("gone") == errc::not_found);
    CHECK(s.purge("never-was") == errc::not_found);
    // The lease still reads what it was given.
    CHECK(std::equal(before.begin(), before.end(), views[0].payload));
    lease.release();
    for (const auto& c : convs) {
      const auto t = c.toks();
      CHECK((s.lookup({tenant_of(c), c.name()}, t).tokens == 0) == (tenant_of(c) == "gone"));
    }
    CHECK(s.tenant_usage("gone").sessions == 0);
    require_accounts_add_up(s, {"gone", "stays"});
    // The tenant may come back; its new sessions are its own.
    REQUIRE(put_as(s, "gone", convs[0]) == errc::ok);
  }
  store s(small_config(dir.str(), 24, 64));  // a crash-free restart: the purge stuck
  for (const auto& c : convs) {
    if (tenant_of(c) == "stays") CHECK(intact(s, "stays", c));
    if (tenant_of(c) == "gone" && c.id != convs[0].id) {
      const auto t = c.toks();
      CHECK(s.lookup({"gone", c.name()}, t).tokens == 0);
    }
  }
  CHECK(s.tenant_usage("gone").sessions == 1);
}

TEST_CASE("tenants: hostile ids are only hashed; the default tenant is a tenant", "[tenants]") {
  store s(small_config("", 32, 0));
  const std::string huge(1 << 20, 'x'), nul("a\0b", 3), nul2("a\0c", 3);
  const conversation c{1, 40};
  for (const std::string& t : {huge, nul, nul2, std::string()}) REQUIRE(put_as(s, t, c) == errc::ok);
  CHECK(s.tenant_usage(nul).sessions == 1);
  CHECK(s.tenant_usage(nul2).sessions == 1);
  CHECK(!(s.tenant_of(nul) == s.tenant_of(nul2)));
  CHECK(s.tenant_usage("").sessions == 1);
  REQUIRE(s.purge(nul) == errc::ok);
  CHECK(intact(s, nul2, c));
  CHECK(intact(s, huge, c));
  std::string m;
  s.metrics(m);
  CHECK(m.find(huge.substr(0, 64)) == std::string::npos);  // ids never appear in clear
  CHECK(m.find("attnstore_tenant_bytes{tenant=\"") != std::string::npos);
}

TEST_CASE("tenants: concurrent saves, purges and drops of several tenants keep the accounts exact",
          "[tenants][concurrency]") {
  temp_dir dir("tenants-race");
  const std::size_t slot = slot_of();
  store_config c = small_config(dir.str(), 48, 96);
  c.tenant_quotas = {{"t0", 16 * slot, 32 * slot}, {"t1", 16 * slot, 32 * slot}};
  store s(c);
  const std::vector<std::string> tenants{"t0", "t1", "t2"};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (std::uint32_t w = 0; w < 3; ++w)
    threads.emplace_back([&, w] {
      for (std::uint64_t i = 0; i < 150; ++i) {
        const conversation conv{w * 1000 + i % 20, 32 + (i * 7) % 90};
        (void)put_as(s, tenants[w], conv);
        if (i % 11 == 0) (void)s.drop({tenants[w], conv.name()});
      }
    });
  threads.emplace_back([&] {
    while (!stop.load()) {
      (void)s.purge("t2");
      std::this_thread::yield();
    }
  });
  for (std::size_t i = 0; i < 3; ++i) threads[i].join();
  stop = true;
  threads.back().join();
  require_accounts_add_up(s, tenants);
  CHECK(s.tenant_usage("t0").dram_bytes <= 16 * slot);
  CHECK(s.tenant_usage("t1").ssd_bytes <= 32 * slot);
}

TEST_CASE("tenants: loads that promote a capped tenant's blocks make room from its other sessions", "[tenants]") {
  temp_dir dir("tenants-load");
  const std::size_t slot = slot_of();
  store_config c = small_config(dir.str(), 32, 64);
  c.tenant_quotas = {{"capped", 8 * slot, 0}};
  store s(c);
  std::vector<conversation> convs;
  for (std::uint64_t i = 0; i < 4; ++i) convs.push_back({10 + i, 96});  // 3 blocks each
  for (const auto& cv : convs) {
    REQUIRE(put_as(s, "capped", cv) == errc::ok);
    REQUIRE(s.demote({"capped", cv.name()}) == errc::ok);
  }
  REQUIRE(s.tenant_usage("capped").dram_bytes == 0);
  for (int round = 0; round < 2; ++round)
    for (const auto& cv : convs) {
      CHECK(intact(s, "capped", cv));  // promoted into DRAM (there is room)
      CHECK(s.tenant_usage("capped").dram_bytes <= 8 * slot);
    }
  CHECK(s.tenant_usage("capped").quota_demoted_blocks > 0);
  require_accounts_add_up(s, {"capped"});
}
