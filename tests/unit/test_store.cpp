#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "attnstore/io/fault_device.hpp"
#include "attnstore/io/memory_device.hpp"
#include "attnstore/store.hpp"
#include "support/kv_data.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::make_blocks;
using attnstore::testing::make_tokens;
using attnstore::testing::temp_dir;

using attnstore::testing::conversation;
using attnstore::testing::put_all;
using attnstore::testing::require_exact;
using attnstore::testing::small_config;
using attnstore::testing::test_geometry;

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
  // Another session of the tenant with the same history finds its whole blocks (a
  // shared prefix); the partial last block is s1's own.
  CHECK(s.lookup({"t", "s2"}, prompt).tokens == 96);
  CHECK(s.get({"other-tenant", "s1"}, prompt, 0, 4, out).status == errc::not_found);
  auto st = s.stats();
  CHECK(st.blocks_served_dram == 4);
  CHECK(st.lookup_hits == 2);
  CHECK(st.lookup_misses == 1);
  CHECK(st.miss_not_found == 1);
}

TEST_CASE("store: demote to SSD, get back verified, promote into free DRAM") {
  temp_dir d("store");
  store s(small_config(d.str(), 16, 64));
  conversation c{7, 200};
  REQUIRE(put_all(s, c) == errc::ok);
  REQUIRE(s.demote({"t", c.name()}) == errc::ok);
  auto toks = c.toks();
  lookup_result r = s.lookup({"t", c.name()}, toks);
  CHECK(r.tokens == 200);
  CHECK(r.ssd_blocks == c.blocks());
  CHECK(s.stats().dram_used_bytes == 0);
  require_exact(s, c);
  auto st = s.stats();
  CHECK(st.blocks_served_ssd == c.blocks());
  CHECK(st.promoted_blocks == c.blocks());
  CHECK(s.lookup({"t", c.name()}, toks).dram_blocks == c.blocks());
  require_exact(s, c);  // now from DRAM
  CHECK(s.stats().blocks_served_dram == c.blocks());
}

TEST_CASE("store: a full DRAM tier demotes least recently used sessions to SSD") {
  temp_dir d("store");
  store s(small_config(d.str(), 8, 256));
  std::vector<conversation> cs;
  for (std::uint64_t i = 0; i < 10; ++i) cs.push_back({100 + i, 96});  // 3 blocks each, 30 blocks > 8
  for (auto& c : cs) REQUIRE(put_all(s, c) == errc::ok);
  auto st = s.stats();
  CHECK(st.demoted_blocks >= 22);
  CHECK(st.evicted_sessions == 0);
  // The newest sessions are in DRAM, the oldest on SSD; all are served exactly.
  auto last = cs.back().toks();
  CHECK(s.lookup({"t", cs.back().name()}, last).dram_blocks == 3);
  auto first = cs.front().toks();
  CHECK(s.lookup({"t", cs.front().name()}, first).ssd_blocks == 3);
  for (auto& c : cs) require_exact(s, c);
}

TEST_CASE("store: without an SSD tier a full DRAM evicts the LRU session; pinned ones stay") {
  store s(small_config("", 6, 0));
  conversation a{1, 64}, b{2, 64}, c{3, 64}, e{4, 64};  // 2 blocks each
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(s.pin({"t", a.name()}) == errc::ok);
  REQUIRE(put_all(s, c) == errc::ok);
  REQUIRE(put_all(s, e) == errc::ok);  // needs room: b is the LRU unpinned session
  auto ta = a.toks(), tb = b.toks(), te = e.toks();
  CHECK(s.lookup({"t", a.name()}, ta).tokens == 64);
  CHECK(s.lookup({"t", b.name()}, tb).tokens == 0);
  CHECK(s.lookup({"t", e.name()}, te).tokens == 64);
  CHECK(s.stats().evicted_sessions == 1);
  REQUIRE(s.unpin({"t", a.name()}) == errc::ok);
  CHECK(s.pin({"t", "nobody"}) == errc::not_found);
}

