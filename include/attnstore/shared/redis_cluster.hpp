// Redis Cluster client for the shared tier: hash-slot routing, per-node pipelined batches,
// MOVED/ASK redirections, bounded time on every call and a circuit breaker per node.
// RESP is parsed by hiredis (its redisReader); sockets, routing and deadlines are ours.
// Speaks plain RESP2, so Valkey, KeyDB and managed Redis-compatible clusters work as well.
//
// Nothing read back is trusted here: a value is a byte string of at most
// redis_cluster_config::max_value_bytes; checking what it holds is the store's job.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnstore/log.hpp"
#include "attnstore/status.hpp"

struct redisReply;  // hiredis; only src/shared/redis_cluster.cpp sees its definition

namespace attnstore::shared {

/// Number of hash slots of a Redis Cluster.
inline constexpr std::uint16_t redis_slot_count = 16384;

namespace detail {
constexpr std::array<std::uint16_t, 256> make_crc16_table() noexcept {
  std::array<std::uint16_t, 256> t{};
  for (unsigned i = 0; i < 256; ++i) {
    std::uint16_t c = static_cast<std::uint16_t>(i << 8);
    for (int b = 0; b < 8; ++b) c = static_cast<std::uint16_t>((c & 0x8000) ? (c << 1) ^ 0x1021 : c << 1);
    t[i] = c;
  }
  return t;
}
inline constexpr std::array<std::uint16_t, 256> crc16_table = make_crc16_table();
}  // namespace detail

/// CRC16-CCITT in its XMODEM form (polynomial 0x1021, initial value 0, no reflection, no
/// final xor): the hash of the Redis Cluster specification. crc16("123456789") == 0x31C3.
constexpr std::uint16_t crc16(std::string_view data) noexcept {
  std::uint16_t crc = 0;
  for (char ch : data) {
    crc = static_cast<std::uint16_t>((crc << 8) ^
                                     detail::crc16_table[((crc >> 8) ^ static_cast<unsigned char>(ch)) & 0xff]);
  }
  return crc;
}

/// The hash slot (0..16383) of `key`, with hash tags as the specification defines them:
/// when the key holds a '{' and, after it, a '}' with at least one byte between them, only
/// the bytes between the first '{' and the first '}' after it are hashed. Otherwise
/// (no '{', no '}' after it, or "{}") the whole key is hashed. Keys that share a tag share
/// a slot, hence a node: `{session}:manifest` and `{session}:block:7`.
constexpr std::uint16_t key_slot(std::string_view key) noexcept {
  const std::size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const std::size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  return static_cast<std::uint16_t>(crc16(key) & (redis_slot_count - 1));
}

/// Outcome of one key's operation. Every per-key result carries one; none is thrown.
enum class redis_status : std::uint8_t {
  ok = 0,            ///< done (GET: the value is in the result)
  not_found,         ///< GET: no such key (never written, expired or evicted); DEL: nothing deleted
  timeout,           ///< no reply within the configured time; the connection was closed
  io_error,          ///< connect failed, connection reset or closed by the server
  auth_error,        ///< AUTH refused (wrong user or password), or NOAUTH / NOPERM from a node
  circuit_open,      ///< the node serving the key failed repeatedly and is in its cool-down
  no_route,          ///< no known node serves the key's slot (slot map missing or incomplete)
  redirect_limit,    ///< still redirected after max_redirects MOVED/ASK rounds
  cluster_down,      ///< -CLUSTERDOWN or -MASTERDOWN: the cluster cannot serve the slot now
  loading,           ///< -LOADING: the node is loading its data set
  oom,               ///< -OOM: the node is at maxmemory and cannot evict enough
  try_again,         ///< -TRYAGAIN or -BUSY: transient, during resharding or a busy script
  server_error,      ///< any other error reply (the node's message is logged, not kept)
  protocol_error,    ///< a reply of the wrong type or shape, or larger than max_value_bytes
  invalid_argument,  ///< the caller's key, value or TTL is out of range
  internal_error,    ///< the client could not allocate what the call needed
  exists,            ///< SET with if_absent: not stored, the key already holds a value
};

/// Stable lower-case name of a status, for logs and stats.
constexpr std::string_view to_string(redis_status s) noexcept {
  constexpr std::string_view names[] = {
      "ok",           "not_found",      "timeout",          "io_error",       "auth_error", "circuit_open",
      "no_route",     "redirect_limit", "cluster_down",     "loading",        "oom",        "try_again",
      "server_error", "protocol_error", "invalid_argument", "internal_error", "exists"};
  const auto i = static_cast<std::size_t>(s);
  return i < std::size(names) ? names[i] : std::string_view("unknown");
}

/// The store's view of a status: ok and not_found as themselves; oom is no_space; the caller's
/// mistakes are invalid_argument; auth_error and exists (a conditional SET that found the key
/// taken) are rejected; everything transient (timeouts, dead nodes, redirections, cluster
/// down) is retry; malformed replies are device_error.
constexpr errc to_errc(redis_status s) noexcept {
  switch (s) {
    case redis_status::ok:
      return errc::ok;
    case redis_status::not_found:
      return errc::not_found;
    case redis_status::oom:
      return errc::no_space;
    case redis_status::invalid_argument:
      return errc::invalid_argument;
    case redis_status::auth_error:
    case redis_status::exists:
      return errc::rejected;
    case redis_status::server_error:
    case redis_status::protocol_error:
    case redis_status::internal_error:
      return errc::device_error;
    default:
      return errc::retry;
  }
}

/// A value read from the cluster: owns the parsed reply, exposes its bytes. Move-only.
/// Empty (size 0, data nullptr) unless the GET that produced it returned ok.
class redis_value {
 public:
  redis_value() noexcept = default;
  redis_value(redis_value&& o) noexcept : reply_(o.reply_), data_(o.data_), size_(o.size_) { o.release(); }
  redis_value& operator=(redis_value&& o) noexcept {
    if (this != &o) {
      reset();
      reply_ = o.reply_;
      data_ = o.data_;
      size_ = o.size_;
      o.release();
    }
    return *this;
  }
  redis_value(const redis_value&) = delete;
  redis_value& operator=(const redis_value&) = delete;
  ~redis_value() { reset(); }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  /// Frees the reply now.
  void reset() noexcept;

