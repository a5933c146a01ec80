// The Redis Cluster client against real clusters that scripts/redis-cluster.sh starts
// (ctest fixtures; the server is never mocked). Environment:
//   ATTNSTORE_REDIS_SEED      host:port of a node of the running cluster
//   ATTNSTORE_REDIS_PASSWORD  its password (requirepass), ATTNSTORE_REDIS_USER its ACL user
// Exits 77 (skipped) when redis-server is not installed.
//   [cluster]   3 masters: big values, batches, write-once SET NX, EXISTS, SET ... GET, OOM,
//               MOVED/ASK during a migration, a hung node, a killed and restarted master,
//               threads sharing a client
//   [failover]  3 masters + 3 replicas: a killed master's slots come back on its replica
#define CATCH_CONFIG_RUNNER
#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/shared/redis_cluster.hpp"
#include "redis_test_support.hpp"

using namespace attnstore::shared;
using namespace redis_test;
using std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

namespace {

/// A key (with `prefix`) whose slot the master on `port` serves.
std::string key_on(const std::vector<int>& owner, int port, const std::string& prefix) {
  for (int i = 0;; ++i) {
    std::string k = prefix + ":" + std::to_string(i);
    if (owner[key_slot(k)] == port) return k;
  }
}

/// Deterministic bytes for (key, size): every value differs from every other.
std::vector<std::byte> pattern(const std::string& key, std::size_t size) {
  std::vector<std::byte> v(size);
  std::uint64_t x = crc16(key) * 0x9E3779B97F4A7C15ull + size;
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v[i] = std::byte(x & 0xff);
  }
  return v;
}

bool same(const redis_value& v, const std::vector<std::byte>& want) {
  return v.size() == want.size() && std::memcmp(v.data(), want.data(), want.size()) == 0;
}

redis_cluster_config base_config() { return test_cluster_config(); }

/// get_many_into of `keys`, each expected `size` bytes long, received as a head of
/// min(size, 4096) bytes and a tail: per key, its status, its size and, when it fitted, its
/// bytes; `arrived` lists the callback's indexes in call order.
struct read_into_result {
  std::vector<redis_status> status;
  std::vector<std::size_t> size;
  std::vector<std::vector<std::byte>> bytes;  // head + tail as they are after the call
  std::vector<std::size_t> arrived;
};
read_into_result read_into(redis_cluster& c, const std::vector<std::string>& keys,
                           const std::vector<std::size_t>& sizes, std::byte fill = std::byte{0xa5}) {
  const std::size_t n = keys.size();
  std::vector<std::vector<std::byte>> heads(n), tails(n);
  std::vector<redis_read_item> items(n);
  for (std::size_t i = 0; i < n; ++i) {
    heads[i].assign(std::min<std::size_t>(sizes[i], 4096), fill);
    tails[i].assign(sizes[i] - heads[i].size(), fill);
    items[i] = redis_read_item{keys[i], heads[i], tails[i]};
  }
  read_into_result r;
  c.get_many_into(
      items, [](void* ctx, std::size_t i) noexcept { static_cast<read_into_result*>(ctx)->arrived.push_back(i); }, &r);
  for (std::size_t i = 0; i < n; ++i) {
    r.status.push_back(items[i].status);
    r.size.push_back(items[i].size);
    std::vector<std::byte> all = heads[i];
    all.insert(all.end(), tails[i].begin(), tails[i].end());
    r.bytes.push_back(std::move(all));
  }
  return r;
}

/// The configuration of the tests of the time bounds.
redis_cluster_config tight_config() {
  redis_cluster_config c = base_config();
  c.connect_timeout = milliseconds{200};
  c.command_timeout = milliseconds{300};
  c.request_timeout = milliseconds{600};
  return c;
}

}  // namespace

int main(int argc, char** argv) { return run_with_cluster(argc, argv, "test_redis_cluster"); }

TEST_CASE("key_slot agrees with the server's CLUSTER KEYSLOT", "[cluster]") {
  admin a(seed_port());
  for (int i = 0; i < 300; ++i) {
    std::string k = "k";
    k += std::to_string(i * 7919);  // not "k" + ...: GCC 12's -Wrestrict misfires on that
    if (i % 3 == 1) k = "x{" + std::to_string(i) + "}y";
    if (i % 5 == 2) k = "{}" + k + "{z}";
    CAPTURE(k);
    reply r = a.cmd("CLUSTER KEYSLOT %b", k.data(), k.size());
    CHECK(r->integer == key_slot(k));
  }
}

