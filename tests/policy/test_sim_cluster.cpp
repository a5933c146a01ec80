// The simulator's multi-node mode (issue 15; docs/sim.md, "Several nodes"): N engines
// with their own tiers, a router, and a shared tier (bench/sim/shared_tier.hpp) that
// continues a lookup where a node's own tiers end. Every run checks the caches' and the
// shared tier's invariants as it goes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <list>
#include <map>
#include <random>
#include <unordered_map>
#include <vector>

#include "engine_sim.hpp"

using namespace attnstore;

namespace {

/// `copies` copies of every session of w, with the same times, interleaved: copy j of
/// session k is session k * copies + j (sessions stay ordered by first arrival), so its
/// home node under sticky routing over `copies` nodes is j.
trace::workload replicate(const trace::workload& w, std::uint32_t copies) {
  trace::workload m;
  m.name = w.name;
  m.open_loop = w.open_loop;
  m.prefixes = w.prefixes;
  m.first.push_back(0);
  for (std::uint32_t s = 0; s < w.sessions(); ++s)
    for (std::uint32_t j = 0; j < copies; ++j) {
      for (trace::request r : w.session(s)) {
        r.session = s * copies + j;
        m.requests.push_back(r);
      }
      m.first.push_back(std::uint32_t(m.requests.size()));
    }
  return m;
}

trace::workload paper_trace(std::uint64_t requests, double sessions_per_s) {
  trace::generator_options g = trace::preset("paper");
  g.requests = requests;
  g.session_rate = sessions_per_s;
  return trace::generate(g);
}

sim::sim_config config(double dram_gb, double ssd_tb, std::uint32_t nodes, sim::routing route) {
  sim::sim_config c;
  c.tiers.dram_bytes = dram_gb * 1e9;
  c.tiers.ssd_bytes = ssd_tb * 1e12;
  c.cluster.nodes = nodes;
  c.cluster.route = route;
  c.check = true;
  return c;
}

/// Every turn as the observer saw it start.
struct turn_seen {
  std::uint32_t node = 0;
  std::uint64_t history = 0, local = 0, shared = 0;
  bool seen = false;
};

struct turn_log {
  const trace::workload* w = nullptr;
  std::vector<turn_seen> turns;  // by request index

  explicit turn_log(const trace::workload& wl) : w(&wl), turns(wl.requests.size()) {}
  sim::cluster_observer observer() {
    sim::cluster_observer o;
    o.context = this;
    o.admitted = [](void* ctx, double, std::uint32_t node, std::uint32_t session, std::uint32_t turn,
                    std::uint64_t history, std::uint64_t local, std::uint64_t shared) {
      auto* self = static_cast<turn_log*>(ctx);
      turn_seen& t = self->turns[self->w->first[session] + turn];
      REQUIRE(!t.seen);
      t = {node, history, local, shared, true};
    };
    return o;
  }
};

sim::sim_result run(const trace::workload& w, sim::policy_kind k, const sim::sim_config& c,
                    const sim::cluster_observer& o = {}) {
  sim::engine_sim e(w, k, c);
  e.observe(o);
  sim::sim_result r = e.run();
  INFO(sim::to_string(k) << ": " << r.invariant_error);
  REQUIRE(r.invariants_ok);
  CHECK(r.requests == w.requests.size());
  CHECK(r.hit_tokens == r.dram_hit_tokens + r.ssd_hit_tokens + r.shared_tier_hit_tokens);
  CHECK(r.reused_tokens <= r.hit_tokens);
  return r;
}

}  // namespace