 private:
  friend struct redis_value_access;
  void release() noexcept {
    reply_ = nullptr;
    data_ = nullptr;
    size_ = 0;
  }
  redisReply* reply_ = nullptr;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// One key's GET outcome. Fails closed: a default-constructed result is not ok.
struct redis_get_result {
  redis_status status = redis_status::internal_error;
  redis_value value;  ///< the bytes when status == ok
};

/// One SET of a batch. `key` and `value` must stay valid for the call; the value is sent from
/// where it lies (no copy). ttl 0 stores without expiry, else `SET key value PX ttl`.
/// if_absent: `SET key value NX`: stored only when the key holds nothing, else the item's
/// status is `exists` and the value already there is left as it is (write-once records).
struct redis_set_item {
  std::string_view key;
  std::span<const std::byte> value;
  std::chrono::milliseconds ttl{0};
  bool if_absent = false;
};

/// One GET of get_many_into: its value is received from the socket straight into the
/// caller's memory, `head` first and then `tail` (for a block record: the header area into
/// a scratch buffer, the payload into its final place), with no copy in between.
struct redis_read_item {
  std::string_view key;       ///< in: valid for the call
  std::span<std::byte> head;  ///< in: where the value's first head.size() bytes go
  std::span<std::byte> tail;  ///< in: where the rest goes
  /// Out: ok (the value arrived: `size` is its length), not_found, or a failure. Only with ok
  /// and size == head.size() + tail.size() do head and tail hold the value; otherwise they
  /// hold unspecified bytes (a connection lost halfway through a value leaves part of it).
  redis_status status = redis_status::internal_error;
  /// Out, with ok: the value's length. A value of any other length than head.size() +
  /// tail.size() (at most max_value_bytes) is read off the connection and discarded: nothing
  /// of it is written to head or tail.
  std::size_t size = 0;
};

/// get_many_into's completion callback: items[i]'s value has just arrived whole in its
/// head and tail (its length fits), while the rest of the batch may still be in flight. At
/// most once per item. Runs in the calling thread, inside the call, holding the batch's
/// node connections: it should do its per-value work (verifying) and return, and must not
/// call the client. The item's final status is what counts: it is ok after the call for
/// every item reported here unless the connection's AUTH was refused.
using redis_read_done = void (*)(void* ctx, std::size_t i) noexcept;

/// Configuration; the constructor validates every field and throws std::invalid_argument
/// naming the field and its allowed range.
struct redis_cluster_config {
  /// "host:port" of one or more nodes ("[v6addr]:port" for IPv6). Any node will do: the slot
  /// map is loaded from the first that answers. At least one, at most max_nodes.
  std::vector<std::string> seeds;
  /// ACL user for `AUTH user password`; empty: `AUTH password` (the default user), when a
  /// password is set. A user needs a password.
  std::string user;
  /// Empty: no AUTH. Sent on every new connection, before any other command.
  std::string password;
  /// Bound on opening one connection (TCP connect), 1 ms..60 s.
  std::chrono::milliseconds connect_timeout{200};
  /// A node that makes no progress (sends or receives nothing) for this long while a reply
  /// is due has timed out: its connection is closed and its keys get timeout. 1 ms..60 s.
  std::chrono::milliseconds command_timeout{500};
  /// Bound on a whole call: routing, connects, every redirection round and slot map refresh
  /// included. No public call blocks longer than this (plus name resolution when seeds are
  /// host names rather than addresses). At least command_timeout, at most 10 min.
  std::chrono::milliseconds request_timeout{1000};
  /// MOVED/ASK rounds a call follows before a key gets redirect_limit, 0..16.
  unsigned max_redirects = 3;
  /// Consecutive failures (connect, I/O, timeout, protocol, auth) that open a node's breaker,
  /// 1..1000. One success closes it.
  unsigned breaker_threshold = 3;
  /// How long an open breaker fails calls for the node's slots without trying it, 1 ms..10 min.
  /// After it one call tries the node again: success closes the breaker, failure reopens it.
  std::chrono::milliseconds breaker_cooldown{1000};
  /// Slot map refreshes (CLUSTER SLOTS, after MOVED or a failure) at most this often, 0..60 s.
  std::chrono::milliseconds refresh_interval{100};
  /// Largest value SET accepts and GET returns (larger replies are protocol_error), 1 B..512 MiB.
  /// Servers need proto-max-bulk-len at least this large.
  std::size_t max_value_bytes = 64u << 20;
  /// Largest key, 1 B..64 KiB.
  std::size_t max_key_bytes = 1024;
  /// Nodes the client will ever learn (seeds, CLUSTER SLOTS, redirections), 1..4096.
  std::size_t max_nodes = 256;
  /// Breaker transitions and failed refreshes at warning, error replies at debug.
  logger log;
};

/// Counters since construction (relaxed reads: a snapshot, not a transaction).
struct redis_cluster_stats {
  std::uint64_t keys = 0;              ///< per-key operations requested
  std::uint64_t moved = 0;             ///< MOVED replies followed
  std::uint64_t ask = 0;               ///< ASK replies followed
  std::uint64_t refreshes = 0;         ///< slot maps loaded
  std::uint64_t refresh_failures = 0;  ///< refresh attempts that found no usable map
  std::uint64_t connects = 0;          ///< connections opened
  std::uint64_t connect_failures = 0;  ///< connections that could not be opened or authenticated
  std::uint64_t timeouts = 0;          ///< node rounds that timed out
  std::uint64_t io_errors = 0;         ///< node rounds lost to an I/O error or a protocol error
  std::uint64_t breaker_opens = 0;     ///< times a breaker opened (or reopened after a failed try)
  std::uint64_t fast_fails = 0;        ///< keys failed with circuit_open without calling the node
};

/// A client of one Redis Cluster.
///
/// Routing: each key goes to the master that owns its slot in the client's slot map, loaded
/// with CLUSTER SLOTS on first use and refreshed (at most once per refresh_interval) after a
/// MOVED, a connection failure, a timeout or a fast fail. MOVED updates the slot at once and
/// retries there; ASK retries once on the named node behind ASKING, without touching the map.
///
/// Batches: get_many / set_many / del_many group keys by node and pipeline each node's share
/// on its connection; all nodes of a batch are driven at the same time (one poll loop), so a
/// batch over N nodes costs about one round trip of the slowest node.
///
/// Failures are values: each key gets a redis_status. A connection that times out or breaks
/// is closed (its pipeline state is unknown); keys already answered keep their answers. A
/// SET that failed with timeout or io_error may or may not have been stored.
///
/// Threads: a client may be shared. Each node has one connection and one mutex; a call holds
/// the mutexes of the nodes it talks to (taken in a fixed order) while its pipelines run, so
/// calls to the same node serialize and calls to different nodes proceed in parallel. For
/// more parallelism towards one node, use several clients (each has its own connections).
/// The destructor must not run concurrently with a call.
class redis_cluster {
 public:
  /// Validates `config` (std::invalid_argument naming the field) and records the seeds.
  /// Connects to nothing: the first call (or refresh_slots) does.
  explicit redis_cluster(redis_cluster_config config);
  ~redis_cluster();
  redis_cluster(const redis_cluster&) = delete;
  redis_cluster& operator=(const redis_cluster&) = delete;

