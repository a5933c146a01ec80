// Redis Cluster client (include/attnstore/shared/redis_cluster.hpp): slot routing, per-node
// pipelines, MOVED/ASK, deadlines and circuit breakers.
//
// hiredis is the protocol layer where it matters for safety: its redisReader parses every
// byte a server sends. Sockets are ours: non-blocking, driven by one ppoll loop over every
// node of a batch, so each wait has a deadline (hiredis' blocking contexts bound a single
// read, not a call) and values go out with sendmsg from the caller's memory (hiredis copies
// each command into its output buffer and memmoves the rest after every partial write:
// quadratic for a pipeline of 4 MiB values).
#include "attnstore/shared/redis_cluster.hpp"

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <hiredis/read.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <utility>

#include "attnstore/shared/detail/redis_protocol.hpp"

namespace attnstore::shared {

namespace {

// ---- reply objects: hiredis's own layout (freeReplyObject's contract), built by our reader
// functions so that large strings (block values) come from a pool instead of malloc. A
// fresh 1 MiB malloc is an mmap or a heap top that glibc trims again on free: 256 zeroed
// pages per value and GET throughput halved. Every reply of this client is freed by
// free_reply, which gives large strings back.

/// Buffers for reply strings of at least min_bytes, by exact size class, process-wide.
class string_pool {
 public:
  static constexpr std::size_t min_bytes = 256 << 10;
  static constexpr std::size_t granule = 64 << 10;
  static constexpr std::size_t max_held = 256u << 20;  // bytes kept for reuse at most

  static std::size_t size_class(std::size_t len) noexcept { return (len + 1 + granule - 1) / granule * granule; }
  char* take(std::size_t len) noexcept {
    const std::size_t c = size_class(len);
    {
      std::lock_guard<std::mutex> l(mu_);
      for (std::size_t i = free_.size(); i-- > 0;) {
        if (free_[i].second == c) {
          char* p = free_[i].first;
          free_[i] = free_.back();
          free_.pop_back();
          held_ -= c;
          return p;
        }
      }
    }
    return static_cast<char*>(std::malloc(c));
  }
  void give(char* p, std::size_t len) noexcept {
    const std::size_t c = size_class(len);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (held_ + c <= max_held && free_.size() < free_.capacity()) {
        free_.emplace_back(p, c);
        held_ += c;
        return;
      }
    }
    std::free(p);
  }
  static string_pool& instance() noexcept {
    static string_pool* pool = new string_pool;  // never destroyed: replies may outlive statics
    return *pool;
  }

 private:
  string_pool() { free_.reserve(max_held / min_bytes); }
  std::mutex mu_;
  std::vector<std::pair<char*, std::size_t>> free_;
  std::size_t held_ = 0;
};

void free_reply(void* obj) noexcept {
  auto* r = static_cast<redisReply*>(obj);
  if (!r) return;
  switch (r->type) {
    case REDIS_REPLY_ARRAY:
      for (std::size_t i = 0; r->element && i < r->elements; ++i) free_reply(r->element[i]);
      std::free(r->element);
      break;
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
      if (r->str && r->len >= string_pool::min_bytes) {
        string_pool::instance().give(r->str, r->len);
      } else {
        std::free(r->str);
      }
      break;
    default:
      break;
  }
  std::free(r);
}

redisReply* new_reply(const redisReadTask* task, int type) noexcept {
  auto* r = static_cast<redisReply*>(std::calloc(1, sizeof(redisReply)));
  if (!r) return nullptr;
  r->type = type;
  if (task->parent) static_cast<redisReply*>(task->parent->obj)->element[task->idx] = r;
  return r;
}

void* create_string(const redisReadTask* task, char* str, std::size_t len) noexcept {
  char* buf =
      len >= string_pool::min_bytes ? string_pool::instance().take(len) : static_cast<char*>(std::malloc(len + 1));
  if (!buf) return nullptr;
  redisReply* r = new_reply(task, task->type);
  if (!r) {
    if (len >= string_pool::min_bytes) {
      string_pool::instance().give(buf, len);
    } else {
      std::free(buf);
    }
    return nullptr;
  }
  std::memcpy(buf, str, len);
  buf[len] = '\0';
  r->str = buf;
  r->len = len;
  return r;
}

void* create_array(const redisReadTask* task, int elements) noexcept {
  redisReply* r = new_reply(task, REDIS_REPLY_ARRAY);
  if (!r) return nullptr;
  if (elements > 0) {
    r->element = static_cast<redisReply**>(std::calloc(std::size_t(elements), sizeof(redisReply*)));
    if (!r->element) {
      if (task->parent) static_cast<redisReply*>(task->parent->obj)->element[task->idx] = nullptr;
      std::free(r);
      return nullptr;
    }
  }
  r->elements = std::size_t(elements);
  return r;
}

void* create_integer(const redisReadTask* task, long long value) noexcept {
  redisReply* r = new_reply(task, REDIS_REPLY_INTEGER);
  if (r) r->integer = value;
  return r;
}

void* create_nil(const redisReadTask* task) noexcept { return new_reply(task, REDIS_REPLY_NIL); }

redisReplyObjectFunctions reply_functions{create_string, create_array, create_integer, create_nil, free_reply};

}  // namespace

void redis_value::reset() noexcept {
  if (reply_) free_reply(reply_);
  release();
}

struct redis_value_access {
  static redis_value make(redisReply* r) noexcept {
    redis_value v;
    v.reply_ = r;
    v.data_ = reinterpret_cast<const std::byte*>(r->str);
    v.size_ = r->len;
    return v;
  }
};

namespace {

using clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct reply_deleter {
  void operator()(redisReply* r) const noexcept {
    if (r) free_reply(r);
  }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

constexpr std::size_t read_chunk = 64 * 1024;       // one recv
constexpr std::size_t read_burst = 1024 * 1024;     // recv per node per wake-up, then the others' turn
constexpr std::size_t reader_keep = 16u << 20;      // reader buffer kept between replies
constexpr std::size_t inline_arg_max = 4096;        // larger arguments are sent from the caller's memory
constexpr unsigned refresh_tries = 3;               // nodes asked for CLUSTER SLOTS per refresh
constexpr std::size_t direct_in_bytes = 64 * 1024;  // get_many_into: a node's framing buffer
constexpr std::size_t direct_line_max = 4096;       // get_many_into: longest reply line accepted
constexpr std::size_t direct_peek = 64;             // recv into the framing buffer before a value: its `$len` line

/// A reply object as the reader functions build it (free_reply frees it), for the replies
/// get_many_into frames itself. A value received into the caller's memory is a string reply
/// without bytes (str null, len its length).
reply_ptr make_reply(int type, const char* text, std::size_t len, long long integer = 0) {
  auto* r = static_cast<redisReply*>(std::calloc(1, sizeof(redisReply)));
  if (!r) throw std::bad_alloc();
  reply_ptr out(r);
  r->type = type;
  r->integer = integer;
  r->len = len;
  if (text) {
    r->str = static_cast<char*>(std::malloc(len + 1));
    if (!r->str) throw std::bad_alloc();
    std::memcpy(r->str, text, len);
    r->str[len] = '\0';
  }
  return out;
}

/// After a recv that returned r <= 0: true when it was interrupted (try again); else eof
/// is set when the peer closed, err on an error other than would-block.
bool interrupted(ssize_t r, bool& eof, bool& err) noexcept {
  if (r == 0) {
    eof = true;
  } else if (errno == EINTR) {
    return true;
  } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
    err = true;
  }
  return false;
}

/// Parses a RESP integer ("-1", "1052672") strictly: an optional '-', 1..18 digits, nothing else.
bool parse_resp_integer(std::string_view s, long long& v) noexcept {
  bool neg = false;
  if (!s.empty() && s.front() == '-') {
    neg = true;
    s.remove_prefix(1);
  }
  if (s.empty() || s.size() > 18) return false;
  long long x = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    x = x * 10 + (c - '0');
  }
  v = neg ? -x : x;
  return true;
}

