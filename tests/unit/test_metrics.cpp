// store::metrics: the exposition is well-formed Prometheus text (checked line by line
// here; tests/metrics/check_exposition.py checks it with the prometheus_client parser),
// and each histogram moves with the calls it times.
#include <catch2/catch.hpp>

#include <map>
#include <sstream>
#include <string>

#include "attnstore/format/manifest.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::testing;

namespace {

struct sample {
  std::string name, labels;
  double value;
};

/// Parses the text format strictly: HELP and TYPE before a family's samples, names and
/// label sets well formed, values numbers, histogram buckets cumulative and ending in
/// +Inf equal to _count. Fails the test on anything else.
std::vector<sample> parse(const std::string& text) {
  std::vector<sample> out;
  std::map<std::string, std::string> types;
  std::istringstream in(text);
  std::string l;
  auto valid_name = [](const std::string& n) {
    if (n.empty() || !(std::isalpha(static_cast<unsigned char>(n[0])) || n[0] == '_' || n[0] == ':')) return false;
    for (char c : n)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':')) return false;
    return true;
  };
  while (std::getline(in, l)) {
    INFO(l);
    REQUIRE(!l.empty());
    if (l.rfind("# HELP ", 0) == 0) continue;
    if (l.rfind("# TYPE ", 0) == 0) {
      std::istringstream t(l.substr(7));
      std::string name, type;
      t >> name >> type;
      REQUIRE(valid_name(name));
      REQUIRE((type == "counter" || type == "gauge" || type == "histogram"));
      REQUIRE(types.count(name) == 0);  // one TYPE per family
      types[name] = type;
      continue;
    }
    REQUIRE(l[0] != '#');
    sample s;
    const auto brace = l.find('{'), space = l.rfind(' ');
    REQUIRE(space != std::string::npos);
    if (brace != std::string::npos && brace < space) {
      const auto close = l.find('}', brace);
      REQUIRE(close != std::string::npos);
      s.name = l.substr(0, brace);
      s.labels = l.substr(brace + 1, close - brace - 1);
      REQUIRE(close + 1 == space);
    } else {
      s.name = l.substr(0, space);
    }
    REQUIRE(valid_name(s.name));
    const std::string v = l.substr(space + 1);
    char* end = nullptr;
    s.value = std::strtod(v.c_str(), &end);
    REQUIRE((v == "+Inf" || (end && *end == 0)));
    // Its family was declared: the name itself, or a histogram's _bucket/_sum/_count.
    std::string family = s.name;
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string sfx = suffix;
      if (family.size() > sfx.size() && family.compare(family.size() - sfx.size(), sfx.size(), sfx) == 0 &&
          types.count(family.substr(0, family.size() - sfx.size())) &&
          types[family.substr(0, family.size() - sfx.size())] == "histogram")
        family = family.substr(0, family.size() - sfx.size());
    }
    REQUIRE(types.count(family) == 1);
    if (types[family] == "counter") REQUIRE(s.name.size() > 6);
    out.push_back(s);
  }
  // Buckets: cumulative, and +Inf equals _count, per family and label set.
  std::map<std::string, double> last;
  for (const sample& s : out) {
    if (s.name.size() < 7 || s.name.compare(s.name.size() - 7, 7, "_bucket") != 0) continue;
    const auto le = s.labels.find("le=\"");
    REQUIRE(le != std::string::npos);
    const std::string series = s.name + "{" + s.labels.substr(0, le) + "}";
    REQUIRE(s.value >= last[series]);
    last[series] = s.value;
    if (s.labels.find("le=\"+Inf\"") != std::string::npos) {
      const std::string base = s.name.substr(0, s.name.size() - 7);
      std::string rest = s.labels.substr(0, le);
      if (!rest.empty() && rest.back() == ',') rest.pop_back();
      bool found = false;
      for (const sample& c : out)
        if (c.name == base + "_count" && c.labels == rest) {
          REQUIRE(c.value == s.value);
          found = true;
        }
      REQUIRE(found);
    }
  }
  return out;
}

// session_key holds views: the names outlive the calls.
const std::string names[] = {"s0", "s1", "s2"};
session_key key_of(const conversation& c) { return {"t", names[c.id]}; }

double value(const std::vector<sample>& samples, const std::string& name, const std::string& labels = "") {
  for (const sample& s : samples)
    if (s.name == name && s.labels == labels) return s.value;
  FAIL("no sample " << name << "{" << labels << "}");
  return 0;
}

}  // namespace