TEST_CASE("sim cluster: sticky routing without a shared tier is N independent engines") {
  // Small tiers, so that every policy evicts, demotes and prefetches.
  const trace::workload w = paper_trace(2500, 1.0);
  constexpr std::uint32_t n = 3;
  const trace::workload m = replicate(w, n);
  for (auto k : {sim::policy_kind::lru, sim::policy_kind::scheduler_aware, sim::policy_kind::opt,
                 sim::policy_kind::predictive}) {
    const sim::sim_result one = run(w, k, config(8, 0.1, 1, sim::routing::sticky));
    const sim::sim_result all = run(m, k, config(8, 0.1, n, sim::routing::sticky));
    INFO(sim::to_string(k));
    REQUIRE(one.evicted_sessions > 0);
    CHECK(all.requests == n * one.requests);
    CHECK(all.measured_requests == n * one.measured_requests);
    REQUIRE(all.node_requests.size() == n);
    for (auto x : all.node_requests) CHECK(x == one.measured_requests);
    using counts = std::uint64_t sim::sim_result::*;
    for (counts f :
         {&sim::sim_result::history_tokens, &sim::sim_result::hit_tokens, &sim::sim_result::dram_hit_tokens,
          &sim::sim_result::ssd_hit_tokens, &sim::sim_result::reused_tokens, &sim::sim_result::prefill_tokens,
          &sim::sim_result::truncations, &sim::sim_result::evicted_sessions})
      CHECK(all.*f == n * (one.*f));
    using bytes = double sim::sim_result::*;
    for (bytes f : {&sim::sim_result::bytes_hbm_to_dram, &sim::sim_result::bytes_dram_to_ssd,
                    &sim::sim_result::bytes_ssd_to_dram, &sim::sim_result::bytes_dropped})
      CHECK(all.*f == n * (one.*f));
    CHECK(all.ttft_p50 == one.ttft_p50);
    CHECK(all.ttft_p99 == one.ttft_p99);
    CHECK(all.ttft_mean == Approx(one.ttft_mean).epsilon(1e-6));
    CHECK(all.same_node_rate() == 1.0);
    CHECK(all.hit_rate_shared() == 0);
  }
}

TEST_CASE("sim cluster: without a shared tier a turn finds what its node saved of the session last") {
  // Ample tiers (nothing is evicted) and a context nothing overflows: a turn finds
  // exactly the history its node saved at the end of the session's last turn there.
  const trace::workload w = paper_trace(4000, 3.0);
  sim::sim_config c = config(128, 10, 3, sim::routing::sticky);
  c.engine.context_tokens = 65536;
  c.engine.hbm_kv_tokens = 4000000;
  double sticky_hit = 0;
  for (auto route : {sim::routing::sticky, sim::routing::round_robin, sim::routing::random}) {
    c.cluster.route = route;
    turn_log log(w);
    const sim::sim_result r = run(w, sim::policy_kind::lru, c, log.observer());
    INFO(sim::to_string(route));
    REQUIRE(r.truncations == 0);
    REQUIRE(r.evicted_sessions == 0);
    std::uint64_t later = 0, same = 0;
    for (std::uint32_t s = 0; s < w.sessions(); ++s) {
      std::map<std::uint32_t, std::uint32_t> last_on;  // node -> the session's last turn there
      for (std::uint32_t q = w.first[s]; q < w.first[s + 1]; ++q) {
        const turn_seen& t = log.turns[q];
        REQUIRE(t.seen);
        CHECK(t.shared == 0);
        const auto it = last_on.find(t.node);
        // Its node saved, at the end of turn j, the history turn j + 1 starts with.
        const std::uint64_t expect = it == last_on.end() ? 0 : log.turns[it->second + 1].history;
        if (t.local != expect)
          FAIL_CHECK("session " << s << " turn " << q - w.first[s] << ": found " << t.local << " of " << t.history
                                << ", its node saved " << expect);
        if (q > w.first[s]) {
          ++later;
          same += log.turns[q - 1].node == t.node;
        }
        last_on[t.node] = q;
      }
    }
    const double same_rate = double(same) / double(later);
    if (route == sim::routing::sticky) {
      CHECK(same_rate == 1.0);
      CHECK(r.hit_rate() == 1.0);
      sticky_hit = r.hit_rate();
    } else if (route == sim::routing::round_robin) {
      CHECK(same_rate == 0.0);  // turn k on node (home + k) mod 3, turn k - 1 elsewhere
      CHECK(r.hit_rate() < 0.5 * sticky_hit);
    } else {
      CHECK(same_rate == Approx(1.0 / 3).margin(0.03));
      CHECK(r.hit_rate() < 0.75 * sticky_hit);
      CHECK(r.hit_rate() > same_rate * 0.5);
    }
    CHECK(r.same_node_rate() == Approx(same_rate).margin(0.03));  // the measured window's share
  }
}