/// One cluster node: its connection and its breaker.
struct node {
  std::string host;
  std::uint16_t port = 0;
  std::string name;      // host:port, for logs and endpoint_of_slot
  std::uint32_t id = 0;  // position in the node table: the order in which mutexes are taken
  // The connection (fd, reader) belongs to whoever set `busy`: one pipeline at a time.
  // A flag and a condition variable rather than a mutex so that waiting for the node is
  // bounded by the caller's deadline too (and TSan understands it, unlike timed_mutex).
  std::mutex busy_mu;
  std::condition_variable busy_cv;
  bool busy = false;
  int fd = -1;
  redisReader* reader = nullptr;
  // get_many_into's framing buffer (direct_in_bytes, made on first use): reply lines and
  // whatever arrived with them; values bypass it. [in_pos, in_len) is unparsed.
  std::unique_ptr<char[]> in;
  std::size_t in_pos = 0;
  std::size_t in_len = 0;
  std::atomic<unsigned> failures{0};        // consecutive
  std::atomic<std::int64_t> open_until{0};  // steady_clock ticks; breaker open while now < this

  ~node() { close(); }
  bool acquire(clock::time_point deadline) {
    std::unique_lock<std::mutex> l(busy_mu);
    if (!busy_cv.wait_until(l, deadline, [&] { return !busy; })) return false;
    busy = true;
    return true;
  }
  void release() noexcept {
    {
      std::lock_guard<std::mutex> l(busy_mu);
      busy = false;
    }
    busy_cv.notify_one();
  }
  void close() noexcept {
    if (fd >= 0) ::close(fd);
    fd = -1;
    if (reader) redisReaderFree(reader);
    reader = nullptr;
    in_pos = in_len = 0;
  }
};

/// A pipeline's bytes: small pieces copied into one string, large arguments referenced
/// where they lie. Written with sendmsg (MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE).
class out_queue {
 public:
  void array(std::size_t n) {
    owned("*");
    number(n);
    owned("\r\n");
  }
  void bulk(const void* p, std::size_t n) {
    owned("$");
    number(n);
    owned("\r\n");
    if (n <= inline_arg_max) {
      owned({static_cast<const char*>(p), n});
    } else {
      external(p, n);
    }
    owned("\r\n");
  }
  void bulk(std::string_view s) { bulk(s.data(), s.size()); }
  /// A decimal argument (a TTL in milliseconds).
  void bulk_number(std::int64_t v) {
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof buf, v);
    bulk(buf, static_cast<std::size_t>(r.ptr - buf));
  }
  bool empty() const noexcept { return cur_ == segs_.size(); }

  /// Sends what the socket takes now. Bytes sent (0: it would block), or -1 with errno.
  long write_some(int fd) noexcept {
    long total = 0;
    while (cur_ < segs_.size()) {
      iovec iov[64];
      int n = 0;
      for (std::size_t i = cur_; i < segs_.size() && n < 64; ++i, ++n) {
        const seg& s = segs_[i];
        const char* base = s.ext ? s.ext : hdr_.data() + s.off;
        const std::size_t skip = i == cur_ ? cur_off_ : 0;
        iov[n].iov_base = const_cast<char*>(base + skip);
        iov[n].iov_len = s.len - skip;
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<std::size_t>(n);
      const ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return total;
        return -1;
      }
      total += w;
      std::size_t left = static_cast<std::size_t>(w);
      while (left > 0) {
        const std::size_t rem = segs_[cur_].len - cur_off_;
        if (left >= rem) {
          left -= rem;
          ++cur_;
          cur_off_ = 0;
        } else {
          cur_off_ += left;
          left = 0;
        }
      }
    }
    return total;
  }

 private:
  struct seg {
    const char* ext;  // nullptr: [off, off + len) of hdr_
    std::size_t off;
    std::size_t len;
  };
  void owned(std::string_view s) {
    if (s.empty()) return;
    if (!segs_.empty() && !segs_.back().ext && segs_.back().off + segs_.back().len == hdr_.size()) {
      segs_.back().len += s.size();
    } else {
      segs_.push_back({nullptr, hdr_.size(), s.size()});
    }
    hdr_.append(s);
  }
  void external(const void* p, std::size_t n) {
    if (n) segs_.push_back({static_cast<const char*>(p), 0, n});
  }
  void number(std::size_t v) {
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof buf, v);
    owned({buf, static_cast<std::size_t>(r.ptr - buf)});
  }
  std::string hdr_;
  std::vector<seg> segs_;
  std::size_t cur_ = 0;
  std::size_t cur_off_ = 0;
};

/// Owns a node's connection while alive (node::acquire succeeded).
class node_turn {
 public:
  explicit node_turn(node* n) noexcept : n_(n) {}
  node_turn(node_turn&& o) noexcept : n_(std::exchange(o.n_, nullptr)) {}
  node_turn& operator=(node_turn&&) = delete;
  ~node_turn() {
    if (n_) n_->release();
  }

 private:
  node* n_;
};

enum class op_kind : std::uint8_t { get, set, del, exists, touch, swap, get_into };

/// One key of a call.
struct op_state {
  op_kind kind = op_kind::get;
  std::string_view key;
  std::span<const std::byte> value;
  std::int64_t ttl_ms = 0;
  bool if_absent = false;  // SET ... NX
  std::uint16_t slot = 0;
  node* ask = nullptr;  // ASK target for the next round only
  bool done = false;
  redis_status status = redis_status::internal_error;
  reply_ptr reply;  // GET ok: the value
  // get_into: where the value goes, and its length once it arrived
  std::span<std::byte> head, tail;
  std::size_t size = 0;
};

/// get_many_into's per-value callback.
struct read_hook {
  redis_read_done fn = nullptr;
  void* ctx = nullptr;
};

enum class cmd : std::uint8_t { asking, op, slots };
struct entry {
  cmd kind;
  std::uint32_t op;
};

/// One node's share of a round.
struct job {
  node* n = nullptr;
  std::vector<entry> entries;
  out_queue out;
  bool auth = false;  // an AUTH leads the pipeline (fresh connection)
  std::size_t expected = 0;
  std::vector<reply_ptr> replies;
  redis_status failure = redis_status::ok;  // transport failure: every unanswered entry gets it
  bool close_after = false;                 // auth or protocol trouble seen in a reply
  bool blameless = false;                   // failed without trying the node (no time left)
  clock::time_point last_progress{};
  // get_many_into (direct): replies framed by read_direct, values received into the ops'
  // memory. ops and hook are the call's.
  bool direct = false;
  std::span<op_state> ops;
  read_hook hook;
  enum class rx : std::uint8_t { line, value, crlf } state = rx::line;
  op_state* value_op = nullptr;  // the op whose value is arriving; nullptr: discarded
  std::size_t value_size = 0;    // its length
  std::size_t value_got = 0;     // bytes of it received
};

