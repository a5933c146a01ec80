#include <catch2/catch.hpp>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "attnstore/index/cache_index.hpp"
#include "support/kv_data.hpp"

using namespace attnstore;

namespace {
const model_id model = make_model_id({"m", kv_geometry{2, 2, 64, dtype::f16, 4}.validated()});

// Frees a chain of blocks detached from a session.
void free_chain(locked_session& s, std::uint32_t b) {
  while (b != no_slot) {
    const std::uint32_t next = s.meta(b).next;
    s.free_block(b);
    b = next;
  }
}

// Publishes `tokens` as the session's blocks (DRAM slot = block table index, for the
// test). No Catch2 assertions: the concurrent test calls it from worker threads.
bool publish_tokens(cache_index& idx, locked_session& s, std::span<const token_id> tokens) {
  const std::uint32_t tpb = idx.tokens_per_block();
  std::uint32_t head = no_slot, tail = no_slot, n = 0;
  hash128 prev{};
  for (std::size_t p = 0; p < tokens.size(); p += tpb) {
    auto t = tokens.subspan(p, std::min<std::size_t>(tpb, tokens.size() - p));
    const std::uint32_t b = s.new_block(t);
    if (b == no_slot) {
      free_chain(s, head);
      return false;
    }
    s.meta(b).chain = prev = chain_hash(prev, model, t);
    s.meta(b).dram_slot = b;
    if (tail == no_slot)
      head = b;
    else
      s.meta(tail).next = b;
    tail = b;
    ++n;
  }
  free_chain(s, s.publish(0, head, n));
  return true;
}

void store_session(cache_index& idx, const session_hash& key, std::span<const token_id> tokens) {
  locked_session s = idx.open(key, true);
  REQUIRE(s);
  REQUIRE(publish_tokens(idx, s, tokens));
}
}  // namespace

TEST_CASE("lookup returns the longest prefix whose chain hashes match") {
  cache_index idx(cache_index_options{16, 256, 4, 4});
  auto key = hash_session({"t", "a"});
  std::vector<token_id> hist{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // blocks: 4, 4, 2
  store_session(idx, key, hist);

  auto prompt = hist;
  prompt.insert(prompt.end(), {11, 12});
  block_location loc[8];
  lookup_result r = idx.lookup(key, model, prompt, loc);
  CHECK(r.tokens == 10);
  CHECK(r.blocks == 3);
  CHECK(loc[2].tokens == 2);

  // An edit inside block 1 (position 6): reuse up to the edit exactly.
  auto edited = prompt;
  edited[6] = 99;
  r = idx.lookup(key, model, edited, loc);
  CHECK(r.tokens == 6);
  CHECK(r.blocks == 2);
  CHECK(loc[1].tokens == 2);

  // A shorter prompt ending inside a block reuses up to its end.
  r = idx.lookup(key, model, std::span(hist).first(5));
  CHECK(r.tokens == 5);

  // Edit at position 0: nothing.
  edited = prompt;
  edited[0] = 42;
  CHECK(idx.lookup(key, model, edited).tokens == 0);

  // Another model never matches whole blocks.
  model_id other = make_model_id({"other", kv_geometry{2, 2, 64, dtype::f16, 4}.validated()});
  // (token compare inside the first block still finds the tokens; the chain hash gates
  // whole blocks, so at most one partial block can match: the store never serves it
  // across models because the model id is part of every SSD header and the store has one model.)
  CHECK(idx.lookup(key, other, prompt).blocks <= 1);
}

TEST_CASE("tenants and sessions are isolated") {
  cache_index idx(cache_index_options{16, 256, 4, 4});
  std::vector<token_id> t{1, 2, 3, 4, 5};
  store_session(idx, hash_session({"tenant-a", "s"}), t);
  CHECK(idx.lookup(hash_session({"tenant-a", "s"}), model, t).tokens == 5);
  CHECK(idx.lookup(hash_session({"tenant-b", "s"}), model, t).tokens == 0);
  CHECK(idx.lookup(hash_session({"tenant-a", "s2"}), model, t).tokens == 0);
}

TEST_CASE("erase frees the record; the pool refills; many sessions hash into shards") {
  cache_index idx(cache_index_options{64, 1024, 4, 8});
  std::vector<token_id> t{1, 2, 3};
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 64; ++i) store_session(idx, hash_session({"t", std::to_string(i)}), t);
    CHECK(idx.live_sessions() == 64);
    CHECK_FALSE(idx.open(hash_session({"t", "one-too-many"}), true));
    for (int i = 0; i < 64; i += 1 + round % 2) {
      locked_session s = idx.open(hash_session({"t", std::to_string(i)}), false);
      REQUIRE(s);
      free_chain(s, s.truncate(0));
      s.erase();
    }
    for (int i = 0; i < 64; ++i) {
      bool erased = i % (1 + round % 2) == 0;
      CHECK(idx.lookup(hash_session({"t", std::to_string(i)}), model, t).tokens == (erased ? 0u : 3u));
      if (!erased) {
        locked_session s = idx.open(hash_session({"t", std::to_string(i)}), false);
        free_chain(s, s.truncate(0));
        s.erase();
      }
    }
    CHECK(idx.live_sessions() == 0);
    CHECK(idx.free_blocks() == 1024);
  }
}