TEST_CASE("metrics: a well-formed exposition whose histograms move with the calls they time", "[metrics]") {
  temp_dir dir("metrics");
  store_config c = small_config(dir.str(), 16, 64);
  c.prefetch_window = 4;
  store s(c);
  std::string text;
  s.metrics(text);
  auto before = parse(text);
  CHECK(value(before, "attnstore_lookup_seconds_count") == 0);
  CHECK(value(before, "attnstore_dram_capacity_bytes") > 0);

  conversation a{1, 200}, b{2, 64};
  REQUIRE(put_all(s, a) == errc::ok);  // 2 saves
  REQUIRE(put_all(s, b) == errc::ok);
  const auto a_toks = a.toks();
  for (int i = 0; i < 3; ++i) (void)s.lookup(key_of(a), a_toks);  // 3 lookups
  require_exact(s, b);                                            // a load from DRAM
  REQUIRE(s.demote(key_of(a)) == errc::ok);                       // SSD writes
  require_exact(s, a);                                            // a load from SSD
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  session_key queue[] = {key_of(a)};
  s.set_queue(queue);  // a prefetch brings a back to DRAM...
  CHECK(s.run_background() >= 1);
  require_exact(s, a);  // ...ahead of its load (DRAM)

  text.clear();
  s.metrics(text);
  const auto after = parse(text);
  CHECK(value(after, "attnstore_lookup_seconds_count") == 3);
  CHECK(value(after, "attnstore_lookups_total") == 3);
  CHECK(value(after, "attnstore_save_seconds_count") == 2);
  CHECK(value(after, "attnstore_puts_total") == 2);
  CHECK(value(after, "attnstore_load_seconds_count", "source=\"dram\"") == 2);
  CHECK(value(after, "attnstore_load_seconds_count", "source=\"ssd\"") == 1);
  CHECK(value(after, "attnstore_ssd_write_seconds_count") >= 1);
  CHECK(value(after, "attnstore_ssd_read_seconds_count") >= 2);  // the load and the prefetch
  CHECK(value(after, "attnstore_prefetch_lead_seconds_count") == 1);
  CHECK(value(after, "attnstore_prefetch_lead_seconds_sum") > 0);
  CHECK(value(after, "attnstore_lookup_seconds_sum") > 0);
  CHECK(value(after, "attnstore_load_seconds_bucket", "source=\"ssd\",le=\"+Inf\"") == 1);
  CHECK(value(after, "attnstore_sessions") == 2);
  CHECK(value(after, "attnstore_ssd_used_bytes") > 0);
  CHECK(value(after, "attnstore_blocks_served_ssd_total") == a.blocks());
}

TEST_CASE("metrics: in-flight gauges, sessions per tier and tenant series move with the store", "[metrics]") {
  temp_dir dir("metrics-gauges");
  store s(small_config(dir.str(), 16, 64));
  const std::size_t slot = format::slot_bytes(test_geometry.validated());
  auto scrape = [&] {
    std::string text;
    s.metrics(text);
    return parse(text);
  };
  conversation a{1, 200}, b{2, 64};
  REQUIRE(put_all(s, a) == errc::ok);
  REQUIRE(s.put({"other", "x"}, b.toks(), 0, b.data(s.block_bytes())) == errc::ok);
  REQUIRE(s.set_tenant_quota("other", 4 * slot, 0) == errc::ok);
  REQUIRE(s.demote(key_of(a)) == errc::ok);
  const std::string ta = "tenant=\"" + format::hex128(s.tenant_of("t")) + "\"",
                    tb = "tenant=\"" + format::hex128(s.tenant_of("other")) + "\"";
  auto m = scrape();
  CHECK(value(m, "attnstore_tier_sessions", "tier=\"dram\"") == 1);
  CHECK(value(m, "attnstore_tier_sessions", "tier=\"ssd\"") == 1);
  CHECK(value(m, "attnstore_tenant_sessions", ta) == 1);
  CHECK(value(m, "attnstore_tenant_bytes", ta + ",tier=\"ssd\"") == double(a.blocks() * slot));
  CHECK(value(m, "attnstore_tenant_bytes", tb + ",tier=\"dram\"") == double(b.blocks() * slot));
  CHECK(value(m, "attnstore_tenant_quota_bytes", tb + ",tier=\"dram\"") == double(4 * slot));
  CHECK(value(m, "attnstore_pinned_sessions") == 0);
  CHECK(value(m, "attnstore_read_leases") == 0);
  CHECK(value(m, "attnstore_saves_in_flight") == 0);
  // A layer-wise load and a save, both open.
  std::vector<block_view> views(8);
  read_lease lease(8);
  const auto toks = b.toks();
  REQUIRE(s.acquire({"other", "x"}, toks, views, lease).status == errc::ok);
  save_reservation r;
  std::vector<std::byte*> payloads(8);
  const auto c_toks = conversation{3, 40}.toks();
  REQUIRE(s.reserve({"t", "new"}, c_toks, 0, payloads, r) == errc::ok);
  m = scrape();
  CHECK(value(m, "attnstore_pinned_sessions") == 2);
  CHECK(value(m, "attnstore_read_leases") == 1);
  CHECK(value(m, "attnstore_saves_in_flight") == 1);
  s.abort(r);
  lease.release();
  m = scrape();
  CHECK(value(m, "attnstore_pinned_sessions") == 0);
  CHECK(value(m, "attnstore_read_leases") == 0);
  CHECK(value(m, "attnstore_saves_in_flight") == 0);
  // A purged tenant leaves the series once it holds nothing and has no cap.
  REQUIRE(s.purge("t") == errc::ok);
  m = scrape();
  CHECK(value(m, "attnstore_tier_sessions", "tier=\"ssd\"") == 0);
  CHECK(value(m, "attnstore_tenant_sessions", tb) == 1);
  std::string text;
  s.metrics(text);
  CHECK(text.find(ta) == std::string::npos);
}