std::int64_t ticks(clock::time_point t) noexcept { return t.time_since_epoch().count(); }

timespec to_timespec(clock::duration d) noexcept {
  if (d < clock::duration::zero()) d = clock::duration::zero();
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  return timespec{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
}

[[noreturn]] void bad_config(const std::string& field, const std::string& what) {
  throw std::invalid_argument("redis_cluster_config." + field + ": " + what);
}

void check_ms(const char* field, milliseconds v, milliseconds lo, milliseconds hi) {
  if (v < lo || v > hi) {
    bad_config(field, std::to_string(v.count()) + " ms is outside [" + std::to_string(lo.count()) + ", " +
                          std::to_string(hi.count()) + "] ms");
  }
}

}  // namespace

struct redis_cluster::impl {
  explicit impl(redis_cluster_config c) : cfg(std::move(c)) {}

  redis_cluster_config cfg;

  mutable std::mutex map_mu;  // guards nodes, slots, have_map, stale, last_refresh
  std::vector<std::unique_ptr<node>> nodes;
  std::vector<node*> seeds;
  std::unique_ptr<std::array<node*, redis_slot_count>> slots = std::make_unique<std::array<node*, redis_slot_count>>();
  bool have_map = false;
  bool stale = true;
  redis_status map_failure = redis_status::no_route;  // why there is no map: the last refresh's failure
  clock::time_point last_refresh = clock::time_point::min();
  // One refresh at a time: `refreshing` (guarded by refresh_mu) is held across it, taken
  // before any node mutex. A flag and a condition variable rather than a timed_mutex:
  // TSan (GCC 12) does not see pthread_mutex_clocklock and reports every unlock.
  std::mutex refresh_mu;
  std::condition_variable refresh_cv;
  bool refreshing = false;

  /// Becomes the refresher: at once, or (wait) when the current one finishes before deadline.
  bool begin_refresh(bool wait, clock::time_point deadline) {
    std::unique_lock<std::mutex> l(refresh_mu);
    if (refreshing) {
      if (!wait || !refresh_cv.wait_until(l, deadline, [&] { return !refreshing; })) return false;
    }
    refreshing = true;
    return true;
  }
  void end_refresh() noexcept {
    {
      std::lock_guard<std::mutex> l(refresh_mu);
      refreshing = false;
    }
    refresh_cv.notify_all();
  }
  struct refresh_turn {
    impl* self;
    ~refresh_turn() { self->end_refresh(); }
  };

