// The Redis Cluster client's pure parts: CRC16 and hash slots as the cluster specification
// defines them, endpoint and error-reply parsing, configuration checks. No server needed:
// get_many_into's own reply framing is fed hostile bytes by a scripted node in this process.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
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

namespace {

/// A fake cluster node on loopback, one connection at a time: it answers CLUSTER SLOTS with
/// itself as the master of every slot and, once a pipeline of `gets` GETs has arrived,
/// sends `script` as it is (in pieces of `piece` bytes, 1 ms apart, so that replies are
/// cut anywhere), then `close_after`: closes the connection.
class scripted_node {
 public:
  scripted_node(std::string script, std::size_t gets, std::size_t piece = 0, bool close_after = false)
      : script_(std::move(script)), gets_(gets), piece_(piece), close_after_(close_after) {
    lfd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(lfd_ >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(lfd_, 4) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(lfd_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~scripted_node() {
    stop_ = true;
    thread_.join();
    ::close(lfd_);
  }
  std::string seed() const { return "127.0.0.1:" + std::to_string(port_); }
  int connections() const { return connections_.load(); }

 private:
  bool wait_readable(int fd) {
    pollfd p{fd, POLLIN, 0};
    while (!stop_) {
      if (::poll(&p, 1, 20) > 0) return true;
    }
    return false;
  }
  void send_all(int fd, std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t w = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (w <= 0) return;
      bytes.remove_prefix(std::size_t(w));
    }
  }
  void serve() {
    while (wait_readable(lfd_)) {
      const int fd = ::accept(lfd_, nullptr, nullptr);
      if (fd < 0) continue;
      ++connections_;
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      std::string in;
      std::size_t seen = 0;
      char buf[4096];
      while (wait_readable(fd)) {
        const ssize_t r = ::recv(fd, buf, sizeof buf, 0);
        if (r <= 0) break;
        in.append(buf, std::size_t(r));
        const std::size_t at = in.find("SLOTS\r\n");
        if (at != std::string::npos) {
          in.erase(0, at + 7);
          send_all(fd, "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:" + std::to_string(port_) + "\r\n");
        }
        for (std::size_t p; (p = in.find("\r\nGET\r\n")) != std::string::npos; in.erase(0, p + 7)) ++seen;
        if (seen < gets_ || in.size() < 2 || in.compare(in.size() - 2, 2, "\r\n") != 0) continue;
        seen = 0;
        in.clear();
        if (piece_ == 0) {
          send_all(fd, script_);
        } else {
          for (std::size_t o = 0; o < script_.size(); o += piece_) {
            send_all(fd, std::string_view(script_).substr(o, piece_));
            std::this_thread::sleep_for(std::chrono::milliseconds{1});
          }
        }
        if (close_after_) break;
      }
      ::close(fd);
    }
  }
  std::string script_;
  std::size_t gets_, piece_;
  bool close_after_;
  int lfd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::thread thread_;
};

struct into_outcome {
  std::vector<redis_status> status;
  std::vector<std::size_t> size;
  std::vector<std::string> bytes;  // head + tail after the call
  std::vector<std::size_t> arrived;
};

/// get_many_into of keys "k{0}", "k{1}", ... with values of `sizes`, heads of `head` bytes.
into_outcome read_into(redis_cluster& c, const std::vector<std::size_t>& sizes, std::size_t head = 3) {
  const std::size_t n = sizes.size();
  std::vector<std::string> keys(n), heads(n), tails(n);
  std::vector<redis_read_item> items(n);
  for (std::size_t i = 0; i < n; ++i) {
    keys[i] = "k{" + std::to_string(i) + "}";
    heads[i].assign(std::min(head, sizes[i]), '.');
    tails[i].assign(sizes[i] - heads[i].size(), '.');
    items[i].key = keys[i];
    items[i].head = std::as_writable_bytes(std::span(heads[i]));
    items[i].tail = std::as_writable_bytes(std::span(tails[i]));
  }
  into_outcome o;
  c.get_many_into(
      items, [](void* ctx, std::size_t i) noexcept { static_cast<into_outcome*>(ctx)->arrived.push_back(i); }, &o);
  for (std::size_t i = 0; i < n; ++i) {
    o.status.push_back(items[i].status);
    o.size.push_back(items[i].size);
    o.bytes.push_back(heads[i] + tails[i]);
  }
  return o;
}

redis_cluster_config scripted_config(const scripted_node& node) {
  redis_cluster_config c;
  c.seeds = {node.seed()};
  c.log.fn = &attnstore::logger::quiet;
  c.command_timeout = milliseconds{1000};
  c.request_timeout = milliseconds{2000};
  c.max_value_bytes = 1 << 20;
  return c;
}

}  // namespace

TEST_CASE("get_many_into frames replies cut anywhere, values split over head and tail", "[redis][into]") {
  for (std::size_t piece : {std::size_t(0), std::size_t(1), std::size_t(3)}) {
    CAPTURE(piece);
    scripted_node node("$8\r\nABCDEFGH\r\n$-1\r\n$0\r\n\r\n-ERR no\r\n$4\r\nWXYZ\r\n$8\r\n12345678\r\n", 6, piece);
    redis_cluster c(scripted_config(node));
    const auto o = read_into(c, {8, 8, 0, 8, 8, 8});
    CHECK(o.status == std::vector<redis_status>{redis_status::ok, redis_status::not_found, redis_status::ok,
                                                redis_status::server_error, redis_status::ok, redis_status::ok});
    CHECK(o.bytes[0] == "ABCDEFGH");
    CHECK(o.size[0] == 8);
    CHECK(o.size[2] == 0);
    CHECK(o.size[4] == 4);            // another length: discarded,
    CHECK(o.bytes[4] == "........");  // nothing written
    CHECK(o.bytes[5] == "12345678");
    CHECK(o.arrived == std::vector<std::size_t>{0, 2, 5});
    CHECK(node.connections() == 1);
  }
  // A value much larger than a recv, cut in pieces, straight into head and tail.
  std::string big(300000, 'x');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = char('a' + i * 7 % 26);
  scripted_node node("$300000\r\n" + big + "\r\n$300000\r\n" + big + "\r\n", 2, 7001);
  redis_cluster c(scripted_config(node));
  const auto o = read_into(c, {300000, 299999}, 4096);
  CHECK(o.status == std::vector<redis_status>{redis_status::ok, redis_status::ok});
  CHECK(o.bytes[0] == big);
  CHECK(o.size[1] == 300000);
  CHECK(o.bytes[1] == std::string(299999, '.'));
  CHECK(o.arrived == std::vector<std::size_t>{0});
}

TEST_CASE("get_many_into: hostile framing is protocol_error, a cut stream io_error, never a hang", "[redis][into]") {
  const std::string huge = std::string(5000, 'E');
  const struct {
    const char* what;
    std::string script;
    redis_status first;
  } cases[] = {
      {"length not a number", "$abc\r\n", redis_status::protocol_error},
      {"length below -1", "$-2\r\n", redis_status::protocol_error},
      {"length with a sign and digits", "$+8\r\nABCDEFGH\r\n", redis_status::protocol_error},
      {"length over max_value_bytes", "$1048577\r\n", redis_status::protocol_error},
      {"length of 19 digits", "$9999999999999999999\r\n", redis_status::protocol_error},
      {"empty length", "$\r\n", redis_status::protocol_error},
      {"no CR before LF", "$8\nABCDEFGH\r\n", redis_status::protocol_error},
      {"no CRLF after the value", "$8\r\nABCDEFGHxx", redis_status::protocol_error},
      {"an array", "*1\r\n$1\r\nA\r\n", redis_status::protocol_error},
      {"an integer", ":5\r\n", redis_status::protocol_error},
      {"a status", "+OK\r\n", redis_status::protocol_error},
      {"an integer that is not one", ":5x\r\n", redis_status::protocol_error},
      {"not RESP", "HTTP/1.1 400\r\n", redis_status::protocol_error},
      {"a line without end", "-" + huge, redis_status::protocol_error},
      {"cut inside the value", "$8\r\nABCD", redis_status::io_error},
      {"cut inside the length", "$8", redis_status::io_error},
  };
  for (const auto& k : cases) {
    CAPTURE(k.what);
    scripted_node node(k.script, 2, 0, true);
    redis_cluster c(scripted_config(node));
    const auto t0 = std::chrono::steady_clock::now();
    const auto o = read_into(c, {8, 8});
    CHECK(std::chrono::steady_clock::now() - t0 < milliseconds{1500});
    CHECK(o.status[0] == k.first);
    CHECK(o.status[1] != redis_status::ok);
  }
  // Bytes after the last reply: the answers stand, the connection is not used again.
  scripted_node node("$8\r\nABCDEFGH\r\n$-1\r\nJUNK", 2);
  redis_cluster c(scripted_config(node));
  auto o = read_into(c, {8, 8});
  CHECK(o.status == std::vector<redis_status>{redis_status::ok, redis_status::not_found});
  CHECK(o.bytes[0] == "ABCDEFGH");
  o = read_into(c, {8, 8});
  CHECK(o.status[0] == redis_status::ok);
  CHECK(c.stats().connects == 2);
}
