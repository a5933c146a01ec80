#include <catch2/catch.hpp>

#include <cstring>
#include <random>
#include <vector>

#include "attnstore/hooks.hpp"
#include "support/kv_data.hpp"
#include "support/paged_memory.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::paged_memory;

namespace {
store_config cfg_for(const kv_geometry& g) {
  store_config c;
  c.geometry = g;
  c.model_name = "hooks-test";
  c.dram_bytes = 256 * format::slot_bytes(g.validated());
  c.log = logger{&logger::quiet, nullptr};
  return c;
}

// One prefill of `new_tokens` after the stored history, through the hooks.
void run_turn(hooks& hk, paged_memory& mem, std::uint64_t session, std::vector<token_id>& history,
              std::size_t new_tokens, std::vector<std::uint32_t>& table, std::uint64_t* loaded) {
  const std::size_t old = history.size();
  for (std::size_t i = 0; i < new_tokens; ++i)
    history.push_back(token_id(attnstore::testing::mix(session + history.size()) % 30000));
  const std::string name = "s" + std::to_string(session);
  session_key key{"t", name};
  // Scrub engine memory: only what the load brings back may be there.
  for (auto pg : table)
    for (std::uint32_t l = 0; l < mem.g.num_layers; ++l) {
      std::memset(mem.kb[l] + pg * mem.page_stride, 0xEE, mem.page_stride);
      std::memset(mem.vb[l] + pg * mem.page_stride, 0xEE, mem.page_stride);
    }
  load_info li = hk.start_load(key, history, kv_target{&mem.layout, table});
  REQUIRE(li.status == errc::ok);
  *loaded = li.tokens;
  errc st;
  save_handle sh = hk.start_save(key, history, li.tokens, kv_source{&mem.layout, table}, std::nullopt, &st);
  REQUIRE(st == errc::ok);
  for (std::uint32_t l = 0; l < mem.g.num_layers; ++l) {
    if (li.handle) REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
    // "Compute" layer l: history must already be here for this layer; write the new tokens' KV.
    for (std::size_t p = 0; p < li.tokens; ++p)
      for (std::uint32_t h = 0; h < mem.g.num_kv_heads; ++h) {
        std::vector<std::byte> want(mem.g.head_dim * mem.g.element_bytes());
        attnstore::testing::fill_block(want, session * 7919 + p * 131 + l * 17 + 0 * 3 + h);
        REQUIRE(std::memcmp(want.data(), mem.at(l, 0, table, p, h), want.size()) == 0);
      }
    for (std::size_t p = li.tokens; p < history.size(); ++p)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t h = 0; h < mem.g.num_kv_heads; ++h)
          attnstore::testing::fill_block({mem.at(l, side, table, p, h), mem.g.head_dim * mem.g.element_bytes()},
                                         session * 7919 + p * 131 + l * 17 + side * 3 + h);
    REQUIRE(hk.save_layer(sh, l) == errc::ok);
  }
  if (li.handle) REQUIRE(hk.finish_load(li.handle) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);
  (void)old;
}
}  // namespace

TEST_CASE("hooks: multi-turn layer-wise load and save through paged engine memory") {
  for (std::size_t head_pad : {0ul, 16ul}) {  // dense layout, and one with padded heads
    kv_geometry g{3, 2, 32, dtype::f16, 16};
    store kv(cfg_for(g));
    auto copier = make_host_copy_backend();
    hooks hk(kv, *copier, hooks_config{1});
    paged_memory mem(g, 64, 8, head_pad);  // engine pages of 8 tokens vs 16-token blocks
    std::vector<std::uint32_t> table;
    for (std::uint32_t i = 0; i < 40; ++i) table.push_back((i * 7) % 64);  // scattered pages
    std::vector<token_id> history;
    std::uint64_t loaded = 0;
    std::size_t expect_loaded = 0;
    for (std::size_t turn : {37ul, 20ul, 64ul, 5ul}) {
      INFO("head_pad " << head_pad << " turn of " << turn);
      run_turn(hk, mem, 1, history, turn, table, &loaded);
      CHECK(loaded == expect_loaded);
      expect_loaded = history.size();
    }
    // The whole history is stored and every byte equals what the engine computed.
    for (std::size_t p = 0; p < history.size(); ++p) CHECK(mem.token_equals(1, table, p));
    CHECK(kv.lookup({"t", "s1"}, history).tokens == history.size());
  }
}