  struct counters {
    std::atomic<std::uint64_t> keys{0}, moved{0}, ask{0}, refreshes{0}, refresh_failures{0}, connects{0},
        connect_failures{0}, timeouts{0}, io_errors{0}, breaker_opens{0}, fast_fails{0};
  } st;

  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    c.fetch_add(n, std::memory_order_relaxed);
  }

  // ---- node table (map_mu held)
  node* find_or_add(std::string_view host, std::uint16_t port) {
    for (auto& n : nodes) {
      if (n->port == port && n->host == host) return n.get();
    }
    if (nodes.size() >= cfg.max_nodes) return nullptr;
    auto n = std::make_unique<node>();
    n->host.assign(host);
    n->port = port;
    n->name = n->host.find(':') != std::string::npos ? "[" + n->host + "]:" + std::to_string(port)
                                                     : n->host + ":" + std::to_string(port);
    n->id = static_cast<std::uint32_t>(nodes.size());
    nodes.push_back(std::move(n));
    return nodes.back().get();
  }

  // ---- breaker
  static bool breaker_open(const node& n, clock::time_point now) noexcept {
    return ticks(now) < n.open_until.load(std::memory_order_relaxed);
  }
  void record_failure(node& n, redis_status why) noexcept {
    const unsigned f = n.failures.fetch_add(1, std::memory_order_relaxed) + 1;
    if (f >= cfg.breaker_threshold) {
      n.open_until.store(ticks(clock::now() + cfg.breaker_cooldown), std::memory_order_relaxed);
      bump(st.breaker_opens);
      char msg[384];
      std::snprintf(msg, sizeof msg,
                    "redis cluster: node %s failed %u times in a row (last: %.*s); not called for %lld ms",
                    n.name.c_str(), f, int(to_string(why).size()), to_string(why).data(),
                    static_cast<long long>(cfg.breaker_cooldown.count()));
      cfg.log(log_level::warning, msg);
    }
  }
  static void record_success(node& n) noexcept { n.failures.store(0, std::memory_order_relaxed); }

  void mark_stale() {
    std::lock_guard<std::mutex> l(map_mu);
    stale = true;
  }

  // ---- I/O (node mutex held)
  redis_status connect(node& n, clock::time_point deadline) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string port = std::to_string(n.port);
    if (::getaddrinfo(n.host.c_str(), port.c_str(), &hints, &res) != 0 || !res) return redis_status::io_error;
    redis_status result = redis_status::io_error;
    int fd = -1;
    for (addrinfo* p = res; p && fd < 0; p = p->ai_next) {
      fd = ::socket(p->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      int rc = ::connect(fd, p->ai_addr, p->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        pollfd pfd{fd, POLLOUT, 0};
        for (;;) {
          const timespec ts = to_timespec(deadline - clock::now());
          rc = ::ppoll(&pfd, 1, &ts, nullptr);
          if (rc < 0 && errno == EINTR) continue;
          break;
        }
        if (rc == 0) {
          result = redis_status::timeout;
          rc = -1;
        } else if (rc > 0) {
          int err = 0;
          socklen_t len = sizeof err;
          rc = (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) ? 0 : -1;
        }
      }
      if (rc != 0) {
        ::close(fd);
        fd = -1;
        if (result == redis_status::timeout) break;  // the deadline is spent
      }
    }
    ::freeaddrinfo(res);
    if (fd < 0) return result;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    n.reader = redisReaderCreateWithFunctions(&reply_functions);
    if (!n.reader) {
      ::close(fd);
      return redis_status::internal_error;
    }
    n.reader->maxbuf = reader_keep;
    n.fd = fd;
    return redis_status::ok;
  }

  void fail(job& j, redis_status why) noexcept {
    if (j.failure != redis_status::ok) return;
    j.failure = why;
    j.n->close();
    bump(why == redis_status::timeout ? st.timeouts : st.io_errors);
  }

  /// Reads what is there into the node's reader and moves complete replies to the job.
  void read_some(job& j, char* buf) {
    if (j.direct) {
      read_direct(j, buf);
      return;
    }
    node& n = *j.n;
    std::size_t total = 0;
    bool eof = false;
    bool err = false;
    while (total < read_burst) {
      const ssize_t r = ::recv(n.fd, buf, read_chunk, MSG_DONTWAIT);
      if (r > 0) {
        if (redisReaderFeed(n.reader, buf, static_cast<std::size_t>(r)) != REDIS_OK) {
          fail(j, redis_status::protocol_error);
          return;
        }
        total += static_cast<std::size_t>(r);
        continue;
      }
      if (interrupted(r, eof, err)) continue;
      break;
    }
    if (total > 0) j.last_progress = clock::now();
    while (j.replies.size() < j.expected) {
      void* reply = nullptr;
      if (redisReaderGetReply(n.reader, &reply) != REDIS_OK) {
        fail(j, redis_status::protocol_error);
        return;
      }
      if (!reply) break;
      j.replies.emplace_back(static_cast<redisReply*>(reply));
    }
    if (j.replies.size() < j.expected) {
      if (eof || err) {
        fail(j, redis_status::io_error);
      } else if (n.reader->len - n.reader->pos > cfg.max_value_bytes + 2 * read_burst) {
        fail(j, redis_status::protocol_error);  // a reply larger than any value we accept
      }
    }
  }

  // ---- get_many_into: replies framed here, values received into the caller's memory

  /// The op that a direct job's next reply answers; nullptr for the AUTH and ASKING replies.
  static op_state* next_op(job& j) noexcept {
    const std::size_t lead = j.auth ? 1 : 0;
    if (j.replies.size() < lead) return nullptr;
    const std::size_t k = j.replies.size() - lead;
    if (k >= j.entries.size() || j.entries[k].kind != cmd::op) return nullptr;
    return &j.ops[j.entries[k].op];
  }

  /// Where the next bytes of the value arriving for `j` go: [*len] bytes at the result.
  static std::byte* value_dest(const job& j, std::size_t* len) noexcept {
    const op_state& o = *j.value_op;
    if (j.value_got < o.head.size()) {
      *len = o.head.size() - j.value_got;
      return o.head.data() + j.value_got;
    }
    *len = j.value_size - j.value_got;
    return o.tail.data() + (j.value_got - o.head.size());
  }

  /// The value has arrived with its CRLF: a string reply without bytes, and the hook.
  void finish_value(job& j) {
    j.replies.push_back(make_reply(REDIS_REPLY_STRING, nullptr, j.value_size));
    j.state = job::rx::line;
    if (j.value_op && j.hook.fn) j.hook.fn(j.hook.ctx, static_cast<std::size_t>(j.value_op - j.ops.data()));
    j.value_op = nullptr;
  }

  /// Frames what the node's buffer holds into replies (values into their places). false: the
  /// bytes are not RESP that a GET, ASKING or AUTH may answer (protocol_error).
  bool parse_direct(job& j) {
    node& n = *j.n;
    while (j.replies.size() < j.expected) {
      const char* p = n.in.get() + n.in_pos;
      const std::size_t avail = n.in_len - n.in_pos;
      if (j.state == job::rx::value) {
        if (avail == 0) return true;
        std::size_t take = std::min(avail, j.value_size - j.value_got);
        if (j.value_op) {
          for (std::size_t left = take; left > 0;) {  // may span head and tail
            std::size_t room = 0;
            std::byte* d = value_dest(j, &room);
            const std::size_t k = std::min(left, room);
            std::memcpy(d, p, k);
            p += k;
            left -= k;
            j.value_got += k;
          }
        } else {
          j.value_got += take;
        }
        n.in_pos += take;
        if (j.value_got == j.value_size) j.state = job::rx::crlf;
        continue;
      }
      if (j.state == job::rx::crlf) {
        if (avail < 2) return true;
        if (p[0] != '\r' || p[1] != '\n') return false;
        n.in_pos += 2;
        finish_value(j);
        continue;
      }
      const void* nl = std::memchr(p, '\n', std::min(avail, direct_line_max));
      if (!nl) return avail < direct_line_max;
      const std::size_t line = static_cast<std::size_t>(static_cast<const char*>(nl) - p);  // before '\n'
      if (line < 2 || p[line - 1] != '\r') return false;
      const std::string_view body(p + 1, line - 2);
      const char type = p[0];
      n.in_pos += line + 1;
      long long v = 0;
      switch (type) {
        case '$': {
          if (!parse_resp_integer(body, v) || v < -1) return false;
          if (v == -1) {
            j.replies.push_back(make_reply(REDIS_REPLY_NIL, nullptr, 0));
            break;
          }
          if (static_cast<std::uint64_t>(v) > cfg.max_value_bytes) return false;
          op_state* o = next_op(j);
          const bool fits =
              o && o->kind == op_kind::get_into && static_cast<std::size_t>(v) == o->head.size() + o->tail.size();
          j.value_op = fits ? o : nullptr;
          j.value_size = static_cast<std::size_t>(v);
          j.value_got = 0;
          j.state = v > 0 ? job::rx::value : job::rx::crlf;
          break;
        }
        case '+':
          j.replies.push_back(make_reply(REDIS_REPLY_STATUS, body.data(), body.size()));
          break;
        case '-':
          j.replies.push_back(make_reply(REDIS_REPLY_ERROR, body.data(), body.size()));
          break;
        case ':':
          if (!parse_resp_integer(body, v)) return false;
          j.replies.push_back(make_reply(REDIS_REPLY_INTEGER, nullptr, 0, v));
          break;
        default:  // arrays, or not RESP: nothing a GET, ASKING or AUTH answers
          return false;
      }
    }
    return true;
  }

  /// read_some for a direct job: reply lines through the node's small framing buffer, each
  /// value's bytes straight from the socket into the op's head and tail (a value of another
  /// length into `scratch`, discarded).
  void read_direct(job& j, char* scratch) {
    node& n = *j.n;
    if (!n.in) n.in = std::make_unique<char[]>(direct_in_bytes);
    std::size_t total = 0;
    bool eof = false;
    bool err = false;
    for (;;) {
      if (!parse_direct(j)) {
        fail(j, redis_status::protocol_error);
        return;
      }
      if (j.replies.size() >= j.expected || total >= read_burst) break;
      char* dst = nullptr;
      std::size_t want = 0;
      const bool into_value = j.state == job::rx::value;  // then the framing buffer is empty
      if (into_value) {
        if (j.value_op) {
          dst = reinterpret_cast<char*>(value_dest(j, &want));
        } else {
          dst = scratch;
          want = std::min(read_chunk, j.value_size - j.value_got);
        }
      } else {
        if (n.in_pos == n.in_len) {
          n.in_pos = n.in_len = 0;
        } else if (n.in_pos > 0 && direct_in_bytes - n.in_len < direct_line_max) {
          std::memmove(n.in.get(), n.in.get() + n.in_pos, n.in_len - n.in_pos);
          n.in_len -= n.in_pos;
          n.in_pos = 0;
        }
        dst = n.in.get() + n.in_len;
        want = direct_in_bytes - n.in_len;
        // Before a value (and after one: its CRLF), only its `$len` line and a little more:
        // the value itself then goes to its place, not through this buffer.
        want = std::min(want, direct_peek);
      }
      const ssize_t r = ::recv(n.fd, dst, want, MSG_DONTWAIT);
      if (r > 0) {
        total += static_cast<std::size_t>(r);
        if (into_value) {
          j.value_got += static_cast<std::size_t>(r);
          if (j.value_got == j.value_size) j.state = job::rx::crlf;
        } else {
          n.in_len += static_cast<std::size_t>(r);
        }
        continue;
      }
      if (interrupted(r, eof, err)) continue;
      break;
    }
    if (total > 0) j.last_progress = clock::now();
    if (j.replies.size() < j.expected) {
      if (eof || err) fail(j, redis_status::io_error);
    } else if (n.in_pos != n.in_len) {
      j.close_after = true;  // bytes that answer nothing asked: the stream cannot be trusted
    }
  }

  /// Drives every job's pipeline until all are answered or failed, or the deadline passes.
  void pump(std::vector<job>& jobs, clock::time_point deadline) {
    std::vector<pollfd> fds;
    std::vector<job*> active;
    auto buf = std::make_unique<char[]>(read_chunk);
    for (;;) {
      fds.clear();
      active.clear();
      const auto now = clock::now();
      auto wake = deadline;
      for (job& j : jobs) {
        if (j.failure != redis_status::ok || j.replies.size() >= j.expected) continue;
        const auto idle = j.last_progress + cfg.command_timeout;
        if (now >= deadline || now >= idle) {
          fail(j, redis_status::timeout);
          continue;
        }
        wake = std::min(wake, idle);
        fds.push_back({j.n->fd, static_cast<short>(POLLIN | (j.out.empty() ? 0 : POLLOUT)), 0});
        active.push_back(&j);
      }
      if (active.empty()) return;
      const timespec ts = to_timespec(wake - now);
      const int rc = ::ppoll(fds.data(), fds.size(), &ts, nullptr);
      if (rc < 0) {
        if (errno == EINTR) continue;
        for (job* j : active) fail(*j, redis_status::io_error);
        return;
      }
      for (std::size_t i = 0; i < active.size(); ++i) {
        job& j = *active[i];
        const short re = fds[i].revents;
        if (!re) continue;
        if (re & POLLNVAL) {
          fail(j, redis_status::io_error);
          continue;
        }
        if ((re & POLLOUT) && !j.out.empty()) {
          const long w = j.out.write_some(j.n->fd);
          if (w < 0) {
            // The peer may have closed after replying (an error for everything): read first.
            read_some(j, buf.get());
            if (j.replies.size() < j.expected) fail(j, redis_status::io_error);
            continue;
          }
          if (w > 0) j.last_progress = clock::now();
        }
        if (re & (POLLIN | POLLHUP | POLLERR)) read_some(j, buf.get());
      }
    }
  }

  /// Takes the jobs' nodes (in node order, each wait bounded by the deadline), connects where
  /// needed, sends every pipeline and collects the replies. `encode` writes job j's entries.
  /// After it every job has replies for a prefix of its entries (all of them unless
  /// j.failure says why not); the AUTH reply, when one was sent, has been checked and
  /// removed. The returned turns keep the nodes' connections until the replies are read.
  template <class Encode>
  std::vector<node_turn> run_jobs(std::vector<job>& jobs, clock::time_point deadline, Encode&& encode) {
    std::sort(jobs.begin(), jobs.end(), [](const job& a, const job& b) { return a.n->id < b.n->id; });
    std::vector<node_turn> turns;
    turns.reserve(jobs.size());
    for (job& j : jobs) {
      if (j.n->acquire(deadline)) {
        turns.emplace_back(j.n);
      } else {  // other calls held the node all this call's time: not the node's fault
        j.failure = redis_status::timeout;
        j.blameless = true;
      }
    }
    try {
      for (job& j : jobs) {
        if (j.failure != redis_status::ok) continue;
        const auto now = clock::now();
        if (now >= deadline) {  // the call's time ran out before this node's turn: not its fault
          j.failure = redis_status::timeout;
          j.blameless = true;
          continue;
        }
        if (j.n->fd < 0) {
          const redis_status c = connect(*j.n, std::min(deadline, now + cfg.connect_timeout));
          if (c != redis_status::ok) {
            j.failure = c;
            bump(st.connect_failures);
            continue;
          }
          bump(st.connects);
          if (!cfg.password.empty()) {
            j.auth = true;
            j.out.array(cfg.user.empty() ? 2 : 3);
            j.out.bulk("AUTH");
            if (!cfg.user.empty()) j.out.bulk(cfg.user);
            j.out.bulk(cfg.password);
          }
        }
        encode(j);
        j.expected = (j.auth ? 1 : 0) + j.entries.size();
        j.replies.reserve(j.expected);
        j.last_progress = clock::now();
      }
      pump(jobs, deadline);
    } catch (...) {
      for (job& j : jobs) {
        if (!j.blameless) j.n->close();  // a pipeline may be half sent
      }
      throw;
    }
    for (job& j : jobs) {
      if (j.auth && !j.replies.empty()) {
        const redisReply* r = j.replies.front().get();
        const bool ok = r->type == REDIS_REPLY_STATUS && std::string_view(r->str, r->len) == "OK";
        j.replies.erase(j.replies.begin());
        if (!ok) {
          j.failure = redis_status::auth_error;
          j.replies.clear();
          j.n->close();
          bump(st.connect_failures);
          char msg[256];
          std::snprintf(msg, sizeof msg, "redis cluster: node %s refused AUTH%s%s", j.n->name.c_str(),
                        cfg.user.empty() ? "" : " for user ", cfg.user.c_str());
          cfg.log(log_level::warning, msg);
        }
      }
      if (j.failure != redis_status::ok && !j.blameless) {
        record_failure(*j.n, j.failure);
        mark_stale();
      }
    }
    return turns;
  }

  /// Node for a redirection target; an empty host is the replying node's.
  node* redirect_target(const detail::endpoint& e, const node& from) {
    std::lock_guard<std::mutex> l(map_mu);
    return find_or_add(e.host.empty() ? std::string_view(from.host) : e.host, e.port);
  }

  /// One op's reply. Leaves the op pending for MOVED and ASK.
  void interpret(job& j, op_state& o, const redisReply* r, bool asking_failed, redis_status asking_status) {
    o.ask = nullptr;
    if (r->type == REDIS_REPLY_ERROR) {
      const std::string_view text(r->str, r->len);
      const detail::error_reply e = detail::classify_error(text);
      if (e.kind != detail::error_reply::redirect::none) {
        node* target = redirect_target(e.target, *j.n);
        if (!target) {
          o.done = true;
          o.status = redis_status::no_route;
          return;
        }
        if (e.kind == detail::error_reply::redirect::moved) {
          bump(st.moved);
          std::lock_guard<std::mutex> l(map_mu);
          (*slots)[e.slot] = target;
          stale = true;
        } else {
          bump(st.ask);
          o.ask = target;
        }
        return;
      }
      o.done = true;
      o.status = e.status;
      if (e.status == redis_status::auth_error || e.status == redis_status::protocol_error) j.close_after = true;
      if (cfg.log.fn != &logger::quiet) {
        char msg[320];
        std::snprintf(msg, sizeof msg, "redis cluster: %s replied: %.*s", j.n->name.c_str(),
                      int(std::min<std::size_t>(text.size(), 200)), text.data());
        cfg.log(log_level::debug, msg);
      }
      return;
    }
    o.done = true;
    if (asking_failed) {
      o.status = asking_status;
      return;
    }
    switch (o.kind) {
      case op_kind::get:
      case op_kind::swap:
      case op_kind::get_into:
        if (r->type == REDIS_REPLY_NIL) {
          o.status = redis_status::not_found;
        } else if (r->type == REDIS_REPLY_STRING && r->len <= cfg.max_value_bytes) {
          o.status = redis_status::ok;
          o.size = r->len;
        } else {
          o.status = redis_status::protocol_error;
        }
        break;
      case op_kind::set:
        if (o.if_absent && r->type == REDIS_REPLY_NIL) {
          o.status = redis_status::exists;  // NX: the key was taken, nothing stored
        } else {
          o.status = r->type == REDIS_REPLY_STATUS && std::string_view(r->str, r->len) == "OK"
                         ? redis_status::ok
                         : redis_status::protocol_error;
        }
        break;
      case op_kind::exists:
      case op_kind::touch:  // PEXPIRE and TOUCH: 1 when the key was there
        o.status = r->type == REDIS_REPLY_INTEGER ? (r->integer > 0 ? redis_status::ok : redis_status::not_found)
                                                  : redis_status::protocol_error;
        break;
      case op_kind::del:
        o.status = r->type == REDIS_REPLY_INTEGER ? (r->integer > 0 ? redis_status::ok : redis_status::not_found)
                                                  : redis_status::protocol_error;
        break;
    }
    if (o.status == redis_status::protocol_error) j.close_after = true;
  }

  void encode_op(out_queue& out, const op_state& o) {
    switch (o.kind) {
      case op_kind::get:
      case op_kind::get_into:
        out.array(2);
        out.bulk("GET");
        out.bulk(o.key);
        break;
      case op_kind::del:
        out.array(2);
        out.bulk("DEL");
        out.bulk(o.key);
        break;
      case op_kind::exists:
        out.array(2);
        out.bulk("EXISTS");
        out.bulk(o.key);
        break;
      case op_kind::touch:
        out.array(o.ttl_ms > 0 ? 3 : 2);
        out.bulk(o.ttl_ms > 0 ? "PEXPIRE" : "TOUCH");
        out.bulk(o.key);
        if (o.ttl_ms > 0) out.bulk_number(o.ttl_ms);
        break;
      case op_kind::set:
      case op_kind::swap: {
        out.array((o.ttl_ms > 0 ? 5 : 3) + (o.kind == op_kind::swap ? 1 : 0) + (o.if_absent ? 1 : 0));
        out.bulk("SET");
        out.bulk(o.key);
        out.bulk(o.value.data(), o.value.size());
        if (o.kind == op_kind::swap) out.bulk("GET");
        if (o.if_absent) out.bulk("NX");
        if (o.ttl_ms > 0) {
          out.bulk("PX");
          out.bulk_number(o.ttl_ms);
        }
        break;
      }
    }
  }

  /// One round: every pending op to its node (or ASK target), all nodes at once.
  void round(std::span<op_state> ops, clock::time_point deadline, read_hook hook) {
    std::vector<job> jobs;
    {
      std::lock_guard<std::mutex> l(map_mu);
      const auto now = clock::now();
      for (std::size_t i = 0; i < ops.size(); ++i) {
        op_state& o = ops[i];
        if (o.done) continue;
        node* n = o.ask ? o.ask : (*slots)[o.slot];
        if (!n) {
          o.done = true;
          o.status = have_map ? redis_status::no_route : map_failure;
          stale = true;
          continue;
        }
        if (breaker_open(*n, now)) {
          o.done = true;
          o.status = redis_status::circuit_open;
          bump(st.fast_fails);
          stale = true;  // a failover may have moved its slots
          continue;
        }
        auto it = std::find_if(jobs.begin(), jobs.end(), [n](const job& j) { return j.n == n; });
        if (it == jobs.end()) {
          jobs.emplace_back();
          jobs.back().n = n;
          it = jobs.end() - 1;
        }
        if (o.ask) it->entries.push_back({cmd::asking, static_cast<std::uint32_t>(i)});
        it->entries.push_back({cmd::op, static_cast<std::uint32_t>(i)});
      }
    }
    if (jobs.empty()) return;
    for (job& j : jobs) {  // a call's ops are all of one kind
      j.direct = ops[j.entries.front().op].kind == op_kind::get_into;
      j.ops = ops;
      j.hook = hook;
    }
    auto turns = run_jobs(jobs, deadline, [&](job& j) {
      for (const entry& e : j.entries) {
        if (e.kind == cmd::asking) {
          j.out.array(1);
          j.out.bulk("ASKING");
        } else {
          encode_op(j.out, ops[e.op]);
        }
      }
    });
    for (job& j : jobs) {
      std::size_t r = 0;
      bool asking_failed = false;
      redis_status asking_status = redis_status::ok;
      for (const entry& e : j.entries) {
        op_state& o = ops[e.op];
        if (r >= j.replies.size()) {
          if (e.kind == cmd::op) {
            o.done = true;
            o.ask = nullptr;
            o.status = j.failure != redis_status::ok ? j.failure : redis_status::protocol_error;
          }
          continue;
        }
        redisReply* reply = j.replies[r++].get();
        if (e.kind == cmd::asking) {
          asking_failed = !(reply->type == REDIS_REPLY_STATUS && std::string_view(reply->str, reply->len) == "OK");
          asking_status = reply->type == REDIS_REPLY_ERROR ? detail::classify_error({reply->str, reply->len}).status
                                                           : redis_status::protocol_error;
          if (asking_status == redis_status::ok) asking_status = redis_status::protocol_error;
          continue;
        }
        interpret(j, o, reply, asking_failed, asking_status);
        asking_failed = false;
        if (o.done && o.status == redis_status::ok && (o.kind == op_kind::get || o.kind == op_kind::swap)) {
          o.reply = std::move(j.replies[r - 1]);
        }
      }
      if (j.close_after && j.failure == redis_status::ok) {
        j.n->close();
        record_failure(*j.n, redis_status::protocol_error);
      } else if (j.failure == redis_status::ok) {
        record_success(*j.n);
      }
    }
  }

  /// Parses a CLUSTER SLOTS reply and installs it. ok, protocol_error or no_route (no slot
  /// assigned, or the node table is full).
  redis_status install_slots(const redisReply* r, const node& from) {
    struct range {
      long long lo, hi;
      std::string_view host;
      std::uint16_t port;
    };
    if (r->type != REDIS_REPLY_ARRAY) return redis_status::protocol_error;
    std::vector<range> ranges;
    ranges.reserve(r->elements);
    for (std::size_t i = 0; i < r->elements; ++i) {
      const redisReply* e = r->element[i];
      if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) return redis_status::protocol_error;
      const redisReply* lo = e->element[0];
      const redisReply* hi = e->element[1];
      const redisReply* m = e->element[2];
      if (lo->type != REDIS_REPLY_INTEGER || hi->type != REDIS_REPLY_INTEGER || lo->integer < 0 ||
          hi->integer < lo->integer || hi->integer >= redis_slot_count) {
        return redis_status::protocol_error;
      }
      if (m->type != REDIS_REPLY_ARRAY || m->elements < 2 || m->element[0]->type != REDIS_REPLY_STRING ||
          m->element[1]->type != REDIS_REPLY_INTEGER || m->element[1]->integer < 1 || m->element[1]->integer > 65535) {
        return redis_status::protocol_error;
      }
      std::string_view host(m->element[0]->str, m->element[0]->len);
      if (host.empty() || host == "?") host = from.host;  // "the node you asked" (Redis 7)
      if (!detail::valid_host(host)) return redis_status::protocol_error;
      ranges.push_back({lo->integer, hi->integer, host, static_cast<std::uint16_t>(m->element[1]->integer)});
    }
    if (ranges.empty()) return redis_status::no_route;
    auto map = std::make_unique<std::array<node*, redis_slot_count>>();
    map->fill(nullptr);
    std::lock_guard<std::mutex> l(map_mu);
    bool full = false;
    for (const range& g : ranges) {
      node* n = find_or_add(g.host, g.port);
      if (!n) {
        full = true;
        continue;
      }
      for (long long s = g.lo; s <= g.hi; ++s) (*map)[static_cast<std::size_t>(s)] = n;
    }
    if (full) cfg.log(log_level::warning, "redis cluster: max_nodes reached; some slots stay unrouted");
    slots = std::move(map);
    have_map = true;
    stale = false;
    bump(st.refreshes);
    return redis_status::ok;
  }

  /// Loads the slot map from up to refresh_tries nodes: those in the map (fewest failures
  /// first), then the seeds, then the rest.
  redis_status refresh(clock::time_point deadline) {
    std::vector<node*> candidates;
    {
      std::lock_guard<std::mutex> l(map_mu);
      last_refresh = clock::now();
      for (node* n : *slots) {
        if (n && std::find(candidates.begin(), candidates.end(), n) == candidates.end()) candidates.push_back(n);
      }
      std::stable_sort(candidates.begin(), candidates.end(), [](const node* a, const node* b) {
        return a->failures.load(std::memory_order_relaxed) < b->failures.load(std::memory_order_relaxed);
      });
      for (node* n : seeds) {
        if (std::find(candidates.begin(), candidates.end(), n) == candidates.end()) candidates.push_back(n);
      }
      for (auto& n : nodes) {
        if (std::find(candidates.begin(), candidates.end(), n.get()) == candidates.end()) candidates.push_back(n.get());
      }
    }
    redis_status last = redis_status::no_route;
    unsigned tries = 0;
    for (node* n : candidates) {
      if (tries >= refresh_tries) break;
      if (clock::now() >= deadline) {
        last = redis_status::timeout;
        break;
      }
      if (breaker_open(*n, clock::now())) {
        last = redis_status::circuit_open;
        continue;
      }
      ++tries;
      std::vector<job> jobs(1);
      jobs[0].n = n;
      jobs[0].entries.push_back({cmd::slots, 0});
      auto turns = run_jobs(jobs, deadline, [](job& j) {
        j.out.array(2);
        j.out.bulk("CLUSTER");
        j.out.bulk("SLOTS");
      });
      job& j = jobs[0];
      if (j.failure != redis_status::ok) {
        last = j.failure;
        continue;
      }
      const redisReply* r = j.replies.front().get();
      if (r->type == REDIS_REPLY_ERROR) {
        last = detail::classify_error({r->str, r->len}).status;
        if (last == redis_status::ok) last = redis_status::protocol_error;
        if (last == redis_status::auth_error) n->close();
        continue;
      }
      last = install_slots(r, *n);
      if (last == redis_status::ok) {
        record_success(*n);
        return last;
      }
      if (last == redis_status::protocol_error) {
        n->close();
        record_failure(*n, last);
      }
    }
    bump(st.refresh_failures);
    {
      std::lock_guard<std::mutex> l(map_mu);
      map_failure = last == redis_status::ok ? redis_status::no_route : last;
    }
    char msg[160];
    std::snprintf(msg, sizeof msg, "redis cluster: slot map refresh failed (%.*s after %u node(s))",
                  int(to_string(last).size()), to_string(last).data(), tries);
    cfg.log(log_level::warning, msg);
    return last;
  }

  /// Refreshes when the map is missing or stale and refresh_interval has passed since the
  /// last attempt, unless another thread is refreshing right now.
  /// Without any map the call waits (until its deadline) for a refresh in progress;
  /// with a stale one it goes on with what it has.
  void maybe_refresh(clock::time_point deadline) {
    auto recent = [&] {  // map_mu held
      return last_refresh != clock::time_point::min() && clock::now() - last_refresh < cfg.refresh_interval;
    };
    bool wait;
    {
      std::lock_guard<std::mutex> l(map_mu);
      if (have_map && !stale) return;
      wait = !have_map;
      if (!wait && recent()) return;
    }
    if (!begin_refresh(wait, deadline)) return;
    refresh_turn turn{this};
    {
      std::lock_guard<std::mutex> l(map_mu);
      if ((have_map && !stale) || recent()) return;  // another thread refreshed (or just tried)
    }
    (void)refresh(deadline);
  }

  /// The whole call: validation, refresh, rounds until every op is done.
  void run(std::span<op_state> ops, read_hook hook = {}) {
    const auto deadline = clock::now() + cfg.request_timeout;
    bump(st.keys, ops.size());
    for (op_state& o : ops) {
      if (o.key.empty() || o.key.size() > cfg.max_key_bytes || o.value.size() > cfg.max_value_bytes || o.ttl_ms < 0 ||
          o.head.size() + o.tail.size() > cfg.max_value_bytes) {
        o.done = true;
        o.status = redis_status::invalid_argument;
        continue;
      }
      o.slot = key_slot(o.key);
    }
    if (std::all_of(ops.begin(), ops.end(), [](const op_state& o) { return o.done; })) return;
    maybe_refresh(deadline);
    for (unsigned r = 0;; ++r) {
      round(ops, deadline, hook);
      const bool pending = std::any_of(ops.begin(), ops.end(), [](const op_state& o) { return !o.done; });
      if (!pending) return;
      const bool late = clock::now() >= deadline;
      if (r >= cfg.max_redirects || late) {
        for (op_state& o : ops) {
          if (!o.done) {
            o.done = true;
            o.status = late ? redis_status::timeout : redis_status::redirect_limit;
          }
        }
        return;
      }
      maybe_refresh(deadline);
    }
  }
};