  /// Loads the slot map now (CLUSTER SLOTS from a known node or a seed), ignoring
  /// refresh_interval. ok, or the failure of the last node tried (io_error, timeout,
  /// auth_error, protocol_error, circuit_open when every node's breaker is open, ...).
  [[nodiscard]] redis_status refresh_slots() noexcept;

  /// GET. ok with the value, not_found, or any failure status.
  [[nodiscard]] redis_get_result get(std::string_view key) noexcept;
  /// SET (PX ttl when ttl > 0). ok, invalid_argument (key or value too large, ttl < 0), oom,
  /// or any failure status.
  [[nodiscard]] redis_status set(std::string_view key, std::span<const std::byte> value,
                                 std::chrono::milliseconds ttl = std::chrono::milliseconds{0}) noexcept;
  /// DEL. ok when the key was deleted, not_found when it did not exist, or a failure.
  [[nodiscard]] redis_status del(std::string_view key) noexcept;
  /// `SET key value [PX ttl] GET` (Redis 6.2+, Valkey): stores `value` and returns what the
  /// key held before: ok with the old value, not_found when it held nothing (the new value is
  /// stored in both cases), or a failure (after timeout or io_error the SET may or may not
  /// have been stored). A lock-free compare-and-set building block: the caller sees exactly
  /// which value it displaced.
  [[nodiscard]] redis_get_result swap(std::string_view key, std::span<const std::byte> value,
                                      std::chrono::milliseconds ttl = std::chrono::milliseconds{0}) noexcept;