TEST_CASE("hooks: a copy engine that delays and reorders everything leaves outputs exact") {
  kv_geometry g{4, 2, 32, dtype::f16, 16};
  store kv(cfg_for(g));
  host_copy_options chaos;
  chaos.chaos_max_delay_us = 300;
  chaos.chaos_seed = 99;
  auto copier = make_host_copy_backend(chaos);
  hooks hk(kv, *copier, hooks_config{2});
  paged_memory mem(g, 128, 16, 0);
  for (std::uint64_t s = 1; s <= 3; ++s) {
    std::vector<std::uint32_t> table;
    for (std::uint32_t i = 0; i < 40; ++i) table.push_back(std::uint32_t((s - 1) * 40 + i));
    std::vector<token_id> history;
    std::uint64_t loaded = 0;
    for (std::size_t turn : {50ul, 33ul, 70ul}) run_turn(hk, mem, s, history, turn, table, &loaded);
    CHECK(loaded == 83);
    for (std::size_t p = 0; p < history.size(); ++p) CHECK(mem.token_equals(s, table, p));
  }
}

TEST_CASE("hooks: bad handles, layouts and unfinished saves are refused") {
  kv_geometry g{2, 2, 32, dtype::f16, 16};
  store kv(cfg_for(g));
  auto copier = make_host_copy_backend();
  hooks hk(kv, *copier);
  CHECK(hk.wait_layer(load_handle{12345}, 0) == errc::invalid_argument);
  CHECK(hk.save_layer(save_handle{0}, 0) == errc::invalid_argument);
  paged_memory wrong(kv_geometry{2, 4, 32, dtype::f16, 16}, 8, 16, 0);
  std::vector<std::uint32_t> table{0, 1};
  std::vector<token_id> toks(20, 5);
  CHECK(hk.start_load({"t", "x"}, toks, kv_target{&wrong.layout, table}).status == errc::invalid_argument);
  errc st;
  CHECK(hk.start_save({"t", "x"}, toks, 0, kv_source{&wrong.layout, table}, std::nullopt, &st) == save_handle{});
  CHECK(st == errc::invalid_argument);
  paged_memory mem(g, 8, 16, 0);
  save_handle sh = hk.start_save({"t", "x"}, toks, 0, kv_source{&mem.layout, table}, std::nullopt, &st);
  REQUIRE(st == errc::ok);
  REQUIRE(hk.save_layer(sh, 0) == errc::ok);
  CHECK(hk.finish_save(sh) == errc::bad_state);  // layer 1 never saved: nothing published
  CHECK(kv.lookup({"t", "x"}, toks).tokens == 0);
  CHECK(kv.stats().dram_used_bytes == 0);
  // GPU engine memory with a copier that has none: refused before any pointer is touched.
  paged_memory gpu(g, 8, 16, 0);
  gpu.layout.where = memory_space::device;
  CHECK(hk.start_save({"t", "y"}, toks, 0, kv_source{&gpu.layout, table}, std::nullopt, &st) == save_handle{});
  CHECK(st == errc::unsupported);
  CHECK(hk.start_load({"t", "x"}, toks, kv_target{&gpu.layout, table}).status == errc::unsupported);
}

TEST_CASE("hooks: checksum_stream over any split equals checksum64 of the whole") {
  std::vector<std::byte> buf(3 * 1024 * 1024 + 77);
  attnstore::testing::fill_block(buf, 42);
  std::mt19937_64 rng(7);
  for (std::size_t size : {0ul, 1ul, 63ul, 240ul, 241ul, 1024ul, 65536ul + 3, buf.size()}) {
    const std::uint64_t want = checksum64(buf.data(), size);
    for (int trial = 0; trial < 20; ++trial) {
      checksum_stream cs;
      cs.reset();
      std::size_t at = 0;
      while (at < size) {
        const std::size_t n = std::min<std::size_t>(size - at, 1 + rng() % (trial < 10 ? 300 : 200000));
        cs.update(buf.data() + at, n);
        at += n;
      }
      INFO("size " << size << " trial " << trial);
      CHECK(cs.digest() == want);
    }
  }
}