redis_cluster::redis_cluster(redis_cluster_config config) {
  const redis_cluster_config& c = config;
  if (c.max_nodes < 1 || c.max_nodes > 4096)
    bad_config("max_nodes", std::to_string(c.max_nodes) + " is outside [1, 4096]");
  if (c.seeds.empty()) bad_config("seeds", "empty; give at least one \"host:port\"");
  if (c.seeds.size() > c.max_nodes) bad_config("seeds", "more seeds than max_nodes");
  for (std::size_t i = 0; i < c.seeds.size(); ++i) {
    detail::endpoint ep;
    if (!detail::parse_endpoint(c.seeds[i], ep, false)) {
      bad_config("seeds[" + std::to_string(i) + "]",
                 "'" + c.seeds[i] + "' is not \"host:port\" or \"[v6addr]:port\" with port 1..65535");
    }
  }
  if (!c.user.empty() && c.password.empty()) bad_config("user", "an ACL user needs a password");
  check_ms("connect_timeout", c.connect_timeout, milliseconds{1}, milliseconds{60000});
  check_ms("command_timeout", c.command_timeout, milliseconds{1}, milliseconds{60000});
  check_ms("request_timeout", c.request_timeout, c.command_timeout, milliseconds{600000});
  check_ms("breaker_cooldown", c.breaker_cooldown, milliseconds{1}, milliseconds{600000});
  check_ms("refresh_interval", c.refresh_interval, milliseconds{0}, milliseconds{60000});
  if (c.max_redirects > 16) bad_config("max_redirects", std::to_string(c.max_redirects) + " is outside [0, 16]");
  if (c.breaker_threshold < 1 || c.breaker_threshold > 1000) {
    bad_config("breaker_threshold", std::to_string(c.breaker_threshold) + " is outside [1, 1000]");
  }
  if (c.max_value_bytes < 1 || c.max_value_bytes > (512u << 20)) {
    bad_config("max_value_bytes", std::to_string(c.max_value_bytes) + " is outside [1, 536870912]");
  }
  if (c.max_key_bytes < 1 || c.max_key_bytes > 65536) {
    bad_config("max_key_bytes", std::to_string(c.max_key_bytes) + " is outside [1, 65536]");
  }
  impl_ = std::make_unique<impl>(std::move(config));
  impl_->slots->fill(nullptr);
  for (const std::string& s : impl_->cfg.seeds) {
    detail::endpoint ep;
    (void)detail::parse_endpoint(s, ep, false);
    node* n = impl_->find_or_add(ep.host, ep.port);
    if (std::find(impl_->seeds.begin(), impl_->seeds.end(), n) == impl_->seeds.end()) impl_->seeds.push_back(n);
  }
}