TEST_CASE("sim cluster: a shared tier larger than the working set gives round-robin the sticky hit rate") {
  const trace::workload w = paper_trace(4000, 3.0);
  sim::sim_config c = config(128, 10, 3, sim::routing::sticky);
  const sim::sim_result sticky = run(w, sim::policy_kind::scheduler_aware, c);
  c.cluster.route = sim::routing::round_robin;
  const sim::sim_result local_only = run(w, sim::policy_kind::scheduler_aware, c);
  c.cluster.shared_tier_bytes = 20e12;
  c.cluster.shared_write_bytes_in_flight = 100e9;
  turn_log log(w);
  const sim::sim_result shared = run(w, sim::policy_kind::scheduler_aware, c, log.observer());
  INFO("sticky " << sticky.hit_rate() << ", round-robin " << local_only.hit_rate() << ", with the shared tier "
                 << shared.hit_rate() << " (local " << shared.hit_rate_local() << ")");
  CHECK(local_only.hit_rate() < 0.5 * sticky.hit_rate());
  CHECK(shared.hit_rate() > sticky.hit_rate() - 0.01);
  CHECK(shared.hit_rate_shared() > 0.5);
  CHECK(shared.bytes_to_shared > 0);
  CHECK(shared.bytes_from_shared > 0);
  CHECK(shared.bytes_shared_skipped == 0);
  CHECK(shared.shared_tier_evicted_bytes == 0);
  // Turn by turn: the session's blocks were published after its turn before, so its
  // whole history is found (its own node's stale copy, then the shared tier), unless the
  // next turn came before that write completed.
  std::uint64_t later = 0, whole = 0;
  for (std::uint32_t s = 0; s < w.sessions(); ++s)
    for (std::uint32_t q = w.first[s] + 1; q < w.first[s + 1]; ++q) {
      const turn_seen& t = log.turns[q];
      ++later;
      whole += t.local + t.shared == t.history;
      CHECK(t.local + t.shared <= t.history);
    }
  CHECK(double(whole) >= 0.995 * double(later));
}

TEST_CASE("sim cluster: with share_by_policy only the sessions the policy finds worth it are published") {
  trace::generator_options g = trace::preset("think");  // users who read and type: typing times for hints
  g.requests = 6000;
  const trace::workload w = trace::generate(g);
  sim::sim_config c = config(16, 0.2, 3, sim::routing::random);
  c.cluster.shared_tier_bytes = 2e12;
  c.hint_composing = 1;
  const sim::sim_result all = run(w, sim::policy_kind::predictive, c);
  CHECK(all.publishes_declined == 0);
  CHECK(all.bytes_to_shared > 0);
  c.cluster.share_by_policy = true;
  {  // A policy that does not learn returns finds every session worth it: the same run.
    sim::sim_config every = c;
    every.cluster.share_by_policy = false;
    const sim::sim_result a = run(w, sim::policy_kind::scheduler_aware, every);
    const sim::sim_result b = run(w, sim::policy_kind::scheduler_aware, c);
    CHECK(b.publishes_declined == 0);
    CHECK(b.bytes_to_shared == a.bytes_to_shared);
    CHECK(b.hit_rate() == a.hit_rate());
  }
  // predictive with no bar: the same as publishing all.
  c.tiers.predictive.share_min_probability = 0;
  const sim::sim_result no_bar = run(w, sim::policy_kind::predictive, c);
  CHECK(no_bar.publishes_declined == 0);
  CHECK(no_bar.bytes_to_shared == all.bytes_to_shared);
  CHECK(no_bar.hit_rate() == all.hit_rate());
  // A bar no return clears once the returns are learned: most saves stay local, fewer
  // bytes go out, and fewer turns find their history in the shared tier.
  c.tiers.predictive.share_min_probability = 1;
  const sim::sim_result high_bar = run(w, sim::policy_kind::predictive, c);
  INFO("all: " << all.bytes_to_shared << " B, " << all.hit_rate_shared() << "; high bar: " << high_bar.bytes_to_shared
               << " B, " << high_bar.hit_rate_shared() << ", declined " << high_bar.publishes_declined);
  CHECK(high_bar.publishes_declined > 0);
  CHECK(high_bar.bytes_to_shared < 0.5 * all.bytes_to_shared);
  CHECK(high_bar.hit_rate_shared() < all.hit_rate_shared());
}

TEST_CASE("sim cluster: one node with a shared tier uses it below SSD") {
  const trace::workload w = paper_trace(4000, 1.0);
  sim::sim_config c = config(8, 0.05, 1, sim::routing::sticky);
  const sim::sim_result local = run(w, sim::policy_kind::lru, c);
  c.cluster.shared_tier_bytes = 10e12;
  const sim::sim_result shared = run(w, sim::policy_kind::lru, c);
  INFO("local only " << local.hit_rate() << ", with the shared tier " << shared.hit_rate());
  CHECK(shared.hit_rate_local() == Approx(local.hit_rate()).margin(0.05));
  CHECK(shared.hit_rate() > local.hit_rate() + 0.2);
  CHECK(shared.hit_rate() > 0.98);
  CHECK(shared.ttft_mean < local.ttft_mean);
}