TEST_CASE("hooks: saves hashed layer by layer while copying store the checksums of their bytes") {
  // Checked where the store verifies: every DRAM read (verify_dram_reads) and every SSD
  // read. A checksum that missed a layer, hashed it before its copy landed, or mixed up
  // blocks makes those reads fail. The copy engine delays and reorders everything.
  kv_geometry g{4, 2, 32, dtype::f16, 16};
  for (std::uint32_t lanes : {0u, 1u, 2u, 3u}) {
    for (bool in_order : {true, false}) {
      INFO("hash lanes " << lanes << (in_order ? ", layers in order" : ", layers out of order"));
      attnstore::testing::temp_dir dir("hooks-hash");
      store_config c = cfg_for(g);
      c.ssd_directory = dir.str();
      c.ssd_bytes = 512 * format::slot_bytes(g.validated());
      c.background_thread = false;
      store kv(c);
      host_copy_options chaos;
      chaos.chaos_max_delay_us = 200;
      chaos.chaos_seed = 5 + lanes;
      auto copier = make_host_copy_backend(chaos);
      hooks_config hc{2};
      hc.hash_lanes = lanes;
      hc.hash_blocks_per_save = 8;  // the 10-block saves below are hashed at commit instead
      hooks hk(kv, *copier, hc);
      REQUIRE(hk.hash_lanes_in_use() == lanes);
      paged_memory mem(g, 128, 16, 0);
      std::vector<std::uint32_t> table;
      for (std::uint32_t i = 0; i < 128; ++i) table.push_back(i);
      for (std::uint64_t s = 1; s <= 4; ++s) {
        // 4 sessions: 7, 8 (a partial last block), 10 and 3 blocks, saved in two parts.
        const std::size_t tokens = s == 1 ? 112 : s == 2 ? 121 : s == 3 ? 160 : 48;
        std::vector<token_id> toks;
        for (std::size_t i = 0; i < tokens; ++i) toks.push_back(token_id((s * 1000 + i) % 30000));
        for (std::size_t p = 0; p < tokens; ++p)
          for (std::uint32_t l = 0; l < g.num_layers; ++l)
            for (int side = 0; side < 2; ++side)
              for (std::uint32_t h = 0; h < g.num_kv_heads; ++h)
                attnstore::testing::fill_block({mem.at(l, side, table, p, h), g.head_dim * g.element_bytes()},
                                               s * 7919 + p * 131 + l * 17 + side * 3 + h);
        const std::string name = "s" + std::to_string(s);
        for (std::size_t upto : {tokens / 2, tokens}) {
          const std::span<const token_id> part(toks.data(), upto);
          const std::uint64_t from = upto == tokens ? tokens / 2 : 0;
          errc st;
          save_handle sh = hk.start_save({"t", name}, part, from, kv_source{&mem.layout, table}, std::nullopt, &st);
          REQUIRE(st == errc::ok);
          for (std::uint32_t k = 0; k < g.num_layers; ++k)
            REQUIRE(hk.save_layer(sh, in_order ? k : g.num_layers - 1 - k) == errc::ok);
          REQUIRE(hk.finish_save(sh) == errc::ok);
        }
        // An aborted save in between: its hashing is drained before its blocks go back.
        errc st;
        save_handle gone = hk.start_save({"t", "aborted"}, toks, 0, kv_source{&mem.layout, table}, std::nullopt, &st);
        REQUIRE(st == errc::ok);
        for (std::uint32_t k = 0; k + 1 < g.num_layers; ++k) REQUIRE(hk.save_layer(gone, k) == errc::ok);
        hk.abort_save(gone);
        const std::uint32_t blocks = g.blocks_for(tokens);
        std::vector<std::byte> out(std::size_t(blocks) * g.block_bytes());
        get_result r = kv.get({"t", name}, toks, 0, blocks, out);  // DRAM: checksums verified
        CHECK(r.status == errc::ok);
        CHECK(r.blocks == blocks);
        REQUIRE(kv.demote({"t", name}) == errc::ok);
        std::vector<std::byte> again(out.size());
        r = kv.get({"t", name}, toks, 0, blocks, again);  // SSD: checksums verified
        CHECK(r.status == errc::ok);
        CHECK(r.blocks == blocks);
        CHECK(again == out);
      }
      CHECK(kv.stats().checksum_failures == 0);
    }
  }
}