redis_cluster::~redis_cluster() = default;

redis_status redis_cluster::refresh_slots() noexcept {
  try {
    const auto deadline = clock::now() + impl_->cfg.request_timeout;
    if (!impl_->begin_refresh(true, deadline)) return redis_status::timeout;
    impl::refresh_turn turn{impl_.get()};
    return impl_->refresh(deadline);
  } catch (...) {
    return redis_status::internal_error;
  }
}

redis_get_result redis_cluster::get(std::string_view key) noexcept {
  redis_get_result out;
  get_many({&key, 1}, {&out, 1});
  return out;
}

redis_status redis_cluster::set(std::string_view key, std::span<const std::byte> value,
                                std::chrono::milliseconds ttl) noexcept {
  const redis_set_item item{key, value, ttl};
  redis_status out = redis_status::internal_error;
  set_many({&item, 1}, {&out, 1});
  return out;
}

redis_status redis_cluster::del(std::string_view key) noexcept {
  redis_status out = redis_status::internal_error;
  del_many({&key, 1}, {&out, 1});
  return out;
}

void redis_cluster::get_many(std::span<const std::string_view> keys, std::span<redis_get_result> out) noexcept {
  for (auto& r : out) {
    r.value.reset();
    r.status = redis_status::internal_error;
  }
  if (out.size() != keys.size()) {
    for (auto& r : out) r.status = redis_status::invalid_argument;
    return;
  }
  try {
    std::vector<op_state> ops(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      ops[i].kind = op_kind::get;
      ops[i].key = keys[i];
    }
    impl_->run(ops);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      out[i].status = ops[i].status;
      if (ops[i].status == redis_status::ok) out[i].value = redis_value_access::make(ops[i].reply.release());
    }
  } catch (...) {
    for (auto& r : out) {
      r.value.reset();
      r.status = redis_status::internal_error;
    }
  }
}

