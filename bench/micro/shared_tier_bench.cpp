// shared_tier_bench: GET and SET throughput of KV blocks through shared_tier (the real
// path: records built and checksummed, EXISTS + SET NX and the manifest on the writer
// thread; manifest, blocks, header checks, chain recomputation and checksummed copy on
// reads), next to the bare cluster client moving the same values with the same batches in
// the same run. scripts/bench-shared-tier.sh starts the cluster, runs this, then
// redis-benchmark (the server's limit) against the same cluster, and prints the ratios.
//
//   build/bench/shared_tier_bench --seed 127.0.0.1:7300 [--user U --password PW]
//       [--blocks 1280] [--batch 48] [--block-bytes 1048576] [--tokens-per-block 16]
//       [--in-flight-mib 256] [--json]
//
// Working set: --blocks distinct blocks (default 1280 x (1 MiB + 4 KiB) = 1.26 GiB), as
// sessions of --batch blocks each; every publish and every fetch moves one session: a
// pipelined batch of --batch values over all masters (48 over 3: ~16 per node, as
// redis-benchmark -c 3 -P 16). Tokens are unique per run, so nothing is found present.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/shared/shared_tier.hpp"

namespace {

using namespace attnstore;
using namespace attnstore::shared;
using clock_type = std::chrono::steady_clock;

struct options {
  std::string seed, user, password;
  std::size_t blocks = 1280, batch = 48, block_bytes = 1 << 20, in_flight_mib = 256;
  std::uint32_t tpb = 16;
  bool json = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "shared_tier_bench: %s\n"
               "usage: shared_tier_bench --seed HOST:PORT [--user U --password PW] [--blocks N] [--batch B]\n"
               "       [--block-bytes N] [--tokens-per-block T] [--in-flight-mib M] [--json]\n",
               why);
  std::exit(2);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    auto number = [&]() -> std::size_t {
      const std::string v = value();
      char* end = nullptr;
      const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end || n == 0) usage((a + " needs a positive number, got '" + v + "'").c_str());
      return std::size_t(n);
    };
    if (a == "--seed") {
      o.seed = value();
    } else if (a == "--user") {
      o.user = value();
    } else if (a == "--password") {
      o.password = value();
    } else if (a == "--blocks") {
      o.blocks = number();
    } else if (a == "--batch") {
      o.batch = number();
    } else if (a == "--block-bytes") {
      o.block_bytes = number();
    } else if (a == "--tokens-per-block") {
      o.tpb = std::uint32_t(number());
    } else if (a == "--in-flight-mib") {
      o.in_flight_mib = number();
    } else if (a == "--json") {
      o.json = true;
    } else {
      usage(("unknown argument '" + a + "'").c_str());
    }
  }
  if (o.seed.empty()) usage("--seed is required");
  if (o.batch > o.blocks) o.batch = o.blocks;
  return o;
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct phase {
  double seconds = 0;
  std::size_t values = 0;
  std::size_t bytes = 0;  // value bytes moved
  std::size_t failed = 0;
  double ops() const { return seconds > 0 ? double(values) / seconds : 0; }
  double gbps() const { return seconds > 0 ? double(bytes) / seconds / 1e9 : 0; }
};