  /// GET of every key, pipelined per node. out[i] is keys[i]'s result; out must be as long as
  /// keys, else every out[i] gets invalid_argument.
  void get_many(std::span<const std::string_view> keys, std::span<redis_get_result> out) noexcept;
  /// GET of every item, pipelined per node like get_many, each value received straight into
  /// the item's head and tail (see redis_read_item): no reply object, no copy. `done`
  /// (optional) is called with ctx and i as each items[i] arrives whole, so the caller can
  /// check one value while the others are still on the wire. The replies' framing (the
  /// `$len` line, one-line errors and redirections) is parsed here rather than by hiredis,
  /// with the same bounds: lengths above max_value_bytes, malformed lines and other reply
  /// types are protocol_error and close the connection.
  void get_many_into(std::span<redis_read_item> items, redis_read_done done = nullptr, void* ctx = nullptr) noexcept;
  /// SET of every item, pipelined per node; out[i] is items[i]'s status (as set()).
  void set_many(std::span<const redis_set_item> items, std::span<redis_status> out) noexcept;
  /// DEL of every key, pipelined per node; out[i] is keys[i]'s status (as del()).
  void del_many(std::span<const std::string_view> keys, std::span<redis_status> out) noexcept;
  /// EXISTS of every key, pipelined per node: out[i] is ok when keys[i] holds a value,
  /// not_found when it does not, or a failure. Nothing but the answer crosses the network.
  void exists_many(std::span<const std::string_view> keys, std::span<redis_status> out) noexcept;
  /// EXISTS that also keeps each key: `PEXPIRE key ttl` (ttl > 0: its time to live starts
  /// again) or `TOUCH key` (ttl 0), pipelined per node. Either makes the key recently used
  /// for the servers' LRU. out[i] as exists_many; invalid_argument for every key when ttl < 0.
  void touch_many(std::span<const std::string_view> keys, std::chrono::milliseconds ttl,
                  std::span<redis_status> out) noexcept;

  /// "host:port" of the node that the slot map says serves `slot`; empty when none is known.
  std::string endpoint_of_slot(std::uint16_t slot) const;
  /// Counters since construction.
  redis_cluster_stats stats() const noexcept;
  /// The validated configuration.
  const redis_cluster_config& config() const noexcept;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace attnstore::shared