void redis_cluster::get_many_into(std::span<redis_read_item> items, redis_read_done done, void* ctx) noexcept {
  for (auto& it : items) {
    it.status = redis_status::internal_error;
    it.size = 0;
  }
  try {
    std::vector<op_state> ops(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
      ops[i].kind = op_kind::get_into;
      ops[i].key = items[i].key;
      ops[i].head = items[i].head;
      ops[i].tail = items[i].tail;
    }
    impl_->run(ops, read_hook{done, ctx});
    for (std::size_t i = 0; i < items.size(); ++i) {
      items[i].status = ops[i].status;
      if (ops[i].status == redis_status::ok) items[i].size = ops[i].size;
    }
  } catch (...) {
    for (auto& it : items) it.status = redis_status::internal_error;
  }
}

void redis_cluster::set_many(std::span<const redis_set_item> items, std::span<redis_status> out) noexcept {
  if (out.size() != items.size()) {
    for (auto& r : out) r = redis_status::invalid_argument;
    return;
  }
  try {
    std::vector<op_state> ops(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
      ops[i].kind = op_kind::set;
      ops[i].key = items[i].key;
      ops[i].value = items[i].value;
      ops[i].ttl_ms = items[i].ttl.count();
      ops[i].if_absent = items[i].if_absent;
    }
    impl_->run(ops);
    for (std::size_t i = 0; i < items.size(); ++i) out[i] = ops[i].status;
  } catch (...) {
    for (auto& r : out) r = redis_status::internal_error;
  }
}

