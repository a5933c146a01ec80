// Randomized: three nodes (stores on separate directories, small tiers that evict) share
// one Redis Cluster through store_remote, and conversations' turns land on random nodes
// (issue 15; the model-based test of the correctness issue, extended to several nodes).
// KV is a function of what it was computed over: of the tokens before it (a rolling hash
// seeds each block) while a session's view is its history as saved, and of the view's
// pieces and tokens after a truncation (store::truncate, on random nodes: the KV of the
// kept tokens stays, moved). Every byte any node serves is checked, with the place and
// shift it is served at, whatever node, tier, manifest version or shared prefix it came
// from. Edits, truncations, drops, demotions, restarts of a node, unsettled write-behind
// (a turn that lands elsewhere before the last one's upload finished) and blocks the tier
// loses (deleted, as eviction would) are mixed in. Asserts: no byte served differs from
// the oracle; no load claims more than the prompt; cross-node turns are served warm.
//
//   ATTNSTORE_REMOTE_MODEL_OPS=N  operations (default 400), ATTNSTORE_REMOTE_MODEL_SEED=S
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attnstore/shared/records.hpp"
#include "attnstore/shared/store_remote.hpp"
#include "attnstore/store.hpp"
#include "attnstore/truncate.hpp"
#include "store_remote_support.hpp"
#include "support/env.hpp"
#include "support/kv_data.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::shared;
using namespace attnstore::testing;
using namespace redis_test;
using std::chrono::milliseconds;

namespace {

constexpr std::uint32_t tpb = 32;  // test_geometry

// The oracle: block b of a token sequence holds KV seeded by every token up to its end.
std::uint64_t prefix_seed(std::span<const token_id> toks, std::size_t end) {
  std::uint64_t h = 0x243F6A8885A308D3ull;
  for (std::size_t i = 0; i < end; ++i) h = mix(h ^ (std::uint64_t(toks[i]) * 0x9E3779B97F4A7C15ull + i));
  return h;
}
std::vector<std::byte> oracle_blocks(std::size_t bb, std::span<const token_id> toks, std::uint32_t first) {
  const std::uint32_t blocks = std::uint32_t((toks.size() + tpb - 1) / tpb);
  std::vector<std::byte> v(std::size_t(blocks - first) * bb);
  for (std::uint32_t b = first; b < blocks; ++b)
    fill_block(std::span(v).subspan(std::size_t(b - first) * bb, bb),
               prefix_seed(toks, std::min<std::size_t>(toks.size(), std::size_t(b + 1) * tpb)));
  return v;
}

// One piece of a session's view: a stored block (its KV seed, its tokens) and the part of
// it the view keeps, moved by `shift` (truncate.hpp).
struct piece {
  std::uint64_t seed;
  std::uint32_t tokens, first, count;
  std::int64_t shift;
  bool operator==(const piece&) const = default;
};

// A version of a session's view: its tokens and pieces, as the model knows them.
struct view {
  std::vector<token_id> toks;
  std::vector<piece> pieces;
  // Whether pieces [0, n) are the history as saved: whole blocks, in place.
  bool straight(std::size_t n) const {
    for (std::size_t i = 0; i < n; ++i)
      if (pieces[i].first != 0 || pieces[i].count != tpb || pieces[i].shift != 0) return false;
    return true;
  }
  // What KV saved after pieces [0, n) depends on besides the tokens: their seeds and ranges.
  std::uint64_t digest(std::size_t n) const {
    std::uint64_t d = 0x5EEDD1E57ull;
    for (std::size_t i = 0; i < n; ++i)
      d = mix(d ^ mix(pieces[i].seed + (std::uint64_t(pieces[i].first) << 40) + pieces[i].count));
    return d;
  }
};

// The seed of a block saved after pieces [0, n) of `v`, ending at token `end` of `prompt`:
// a function of its context only (every piece before it, the blocks of its own save
// included, and the tokens), however the saves were split, as an engine's KV is.
std::uint64_t saved_seed(const view& v, std::size_t n, std::span<const token_id> prompt, std::size_t end) {
  return v.straight(n) ? prefix_seed(prompt, end) : mix(v.digest(n) ^ prefix_seed(prompt, end));
}

// `v` cut as store::truncate cuts it: positions [sink, sink + drop) go.
view cut_view(const view& v, std::size_t sink, std::size_t drop) {
  view t;
  t.toks = cut_tokens(v.toks, sink, drop);
  std::size_t pos = 0;
  for (piece p : v.pieces) {
    const std::size_t vs = pos, ve = pos + p.count;
    pos = ve;
    if (ve <= sink) {
      t.pieces.push_back(p);
    } else if (vs >= sink + drop) {
      p.shift -= std::int64_t(drop);
      t.pieces.push_back(p);
    } else if (vs >= sink && ve <= sink + drop) {
      continue;
    } else if (vs < sink) {
      p.count = std::uint32_t(sink - vs);
      t.pieces.push_back(p);
    } else {
      const std::uint32_t skip = std::uint32_t(sink + drop - vs);
      p.first += skip;
      p.count -= skip;
      p.shift -= std::int64_t(drop);
      t.pieces.push_back(p);
    }
  }
  return t;
}

struct node {
  std::string dir;
  std::shared_ptr<store_remote> remote;
  std::unique_ptr<store> kv;
  store_config cfg;
  void open() {
    remote.reset();
    kv.reset();
    remote = std::make_shared<store_remote>(remote_config(cfg, hash128{0x0bad5eedull, 0x3f1ee7ull}));
    cfg.remote = remote;
    kv = std::make_unique<store>(cfg);
  }
};

}  // namespace

