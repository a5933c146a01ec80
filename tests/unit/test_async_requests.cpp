// async_requests: many loads and saves in flight, completion order differing from
// submission order, cancellation before and while running, and an engine thread that
// never waits on a stalled SSD.
#include <catch2/catch.hpp>

#include <chrono>
#include <map>
#include <set>

#include "attnstore/async_requests.hpp"
#include "attnstore/io/fault_device.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::testing;

namespace {

const std::string names[] = {"s0",  "s1",  "s2",  "s3",  "s4",  "s5",  "s6",  "s7",  "s8",  "s9", "s10",
                             "s11", "s12", "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20"};
session_key key_of(const conversation& c) { return {"t", names[c.id]}; }

/// A store whose SSD reads take `latency_us` each (a slow or stalled device).
struct slow_store {
  temp_dir dir{"async"};
  fault_device* faults = nullptr;
  std::unique_ptr<store> kv;
  explicit slow_store(std::size_t dram_blocks = 64) {
    store_config c = small_config(dir.str(), dram_blocks, 256);
    c.prefetch = false;
    c.wrap_device = [this](std::unique_ptr<block_device> inner, const ssd_space&) -> std::unique_ptr<block_device> {
      auto d = std::make_unique<fault_device>(std::move(inner), fault_config{});
      faults = d.get();
      return d;
    };
    kv = std::make_unique<store>(c);
  }
  void set_latency(unsigned us) {
    fault_config f;
    f.latency_us = us;
    faults->set_faults(f);
  }
};

}  // namespace

