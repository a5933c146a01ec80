// What the tests against real Redis Clusters share: the environment ctest's fixtures set,
// an admin connection (plain blocking hiredis) to inspect and disturb nodes, the slot map
// as the servers see it, and a wait for the cluster to be whole again.
//   ATTNSTORE_REDIS_SEED      host:port of a node of the running cluster
//   ATTNSTORE_REDIS_PASSWORD  its password (requirepass), ATTNSTORE_REDIS_USER its ACL user
//   ATTNSTORE_REDIS_SCRIPT    scripts/redis-cluster.sh, ATTNSTORE_REDIS_DIR the cluster's --dir
#pragma once

#include <hiredis/hiredis.h>
#include <signal.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/shared/redis_cluster.hpp"

namespace redis_test {

inline std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

inline bool on_path(const char* exe) {
  const std::string path = env("PATH");
  std::size_t start = 0;
  while (start <= path.size()) {
    const std::size_t end = path.find(':', start);
    const std::string dir = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!dir.empty() && ::access((dir + "/" + exe).c_str(), X_OK) == 0) return true;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return false;
}

/// The main of a test binary that needs a running cluster: 77 (skipped) without
/// redis-server, 1 without the fixture's environment, else Catch2's answer.
inline int run_with_cluster(int argc, char** argv, const char* program) {
  if (!on_path("redis-server")) {
    std::fprintf(stderr, "%s: redis-server not installed (scripts/deps.sh): skipped\n", program);
    return 77;
  }
  if (env("ATTNSTORE_REDIS_SEED").empty()) {
    std::fprintf(stderr,
                 "%s: ATTNSTORE_REDIS_SEED is not set; run it through ctest "
                 "(its fixture starts the cluster with scripts/redis-cluster.sh)\n",
                 program);
    return 1;
  }
  return Catch::Session().run(argc, argv);
}

/// The client configuration of the tests: the fixture's seed and credentials, generous
/// timeouts (ctest runs other tests beside these; the tests of the bounds tighten them), a
/// quick breaker and no log.
inline attnstore::shared::redis_cluster_config test_cluster_config() {
  using std::chrono::milliseconds;
  attnstore::shared::redis_cluster_config c;
  c.seeds = {env("ATTNSTORE_REDIS_SEED")};
  c.user = env("ATTNSTORE_REDIS_USER");
  c.password = env("ATTNSTORE_REDIS_PASSWORD");
  c.connect_timeout = milliseconds{1000};
  c.command_timeout = milliseconds{2000};
  c.request_timeout = milliseconds{10000};
  c.breaker_threshold = 2;
  c.breaker_cooldown = milliseconds{500};
  c.refresh_interval = milliseconds{50};
  c.log.fn = &attnstore::logger::quiet;
  return c;
}

/// What a call may take beyond its bound on a loaded 2-core machine (wake-up latency).
inline constexpr double slack_ms = 400;

inline int seed_port() {
  return std::atoi(env("ATTNSTORE_REDIS_SEED").substr(env("ATTNSTORE_REDIS_SEED").rfind(':') + 1).c_str());
}

struct reply_free {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using reply = std::unique_ptr<redisReply, reply_free>;

/// An admin connection to one node, authenticated as the default user.
struct admin {
  explicit admin(int port) : port(port) {
    ctx = redisConnectWithTimeout("127.0.0.1", port, timeval{2, 0});
    REQUIRE(ctx);
    REQUIRE(ctx->err == 0);
    redisSetTimeout(ctx, timeval{5, 0});
    const std::string pw = env("ATTNSTORE_REDIS_PASSWORD");
    if (!pw.empty()) {
      reply r(static_cast<redisReply*>(redisCommand(ctx, "AUTH %s", pw.c_str())));
      REQUIRE(r);
      REQUIRE(r->type == REDIS_REPLY_STATUS);
    }
  }
  ~admin() { redisFree(ctx); }
  admin(const admin&) = delete;
  admin& operator=(const admin&) = delete;