TEST_CASE("1 MiB and 4 MiB values round-trip across many slots", "[cluster]") {
  redis_cluster client(base_config());
  const auto owner = slot_owners(seed_port());
  std::set<std::string> nodes_hit;
  const auto t0 = steady::now();
  for (int i = 0; i < 40; ++i) {
    const std::string key = "big:" + std::to_string(i);
    const std::size_t size = (i % 4 == 3 ? 4u : 1u) << 20;
    const auto value = pattern(key, size);
    REQUIRE(client.set(key, value, milliseconds{60000}) == redis_status::ok);
    const auto got = client.get(key);
    REQUIRE(got.status == redis_status::ok);
    CHECK(same(got.value, value));
    nodes_hit.insert(client.endpoint_of_slot(key_slot(key)));
    CHECK(client.endpoint_of_slot(key_slot(key)) == "127.0.0.1:" + std::to_string(owner[key_slot(key)]));
  }
  WARN("40 values (30 x 1 MiB, 10 x 4 MiB) set and read back one by one in " << ms_since(t0) << " ms");
  CHECK(nodes_hit.size() == masters(owner).size());
  CHECK(client.get("big:never-written").status == redis_status::not_found);
  CHECK(client.del("big:0") == redis_status::ok);
  CHECK(client.del("big:0") == redis_status::not_found);
  CHECK(client.get("big:0").status == redis_status::not_found);
  const std::vector<std::byte> small(10, std::byte{7});
  REQUIRE(client.set("ttl:a", small, milliseconds{50}) == redis_status::ok);
  std::this_thread::sleep_for(milliseconds{150});
  CHECK(client.get("ttl:a").status == redis_status::not_found);  // PX took effect
  const auto s = client.stats();
  CHECK(s.refreshes >= 1);
  CHECK(s.moved == 0);
  CHECK(s.timeouts == 0);
}

TEST_CASE("pipelined batches span every node", "[cluster]") {
  redis_cluster client(base_config());
  const auto owner = slot_owners(seed_port());
  constexpr int n = 96;
  std::vector<std::string> keys;
  std::vector<std::vector<std::byte>> values;
  std::set<int> ports;
  for (int i = 0; i < n; ++i) {
    keys.push_back("batch:{" + std::to_string(i) + "}");
    values.push_back(pattern(keys.back(), i % 8 == 0 ? (4u << 20) : (1u << 20) + i));
    ports.insert(owner[key_slot(keys.back())]);
  }
  REQUIRE(ports.size() == masters(owner).size());
  std::vector<redis_set_item> items;
  for (int i = 0; i < n; ++i) items.push_back({keys[i], values[i], milliseconds{60000}});
  std::vector<redis_status> st(n, redis_status::internal_error);
  auto t0 = steady::now();
  client.set_many(items, st);
  const double set_ms = ms_since(t0);
  for (int i = 0; i < n; ++i) CHECK(st[i] == redis_status::ok);

  std::vector<std::string_view> views(keys.begin(), keys.end());
  views.push_back("batch:missing");
  std::vector<redis_get_result> got(views.size());
  t0 = steady::now();
  client.get_many(views, got);
  const double get_ms = ms_since(t0);
  for (int i = 0; i < n; ++i) {
    CAPTURE(i);
    REQUIRE(got[i].status == redis_status::ok);
    CHECK(same(got[i].value, values[i]));
  }
  CHECK(got[n].status == redis_status::not_found);
  std::size_t bytes = 0;
  for (auto& v : values) bytes += v.size();
  WARN("batch of " << n << " values (" << bytes / (1 << 20) << " MiB) over " << ports.size() << " nodes: set " << set_ms
                   << " ms, get " << get_ms << " ms");

  std::vector<redis_status> del(n);
  client.del_many(std::span<const std::string_view>(views.data(), n), del);
  for (auto s : del) CHECK(s == redis_status::ok);
  client.get_many(views, got);
  for (auto& g : got) CHECK(g.status == redis_status::not_found);
  CHECK(client.stats().connects == ports.size());  // one connection per node, reused
}