namespace {
/// The keys-only batches (DEL, EXISTS): one op of `kind` per key, a status per key.
void run_key_ops(redis_cluster::impl& impl, op_kind kind, std::span<const std::string_view> keys,
                 std::span<redis_status> out, std::int64_t ttl_ms = 0) noexcept {
  if (out.size() != keys.size()) {
    for (auto& r : out) r = redis_status::invalid_argument;
    return;
  }
  try {
    std::vector<op_state> ops(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      ops[i].kind = kind;
      ops[i].key = keys[i];
      ops[i].ttl_ms = ttl_ms;
    }
    impl.run(ops);
    for (std::size_t i = 0; i < keys.size(); ++i) out[i] = ops[i].status;
  } catch (...) {
    for (auto& r : out) r = redis_status::internal_error;
  }
}
}  // namespace

void redis_cluster::del_many(std::span<const std::string_view> keys, std::span<redis_status> out) noexcept {
  run_key_ops(*impl_, op_kind::del, keys, out);
}

void redis_cluster::exists_many(std::span<const std::string_view> keys, std::span<redis_status> out) noexcept {
  run_key_ops(*impl_, op_kind::exists, keys, out);
}

void redis_cluster::touch_many(std::span<const std::string_view> keys, std::chrono::milliseconds ttl,
                               std::span<redis_status> out) noexcept {
  if (ttl.count() < 0) {
    for (auto& r : out) r = redis_status::invalid_argument;
    return;
  }
  run_key_ops(*impl_, op_kind::touch, keys, out, ttl.count());
}

redis_get_result redis_cluster::swap(std::string_view key, std::span<const std::byte> value,
                                     std::chrono::milliseconds ttl) noexcept {
  redis_get_result out;
  try {
    op_state op;
    op.kind = op_kind::swap;
    op.key = key;
    op.value = value;
    op.ttl_ms = ttl.count();
    impl_->run({&op, 1});
    out.status = op.status;
    if (op.status == redis_status::ok) out.value = redis_value_access::make(op.reply.release());
  } catch (...) {
    out.value.reset();
    out.status = redis_status::internal_error;
  }
  return out;
}

std::string redis_cluster::endpoint_of_slot(std::uint16_t slot) const {
  if (slot >= redis_slot_count) return {};
  std::lock_guard<std::mutex> l(impl_->map_mu);
  const node* n = (*impl_->slots)[slot];
  return n ? n->name : std::string();
}

redis_cluster_stats redis_cluster::stats() const noexcept {
  const auto& c = impl_->st;
  auto v = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  redis_cluster_stats s;
  s.keys = v(c.keys);
  s.moved = v(c.moved);
  s.ask = v(c.ask);
  s.refreshes = v(c.refreshes);
  s.refresh_failures = v(c.refresh_failures);
  s.connects = v(c.connects);
  s.connect_failures = v(c.connect_failures);
  s.timeouts = v(c.timeouts);
  s.io_errors = v(c.io_errors);
  s.breaker_opens = v(c.breaker_opens);
  s.fast_fails = v(c.fast_fails);
  return s;
}

const redis_cluster_config& redis_cluster::config() const noexcept { return impl_->cfg; }

}  // namespace attnstore::shared