  template <class... A>
  reply cmd(const char* fmt, A... args) {
    reply r(static_cast<redisReply*>(redisCommand(ctx, fmt, args...)));
    INFO("port " << port << ": " << fmt << (ctx->err ? std::string(" -> ") + ctx->errstr : ""));
    REQUIRE(r);
    return r;
  }
  std::string str(const char* fmt, const char* arg = nullptr) {
    reply r = arg ? cmd(fmt, arg) : cmd(fmt);
    return r->str ? std::string(r->str, r->len) : std::string();
  }
  std::string info_field(const char* section, const std::string& field) {
    const std::string text = str("INFO %s", section);
    const std::size_t at = text.find(field + ":");
    if (at == std::string::npos) return {};
    const std::size_t from = at + field.size() + 1;
    return text.substr(from, text.find("\r\n", from) - from);
  }
  int port;
  redisContext* ctx = nullptr;
};

/// slot -> port of the master serving it, from CLUSTER SLOTS on `port`.
inline std::vector<int> slot_owners(int port) {
  admin a(port);
  reply r = a.cmd("CLUSTER SLOTS");
  REQUIRE(r->type == REDIS_REPLY_ARRAY);
  std::vector<int> owner(attnstore::shared::redis_slot_count, 0);
  for (std::size_t i = 0; i < r->elements; ++i) {
    const redisReply* e = r->element[i];
    for (long long s = e->element[0]->integer; s <= e->element[1]->integer; ++s) {
      owner[static_cast<std::size_t>(s)] = static_cast<int>(e->element[2]->element[1]->integer);
    }
  }
  return owner;
}

inline std::vector<int> masters(const std::vector<int>& owner) {
  std::set<int> s(owner.begin(), owner.end());
  s.erase(0);
  return {s.begin(), s.end()};
}

inline double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

/// The port of a replica of master `port` that is online and has caught up with it
/// (waits up to 5 s for its offset), or 0 when it has none.
inline int synced_replica(int port) {
  admin a(port);
  const std::string slave0 = a.info_field("replication", "slave0");
  if (slave0.empty() || slave0.find("online") == std::string::npos) return 0;
  const std::string offset = a.info_field("replication", "master_repl_offset");
  const int rport = std::atoi(slave0.substr(slave0.find("port=") + 5).c_str());
  admin r(rport);
  const auto t0 = std::chrono::steady_clock::now();
  while (r.info_field("replication", "slave_repl_offset") != offset && ms_since(t0) < 5000)
    std::this_thread::sleep_for(std::chrono::milliseconds{20});
  return r.info_field("replication", "slave_repl_offset") == offset ? rport : 0;
}

/// scripts/redis-cluster.sh with `args` on the fixture's cluster (kill-node, restart-node).
inline int script(const std::string& args) {
  const std::string cmd = env("ATTNSTORE_REDIS_SCRIPT") + " " + args + " --dir " + env("ATTNSTORE_REDIS_DIR");
  return std::system(cmd.c_str());
}

/// A master killed (kill-node) for a test: restarted when this goes out of scope unless
/// the test restarted it (restart()), so a failed assertion in between never leaves the
/// fixture's cluster without it for the tests after.
struct killed_node {
  int port;
  bool down = false;
  explicit killed_node(int p) : port(p) { down = script("kill-node --node " + std::to_string(port)) == 0; }
  int restart() {
    down = false;
    return script("restart-node --node " + std::to_string(port));
  }
  ~killed_node() {
    if (down) (void)script("restart-node --node " + std::to_string(port));
  }
  killed_node(const killed_node&) = delete;
  killed_node& operator=(const killed_node&) = delete;
};

/// A node stopped with SIGSTOP (it accepts nothing and answers nothing; below
/// cluster-node-timeout no failure is declared): continued when this goes out of scope
/// unless the test did (resume()), so later tests always find it answering.
struct hung_node {
  pid_t pid = 0;
  bool stopped = false;
  explicit hung_node(int port) {
    pid = std::atoi(admin(port).info_field("server", "process_id").c_str());
    stopped = pid > 0 && ::kill(pid, SIGSTOP) == 0;
  }
  void resume() {
    if (stopped) ::kill(pid, SIGCONT);
    stopped = false;
  }
  ~hung_node() { resume(); }
  hung_node(const hung_node&) = delete;
  hung_node& operator=(const hung_node&) = delete;
};

/// Every node answers PING and reports cluster_state:ok (within `limit`).
inline bool wait_cluster_ok(const std::vector<int>& ports, std::chrono::milliseconds limit) {
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < limit) {
    bool all = true;
    for (int p : ports) {
      redisContext* c = redisConnectWithTimeout("127.0.0.1", p, timeval{0, 200000});
      bool ok = c && !c->err;
      if (ok) {
        redisSetTimeout(c, timeval{1, 0});
        const std::string pw = env("ATTNSTORE_REDIS_PASSWORD");
        if (!pw.empty()) freeReplyObject(redisCommand(c, "AUTH %s", pw.c_str()));
        auto* r = static_cast<redisReply*>(redisCommand(c, "CLUSTER INFO"));
        ok = r && r->type == REDIS_REPLY_STRING && std::strstr(r->str, "cluster_state:ok");
        if (r) freeReplyObject(r);
      }
      if (c) redisFree(c);
      all = all && ok;
    }
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds{100});
  }
  return false;
}

}  // namespace redis_test
