// The Redis Cluster client's pure parts: CRC16 and hash slots as the cluster specification
// defines them, endpoint and error-reply parsing, configuration checks. No server needed.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include "attnstore/shared/detail/redis_protocol.hpp"
#include "attnstore/shared/redis_cluster.hpp"

using namespace attnstore::shared;
using std::chrono::milliseconds;

static_assert(crc16("123456789") == 0x31C3, "XMODEM check value");
static_assert(key_slot("{user1000}.following") == key_slot("{user1000}.followers"));

TEST_CASE("crc16 is CRC16-XMODEM", "[redis][slots]") {
  CHECK(crc16("123456789") == 0x31C3);  // the specification's test vector
  CHECK(crc16("") == 0);
  CHECK(crc16(std::string_view("\0", 1)) == 0);
  CHECK(crc16("A") == 0x58E5);
  // Bytes above 0x7f are unsigned: the table index must not go negative.
  const std::string high = "\xff\x80\xfe";
  CHECK(crc16(high) == crc16(std::string_view(high)));
  CHECK(crc16(high) != crc16("abc"));
}

TEST_CASE("key_slot matches Redis' CLUSTER KEYSLOT", "[redis][slots]") {
  // Values from redis-server 7.0 (CLUSTER KEYSLOT).
  CHECK(key_slot("123456789") == 12739);
  CHECK(key_slot("foo") == 12182);
  CHECK(key_slot("bar") == 5061);
  CHECK(key_slot("hello") == 866);
  CHECK(key_slot("somekey") == 11058);
  CHECK(key_slot("{user1000}.following") == 3443);
  CHECK(key_slot("") == 0);
  CHECK(key_slot("{}") == 15257);
}

TEST_CASE("hash tags follow the specification", "[redis][slots]") {
  // Only the bytes between the first '{' and the first '}' after it, when not empty.
  CHECK(key_slot("{user1000}.following") == key_slot("user1000"));
  CHECK(key_slot("foo{bar}{zap}") == key_slot("bar"));  // first tag wins
  CHECK(key_slot("foo{bar}{zap}") == 5061);
  CHECK(key_slot("foo{}{bar}") == crc16("foo{}{bar}") % 16384);  // empty tag: whole key
  CHECK(key_slot("foo{}{bar}") == 8363);
  CHECK(key_slot("foo{{bar}}zap") == key_slot("{bar"));  // tag is "{bar"
  CHECK(key_slot("foo{{bar}}zap") == 4015);
  CHECK(key_slot("{bar") == crc16("{bar") % 16384);  // no '}': whole key
  CHECK(key_slot("}{a}") == key_slot("a"));          // a '}' before the '{' is ignored
  CHECK(key_slot("a{b}") == 3300);
  CHECK(key_slot("a{b}c") == key_slot("b"));
  for (int i = 0; i < 1000; ++i) {
    std::string k = "k";
    k += std::to_string(i);  // not "k" + ...: GCC 12's -Wrestrict misfires on that
    CHECK(key_slot(k) < redis_slot_count);
    CHECK(key_slot("{" + k + "}:manifest") == key_slot("{" + k + "}:block:" + std::to_string(i * 7)));
  }
}

TEST_CASE("endpoints parse strictly", "[redis]") {
  detail::endpoint e;
  REQUIRE(detail::parse_endpoint("127.0.0.1:7100", e, false));
  CHECK(e.host == "127.0.0.1");
  CHECK(e.port == 7100);
  REQUIRE(detail::parse_endpoint("[::1]:6379", e, false));
  CHECK(e.host == "::1");
  CHECK(e.port == 6379);
  REQUIRE(detail::parse_endpoint("redis.example:1", e, false));
  CHECK(e.port == 1);
  CHECK_FALSE(detail::parse_endpoint(":6379", e, false));
  REQUIRE(detail::parse_endpoint(":6379", e, true));  // Redis 7: "the node you asked"
  CHECK(e.host.empty());
  for (const char* bad : {"", "host", "host:", "host:0", "host:65536", "host:12a", "::1:6379", "[::1]6379", "[]:1",
                          "a b:1", "host:123456", "[::1:1"}) {
    CAPTURE(bad);
    CHECK_FALSE(detail::parse_endpoint(bad, e, true));
  }
  CHECK_FALSE(detail::parse_endpoint(std::string(256, 'h') + ":1", e, false));
}

