// The operator's tool (src/cli/attnstore_cli.cpp) on stores made by the store itself:
// inspect counts what is there; verify passes a sound store and finds, names and fails
// on every injected fault, judging slots as recovery does.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include <fstream>

#include "attnstore/format/block_header.hpp"
#include "attnstore/format/manifest.hpp"
#include "metrics_server.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::testing;

namespace {

struct run_result {
  int status = -1;
  std::string out;
};

run_result run_cli(const std::string& args) {
  run_result r;
  const std::string cmd = std::string(ATTNSTORE_CLI) + " " + args + " 2>/dev/null";
  std::FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

/// The unsigned number after `"key": ` in a JSON text.
std::uint64_t json_number(const std::string& json, const std::string& key) {
  std::string needle = "\"";
  needle += key;
  needle += "\": ";
  const auto at = json.find(needle);
  REQUIRE(at != std::string::npos);
  return std::strtoull(json.c_str() + at + key.size() + 4, nullptr, 10);
}

void flip(const std::string& dir, std::uint64_t offset) {
  const int fd = ::open((dir + "/blocks-0000.dat").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  char b = 0;
  REQUIRE(::pread(fd, &b, 1, off_t(offset)) == 1);
  b ^= 0x20;
  REQUIRE(::pwrite(fd, &b, 1, off_t(offset)) == 1);
  ::close(fd);
}

}  // namespace

TEST_CASE("cli: inspect and verify a sound store, then find every injected fault", "[cli]") {
  temp_dir dir("cli");
  const std::vector<conversation> convs{{1, 100}, {2, 70}, {3, 33}};
  std::uint32_t blocks = 0;
  {
    store s(small_config(dir.str(), 16, 32));
    for (const auto& c : convs) {
      REQUIRE(put_all(s, c) == errc::ok);
      blocks += c.blocks();
    }
    REQUIRE(s.close() == errc::ok);  // writes the DRAM blocks out
  }

  run_result in = run_cli("inspect " + dir.str() + " --json");
  REQUIRE(in.status == 0);
  CHECK(json_number(in.out, "blocks") == blocks);
  CHECK(json_number(in.out, "slots") == 32);
  CHECK(json_number(in.out, "empty_slots") == 32 - blocks);
  CHECK(json_number(in.out, "damaged_slots") == 0);
  CHECK(in.out.find("\"clean_close\": true") != std::string::npos);
  std::size_t sessions = 0;
  for (std::size_t at = 0; (at = in.out.find("\"session\": ", at)) != std::string::npos; ++at) ++sessions;
  CHECK(sessions == convs.size());
  CHECK(run_cli("inspect " + dir.str()).out.find("sessions: 3") != std::string::npos);  // the human table

  run_result ok = run_cli("verify " + dir.str() + " --json");
  REQUIRE(ok.status == 0);
  CHECK(json_number(ok.out, "blocks_checked") == blocks);
  CHECK(json_number(ok.out, "blocks_bad") == 0);

  // Damage: a payload bit in slot 0, a header bit in slot 2 (after its checksum's
  // fields: the header checksum catches it), a whole header overwritten in slot 4.
  const kv_geometry g = test_geometry.validated();
  const std::uint64_t slot = format::slot_bytes(g), hb = format::header_bytes(g.tokens_per_block);
  flip(dir.str(), 0 * slot + hb + 777);
  flip(dir.str(), 2 * slot + 60);
  {
    const int fd = ::open((dir.str() + "/blocks-0000.dat").c_str(), O_RDWR);
    const std::string junk(64, 'x');
    REQUIRE(::pwrite(fd, junk.data(), junk.size(), off_t(4 * slot)) == ssize_t(junk.size()));
    ::close(fd);
  }
  run_result bad = run_cli("verify " + dir.str() + " --json");
  CHECK(bad.status == 1);
  CHECK(json_number(bad.out, "blocks_checked") == blocks);
  CHECK(json_number(bad.out, "blocks_bad") == 3);
  CHECK(bad.out.find("blocks-0000.dat slot 0 (offset 0): payload checksum mismatch (session ") != std::string::npos);
  CHECK(bad.out.find("blocks-0000.dat slot 2 (offset " + std::to_string(2 * slot) + "): damaged header") !=
        std::string::npos);
  CHECK(bad.out.find("blocks-0000.dat slot 4 (offset " + std::to_string(4 * slot) + "): damaged header") !=
        std::string::npos);
  run_result human = run_cli("verify " + dir.str());
  CHECK(human.status == 1);
  CHECK(human.out.find("3 bad") != std::string::npos);

  // The store agrees: after a clean close recovery reads headers only and drops the
  // two damaged ones (with the rest of their puts: a put is all or none); the flipped
  // payload bit is caught when that block is read.
  {
    store s(small_config(dir.str(), 16, 32));
    CHECK(s.stats().recovery_dropped_blocks >= 2);
  }
}

TEST_CASE("cli: refuses what is not a store, and bad usage", "[cli]") {
  temp_dir dir("cli-empty");
  CHECK(run_cli("inspect " + dir.str()).status == 2);
  CHECK(run_cli("verify " + dir.str() + "/missing").status == 2);
  CHECK(run_cli("frobnicate " + dir.str()).status == 2);
  CHECK(run_cli("").status == 2);
  CHECK(run_cli("--help").status == 0);
}

TEST_CASE("cli: drop erases one session offline and refuses a directory a store has open", "[cli]") {
  temp_dir dir("cli-drop");
  const std::vector<conversation> convs{{1, 100}, {2, 70}, {3, 33}};
  {
    store s(small_config(dir.str(), 16, 32));
    for (const auto& c : convs) REQUIRE(put_all(s, c) == errc::ok);
    // Open: the tool must not touch it.
    CHECK(run_cli("drop " + dir.str() + " --session t/s1").status == 2);
  }
  run_result r = run_cli("drop " + dir.str() + " --session t/" + convs[0].name());
  REQUIRE(r.status == 0);
  CHECK(r.out.find(std::to_string(convs[0].blocks()) + " blocks erased") != std::string::npos);
  CHECK(run_cli("drop " + dir.str() + " --session t/no-such-session").out.find(" 0 blocks erased") !=
        std::string::npos);
  CHECK(run_cli("drop " + dir.str() + " --session missing-slash").status == 2);
  CHECK(run_cli("verify " + dir.str()).status == 0);  // erased slots are empty, not damaged
  store s(small_config(dir.str(), 16, 32));
  const auto toks = convs[0].toks();
  CHECK(s.lookup({"t", convs[0].name()}, toks).tokens == 0);
  require_exact(s, convs[1]);
  require_exact(s, convs[2]);
}

TEST_CASE("cli: purge erases every session of one tenant offline, and only that tenant's", "[cli]") {
  temp_dir dir("cli-purge");
  const std::vector<conversation> convs{{1, 100}, {2, 70}, {3, 33}, {4, 64}};
  auto tenant_of = [](const conversation& c) { return c.id % 2 ? std::string("acme") : std::string("acme2"); };
  hash128 acme{};
  {
    store s(small_config(dir.str(), 16, 32));
    for (const auto& c : convs)
      REQUIRE(s.put({tenant_of(c), c.name()}, c.toks(), 0, c.data(s.block_bytes())) == errc::ok);
    acme = s.tenant_of("acme");
    CHECK(run_cli("purge " + dir.str() + " --tenant acme").status == 2);  // open: refused
  }
  // inspect names each session's tenant by its keyed hash, never the id.
  const run_result in = run_cli("inspect " + dir.str() + " --json");
  CHECK(in.out.find("\"tenant\": \"" + format::hex128(acme) + "\"") != std::string::npos);
  CHECK(in.out.find("acme") == std::string::npos);
  run_result r = run_cli("purge " + dir.str() + " --tenant acme");
  REQUIRE(r.status == 0);
  CHECK(r.out.find(std::to_string(convs[0].blocks() + convs[2].blocks()) + " blocks erased") != std::string::npos);
  CHECK(run_cli("purge " + dir.str() + " --tenant nobody").out.find(" 0 blocks erased") != std::string::npos);
  CHECK(run_cli("purge " + dir.str()).status == 2);  // no --tenant
  CHECK(run_cli("verify " + dir.str()).status == 0);
  store s(small_config(dir.str(), 16, 32));
  for (const auto& c : convs) {
    const auto toks = c.toks();
    const lookup_result l = s.lookup({tenant_of(c), c.name()}, toks);
    CHECK(l.tokens == (tenant_of(c) == "acme" ? 0u : c.tokens));
  }
  CHECK(s.tenant_usage("acme").sessions == 0);
  CHECK(s.tenant_usage("acme2").sessions == 2);
}

TEST_CASE("cli: stats sums up a running engine's metrics, from a file and over HTTP", "[cli]") {
  temp_dir dir("cli-stats");
  store s(small_config(dir.str(), 16, 32));
  const conversation a{1, 100}, b{2, 70};
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(put_all(s, b) == errc::ok);
  const auto ta = a.toks();
  for (int i = 0; i < 3; ++i) (void)s.lookup({"t", a.name()}, ta);
  (void)s.lookup({"elsewhere", "nobody"}, ta);  // 3 hits, 1 miss (another tenant: nothing shared)
  require_exact(s, a);
  REQUIRE(s.demote({"t", b.name()}) == errc::ok);
  require_exact(s, b);  // from SSD
  std::string text;
  s.metrics(text);
  const std::string file = dir.str() + "/metrics.txt";
  std::ofstream(file) << text;

  run_result j = run_cli("stats " + file + " --json");
  REQUIRE(j.status == 0);
  CHECK(json_number(j.out, "lookups") == 4);
  CHECK(j.out.find("\"hit_ratio\": 0.750000") != std::string::npos);
  CHECK(json_number(j.out, "saves") == 2);
  CHECK(j.out.find("\"load from SSD\": {\"p50\": ") != std::string::npos);
  CHECK(j.out.find("\"ssd_block_share\": 0.") != std::string::npos);
  run_result h = run_cli("stats " + file);
  CHECK(h.status == 0);
  CHECK(h.out.find("hit ratio 75.0 %") != std::string::npos);
  CHECK(h.out.find("0 checksum failures") != std::string::npos);

  // Over loopback HTTP, as from a running engine's endpoint.
  mini::metrics_server server(0, [&] {
    std::string t;
    s.metrics(t);
    return t;
  });
  run_result web = run_cli("stats http://127.0.0.1:" + std::to_string(server.port()) + "/metrics --json");
  CHECK(web.status == 0);
  CHECK(json_number(web.out, "lookups") == 4);
  CHECK(server.served() == 1);
  CHECK(run_cli("stats http://127.0.0.1:" + std::to_string(server.port()) + "/nothing").status == 2);  // 404
  CHECK(run_cli("stats " + dir.str() + "/missing.txt").status == 2);
}