TEST_CASE("store: incremental turns re-save only the partial block and what follows") {
  temp_dir d("store");
  store s(small_config(d.str(), 32, 64));
  const std::size_t bb = s.block_bytes();
  conversation turn1{9, 70}, turn2{9, 150};  // same session, history grows
  REQUIRE(put_all(s, turn1) == errc::ok);    // blocks 0,1 full, block 2 partial (6 tokens)
  // Turn 2: blocks 0 and 1 are stored; pass block 2 (now full) to 4 (partial).
  auto toks2 = turn2.toks();
  REQUIRE(s.put({"t", turn2.name()}, toks2, 2, turn2.data(bb, 2)) == errc::ok);
  require_exact(s, turn2);
  CHECK(s.stats().put_blocks == 3 + 3);
  // first_block beyond what is stored for these tokens is refused.
  conversation other{10, 150};
  auto toks3 = other.toks();
  CHECK(s.put({"t", turn2.name()}, toks3, 2, other.data(bb, 2)) == errc::rejected);
  require_exact(s, turn2);  // unchanged
}

TEST_CASE("store: an edited history reuses exactly up to the edit and never serves stale KV") {
  store s(small_config("", 32, 0));
  const std::size_t bb = s.block_bytes();
  conversation c{11, 128};
  REQUIRE(put_all(s, c) == errc::ok);
  auto edited = c.toks();
  edited[70] = 31999;  // inside block 2
  CHECK(s.lookup({"t", c.name()}, edited).tokens == 70);
  std::vector<std::byte> out(4 * bb);
  get_result g = s.get({"t", c.name()}, edited, 0, 4, out);
  CHECK(g.status == errc::not_found);  // only a prefix matches
  CHECK(g.blocks == 3);                // blocks 0, 1 whole and block 2 up to the edit
  CHECK(g.tokens == 70);
  CHECK(std::equal(out.begin(), out.begin() + long(3 * bb), c.data(bb).begin()));
  // Saving the edited history replaces the old blocks from the edit on.
  auto blocks = make_blocks(bb, 12, 0, 4);
  REQUIRE(s.put({"t", c.name()}, edited, 0, blocks) == errc::ok);
  CHECK(s.lookup({"t", c.name()}, edited).tokens == 128);
  auto orig = c.toks();
  CHECK(s.lookup({"t", c.name()}, orig).tokens == 70);
}

TEST_CASE("store: reopening rebuilds the index from SSD, bit-exact") {
  temp_dir d("store");
  std::vector<conversation> cs{{1, 33}, {2, 256}, {3, 1}, {4, 97}};
  {
    auto cfg = small_config(d.str(), 8, 64);
    cfg.write_through = true;
    store s(cfg);
    for (auto& c : cs) REQUIRE(put_all(s, c) == errc::ok);
    REQUIRE(s.drop({"t", "s3"}) == errc::ok);
  }
  store s(small_config(d.str(), 8, 64));
  auto st = s.stats();
  CHECK(st.recovered_sessions == 3);
  CHECK(st.recovered_blocks == 2 + 8 + 4);
  for (auto& c : cs) {
    auto t = c.toks();
    if (c.id == 3) {
      CHECK(s.lookup({"t", c.name()}, t).tokens == 0);
      continue;
    }
    require_exact(s, c);
  }
}

TEST_CASE("store: a later version of a block wins after restart; the old one is gone") {
  temp_dir d("store");
  conversation v1{5, 40}, v2{5, 60};
  {
    auto cfg = small_config(d.str(), 8, 64);
    cfg.write_through = true;
    store s(cfg);
    REQUIRE(put_all(s, v1) == errc::ok);
    auto t2 = v2.toks();
    REQUIRE(s.put({"t", v2.name()}, t2, 1, v2.data(s.block_bytes(), 1)) == errc::ok);
  }
  store s(small_config(d.str(), 8, 64));
  require_exact(s, v2);
  CHECK(s.stats().ssd_used_bytes == 2 * format::slot_bytes(test_geometry.validated()));
}