TEST_CASE("find names a live session's record and nothing else") {
  cache_index idx(cache_index_options{8, 64, 4, 2});
  std::vector<token_id> t{1};
  for (int i = 0; i < 4; ++i) store_session(idx, hash_session({"t", std::to_string(i)}), t);
  locked_session s2 = idx.open(hash_session({"t", "2"}), false);
  REQUIRE(s2);
  CHECK(idx.find(hash_session({"t", "2"})) == s2.record_id());
  CHECK(idx.find(hash_session({"t", "9"})) == no_slot);
  free_chain(s2, s2.truncate(0));
  s2.erase();
  CHECK(idx.find(hash_session({"t", "2"})) == no_slot);
}

TEST_CASE("concurrent open/lookup/erase on shared keys is safe") {
  // Catch2 is not thread-safe: worker threads count problems, the main thread checks.
  cache_index idx(cache_index_options{32, 4096, 4, 4});
  std::atomic<int> bad_lookups{0}, failed_opens{0};
  std::vector<std::thread> ts;
  for (int th = 0; th < 4; ++th)
    ts.emplace_back([&, th] {
      std::mt19937 rng(th);
      std::vector<token_id> t{1, 2, 3, 4, 5, 6};
      for (int i = 0; i < 3000; ++i) {
        auto key = hash_session({"t", std::to_string(rng() % 24)});
        switch (rng() % 3) {
          case 0: {
            locked_session s = idx.open(key, true);
            if (!s) {
              ++failed_opens;
              break;
            }
            if (!publish_tokens(idx, s, t)) ++failed_opens;
            break;
          }
          case 1: {
            auto r = idx.lookup(key, model, t);
            if (r.tokens != 0 && r.tokens != 6) ++bad_lookups;
            break;
          }
          case 2: {
            locked_session s = idx.open(key, false);
            if (!s) break;
            free_chain(s, s.truncate(0));
            s.erase();
          }
        }
      }
    });
  for (auto& t : ts) t.join();
  CHECK(bad_lookups == 0);
  CHECK(failed_opens == 0);
  CHECK(idx.live_sessions() <= 24);
}

TEST_CASE("bad index options name the field") {
  CHECK_THROWS_WITH(cache_index(cache_index_options{0, 8, 4, 4}), Catch::Contains("max_sessions is 0"));
  CHECK_THROWS_WITH(cache_index(cache_index_options{8, 8, 4, 3}), Catch::Contains("shards is 3"));
}
