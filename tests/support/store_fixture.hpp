// Small stores and conversations for the store tests: a geometry of 64 KiB blocks, a
// config sized in blocks, and whole conversations put and checked bit-exact.
#pragma once

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "attnstore/store.hpp"
#include "attnstore/truncate.hpp"
#include "support/kv_data.hpp"

namespace attnstore::testing {

inline const kv_geometry test_geometry{4, 2, 64, dtype::f16, 32};  // 64 KiB blocks

inline store_config small_config(const std::string& dir, std::size_t dram_blocks, std::size_t ssd_blocks) {
  store_config c;
  c.geometry = test_geometry;
  c.model_name = "test-model";
  const std::size_t slot = format::slot_bytes(c.geometry.validated());
  c.dram_bytes = dram_blocks * slot;
  if (!dir.empty()) {
    c.ssd_directory = dir;
    c.ssd_bytes = ssd_blocks * slot;
  }
  c.queue_depth = 8;
  c.log = logger{&logger::quiet, nullptr};
  // Deterministic: background work (prefetch, watermark, TTL) runs only when a test
  // calls run_background(); the tests of the thread itself turn it back on.
  c.background_thread = false;
  return c;
}

// A truncation plan that cuts `drop` tokens (whole blocks) after `sink` of a view of
// `history` tokens: what plan_truncation gives, with the cut chosen by the test.
inline truncation_plan explicit_cut(std::size_t history, std::size_t sink, std::size_t drop) {
  truncation_plan p;
  p.needed = true;
  p.history = history;
  p.sink = sink;
  p.drop = drop;
  p.kept = history - drop;
  p.shift = -std::int64_t(drop);
  return p;
}

// `tokens` without positions [sink, sink + drop): the view's tokens after that cut.
inline std::vector<token_id> cut_tokens(const std::vector<token_id>& tokens, std::size_t sink, std::size_t drop) {
  std::vector<token_id> v(tokens.begin(), tokens.begin() + std::ptrdiff_t(sink));
  v.insert(v.end(), tokens.begin() + std::ptrdiff_t(sink + drop), tokens.end());
  return v;
}

// A session's whole history: tokens and the blocks holding their KV.
struct conversation {
  std::uint64_t id;
  std::size_t tokens;
  std::vector<token_id> toks() const { return make_tokens(id, tokens); }
  std::uint32_t blocks() const { return test_geometry.blocks_for(tokens); }
  std::vector<std::byte> data(std::size_t bb, std::uint32_t first = 0) const {
    return make_blocks(bb, id, first, blocks() - first);
  }
  std::string name() const { return "s" + std::to_string(id); }
};

inline errc put_all(store& s, const conversation& c) {
  return s.put({"t", c.name()}, c.toks(), 0, c.data(s.block_bytes()));
}

// Gets the whole conversation and requires it bit-exact.
inline void require_exact(store& s, const conversation& c) {
  std::vector<std::byte> out(std::size_t(c.blocks()) * s.block_bytes());
  auto toks = c.toks();
  get_result g = s.get({"t", c.name()}, toks, 0, c.blocks(), out);
  INFO("session " << c.id << " status " << to_string(g.status) << " blocks " << g.blocks);
  REQUIRE(g.status == errc::ok);
  REQUIRE(g.blocks == c.blocks());
  REQUIRE(g.tokens == c.tokens);
  REQUIRE(out == c.data(s.block_bytes()));
}

}  // namespace attnstore::testing