TEST_CASE("store: flipped bytes on disk are a miss, never wrong data") {
  temp_dir d("store");
  conversation c{21, 128};
  const std::size_t slot = format::slot_bytes(test_geometry.validated());
  const std::size_t hb = format::header_bytes(test_geometry.tokens_per_block);
  {
    store s(small_config(d.str(), 8, 16));
    REQUIRE(put_all(s, c) == errc::ok);
    REQUIRE(s.demote({"t", c.name()}) == errc::ok);
  }
  // Corrupt block 2's payload (slot 2 of file 0: slots are handed out lowest first).
  {
    int fd = ::open((d.str() + "/blocks-0000.dat").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    char byte = 0;
    REQUIRE(::pread(fd, &byte, 1, off_t(2 * slot + hb + 1000)) == 1);
    byte ^= 0x40;
    REQUIRE(::pwrite(fd, &byte, 1, off_t(2 * slot + hb + 1000)) == 1);
    ::close(fd);
  }
  store s(small_config(d.str(), 8, 16));
  // Recovery reads headers only; the payload is verified on its first read: block 2
  // fails there and is dropped with what follows, so the session ends after block 1.
  auto t = c.toks();
  std::vector<std::byte> out(4 * s.block_bytes());
  get_result g = s.get({"t", c.name()}, t, 0, 4, out);
  CHECK(g.status == errc::checksum_error);
  CHECK(g.blocks == 2);
  CHECK(g.tokens == 64);
  CHECK(std::equal(out.begin(), out.begin() + long(2 * s.block_bytes()), c.data(s.block_bytes()).begin()));
  CHECK(s.stats().checksum_failures == 1);
  CHECK(s.lookup({"t", c.name()}, t).tokens == 64);
}

TEST_CASE("store: corruption after open is caught at read time and the block is dropped") {
  temp_dir d("store");
  conversation c{22, 128};
  memory_device* mem = nullptr;
  auto cfg = small_config(d.str(), 8, 16);
  cfg.wrap_device = [&](std::unique_ptr<block_device>, const ssd_space& sp) -> std::unique_ptr<block_device> {
    auto m = std::make_unique<memory_device>(sp.file_sizes(), 4096);
    mem = m.get();
    return m;
  };
  store s(cfg);
  REQUIRE(put_all(s, c) == errc::ok);
  REQUIRE(s.demote({"t", c.name()}) == errc::ok);
  const std::size_t slot = format::slot_bytes(test_geometry.validated());
  mem->file_bytes(0)[1 * slot + format::header_bytes(32) + 5] ^= std::byte{1};
  auto t = c.toks();
  std::vector<std::byte> out(4 * s.block_bytes());
  get_result g = s.get({"t", c.name()}, t, 0, 4, out);
  CHECK(g.status == errc::checksum_error);
  CHECK(g.blocks == 1);
  CHECK(g.tokens == 32);
  CHECK(s.stats().checksum_failures == 1);
  CHECK(s.lookup({"t", c.name()}, t).tokens == 32);  // the bad block and its successors are gone
  CHECK(s.stats().ssd_used_bytes == slot);           // and their slots were freed
}

TEST_CASE("store: I/O errors degrade to misses; failed demotion keeps the DRAM copy") {
  temp_dir d("store");
  fault_device* faults = nullptr;
  auto cfg = small_config(d.str(), 16, 64);
  cfg.wrap_device = [&](std::unique_ptr<block_device> real, const ssd_space&) -> std::unique_ptr<block_device> {
    auto f = std::make_unique<fault_device>(std::move(real));
    faults = f.get();
    return f;
  };
  store s(cfg);
  conversation c{31, 160};
  REQUIRE(put_all(s, c) == errc::ok);
  fault_config broken;
  broken.error_rate = 1.0;
  faults->set_faults(broken);
  CHECK(s.demote({"t", c.name()}) == errc::device_error);
  faults->set_faults({});
  require_exact(s, c);  // nothing was lost
  REQUIRE(s.demote({"t", c.name()}) == errc::ok);
  broken.fail_writes = false;
  faults->set_faults(broken);
  auto t = c.toks();
  std::vector<std::byte> out(std::size_t(c.blocks()) * s.block_bytes());
  get_result g = s.get({"t", c.name()}, t, 0, c.blocks(), out);
  CHECK(g.status == errc::device_error);
  CHECK(g.blocks == 0);
  CHECK(s.stats().miss_io_error == 1);
  faults->set_faults({});
  require_exact(s, c);  // an I/O error does not destroy the block
  CHECK(s.stats().io_errors > 0);
}

TEST_CASE("store: ENOSPC on write-through is a clean refusal and the store keeps working") {
  temp_dir d("store");
  fault_device* faults = nullptr;
  auto cfg = small_config(d.str(), 16, 64);
  cfg.write_through = true;
  cfg.wrap_device = [&](std::unique_ptr<block_device> real, const ssd_space&) -> std::unique_ptr<block_device> {
    auto f = std::make_unique<fault_device>(std::move(real));
    faults = f.get();
    return f;
  };
  store s(cfg);
  conversation a{41, 64}, b{42, 64};
  REQUIRE(put_all(s, a) == errc::ok);
  fault_config full;
  full.write_budget = 0;  // every further write: ENOSPC
  faults->set_faults(full);
  CHECK(put_all(s, b) == errc::no_space);
  auto tb = b.toks();
  CHECK(s.lookup({"t", b.name()}, tb).tokens == 0);  // nothing half-committed is visible
  require_exact(s, a);
  CHECK(s.stats().no_space == 1);
  faults->set_faults({});
  REQUIRE(put_all(s, b) == errc::ok);
  require_exact(s, b);
  CHECK(s.stats().dram_used_bytes == 4 * format::slot_bytes(test_geometry.validated()));
}

TEST_CASE("store: bad input is refused with the field and the allowed values named") {
  auto err = [](store_config c) {
    try {
      store s(std::move(c));
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  temp_dir d("store");
  auto c = small_config("", 8, 0);
  c.geometry.num_layers = 0;
  CHECK_THAT(err(c), Catch::Contains("num_layers is 0"));
  c = small_config("", 8, 0);
  c.geometry.dtype = static_cast<dtype>(17);
  CHECK_THAT(err(c), Catch::Contains("dtype is 17, allowed f32, f16, bf16, fp8_e4m3"));
  c = small_config("", 8, 0);
  c.dram_bytes = 4096;
  CHECK_THAT(err(c), Catch::Contains("dram_bytes is 4096, must hold at least one block"));
  c = small_config(d.str() + "/x", 8, 0);
  c.ssd_bytes = 100;
  CHECK_THAT(err(c), Catch::Contains("ssd_bytes is 100"));
  c = small_config("/etc/passwd/attnstore", 8, 8);  // a directory under a file
  CHECK_THAT(err(c), Catch::Contains("cannot create directory /etc/passwd/attnstore"));
  c = small_config("", 8, 0);
  c.model_name.clear();
  CHECK_THAT(err(c), Catch::Contains("model_name is empty"));
  c = small_config("", 8, 0);
  c.queue_depth = 0;
  CHECK_THAT(err(c), Catch::Contains("queue_depth is 0, allowed 1..1024"));

  // Wrong sizes at run time: invalid_argument, logged, nothing stored.
  store s(small_config("", 8, 0));
  auto t = make_tokens(1, 40);
  std::vector<std::byte> one(s.block_bytes());
  CHECK(s.put({"t", "x"}, t, 0, one) == errc::invalid_argument);   // 40 tokens need 2 blocks
  CHECK(s.put({"t", "x"}, {}, 0, one) == errc::invalid_argument);  // no tokens
  CHECK(s.put({"t", "x"}, t, 2, {}) == errc::invalid_argument);    // first_block past the end
  std::vector<std::byte> out(100);
  CHECK(s.get({"t", "x"}, t, 0, 1, out).status == errc::invalid_argument);
}

TEST_CASE("store: a directory written for another geometry or model is refused") {
  temp_dir d("store");
  { store s(small_config(d.str(), 8, 8)); }
  auto c = small_config(d.str(), 8, 8);
  c.geometry.num_layers = 5;
  CHECK_THROWS_WITH(store(c),
                    Catch::Contains("was written with num_layers=4 but this store is configured with num_layers=5"));
  c = small_config(d.str(), 8, 8);
  c.model_name = "another-model";
  CHECK_THROWS_WITH(store(c), Catch::Contains("holds KV of another model"));
  c = small_config(d.str(), 8, 8);
  c.tp_size = 2;
  CHECK_THROWS_WITH(store(c), Catch::Contains("another model"));
  { store s(small_config(d.str(), 8, 8)); }  // the right configuration still opens
}

TEST_CASE("store: a file system without O_DIRECT is refused unless allowed") {
  // Every file system on this machine may support O_DIRECT; look for one that does not.
  std::string dir;
  for (const char* cand : {"/run/user", "/run/lock", "/dev/mqueue"}) {
    std::error_code ec;
    if (!std::filesystem::is_directory(cand, ec)) continue;
    std::string f = std::string(cand) + "/attnstore-odirect-probe";
    int fd = ::open(f.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd >= 0) {
      ::close(fd);
      ::unlink(f.c_str());
      continue;
    }
    if (errno == EINVAL) {
      dir = std::string(cand) + "/attnstore-odirect-test";
      break;
    }
  }
  if (dir.empty()) {
    WARN("every writable file system here supports O_DIRECT; the refusal path is not exercised");
    return;
  }
  CHECK_THROWS_WITH(store(small_config(dir, 8, 8)), Catch::Contains("does not support O_DIRECT"));
  auto c = small_config(dir, 8, 8);
  c.require_direct_io = false;
  store s(c);
  conversation x{1, 40};
  REQUIRE(put_all(s, x) == errc::ok);
  REQUIRE(s.demote({"t", x.name()}) == errc::ok);
  require_exact(s, x);
  std::filesystem::remove_all(dir);
}

TEST_CASE("store: many sessions beyond max_sessions evict the least recently used") {
  auto cfg = small_config("", 64, 0);
  cfg.max_sessions = 8;
  store s(cfg);
  for (std::uint64_t i = 0; i < 20; ++i) REQUIRE(put_all(s, conversation{i, 10}) == errc::ok);
  CHECK(s.stats().sessions == 8);
  auto t = conversation{19, 10}.toks();
  CHECK(s.lookup({"t", "s19"}, t).tokens == 10);
  auto t0 = conversation{0, 10}.toks();
  CHECK(s.lookup({"t", "s0"}, t0).tokens == 0);
}

TEST_CASE("store: sessions in the engine's queue are evicted only when nothing else can go") {
  store s(small_config("", 6, 0));
  conversation a{1, 64}, b{2, 64}, c{3, 64}, d{4, 64}, e{5, 64};  // 2 blocks each
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  REQUIRE(put_all(s, c) == errc::ok);
  const std::string an = a.name(), bn = b.name(), cn = c.name();
  session_key queue[] = {{"t", an}, {"t", cn}};
  s.set_queue(queue);
  REQUIRE(put_all(s, d) == errc::ok);  // a is least recent but queued: b goes
  auto ta = a.toks(), tb = b.toks(), tc = c.toks();
  CHECK(s.lookup({"t", an}, ta).tokens == 64);
  CHECK(s.lookup({"t", bn}, tb).tokens == 0);
  REQUIRE(put_all(s, e) == errc::ok);  // d is the only unqueued one left: it goes
  auto td = d.toks();
  CHECK(s.lookup({"t", d.name()}, td).tokens == 0);
  CHECK(s.lookup({"t", cn}, tc).tokens == 64);
  s.set_queue({});
  conversation f{6, 64};
  REQUIRE(put_all(s, f) == errc::ok);  // queue cleared: plain LRU again (a, the oldest touched first)
  CHECK(s.stats().evicted_sessions == 3);
}