TEST_CASE("store remote model: random turns on random nodes never serve a wrong byte", "[cluster]") {
  const std::uint64_t ops = env_u64("ATTNSTORE_REMOTE_MODEL_OPS", 400);
  const std::uint64_t seed = env_u64("ATTNSTORE_REMOTE_MODEL_SEED", 20261205);
  std::mt19937_64 rng(seed);
  auto rnd = [&](std::uint64_t n) { return std::uint64_t(rng() % n); };
  temp_dir root("remote-model");
  // Sessions and the model under a fresh name per run (the cluster outlives a run).
  const std::string run = std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  std::vector<node> nodes(3);
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    nodes[i].dir = root.str() + "/node" + std::to_string(i);
    nodes[i].cfg = small_config(nodes[i].dir, 24, 48);  // small: demotion and eviction happen
    // A model of its own, per run: blocks are content-addressed by (model, chain), and the
    // cluster keeps the first bytes written for a chain: other tests (under "test-model"),
    // and runs of this one with the same seed but another oracle, store other bytes for
    // some of the same tokens.
    nodes[i].cfg.model_name = "remote-model-oracle-" + run;
    nodes[i].open();
  }
  const std::size_t bb = nodes[0].kv->block_bytes();
  // Half the sessions start with a shared prompt.
  constexpr int n_sessions = 10;
  std::vector<std::string> names(n_sessions);
  // Per session: its view now, and every version since its last drop (a node may serve an
  // older one it holds, for the tokens the prompt shares with it).
  std::vector<view> cur(n_sessions);
  std::vector<std::vector<view>> seen(n_sessions);
  const auto system = make_tokens(777, 2 * tpb);
  for (int s = 0; s < n_sessions; ++s) names[s] = "m" + run + "-" + std::to_string(s);
  std::uint64_t served_tokens = 0, warm_cross_node = 0, wrong = 0, over = 0, lost = 0, cuts = 0, cut_views_served = 0;
  redis_cluster raw(test_cluster_config());
  // Counters over the whole run (a restart opens a new store, whose counters start at 0).
  std::uint64_t fetched = 0, publishes = 0, prefetch_misses = 0, resends = 0, skipped = 0;
  const auto absorb = [&](node& nd) {
    const store_stats st = nd.kv->stats();
    fetched += st.remote_blocks_fetched;
    publishes += st.remote_publishes;
    prefetch_misses += st.remote_misses;
    resends += st.remote_resends;
    skipped += st.remote_publishes_skipped;
  };
  const model_id model = store_model_id(nodes[0].cfg);
  std::vector<int> last_node(n_sessions, -1);
  for (std::uint64_t op = 0; op < ops; ++op) {
    const int s = int(rnd(n_sessions));
    const int n = int(rnd(nodes.size()));
    store& kv = *nodes[std::size_t(n)].kv;
    const session_key key{"tenant", names[std::size_t(s)]};
    view& v = cur[std::size_t(s)];
    auto& versions = seen[std::size_t(s)];
    const auto remember = [&](view next) {
      v = std::move(next);
      versions.push_back(v);
      if (versions.size() > 64) versions.erase(versions.begin());
    };
    const std::uint64_t what = rnd(20);
    if (what == 0) {  // the conversation is deleted (from this node and the tier)
      (void)kv.drop(key);
      v = view{};
      versions.clear();
      continue;
    }
    if (what == 1) {
      (void)kv.demote(key);
      continue;
    }
    if (what == 2) {  // a node restarts: recovery, then its published flags are gone
      absorb(nodes[std::size_t(n)]);
      (void)nodes[std::size_t(n)].kv->close();
      nodes[std::size_t(n)].open();
      continue;
    }
    if (what == 3) {
      for (auto& nd : nodes) (void)nd.remote->tier().flush(milliseconds{10000});
      continue;
    }
    if (what == 4 && !v.toks.empty() && v.straight(v.pieces.size())) {  // the tier loses a block of the session
      session_manifest m;
      m.tokens = v.toks;
      m.tokens_per_block = tpb;
      REQUIRE(build_manifest_blocks(m, model, {}) == shared_status::ok);
      const record_key k = block_key(model.value, m.blocks[rnd(m.blocks.size())].chain);
      lost += raw.del(k.view()) == redis_status::ok;
      continue;
    }
    if ((what == 5 || what == 6) && v.toks.size() > 3 * tpb) {  // the context window overflows on this node
      const std::size_t sink = rnd(2 * tpb + 1);
      const std::size_t drop = tpb * (1 + rnd(std::min<std::size_t>(3, (v.toks.size() - sink) / tpb)));
      if (sink + drop > v.toks.size()) continue;
      // Refused when this node holds another version and the tier has no newer one for it.
      if (kv.truncate(key, v.toks, explicit_cut(v.toks.size(), sink, drop)) == errc::ok) {
        remember(cut_view(v, sink, drop));
        ++cuts;
      }
      continue;
    }
    // A turn: the view (perhaps edited at a random place), then new tokens.
    std::vector<token_id> prompt = v.toks;
    if (prompt.empty() && rnd(2) == 0) prompt = system;
    if (!prompt.empty() && rnd(6) == 0) prompt.resize(rnd(prompt.size()));
    const auto fresh = make_tokens(rng(), 1 + rnd(70));
    prompt.insert(prompt.end(), fresh.begin(), fresh.end());
    if (prompt.size() > 12 * tpb)  // an engine that recomputes after cutting (no store::truncate)
      prompt.erase(prompt.begin() + std::ptrdiff_t(2 * tpb), prompt.begin() + std::ptrdiff_t(2 * tpb + 3 * tpb));
    const lookup_result r = kv.lookup(key, prompt);
    if (r.tokens > prompt.size()) ++over;
    std::vector<block_view> got(48);
    read_lease lease(48);
    const get_result g = kv.acquire(key, prompt, got, lease);
    if (g.tokens > prompt.size()) ++over;
    // What was served: the view's pieces, each at its place. The history as saved (every
    // piece a whole block in place) is checked against the tokens' oracle, which any
    // session's shared blocks also meet; anything else against a version of this session's
    // view that has exactly these pieces at these places for these tokens.
    std::size_t straight_served = 0;
    while (straight_served < g.blocks && got[straight_served].first == 0 && got[straight_served].shift == 0 &&
           got[straight_served].position == std::uint64_t(straight_served) * tpb)
      ++straight_served;
    const view* source = nullptr;  // the version the pieces came from, when not straight
    if (straight_served == g.blocks) {
      // (A block matched only in part holds rows past the match that belong to the stored
      // history: checked only when served whole; tests/stress/test_model checks rows.)
      for (std::uint32_t b = 0; b < g.blocks; ++b) {
        const std::size_t end = std::size_t(b) * tpb + got[b].tokens;
        if (got[b].tokens < tpb && end < prompt.size()) continue;  // matched in part
        std::vector<std::byte> want(bb);
        fill_block(want, prefix_seed(prompt, end));
        if (std::memcmp(got[b].payload, want.data(), bb) != 0) {
          ++wrong;
          std::fprintf(
              stderr,
              "WRONG straight op %llu node %d session %d block %u of %u tokens %u prompt %zu cur %zu straight %d\n",
              (unsigned long long)op, n, s, b, g.blocks, got[b].tokens, prompt.size(), v.toks.size(),
              int(v.straight(v.pieces.size())));
        }
      }
    } else {
      for (auto it = versions.rbegin(); it != versions.rend() && !source; ++it) {
        bool same = it->pieces.size() >= g.blocks;
        std::size_t pos = 0;
        for (std::uint32_t b = 0; same && b < g.blocks; ++b) {
          const piece& p = it->pieces[b];
          same = got[b].first == p.first && got[b].shift == p.shift && got[b].position == pos &&
                 got[b].tokens <= p.count && pos + got[b].tokens <= it->toks.size() &&
                 std::equal(prompt.begin() + std::ptrdiff_t(pos), prompt.begin() + std::ptrdiff_t(pos + got[b].tokens),
                            it->toks.begin() + std::ptrdiff_t(pos));
          if (same) {
            std::vector<std::byte> want(bb);
            fill_block(want, p.seed);
            same = std::memcmp(got[b].payload, want.data(), bb) == 0;
          }
          pos += p.count;
        }
        if (same) source = &*it;
      }
      if (!source) {
        ++wrong;
        std::fprintf(stderr, "WRONG view op %llu node %d session %d served %u pieces, %llu tokens; versions %zu\n",
                     (unsigned long long)op, n, s, g.blocks, (unsigned long long)g.tokens, versions.size());
        for (std::uint32_t b = 0; b < g.blocks; ++b)
          std::fprintf(stderr, "  got %u: first %u tokens %u pos %llu shift %lld\n", b, got[b].first, got[b].tokens,
                       (unsigned long long)got[b].position, (long long)got[b].shift);
        const view& last = versions.back();
        std::size_t pos = 0;
        for (std::size_t b = 0; b < last.pieces.size(); ++b) {
          std::vector<std::byte> want(bb);
          fill_block(want, last.pieces[b].seed);
          std::fprintf(stderr, "  cur %zu: first %u count %u tokens %u pos %zu shift %lld bytes-eq %d\n", b,
                       last.pieces[b].first, last.pieces[b].count, last.pieces[b].tokens, pos,
                       (long long)last.pieces[b].shift,
                       b < g.blocks ? int(std::memcmp(got[b].payload, want.data(), bb) == 0) : -1);
          pos += last.pieces[b].count;
        }
      }
      ++cut_views_served;
    }
    served_tokens += g.tokens;
    if (last_node[std::size_t(s)] >= 0 && last_node[std::size_t(s)] != n && g.tokens > 0) ++warm_cross_node;
    // The engine computes the rest and saves after the last whole block boundary of the
    // pieces it loaded (a truncated view's pieces need not end on one).
    std::size_t boundary = 0, used = 0, acc = 0;
    for (std::uint32_t b = 0; b < g.blocks; ++b) {
      acc += got[b].tokens;
      if (acc % tpb == 0 && acc < prompt.size()) boundary = acc, used = b + 1;
    }
    lease.release();
    view loaded;  // the pieces the save goes on from
    if (source) {
      loaded.pieces.assign(source->pieces.begin(), source->pieces.begin() + std::ptrdiff_t(used));
    } else {
      for (std::size_t b = 0; b < used; ++b)
        loaded.pieces.push_back({prefix_seed(prompt, (b + 1) * tpb), tpb, 0, tpb, 0});
    }
    const auto saved = [&](std::uint32_t first) {
      // The blocks from `first` on, computed over the pieces before them and the prompt.
      const std::uint32_t blocks = std::uint32_t((prompt.size() + tpb - 1) / tpb);
      view next;
      next.toks = prompt;
      next.pieces.assign(loaded.pieces.begin(),
                         loaded.pieces.begin() + std::ptrdiff_t(first ? loaded.pieces.size() : 0));
      std::vector<std::byte> data(std::size_t(blocks - first) * bb);
      for (std::uint32_t b = first; b < blocks; ++b) {
        const std::size_t end = std::min<std::size_t>(prompt.size(), std::size_t(b + 1) * tpb);
        const std::uint32_t n_tokens = std::uint32_t(end - std::size_t(b) * tpb);
        const std::uint64_t seed = saved_seed(next, next.pieces.size(), prompt, end);
        fill_block(std::span(data).subspan(std::size_t(b - first) * bb, bb), seed);
        next.pieces.push_back({seed, n_tokens, 0, n_tokens, 0});
      }
      return std::pair(std::move(data), std::move(next));
    };
    auto [data, next] = saved(std::uint32_t(boundary / tpb));
    errc e = kv.put(key, prompt, std::uint32_t(boundary / tpb), data);
    if (e != errc::ok) {
      // Rejected (the node's view moved) or no room: the engine saves the whole history.
      std::tie(data, next) = saved(0);
      e = kv.put(key, prompt, 0, data);
    }
    if (e == errc::ok) {
      remember(std::move(next));
      last_node[std::size_t(s)] = n;
    }
  }
  for (auto& nd : nodes) absorb(nd);
  INFO("seed " << seed << ": " << ops << " ops, " << served_tokens << " tokens served, " << warm_cross_node
               << " cross-node turns served warm, " << fetched << " blocks fetched from the tier, " << publishes
               << " write-behinds, " << prefetch_misses << " remote misses");
  CHECK(wrong == 0);
  CHECK(over == 0);
  CHECK(warm_cross_node > ops / 10);
  CHECK(fetched > 0);
  CHECK(cut_views_served > ops / 50);
  WARN("remote model: seed " << seed << ", " << ops << " ops, " << served_tokens << " tokens served, "
                             << warm_cross_node << " cross-node turns warm, " << fetched
                             << " blocks fetched from the tier, " << publishes << " write-behinds (" << skipped
                             << " skipped), " << lost << " blocks lost from the tier, " << resends << " resends, "
                             << cuts << " truncations, " << cut_views_served << " loads of cut views");
}

int main(int argc, char** argv) { return run_with_cluster(argc, argv, "test_store_remote_model"); }