TEST_CASE("sim cluster: the shared tier serves only blocks a node wrote and it still holds") {
  // A shared tier far smaller than the working set, so that LRU evicts all the time.
  for (const char* preset : {"paper", "shared-prompt"}) {
    trace::generator_options g = trace::preset(preset);
    g.requests = 3000;
    g.session_rate = 3.0;
    const trace::workload w = trace::generate(g);
    const bool prompts = w.prefixes > 0;
    sim::sim_config c = config(8, 0.05, 3, sim::routing::round_robin);
    c.cluster.shared_tier_bytes = 150e9;
    struct model {
      std::unordered_map<std::uint64_t, std::uint32_t> present;  // key.lo ^ key.hi -> publishing session
      std::uint64_t served = 0, evicted = 0, foreign = 0;
      bool prompts = false;
      static std::uint64_t id(const hash128& k) { return k.lo ^ (k.hi * 0x9e3779b97f4a7c15ull); }
    } m;
    m.prompts = prompts;
    sim::cluster_observer o;
    o.context = &m;
    o.published = [](void* ctx, double, std::uint32_t, std::uint32_t session, std::span<const hash128> keys) {
      auto* md = static_cast<model*>(ctx);
      for (const hash128& k : keys) md->present.emplace(model::id(k), session);
    };
    o.evicted = [](void* ctx, const hash128& k) {
      auto* md = static_cast<model*>(ctx);
      REQUIRE(md->present.erase(model::id(k)) == 1);  // only what was written is evicted
      ++md->evicted;
    };
    o.served = [](void* ctx, double, std::uint32_t, std::uint32_t session, std::uint32_t,
                  std::span<const hash128> keys) {
      auto* md = static_cast<model*>(ctx);
      for (const hash128& k : keys) {
        const auto it = md->present.find(model::id(k));
        REQUIRE(it != md->present.end());  // written, completed and not evicted since
        // Without system prompts no two sessions share a block: a block is the session's own.
        if (it->second != session) ++md->foreign;
        ++md->served;
      }
    };
    // With a slow link, writes complete seconds after the turn that made them, and
    // sessions often come back before: what is in flight is not served.
    for (auto [k, link] : {std::pair{sim::policy_kind::lru, 12.5e9}, std::pair{sim::policy_kind::predictive, 12.5e9},
                           std::pair{sim::policy_kind::lru, 0.2e9}}) {
      c.cluster.shared_tier_bytes_per_s = link;
      m = model{};
      m.prompts = prompts;
      const sim::sim_result r = run(w, k, c, o);
      INFO(preset << " " << sim::to_string(k) << ", link " << link / 1e9 << " GB/s");
      CHECK(m.served > 0);
      CHECK(m.evicted > 0);
      if (link > 1e9) CHECK(r.shared_tier_evicted_bytes > 0);
      if (!prompts) CHECK(m.foreign == 0);
      if (prompts) CHECK(m.foreign > 0);  // a system prompt's blocks, written by another session
    }
  }
}

TEST_CASE("sim cluster: reads from the shared tier take the node link's time, writes its bound") {
  const trace::workload w = paper_trace(3000, 3.0);
  sim::sim_config c = config(128, 10, 3, sim::routing::round_robin);
  c.cluster.shared_tier_bytes = 20e12;
  c.cluster.shared_tier_bytes_per_s = 100e9;
  c.cluster.shared_tier_latency_s = 0;
  const sim::sim_result fast = run(w, sim::policy_kind::lru, c);
  c.cluster.shared_tier_bytes_per_s = 1e9;
  c.cluster.shared_tier_latency_s = 5e-3;
  const sim::sim_result slow = run(w, sim::policy_kind::lru, c);
  const double kvb = c.model.kv_bytes_per_token;
  for (const auto* r : {&fast, &slow}) {
    CHECK(r->bytes_from_shared <= double(r->shared_tier_hit_tokens) * kvb);
    CHECK(r->hit_rate_shared() > 0.4);
  }
  // A slow link delivers less within the prefill: the engine recomputes more and waits.
  CHECK(slow.bytes_from_shared < 0.5 * fast.bytes_from_shared);
  CHECK(slow.reuse_rate() < fast.reuse_rate());
  CHECK(slow.ttft_mean > fast.ttft_mean);
  // Write-behind with room for about one block in flight: most of each publish is
  // skipped, and the tier finds less.
  c.cluster.shared_tier_bytes_per_s = 100e9;
  c.cluster.shared_tier_latency_s = 0;
  c.cluster.shared_write_bytes_in_flight = 64 * kvb;
  const sim::sim_result bound = run(w, sim::policy_kind::lru, c);
  CHECK(fast.bytes_shared_skipped == 0);
  CHECK(bound.bytes_shared_skipped > 0);
  CHECK(bound.bytes_to_shared < fast.bytes_to_shared);
  CHECK(bound.hit_rate_shared() < fast.hit_rate_shared() - 0.1);
}