TEST_CASE("write-once SET NX, EXISTS and SET ... GET across nodes", "[cluster]") {
  redis_cluster client(base_config());
  const auto owner = slot_owners(seed_port());
  std::vector<std::string> keys;
  std::set<int> ports;
  for (int i = 0; i < 12; ++i) {
    keys.push_back("nx:{" + std::to_string(i) + "}");
    ports.insert(owner[key_slot(keys.back())]);
  }
  REQUIRE(ports.size() == masters(owner).size());
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<redis_status> ex(keys.size());
  client.exists_many(views, ex);
  for (auto s : ex) CHECK(s == redis_status::not_found);
  // The even keys get a first value; then every key is written with NX: the even ones
  // keep their first value (exists), the odd ones take the new one.
  std::vector<std::vector<std::byte>> first, second;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    first.push_back(pattern(keys[i] + "a", (1 << 20) + i));
    second.push_back(pattern(keys[i] + "b", (1 << 20) + i));
    if (i % 2 == 0) REQUIRE(client.set(keys[i], first[i], milliseconds{60000}) == redis_status::ok);
  }
  std::vector<redis_set_item> items;
  for (std::size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], second[i], milliseconds{60000}, true});
  std::vector<redis_status> st(keys.size());
  client.set_many(items, st);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    CAPTURE(i);
    CHECK(st[i] == (i % 2 == 0 ? redis_status::exists : redis_status::ok));
    const auto got = client.get(keys[i]);
    REQUIRE(got.status == redis_status::ok);
    CHECK(same(got.value, i % 2 == 0 ? first[i] : second[i]));
  }
  client.exists_many(views, ex);
  for (auto s : ex) CHECK(s == redis_status::ok);
  CHECK(to_errc(redis_status::exists) == attnstore::errc::rejected);

  // touch_many: PEXPIRE starts a key's time to live again, TOUCH (ttl 0) leaves it; both
  // answer whether the key is there, and a missing key stays missing.
  const std::string short_lived = "touch:{short}", missing = "touch:{missing}";
  REQUIRE(client.set(short_lived, first[0], milliseconds{3000}) == redis_status::ok);
  const std::string_view touched[] = {short_lived, missing};
  std::vector<redis_status> tst(2);
  const auto pttl = [&](const std::string& k) {
    admin a(owner[key_slot(k)]);
    return a.cmd("PTTL %s", k.c_str())->integer;
  };
  client.touch_many(touched, milliseconds{600000}, tst);
  CHECK(tst[0] == redis_status::ok);
  CHECK(tst[1] == redis_status::not_found);
  CHECK(pttl(short_lived) > 500000);
  CHECK(pttl(missing) == -2);  // no such key
  REQUIRE(client.set(short_lived, first[0], milliseconds{3000}) == redis_status::ok);
  client.touch_many(touched, milliseconds{0}, tst);
  CHECK(tst[0] == redis_status::ok);
  CHECK(tst[1] == redis_status::not_found);
  CHECK(pttl(short_lived) <= 3000);
  client.touch_many(touched, milliseconds{-1}, tst);
  CHECK(tst[0] == redis_status::invalid_argument);

  // SET ... GET: returns what it displaced and stores the new value (with its TTL).
  const auto v1 = pattern("swap1", 3000);
  const auto v2 = pattern("swap2", 5 << 20);
  auto r = client.swap("swap:{k}", v1, milliseconds{60000});
  CHECK(r.status == redis_status::not_found);
  r = client.swap("swap:{k}", v2, milliseconds{60000});
  REQUIRE(r.status == redis_status::ok);
  CHECK(same(r.value, v1));
  r = client.swap("swap:{k}", v1);
  REQUIRE(r.status == redis_status::ok);
  CHECK(same(r.value, v2));
  admin a(owner[key_slot("swap:{k}")]);
  CHECK(a.cmd("PTTL %s", "swap:{k}")->integer == -1);  // the last swap had no TTL
}