void print_phase(const char* name, const phase& p) {
  std::fprintf(stderr, "  %-28s %6zu values in %7.3f s: %8.1f values/s, %6.2f GB/s%s\n", name, p.values, p.seconds,
               p.ops(), p.gbps(), p.failed ? " (FAILURES)" : "");
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  shared_tier_config cfg;
  cfg.cluster.seeds = {o.seed};
  cfg.cluster.user = o.user;
  cfg.cluster.password = o.password;
  cfg.cluster.request_timeout = std::chrono::milliseconds{10000};
  cfg.cluster.command_timeout = std::chrono::milliseconds{5000};
  cfg.model = model_id{{0x62656e6368ull, std::uint64_t(clock_type::now().time_since_epoch().count())}};
  cfg.fleet_secret = hash128{0x5ecull, 0x7e7ull};
  cfg.tokens_per_block = o.tpb;
  cfg.block_bytes = o.block_bytes;
  cfg.block_ttl = std::chrono::milliseconds{3600 * 1000};
  cfg.manifest_ttl = cfg.block_ttl;
  cfg.max_bytes_in_flight = o.in_flight_mib << 20;
  cfg.max_batch_bytes =
      std::max<std::size_t>(std::size_t(1) << 20, o.batch * (format::header_bytes(o.tpb) + o.block_bytes));
  std::unique_ptr<shared_tier> tier;
  try {
    tier = std::make_unique<shared_tier>(cfg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shared_tier_bench: %s\n", e.what());
    return 2;
  }
  const record_shape shape = tier->shape();
  const std::size_t sessions = o.blocks / o.batch;
  const std::size_t blocks = sessions * o.batch;
  std::fprintf(stderr,
               "shared_tier_bench: %zu sessions x %zu blocks of %zu payload bytes (records of %zu bytes), %.2f GiB "
               "written per phase\n",
               sessions, o.batch, o.block_bytes, shape.record_bytes(),
               double(blocks * shape.record_bytes()) / double(1 << 30));

  // Payloads: `batch` distinct buffers reused by every session (the keys differ by tokens).
  std::vector<std::vector<std::byte>> payloads(o.batch, std::vector<std::byte>(o.block_bytes));
  for (std::size_t b = 0; b < o.batch; ++b) {
    std::uint64_t x = 0x9E3779B97F4A7C15ull * (b + 1);
    for (auto& v : payloads[b]) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      v = std::byte(x);
    }
  }
  std::vector<const std::byte*> payload_ptrs;
  for (auto& p : payloads) payload_ptrs.push_back(p.data());
  const std::uint64_t run = std::uint64_t(clock_type::now().time_since_epoch().count());
  auto tokens_of = [&](std::size_t s) {
    std::vector<token_id> t(o.batch * o.tpb);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = token_id((run + s * 1000003 + i * 7919) % 151936);
    return t;
  };
  auto key_of = [&](std::size_t s) { return "bench-" + std::to_string(run) + "-" + std::to_string(s); };

  // ---- SET through the tier: publish every session (retrying while busy), then flush.
  phase tier_set;
  {
    std::vector<std::vector<token_id>> toks(sessions);
    for (std::size_t s = 0; s < sessions; ++s) toks[s] = tokens_of(s);
    const auto t0 = clock_type::now();
    for (std::size_t s = 0; s < sessions; ++s) {
      const std::string id = key_of(s);
      const shared_session ss = tier->identify(session_key{"bench", id});
      const publish_request req{.sequence = 1, .tokens = toks[s], .keys = {}, .payloads = payload_ptrs};
      shared_status st;
      while ((st = tier->publish(ss, req)) == shared_status::busy)
        std::this_thread::sleep_for(std::chrono::microseconds{200});
      if (st != shared_status::ok) ++tier_set.failed;
    }
    if (tier->flush(std::chrono::minutes{10}) != shared_status::ok) ++tier_set.failed;
    tier_set.seconds = seconds_since(t0);
    const auto s = tier->stats();
    tier_set.values = s.blocks_written;
    tier_set.bytes = s.blocks_written * shape.record_bytes();
    tier_set.failed += s.write_failures.total() + (blocks - s.blocks_written);
  }

  // ---- GET through the tier: manifest, then every block verified into the caller's buffers.
  phase tier_get;
  {
    std::vector<std::vector<std::byte>> out(o.batch, std::vector<std::byte>(o.block_bytes));
    std::vector<std::byte*> out_ptrs;
    for (auto& b : out) out_ptrs.push_back(b.data());
    std::vector<block_ref> refs(o.batch);
    std::vector<shared_status> status(o.batch);
    session_manifest m;
    const std::uint64_t read0 = tier->stats().bytes_read;
    const auto t0 = clock_type::now();
    for (std::size_t s = 0; s < sessions; ++s) {
      const shared_session ss = tier->identify(session_key{"bench", key_of(s)});
      if (tier->fetch_manifest(ss, m) != shared_status::ok || m.blocks.size() != o.batch) {
        ++tier_get.failed;
        continue;
      }
      for (std::size_t i = 0; i < o.batch; ++i) refs[i] = m.ref(i);
      const fetch_result r = tier->fetch_blocks(refs, out_ptrs, status);
      tier_get.values += r.prefix;
      if (r.prefix != o.batch) ++tier_get.failed;
    }
    tier_get.seconds = seconds_since(t0);
    tier_get.bytes = tier->stats().bytes_read - read0;
    // The last session's blocks are what was published.
    for (std::size_t i = 0; i < o.batch; ++i)
      if (out[i] != payloads[i]) ++tier_get.failed;
  }

  // ---- the bare cluster client: the same values, the same batches, no records, no checks.
  phase raw_set, raw_get;
  {
    redis_cluster raw(cfg.cluster);
    std::vector<std::vector<std::byte>> values(o.batch, std::vector<std::byte>(shape.record_bytes()));
    for (std::size_t b = 0; b < o.batch; ++b) std::memcpy(values[b].data(), payloads[b].data(), o.block_bytes);
    std::vector<std::string> keys(blocks);
    for (std::size_t i = 0; i < blocks; ++i)
      keys[i] = "rawbench:" + std::to_string(run) + ":{" + std::to_string(i) + "}";
    std::vector<redis_set_item> items(o.batch);
    std::vector<redis_status> st(o.batch);
    auto t0 = clock_type::now();
    for (std::size_t s = 0; s < sessions; ++s) {
      for (std::size_t b = 0; b < o.batch; ++b)
        items[b] = redis_set_item{keys[s * o.batch + b], values[b], cfg.block_ttl, false};
      raw.set_many(items, st);
      for (auto x : st) (x == redis_status::ok ? raw_set.values : raw_set.failed) += 1;
    }
    raw_set.seconds = seconds_since(t0);
    raw_set.bytes = raw_set.values * shape.record_bytes();
    std::vector<std::string_view> views(o.batch);
    std::vector<redis_get_result> got(o.batch);
    t0 = clock_type::now();
    for (std::size_t s = 0; s < sessions; ++s) {
      for (std::size_t b = 0; b < o.batch; ++b) views[b] = keys[s * o.batch + b];
      raw.get_many(views, got);
      for (auto& g : got) {
        if (g.status == redis_status::ok && g.value.size() == shape.record_bytes()) {
          ++raw_get.values;
          raw_get.bytes += g.value.size();
        } else {
          ++raw_get.failed;
        }
      }
    }
    raw_get.seconds = seconds_since(t0);
    for (std::size_t s = 0; s < sessions; ++s) {  // free the servers' memory for what runs next
      for (std::size_t b = 0; b < o.batch; ++b) views[b] = keys[s * o.batch + b];
      raw.del_many(views, st);
    }
  }

  std::fprintf(stderr, "shared_tier_bench: batches of %zu values, one call at a time\n", o.batch);
  print_phase("shared_tier publish (SET)", tier_set);
  print_phase("shared_tier fetch (GET)", tier_get);
  print_phase("redis_cluster set_many", raw_set);
  print_phase("redis_cluster get_many", raw_get);
  const auto s = tier->stats();
  std::fprintf(stderr, "  tier stats: %llu blocks written, %llu present, %llu hits, %llu misses, %llu write failures\n",
               (unsigned long long)s.blocks_written, (unsigned long long)s.blocks_present,
               (unsigned long long)s.block_hits, (unsigned long long)s.block_misses.total(),
               (unsigned long long)s.write_failures.total());
  const bool ok = !tier_set.failed && !tier_get.failed && !raw_set.failed && !raw_get.failed;
  if (o.json) {
    std::printf(
        "{\"record_bytes\": %zu, \"payload_bytes\": %zu, \"blocks\": %zu, \"batch\": %zu, "
        "\"tier_set_per_s\": %.1f, \"tier_get_per_s\": %.1f, \"tier_set_gbps\": %.3f, \"tier_get_gbps\": %.3f, "
        "\"raw_set_per_s\": %.1f, \"raw_get_per_s\": %.1f, \"raw_set_gbps\": %.3f, \"raw_get_gbps\": %.3f, "
        "\"failures\": %zu}\n",
        shape.record_bytes(), o.block_bytes, blocks, o.batch, tier_set.ops(), tier_get.ops(), tier_set.gbps(),
        tier_get.gbps(), raw_set.ops(), raw_get.ops(), raw_set.gbps(), raw_get.gbps(),
        tier_set.failed + tier_get.failed + raw_set.failed + raw_get.failed);
  }
  return ok ? 0 : 1;
}