TEST_CASE("sim cluster: the same routes for every policy, and for the same seed") {
  const trace::workload w = paper_trace(2000, 3.0);
  sim::sim_config c = config(16, 0.2, 4, sim::routing::random);
  std::vector<std::uint32_t> nodes[3];
  int i = 0;
  for (auto [k, seed] : {std::pair{sim::policy_kind::lru, 7ull}, std::pair{sim::policy_kind::opt, 7ull},
                         std::pair{sim::policy_kind::lru, 8ull}}) {
    c.cluster.route_seed = seed;
    turn_log log(w);
    (void)run(w, k, c, log.observer());
    for (const auto& t : log.turns) nodes[i].push_back(t.node);
    ++i;
  }
  CHECK(nodes[0] == nodes[1]);
  CHECK(nodes[0] != nodes[2]);
  std::vector<std::uint32_t> per(4, 0);
  for (auto x : nodes[0]) ++per[x];
  for (auto x : per) CHECK(double(x) == Approx(w.requests.size() / 4.0).epsilon(0.1));
}

TEST_CASE("shared_tier: exact LRU over bytes against a reference model") {
  std::mt19937_64 rng(42);
  for (double capacity : {1000.0, 20000.0}) {
    std::vector<hash128> evicted;
    sim::shared_tier_observer o{
        &evicted, [](void* ctx, const hash128& k) { static_cast<std::vector<hash128>*>(ctx)->push_back(k); }};
    sim::shared_tier t(capacity, o);
    std::list<std::pair<std::uint64_t, std::uint64_t>> lru;  // (key, bytes), most recent first
    std::uint64_t stored = 0;
    auto key = [](std::uint64_t k) { return hash128{k, ~k}; };
    auto find = [&](std::uint64_t k) {
      return std::find_if(lru.begin(), lru.end(), [&](auto& e) { return e.first == k; });
    };
    for (int step = 0; step < 20000; ++step) {
      const std::uint64_t k = rng() % 64;
      const int op = int(rng() % 3);
      if (op == 0) {  // get
        const auto it = find(k);
        CHECK(t.get(key(k)) == (it != lru.end()));
        if (it != lru.end()) lru.splice(lru.begin(), lru, it);
      } else if (op == 1) {  // touch (a publish of a key that exists)
        const auto it = find(k);
        CHECK(t.touch(key(k)) == (it != lru.end()));
        if (it != lru.end()) lru.splice(lru.begin(), lru, it);
      } else {  // put
        const std::uint64_t bytes = 1 + rng() % 1200;
        evicted.clear();
        const bool stored_now = t.put(key(k), bytes, 0);
        std::vector<hash128> expect;
        if (const auto it = find(k); it != lru.end()) {
          lru.splice(lru.begin(), lru, it);
          CHECK(stored_now);
        } else if (double(bytes) > capacity) {
          CHECK(!stored_now);
        } else {
          while (double(stored + bytes) > capacity) {
            expect.push_back(key(lru.back().first));
            stored -= lru.back().second;
            lru.pop_back();
          }
          lru.emplace_front(k, bytes);
          stored += bytes;
          CHECK(stored_now);
        }
        CHECK(evicted == expect);
      }
      REQUIRE(t.stored_bytes() == stored);
      REQUIRE(t.entries() == lru.size());
      if (!lru.empty()) REQUIRE(*t.oldest() == key(lru.back().first));
    }
    CHECK(t.check());
    CHECK(t.evicted_keys() > 100);
  }
}