TEST_CASE("a wrong password or user is an auth_error value, fast", "[cluster]") {
  if (env("ATTNSTORE_REDIS_PASSWORD").empty()) return;
  for (int variant = 0; variant < 3; ++variant) {
    auto c = base_config();
    if (variant == 0) c.password = "not-the-password";
    if (variant == 1) c.user = "nobody";
    if (variant == 2) {
      c.user.clear();
      c.password.clear();  // no AUTH at all: NOAUTH
    }
    CAPTURE(variant);
    redis_cluster client(c);
    const auto t0 = steady::now();
    const auto r = client.get("auth:k");
    CHECK(r.status == redis_status::auth_error);
    CHECK(client.set("auth:k", pattern("auth:k", 100)) == redis_status::auth_error);
    CHECK(client.refresh_slots() == redis_status::auth_error);
    CHECK(ms_since(t0) < 500);
  }
  // The default user with the right password works as well as the ACL user.
  auto c = base_config();
  c.user.clear();
  redis_cluster client(c);
  CHECK(client.set("auth:ok", pattern("auth:ok", 100)) == redis_status::ok);
}

TEST_CASE("-OOM from a full node is an oom value for its keys only", "[cluster]") {
  redis_cluster client(base_config());
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  const int full = ms.back();
  const std::string k_full = key_on(owner, full, "oom");
  const std::string k_other = key_on(owner, ms.front(), "oom");
  admin a(full);
  const std::string saved = [&] {
    reply r = a.cmd("CONFIG GET maxmemory");
    return std::string(r->element[1]->str, r->element[1]->len);
  }();
  a.cmd("CONFIG SET maxmemory 1");
  const auto v = pattern(k_full, 1 << 20);
  CHECK(client.set(k_full, v) == redis_status::oom);
  CHECK(client.set(k_other, v) == redis_status::ok);
  a.cmd("CONFIG SET maxmemory %s", saved.c_str());
  CHECK(client.set(k_full, v) == redis_status::ok);
}

TEST_CASE("get_many_into receives values straight into the caller's memory, over every node", "[cluster]") {
  redis_cluster client(base_config());
  const auto owner = slot_owners(seed_port());
  constexpr int n = 60;
  std::vector<std::string> keys;
  std::vector<std::vector<std::byte>> values;
  std::set<int> ports;
  for (int i = 0; i < n; ++i) {
    keys.push_back("into:{" + std::to_string(i) + "}");
    // 1 MiB + 4 KiB records, a few 4 MiB values, small ones (smaller than the head), one empty
    const std::size_t size = i == 7 ? 0 : i % 10 == 3 ? 100 + i : i % 8 == 0 ? (4u << 20) : (1u << 20) + 4096;
    values.push_back(pattern(keys.back(), size));
    ports.insert(owner[key_slot(keys.back())]);
  }
  REQUIRE(ports.size() == masters(owner).size());
  std::vector<redis_set_item> items;
  for (int i = 0; i < n; ++i) items.push_back({keys[i], values[i], milliseconds{60000}});
  std::vector<redis_status> st(n, redis_status::internal_error);
  client.set_many(items, st);
  for (int i = 0; i < n; ++i) REQUIRE(st[i] == redis_status::ok);
  admin(owner[key_slot("into:{hash}")]).cmd("HSET into:{hash} f v");  // WRONGTYPE for GET

  std::vector<std::string> ask = keys;
  std::vector<std::size_t> sizes;
  for (auto& v : values) sizes.push_back(v.size());
  ask.push_back("into:missing");  // not_found
  sizes.push_back(1 << 20);
  ask.push_back(keys[1]);  // expected longer than it is: discarded
  sizes.push_back(values[1].size() + 1);
  ask.push_back(keys[2]);  // expected shorter: discarded
  sizes.push_back(values[2].size() - 1);
  ask.push_back("into:{hash}");  // an error reply in the middle of a pipeline
  sizes.push_back(10);
  const auto t0 = steady::now();
  const auto r = read_into(client, ask, sizes);
  const double get_ms = ms_since(t0);
  std::set<std::size_t> arrived(r.arrived.begin(), r.arrived.end());
  CHECK(arrived.size() == r.arrived.size());  // at most once each
  for (int i = 0; i < n; ++i) {
    CAPTURE(i);
    REQUIRE(r.status[i] == redis_status::ok);
    CHECK(r.size[i] == values[i].size());
    CHECK(r.bytes[i] == values[i]);
    CHECK(arrived.count(i) == 1);
  }
  CHECK(r.status[n] == redis_status::not_found);
  for (int i : {n + 1, n + 2}) {  // ok with the true size; nothing written, no callback
    CAPTURE(i);
    CHECK(r.status[i] == redis_status::ok);
    CHECK(r.size[i] == values[i - n].size());
    CHECK(std::all_of(r.bytes[i].begin(), r.bytes[i].end(), [](std::byte b) { return b == std::byte{0xa5}; }));
    CHECK(arrived.count(i) == 0);
  }
  CHECK(r.status[n + 3] == redis_status::server_error);
  CHECK(arrived.count(n) == 0);
  CHECK(arrived.count(n + 3) == 0);
  WARN(n << " values received in place over " << ports.size() << " nodes in " << get_ms << " ms");
  // The connections are in step afterwards: hiredis-framed and in-place calls alternate.
  const auto got = client.get(keys[5]);
  REQUIRE(got.status == redis_status::ok);
  CHECK(same(got.value, values[5]));
  const auto again = read_into(client, {keys[0], keys[5]}, {values[0].size(), values[5].size()});
  CHECK(again.status == std::vector<redis_status>{redis_status::ok, redis_status::ok});
  CHECK(again.bytes[0] == values[0]);
  CHECK(again.bytes[1] == values[5]);
  CHECK(client.stats().connects == ports.size());  // nothing was closed
  CHECK(client.stats().io_errors == 0);
  // A head and tail larger than max_value_bytes is the caller's mistake.
  redis_cluster_config small = base_config();
  small.max_value_bytes = 1000;
  redis_cluster limited(small);
  const auto big = read_into(limited, {keys[3], keys[0]}, {values[3].size(), 1001});
  CHECK(big.status[0] == redis_status::ok);
  CHECK(big.bytes[0] == values[3]);
  CHECK(big.status[1] == redis_status::invalid_argument);
  // A value longer than max_value_bytes is a protocol_error (and the connection is closed).
  const auto over = read_into(limited, {keys[0]}, {1000});
  CHECK(over.status[0] == redis_status::protocol_error);
  for (int i = 0; i < n; ++i) CHECK(client.del(keys[i]) == redis_status::ok);
  CHECK(client.del("into:{hash}") == redis_status::ok);
}