TEST_CASE("hooks: a copy backend out of streams gives fewer hash lanes, and saves still verify") {
  kv_geometry g{2, 2, 32, dtype::f16, 16};
  store kv(cfg_for(g));
  host_copy_options ho;
  ho.max_streams = 4;  // 2 read streams and the write stream leave one
  auto copier = make_host_copy_backend(ho);
  hooks_config hc{1};
  hc.hash_lanes = 3;
  hooks hk(kv, *copier, hc);
  CHECK(hk.hash_lanes_in_use() == 1);
  paged_memory mem(g, 64, 8, 0);
  std::vector<std::uint32_t> table;
  for (std::uint32_t i = 0; i < 40; ++i) table.push_back(i);
  std::vector<token_id> history;
  std::uint64_t loaded = 0;
  run_turn(hk, mem, 9, history, 40, table, &loaded);
  run_turn(hk, mem, 9, history, 30, table, &loaded);
  CHECK(loaded == 40);  // the first turn's blocks verified when loaded from DRAM
}

TEST_CASE("hooks: many saves in flight at once, their layers interleaved, all hashed right") {
  kv_geometry g{4, 2, 32, dtype::f16, 16};
  store kv(cfg_for(g));
  host_copy_options chaos;
  chaos.chaos_max_delay_us = 150;
  chaos.chaos_seed = 11;
  auto copier = make_host_copy_backend(chaos);
  hooks_config hc{2};
  hc.max_saves = 6;
  hooks hk(kv, *copier, hc);
  REQUIRE(hk.hash_lanes_in_use() == 2);
  paged_memory mem(g, 256, 16, 0);
  std::vector<std::vector<std::uint32_t>> tables(6);
  std::vector<std::vector<token_id>> toks(6);
  std::vector<save_handle> saves(6);
  for (std::uint64_t s = 0; s < 6; ++s) {
    const std::size_t tokens = 40 + 23 * s;
    for (std::uint32_t i = 0; i < 40; ++i) tables[s].push_back(std::uint32_t(s * 40 + i));
    for (std::size_t i = 0; i < tokens; ++i) toks[s].push_back(token_id((s * 977 + i) % 30000));
    for (std::size_t p = 0; p < tokens; ++p)
      for (std::uint32_t l = 0; l < g.num_layers; ++l)
        for (int side = 0; side < 2; ++side)
          for (std::uint32_t h = 0; h < g.num_kv_heads; ++h)
            attnstore::testing::fill_block({mem.at(l, side, tables[s], p, h), g.head_dim * g.element_bytes()},
                                           s * 131 + p * 7 + l * 3 + side + h * 5);
    errc st;
    saves[s] =
        hk.start_save({"t", "m" + std::to_string(s)}, toks[s], 0, kv_source{&mem.layout, tables[s]}, std::nullopt, &st);
    REQUIRE(st == errc::ok);
  }
  for (std::uint32_t l = 0; l < g.num_layers; ++l)
    for (std::size_t s = 0; s < 6; ++s) REQUIRE(hk.save_layer(saves[s], l) == errc::ok);
  for (std::size_t s : {3, 0, 5, 1}) REQUIRE(hk.finish_save(saves[s]) == errc::ok);  // out of start order
  hk.abort_save(saves[2]);
  hk.abort_save(saves[4]);
  for (std::size_t s : {0, 1, 3, 5}) {
    const std::uint32_t blocks = g.blocks_for(toks[s].size());
    std::vector<std::byte> out(std::size_t(blocks) * g.block_bytes());
    const get_result r = kv.get({"t", "m" + std::to_string(s)}, toks[s], 0, blocks, out);  // verified
    CHECK(r.status == errc::ok);
    CHECK(r.blocks == blocks);
  }
  CHECK(kv.lookup({"t", "m2"}, toks[2]).tokens == 0);
  CHECK(kv.stats().checksum_failures == 0);
}