TEST_CASE("async: loads and saves in flight finish out of order, each exact", "[async]") {
  slow_store s;
  const std::size_t bb = s.kv->block_bytes();
  std::vector<conversation> convs;
  for (std::uint64_t i = 1; i <= 12; ++i) convs.push_back({i, 40 + 17 * i});
  async_requests io(*s.kv, {3, 64});
  // Saves through the async path.
  std::vector<std::vector<token_id>> toks;
  std::vector<std::vector<std::byte>> data;
  for (const auto& c : convs) {
    toks.push_back(c.toks());
    data.push_back(c.data(bb));
  }
  for (std::size_t i = 0; i < convs.size(); ++i)
    REQUIRE(io.submit_save(100 + i, key_of(convs[i]), toks[i], 0, data[i]) == errc::ok);
  std::vector<finished_request> done(64);
  std::size_t got = 0;
  for (int spin = 0; got < convs.size() && spin < 10000; ++spin) {
    got += io.get_finished(std::span(done).subspan(got));
    if (got < convs.size()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(got == convs.size());
  for (std::size_t i = 0; i < got; ++i) {
    CHECK(done[i].kind == request_kind::save);
    CHECK(done[i].status == errc::ok);
  }
  // Half the sessions to SSD, whose reads are slow: their loads finish after the DRAM
  // ones submitted later.
  for (std::size_t i = 0; i < convs.size(); i += 2) REQUIRE(s.kv->demote(key_of(convs[i])) == errc::ok);
  s.set_latency(20000);  // 20 ms per SSD piece
  std::vector<std::vector<std::byte>> out;
  for (const auto& c : convs) out.emplace_back(std::size_t(c.blocks()) * bb);
  for (std::size_t i = 0; i < convs.size(); ++i)
    REQUIRE(io.submit_load(i, key_of(convs[i]), toks[i], 0, convs[i].blocks(), out[i]) == errc::ok);
  CHECK(io.submit_load(3, key_of(convs[3]), toks[3], 0, convs[3].blocks(), out[3]) == errc::invalid_argument);
  got = 0;
  for (int spin = 0; got < convs.size() && spin < 20000; ++spin) {
    got += io.get_finished(std::span(done).subspan(got));
    if (got < convs.size()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(got == convs.size());
  std::vector<std::uint64_t> order;
  for (std::size_t i = 0; i < got; ++i) {
    const finished_request& f = done[i];
    INFO("request " << f.id);
    CHECK(f.kind == request_kind::load);
    CHECK(f.status == errc::ok);
    CHECK(f.blocks == convs[f.id].blocks());
    CHECK(f.tokens == convs[f.id].tokens);
    CHECK(out[f.id] == data[f.id]);
    order.push_back(f.id);
  }
  CHECK(order != std::vector<std::uint64_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));  // not submission order
  CHECK(order.front() % 2 == 1);                                                       // a DRAM load finished first
  CHECK(io.outstanding() == 0);
}

TEST_CASE("async: the engine thread never waits on a stalled SSD; cancellation", "[async]") {
  slow_store s;
  const std::size_t bb = s.kv->block_bytes();
  const conversation a{1, 200}, b{2, 100};
  REQUIRE(put_all(*s.kv, a) == errc::ok);
  REQUIRE(put_all(*s.kv, b) == errc::ok);
  REQUIRE(s.kv->demote(key_of(a)) == errc::ok);
  REQUIRE(s.kv->demote(key_of(b)) == errc::ok);
  s.set_latency(300000);             // 300 ms per SSD piece: a stalled device
  async_requests io(*s.kv, {1, 8});  // one worker: b waits behind a
  const auto ta = a.toks(), tb = b.toks();
  std::vector<std::byte> oa(std::size_t(a.blocks()) * bb), ob(std::size_t(b.blocks()) * bb);

  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(io.submit_load(1, key_of(a), ta, 0, a.blocks(), oa) == errc::ok);
  REQUIRE(io.submit_load(2, key_of(b), tb, 0, b.blocks(), ob) == errc::ok);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a is running now
  std::vector<finished_request> done(8);
  CHECK(io.get_finished(done) == 0);
  CHECK(io.cancel(2));   // queued: it will not run
  CHECK(io.cancel(1));   // running: reported cancelled when it ends
  CHECK(!io.cancel(9));  // not outstanding
  std::size_t n = io.get_finished(done);
  const double engine_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(engine_ms < 250);  // submit, poll and cancel never waited on the device
  REQUIRE(n == 1);
  CHECK(done[0].id == 2);
  CHECK(done[0].cancelled);
  CHECK(done[0].status == errc::rejected);
  CHECK(std::all_of(ob.begin(), ob.end(), [](std::byte x) { return x == std::byte{0}; }));  // never touched
  REQUIRE(io.wait(1));
  n = io.get_finished(done);
  REQUIRE(n == 1);
  CHECK(done[0].id == 1);
  CHECK(done[0].cancelled);
  CHECK(done[0].status == errc::ok);  // it ran to the end: its buffer is free now
  CHECK(io.outstanding() == 0);

  // Full: max_requests outstanding, then retry.
  for (std::uint64_t i = 0; i < 8; ++i) REQUIRE(io.submit_load(10 + i, key_of(a), ta, 0, a.blocks(), oa) == errc::ok);
  CHECK(io.submit_load(99, key_of(a), ta, 0, a.blocks(), oa) == errc::retry);
  for (std::uint64_t i = 0; i < 8; ++i) (void)io.cancel(10 + i);
  s.set_latency(0);
}

TEST_CASE("async: a scheduler step's lookups in one call", "[async]") {
  slow_store s;
  std::vector<conversation> convs{{1, 70}, {2, 33}, {3, 129}};
  for (const auto& c : convs) REQUIRE(put_all(*s.kv, c) == errc::ok);
  async_requests io(*s.kv);
  std::vector<std::vector<token_id>> toks;
  for (const auto& c : convs) toks.push_back(c.toks());
  toks[2].resize(100);  // a shorter prompt: 100 of 129 reusable
  const session_key keys[] = {key_of(convs[0]), key_of(convs[1]), key_of(convs[2]), {"elsewhere", "nobody"}};
  const std::span<const token_id> prompts[] = {toks[0], toks[1], toks[2], toks[0]};
  lookup_result r[4];
  io.lookup_batch(keys, prompts, r);
  CHECK(r[0].tokens == 70);
  CHECK(r[1].tokens == 33);
  CHECK(r[2].tokens == 100);
  CHECK(r[3].tokens == 0);
}

TEST_CASE("async: cancel and resubmit in rounds behind a stalled load; every request runs once", "[async]") {
  slow_store s;
  const std::size_t bb = s.kv->block_bytes();
  const conversation a{1, 200}, b{2, 100};
  REQUIRE(put_all(*s.kv, a) == errc::ok);
  REQUIRE(put_all(*s.kv, b) == errc::ok);
  REQUIRE(s.kv->demote(key_of(a)) == errc::ok);
  s.set_latency(100000);  // a's SSD reads stall the only worker
  async_requests io(*s.kv, {1, 4});
  const auto ta = a.toks(), tb = b.toks();
  std::vector<std::byte> oa(std::size_t(a.blocks()) * bb);
  std::vector<std::vector<std::byte>> ob(3, std::vector<std::byte>(std::size_t(b.blocks()) * bb));
  REQUIRE(io.submit_load(1, key_of(a), ta, 0, a.blocks(), oa) == errc::ok);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::vector<finished_request> done(8);
  for (int round = 0; round < 5; ++round) {  // 3 queued and cancelled per round: the queue holds only live ones
    for (std::uint64_t i = 0; i < 3; ++i)
      REQUIRE(io.submit_load(10 + i, key_of(b), tb, 0, b.blocks(), ob[i]) == errc::ok);
    CHECK(io.submit_load(99, key_of(b), tb, 0, b.blocks(), ob[0]) == errc::retry);  // 4 outstanding
    for (std::uint64_t i = 0; i < 3; ++i) CHECK(io.cancel(10 + i));
    REQUIRE(io.get_finished(done) == 3);
  }
  for (std::uint64_t i = 0; i < 3; ++i)
    REQUIRE(io.submit_load(20 + i, key_of(b), tb, 0, b.blocks(), ob[i]) == errc::ok);
  s.set_latency(0);
  std::map<std::uint64_t, int> seen;
  for (int spin = 0; seen.size() < 4 && spin < 20000; ++spin) {
    const std::size_t n = io.get_finished(done);
    for (std::size_t i = 0; i < n; ++i) {
      ++seen[done[i].id];
      CHECK(done[i].status == errc::ok);
      CHECK(!done[i].cancelled);
    }
    if (seen.size() < 4) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(seen == std::map<std::uint64_t, int>{{1, 1}, {20, 1}, {21, 1}, {22, 1}});
  for (const auto& o : ob) CHECK(o == b.data(bb));
  CHECK(oa == a.data(bb));
  CHECK(io.outstanding() == 0);
  // A client-chosen id cannot make a slot grow without bound.
  const std::string long_id(async_requests::max_key_bytes + 1, 'x');
  CHECK(io.submit_load(30, {"t", long_id}, tb, 0, b.blocks(), ob[0]) == errc::invalid_argument);
}

TEST_CASE("async: a model with a checkpoint (state groups) is refused, naming the hooks", "[async]") {
  temp_dir dir("async-state");
  store_config c = small_config(dir.str(), 16, 32);
  c.geometry = kv_geometry{};
  c.geometry.groups = {kv_group{.kind = layer_kind::state, .num_layers = 2, .state_bytes = 4096},
                       kv_group{.kind = layer_kind::full, .num_layers = 2, .num_kv_heads = 2, .head_dim = 64}};
  c.geometry.tokens_per_block = 32;
  c.dram_bytes = 16 * format::slot_bytes(c.geometry.validated());
  c.ssd_bytes = 32 * format::slot_bytes(c.geometry.validated());
  store s(c);
  CHECK_THROWS_WITH(async_requests(s, {}), Catch::Contains("use attnstore::hooks"));
}