TEST_CASE("MOVED and ASK are followed while a slot migrates", "[cluster]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  REQUIRE(ms.size() >= 3);
  const int src = ms[1];
  const int dst = ms[2];
  // A hash tag whose slot the source owns: every key with it is in that slot.
  std::string tag;
  for (int i = 0; tag.empty(); ++i) {
    if (owner[key_slot("mig" + std::to_string(i))] == src) tag = "mig" + std::to_string(i);
  }
  const std::uint16_t slot = key_slot(tag);
  const std::string k_old = "{" + tag + "}:old";
  const std::string k_new = "{" + tag + "}:new";
  const auto v_old = pattern(k_old, 1 << 20);
  const auto v_new = pattern(k_new, 2 << 20);

  redis_cluster client(base_config());
  REQUIRE(client.set(k_old, v_old) == redis_status::ok);
  REQUIRE(client.endpoint_of_slot(slot) == "127.0.0.1:" + std::to_string(src));

  admin a_src(src), a_dst(dst);
  const std::string src_id = a_src.str("CLUSTER MYID");
  const std::string dst_id = a_dst.str("CLUSTER MYID");
  a_dst.cmd("CLUSTER SETSLOT %d IMPORTING %s", int(slot), src_id.c_str());
  a_src.cmd("CLUSTER SETSLOT %d MIGRATING %s", int(slot), dst_id.c_str());

  // A key the source does not hold: ASK to the destination, for writes and reads.
  const auto s0 = client.stats();
  CHECK(client.set(k_new, v_new) == redis_status::ok);
  auto got = client.get(k_new);
  REQUIRE(got.status == redis_status::ok);
  CHECK(same(got.value, v_new));
  CHECK(client.stats().ask >= s0.ask + 2);
  a_dst.cmd("ASKING");
  CHECK(a_dst.cmd("EXISTS %s", k_new.c_str())->integer == 1);  // it really went to the destination
  // A key still on the source is served there; once migrated, ASK again.
  got = client.get(k_old);
  REQUIRE(got.status == redis_status::ok);
  CHECK(same(got.value, v_old));
  const std::string pw = env("ATTNSTORE_REDIS_PASSWORD");
  const std::string user = env("ATTNSTORE_REDIS_USER");
  auto migrate = [&](const std::string& key) {
    reply m = pw.empty()
                  ? a_src.cmd("MIGRATE 127.0.0.1 %d %s 0 5000 KEYS %s", dst, "", key.c_str())
                  : a_src.cmd("MIGRATE 127.0.0.1 %d %s 0 5000 AUTH %s KEYS %s", dst, "", pw.c_str(), key.c_str());
    INFO("MIGRATE " << key << ": " << (m->str ? m->str : ""));
    REQUIRE(m->type == REDIS_REPLY_STATUS);
  };
  migrate(k_old);
  got = client.get(k_old);
  REQUIRE(got.status == redis_status::ok);
  CHECK(same(got.value, v_old));
  redis_cluster into(base_config());  // values into the caller's memory, behind ASKING
  const auto s_into = into.stats();
  auto r = read_into(into, {k_old, k_new}, {v_old.size(), v_new.size()});
  CHECK(r.status == std::vector<redis_status>{redis_status::ok, redis_status::ok});
  CHECK(r.bytes[0] == v_old);
  CHECK(r.bytes[1] == v_new);
  CHECK(into.stats().ask == s_into.ask + 2);
  CHECK(client.endpoint_of_slot(slot) == "127.0.0.1:" + std::to_string(src));  // ASK leaves the map alone

  // The migration ends: every master learns the new owner. The client's map is now stale:
  // MOVED sends it to the destination, and later calls go there directly.
  for (;;) {  // keys of earlier tests may share the slot: the source must be empty first
    reply left = a_src.cmd("CLUSTER GETKEYSINSLOT %d 100", int(slot));
    if (left->elements == 0) break;
    for (std::size_t i = 0; i < left->elements; ++i) migrate(std::string(left->element[i]->str, left->element[i]->len));
  }
  for (int p : ms) {
    admin a(p);
    reply r = a.cmd("CLUSTER SETSLOT %d NODE %s", int(slot), dst_id.c_str());
    INFO(p << ": " << (r->str ? r->str : ""));
    CHECK(r->type == REDIS_REPLY_STATUS);
  }
  const auto s_moved = into.stats();  // `into` still has the old map: MOVED for in-place reads
  r = read_into(into, {k_new, k_old}, {v_new.size(), v_old.size()});
  CHECK(r.status == std::vector<redis_status>{redis_status::ok, redis_status::ok});
  CHECK(r.bytes[0] == v_new);
  CHECK(r.bytes[1] == v_old);
  CHECK(into.stats().moved >= s_moved.moved + 1);
  const auto s1 = client.stats();
  got = client.get(k_old);
  REQUIRE(got.status == redis_status::ok);
  CHECK(same(got.value, v_old));
  CHECK(client.stats().moved == s1.moved + 1);
  CHECK(client.endpoint_of_slot(slot) == "127.0.0.1:" + std::to_string(dst));
  got = client.get(k_new);
  CHECK(got.status == redis_status::ok);
  CHECK(client.stats().moved == s1.moved + 1);
  CHECK(wait_cluster_ok(ms, milliseconds{5000}));
}