TEST_CASE("error replies are classified by their first word", "[redis]") {
  using redirect = detail::error_reply::redirect;
  auto m = detail::classify_error("MOVED 3999 127.0.0.1:6381");
  CHECK(m.kind == redirect::moved);
  CHECK(m.slot == 3999);
  CHECK(m.target.host == "127.0.0.1");
  CHECK(m.target.port == 6381);
  auto a = detail::classify_error("ASK 16383 :7000");
  CHECK(a.kind == redirect::ask);
  CHECK(a.slot == 16383);
  CHECK(a.target.host.empty());
  CHECK(a.target.port == 7000);
  for (const char* bad : {"MOVED", "MOVED 3999", "MOVED 16384 127.0.0.1:1", "MOVED x 127.0.0.1:1", "ASK 1 127.0.0.1",
                          "MOVED -1 h:1", "MOVED 123456 h:1"}) {
    CAPTURE(bad);
    const auto r = detail::classify_error(bad);
    CHECK(r.kind == redirect::none);
    CHECK(r.status == redis_status::protocol_error);
  }
  CHECK(detail::classify_error("OOM command not allowed when used memory > 'maxmemory'.").status == redis_status::oom);
  CHECK(detail::classify_error("LOADING Redis is loading the dataset in memory").status == redis_status::loading);
  CHECK(detail::classify_error("CLUSTERDOWN The cluster is down").status == redis_status::cluster_down);
  CHECK(detail::classify_error("MASTERDOWN Link with MASTER is down").status == redis_status::cluster_down);
  CHECK(detail::classify_error("TRYAGAIN Multiple keys request during rehashing of slot").status ==
        redis_status::try_again);
  CHECK(detail::classify_error("NOAUTH Authentication required.").status == redis_status::auth_error);
  CHECK(detail::classify_error("WRONGPASS invalid username-password pair").status == redis_status::auth_error);
  CHECK(detail::classify_error("NOPERM this user has no permissions").status == redis_status::auth_error);
  CHECK(detail::classify_error("ERR unknown command").status == redis_status::server_error);
  CHECK(detail::classify_error("").status == redis_status::server_error);
  CHECK(detail::classify_error("WRONGTYPE Operation against a key").status == redis_status::server_error);
}

TEST_CASE("statuses map onto errc", "[redis]") {
  CHECK(to_errc(redis_status::ok) == attnstore::errc::ok);
  CHECK(to_errc(redis_status::not_found) == attnstore::errc::not_found);
  CHECK(to_errc(redis_status::oom) == attnstore::errc::no_space);
  CHECK(to_errc(redis_status::timeout) == attnstore::errc::retry);
  CHECK(to_errc(redis_status::circuit_open) == attnstore::errc::retry);
  CHECK(to_errc(redis_status::auth_error) == attnstore::errc::rejected);
  CHECK(to_errc(redis_status::protocol_error) == attnstore::errc::device_error);
  CHECK(to_string(redis_status::circuit_open) == "circuit_open");
  CHECK(to_string(redis_status::internal_error) == "internal_error");
  CHECK(to_string(static_cast<redis_status>(200)) == "unknown");
}

namespace {
redis_cluster_config good() {
  redis_cluster_config c;
  c.seeds = {"127.0.0.1:1"};
  return c;
}
void expect_refused(const redis_cluster_config& c, const std::string& field) {
  CAPTURE(field);
  try {
    redis_cluster client(c);
    FAIL("accepted a bad " << field);
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find(field) != std::string::npos);
  }
}
}  // namespace

TEST_CASE("a bad configuration is refused at construction, naming the field", "[redis]") {
  CHECK_NOTHROW(redis_cluster(good()));
  auto c = good();
  c.seeds.clear();
  expect_refused(c, "seeds");
  c = good();
  c.seeds.push_back("127.0.0.1");
  expect_refused(c, "seeds[1]");
  c = good();
  c.user = "u";
  expect_refused(c, "user");
  c = good();
  c.connect_timeout = milliseconds{0};
  expect_refused(c, "connect_timeout");
  c = good();
  c.command_timeout = milliseconds{2000};
  c.request_timeout = milliseconds{1000};
  expect_refused(c, "request_timeout");
  c = good();
  c.breaker_threshold = 0;
  expect_refused(c, "breaker_threshold");
  c = good();
  c.breaker_cooldown = milliseconds{0};
  expect_refused(c, "breaker_cooldown");
  c = good();
  c.max_redirects = 17;
  expect_refused(c, "max_redirects");
  c = good();
  c.max_value_bytes = 0;
  expect_refused(c, "max_value_bytes");
  c = good();
  c.max_key_bytes = 100000;
  expect_refused(c, "max_key_bytes");
  c = good();
  c.max_nodes = 0;
  expect_refused(c, "max_nodes");
}

TEST_CASE("bad arguments and unreachable nodes are values, not exceptions or hangs", "[redis]") {
  auto c = good();  // port 1 on loopback: refused
  c.log.fn = &attnstore::logger::quiet;
  c.request_timeout = milliseconds{300};
  c.command_timeout = milliseconds{100};
  redis_cluster client(c);
  CHECK(client.set("", {}) == redis_status::invalid_argument);
  CHECK(client.set(std::string(2000, 'k'), {}) == redis_status::invalid_argument);
  CHECK(client.set("k", {}, milliseconds{-1}) == redis_status::invalid_argument);
  std::vector<std::string_view> keys = {"a", "b"};
  std::vector<redis_get_result> one(1);
  client.get_many(keys, one);
  CHECK(one[0].status == redis_status::invalid_argument);
  std::vector<redis_status> st(3);
  client.del_many(keys, st);
  for (auto s : st) CHECK(s == redis_status::invalid_argument);
  CHECK(client.stats().connects == 0);  // none of that touched the network

  const auto t0 = std::chrono::steady_clock::now();
  const auto r = client.get("a");
  CHECK(r.status == redis_status::io_error);
  CHECK(r.value.empty());
  CHECK(client.refresh_slots() == redis_status::io_error);
  CHECK(std::chrono::steady_clock::now() - t0 < milliseconds{700});
  CHECK(client.endpoint_of_slot(0).empty());
  CHECK(client.stats().connect_failures >= 2);
}