TEST_CASE("a hung node times out within the bound, its breaker opens, the others serve", "[cluster]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  const int hung = ms[1];
  const std::string k_hung = key_on(owner, hung, "hung");
  const std::string k_fine = key_on(owner, ms[0], "hung");
  auto cfg = tight_config();
  redis_cluster client(cfg);
  REQUIRE(client.set(k_hung, pattern(k_hung, 1 << 20)) == redis_status::ok);
  REQUIRE(client.set(k_fine, pattern(k_fine, 1 << 20)) == redis_status::ok);
  const pid_t pid = std::atoi(admin(hung).info_field("server", "process_id").c_str());
  REQUIRE(pid > 0);

  REQUIRE(::kill(pid, SIGSTOP) == 0);  // accepts nothing, answers nothing; < cluster-node-timeout
  const double bound = double(cfg.request_timeout.count()) + slack_ms;
  auto t0 = steady::now();
  const auto r1 = client.get(k_hung);
  const double t1 = ms_since(t0);
  t0 = steady::now();
  const auto r2 = client.set(k_hung, pattern(k_hung, 4 << 20));
  const double t2 = ms_since(t0);
  t0 = steady::now();
  const auto r3 = client.get(k_hung);
  const double t3 = ms_since(t0);
  t0 = steady::now();
  const auto fine = client.get(k_fine);
  const double t4 = ms_since(t0);
  const auto s = client.stats();
  ::kill(pid, SIGCONT);

  CHECK(r1.status == redis_status::timeout);
  CHECK(t1 < bound);
  CHECK(t1 >= double(cfg.command_timeout.count()) - 5);
  CHECK(r2 == redis_status::timeout);
  CHECK(t2 < bound);
  CHECK(r3.status == redis_status::circuit_open);  // breaker_threshold 2: open
  CHECK(t3 < 50);
  CHECK(fine.status == redis_status::ok);
  CHECK(t4 < bound);
  CHECK(s.timeouts >= 2);
  CHECK(s.breaker_opens >= 1);
  CHECK(s.fast_fails >= 1);
  WARN("hung node: timeouts after " << t1 << " and " << t2 << " ms, then fast fail in " << t3 << " ms");

  // After the cool-down one call tries the node again and closes the breaker.
  std::this_thread::sleep_for(cfg.breaker_cooldown + milliseconds{50});
  const auto back = client.get(k_hung);
  CHECK(back.status == redis_status::ok);
  // The timed-out SET may or may not have been stored (the kernel may have buffered all of it).
  CHECK((same(back.value, pattern(k_hung, 1 << 20)) || same(back.value, pattern(k_hung, 4 << 20))));
  CHECK(wait_cluster_ok(ms, milliseconds{10000}));
}

TEST_CASE("a killed master fails fast for its slots only, and serves again once restarted", "[cluster]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  const int dead = ms[2];
  const std::string k_dead = key_on(owner, dead, "kill");
  std::vector<std::string> k_live = {key_on(owner, ms[0], "kill"), key_on(owner, ms[1], "kill")};
  auto cfg = tight_config();
  redis_cluster client(cfg);
  REQUIRE(client.set(k_dead, pattern(k_dead, 1 << 20)) == redis_status::ok);
  for (auto& k : k_live) REQUIRE(client.set(k, pattern(k, 1 << 20)) == redis_status::ok);
  admin a(dead);
  const pid_t pid = std::atoi(a.info_field("server", "process_id").c_str());
  const std::string conf = a.info_field("server", "config_file");
  REQUIRE(pid > 0);
  REQUIRE(!conf.empty());

  REQUIRE(::kill(pid, SIGKILL) == 0);
  for (int i = 0; i < 50 && ::kill(pid, 0) == 0; ++i) std::this_thread::sleep_for(milliseconds{20});
  const double bound = double(cfg.request_timeout.count()) + slack_ms;
  std::vector<redis_status> seen;
  double worst = 0;
  for (int i = 0; i < 4; ++i) {
    const auto t0 = steady::now();
    seen.push_back(client.get(k_dead).status);
    worst = std::max(worst, ms_since(t0));
  }
  CHECK(worst < bound);
  CHECK(seen[0] == redis_status::io_error);
  CHECK(seen[1] == redis_status::io_error);
  CHECK(seen[2] == redis_status::circuit_open);
  CHECK(seen[3] == redis_status::circuit_open);
  CHECK(client.stats().breaker_opens >= 1);
  // The other masters' slots work, alone and in a batch with the dead node's keys.
  std::vector<std::string_view> mixed = {k_live[0], k_dead, k_live[1]};
  std::vector<redis_get_result> got(3);
  const auto t0 = steady::now();
  client.get_many(mixed, got);
  CHECK(ms_since(t0) < bound);
  CHECK(got[0].status == redis_status::ok);
  CHECK(got[1].status == redis_status::circuit_open);
  CHECK(got[2].status == redis_status::ok);
  CHECK(same(got[2].value, pattern(k_live[1], 1 << 20)));

  // Restarted (its nodes.conf keeps its slots; its data is gone: nothing is persisted).
  REQUIRE(std::system(("redis-server " + conf + " >/dev/null").c_str()) == 0);
  REQUIRE(wait_cluster_ok(ms, milliseconds{15000}));
  std::this_thread::sleep_for(cfg.breaker_cooldown);
  redis_status st = redis_status::internal_error;
  for (int i = 0; i < 40 && st != redis_status::not_found; ++i) {  // the first try may hit the old socket
    st = client.get(k_dead).status;
    if (st != redis_status::not_found) std::this_thread::sleep_for(cfg.breaker_cooldown / 4);
  }
  CHECK(st == redis_status::not_found);
  CHECK(client.set(k_dead, pattern(k_dead, 4 << 20)) == redis_status::ok);
  const auto back = client.get(k_dead);
  CHECK(back.status == redis_status::ok);
  CHECK(same(back.value, pattern(k_dead, 4 << 20)));
}

TEST_CASE("threads may share one client", "[cluster]") {
  redis_cluster client(base_config());
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  std::atomic<int> first_bad{-1};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        const std::string key = "thr:" + std::to_string(t) + ":" + std::to_string(i);
        const auto v = pattern(key, 64 * 1024 + i);
        const auto s = client.set(key, v);
        const auto got = client.get(key);
        const bool ok = s == redis_status::ok && got.status == redis_status::ok && same(got.value, v);
        if (!ok) {
          ++bad;
          int expected = -1;
          first_bad.compare_exchange_strong(expected, int(s) * 100 + int(got.status));
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  INFO("first failure: set " << to_string(redis_status(first_bad.load() / 100)) << ", get "
                             << to_string(redis_status(first_bad.load() % 100)));
  CHECK(bad.load() == 0);
}

TEST_CASE("after a failover the replica's promotion is found and hits resume", "[failover]") {
  const auto owner = slot_owners(seed_port());
  const auto ms = masters(owner);
  REQUIRE(ms.size() == 3);
  const int dead = ms[1];
  std::vector<std::string> keys;
  for (int i = 0; i < 8; ++i) keys.push_back(key_on(owner, dead, "fo" + std::to_string(i)));
  const std::string k_live = key_on(owner, ms[0], "fo");
  auto cfg = tight_config();
  redis_cluster client(cfg);
  for (auto& k : keys) REQUIRE(client.set(k, pattern(k, 1 << 20)) == redis_status::ok);
  REQUIRE(client.set(k_live, pattern(k_live, 1 << 20)) == redis_status::ok);

  // Wait until the replica has everything, then kill the master.
  admin a(dead);
  const pid_t pid = std::atoi(a.info_field("server", "process_id").c_str());
  const std::string offset = a.info_field("replication", "master_repl_offset");
  const int replica_port = std::atoi(
      a.info_field("replication", "slave0").substr(a.info_field("replication", "slave0").find("port=") + 5).c_str());
  REQUIRE(replica_port > 0);
  {
    admin r(replica_port);
    const auto t0 = steady::now();
    while (r.info_field("replication", "slave_repl_offset") != offset && ms_since(t0) < 5000) {
      std::this_thread::sleep_for(milliseconds{20});
    }
    REQUIRE(r.info_field("replication", "slave_repl_offset") == offset);
  }
  REQUIRE(::kill(pid, SIGKILL) == 0);
  const auto killed = steady::now();
  const double bound = double(cfg.request_timeout.count()) + slack_ms;
  double worst = 0;
  redis_status last = redis_status::internal_error;
  std::map<std::string, int> statuses;
  while (ms_since(killed) < 20000) {
    auto t0 = steady::now();
    const auto r = client.get(keys[0]);
    worst = std::max(worst, ms_since(t0));
    last = r.status;
    ++statuses[std::string(to_string(last))];
    if (last == redis_status::ok) break;
    t0 = steady::now();
    CHECK(client.get(k_live).status == redis_status::ok);  // the rest of the cluster keeps serving
    worst = std::max(worst, ms_since(t0));
    std::this_thread::sleep_for(milliseconds{50});
  }
  std::string summary;
  for (auto& [k, v] : statuses) summary += k + "=" + std::to_string(v) + " ";
  WARN("failover: hits resumed " << ms_since(killed) << " ms after the kill; statuses " << summary << "; slowest call "
                                 << worst << " ms");
  REQUIRE(last == redis_status::ok);
  CHECK(worst < bound);
  CHECK(client.endpoint_of_slot(key_slot(keys[0])) == "127.0.0.1:" + std::to_string(replica_port));
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<redis_get_result> got(keys.size());
  client.get_many(views, got);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    CHECK(got[i].status == redis_status::ok);
    CHECK(same(got[i].value, pattern(keys[i], 1 << 20)));
  }
}
