// Truncation on context overflow: plan, apply, load at the new positions with keys
// re-rotated there, keep saving after it.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "attnstore/hooks.hpp"
#include "attnstore/truncate.hpp"

using namespace attnstore;

TEST_CASE("plan_truncation: block-granular drops, a ratio, and refusal when it cannot fit") {
  auto p = plan_truncation(1000, 100, 2048, 64, 16);
  CHECK_FALSE(p.needed);
  p = plan_truncation(2000, 100, 2048, 64, 16);  // overflow 52, ratio 0.5 of 1936 = 968 -> 976
  REQUIRE(p.needed);
  CHECK(p.drop % 16 == 0);
  CHECK(p.drop >= 52);
  CHECK(p.drop == 976);
  CHECK(p.kept == 2000 - 976);
  CHECK(p.shift == -976);
  p = plan_truncation(2000, 100, 2048, 64, 16, 0.0);  // no ratio: just the overflow, rounded up
  CHECK(p.drop == 64);
  CHECK_FALSE(plan_truncation(200, 5000, 2048, 64, 16).needed);  // the new tokens alone overflow
}

namespace {
constexpr std::uint32_t L = 2, H = 2, D = 32, TPB = 16, PAGE = 8;

// Engine memory and a synthetic model: K(p) = R(p) k_raw(token p), V(p) = v_raw(token p),
// where the raw vectors depend on the token id and its original position only.
struct rig {
  kv_geometry g{L, H, D, dtype::f32, TPB};
  rope_spec rope{rope_style::neox, D};
  store kv;
  std::unique_ptr<copy_backend> copier = make_host_copy_backend();
  hooks hk;
  std::vector<float> k, v;
  std::vector<std::byte*> kb, vb;
  kv_layout layout{};
  std::vector<std::uint32_t> pages;
  // max_runs: hooks_config::max_rotated_runs; contiguous: page i of the sequence is
  // engine page i (runs merge across pages), else scattered pages.
  explicit rig(bool pre_rope, std::uint32_t max_runs = 0, bool contiguous = false)
      : kv([&] {
          store_config c;
          c.geometry = g;
          c.model_name = "trunc";
          c.keys_pre_rope = pre_rope;
          c.dram_bytes = 256 * format::slot_bytes(g.validated());
          c.log = logger{&logger::quiet, nullptr};
          return c;
        }()),
        hk(kv, *copier, [&] {
          hooks_config hc;
          hc.rope = rope;
          hc.keys_pre_rope = pre_rope;
          hc.max_positions = 4096;
          hc.max_rotated_runs = max_runs;
          return hc;
        }()) {
    const std::size_t pages_n = 128, page_floats = std::size_t(PAGE) * H * D;
    k.assign(pages_n * page_floats * L, 0);
    v.assign(k.size(), 0);
    for (std::uint32_t l = 0; l < L; ++l) {
      kb.push_back(reinterpret_cast<std::byte*>(k.data() + l * pages_n * page_floats));
      vb.push_back(reinterpret_cast<std::byte*>(v.data() + l * pages_n * page_floats));
    }
    layout = kv_layout{L,
                       H,
                       D,
                       dtype::f32,
                       PAGE,
                       page_floats * 4,
                       std::size_t(H) * D * 4,
                       std::size_t(D) * 4,
                       kb,
                       vb,
                       memory_space::host};
    for (std::uint32_t i = 0; i < pages_n; ++i) pages.push_back(contiguous ? i : (i * 5) % pages_n);
  }
  float* at(std::vector<float>& arr, std::uint32_t l, std::uint64_t pos, std::uint32_t h) {
    const std::size_t pages_n = 128, page_floats = std::size_t(PAGE) * H * D;
    return arr.data() + l * pages_n * page_floats + pages[pos / PAGE] * page_floats + (pos % PAGE) * H * D + h * D;
  }
  static void raw(token_id t, std::uint64_t orig, std::uint32_t l, std::uint32_t h, int side, float* out) {
    std::mt19937 rng(std::uint32_t(t * 7919 + orig * 31 + l * 7 + h * 3 + side));
    std::normal_distribution<float> n;
    for (std::uint32_t i = 0; i < D; ++i) out[i] = n(rng);
  }
  // R(pos) applied to x, in double.
  void rotated(const float* x, std::int64_t pos, double* out) const {
    for (std::uint32_t i = 0; i < D; ++i) out[i] = x[i];
    for (std::uint32_t i = 0; i < D / 2; ++i) {
      const double a = double(pos) * rope.inv_freq(i);
      out[i] = x[i] * std::cos(a) - x[i + D / 2] * std::sin(a);
      out[i + D / 2] = x[i] * std::sin(a) + x[i + D / 2] * std::cos(a);
    }
  }
  // "Compute" tokens [from, to) of `toks` at positions from.. with original positions orig[].
  void compute(const std::vector<token_id>& toks, const std::vector<std::uint64_t>& orig, std::size_t from) {
    float r[D];
    double d[D];
    for (std::size_t p = from; p < toks.size(); ++p)
      for (std::uint32_t l = 0; l < L; ++l)
        for (std::uint32_t h = 0; h < H; ++h) {
          raw(toks[p], orig[p], l, h, 0, r);
          rotated(r, std::int64_t(p), d);
          for (std::uint32_t i = 0; i < D; ++i) at(k, l, p, h)[i] = float(d[i]);
          raw(toks[p], orig[p], l, h, 1, at(v, l, p, h));
        }
  }
  // One turn: load what is stored, compute the rest, save. Returns tokens loaded.
  std::uint64_t turn(const std::vector<token_id>& toks, const std::vector<std::uint64_t>& orig) {
    std::fill(k.begin(), k.end(), 0.0f);
    std::fill(v.begin(), v.end(), 0.0f);
    load_info li = hk.start_load({"t", "s"}, toks, kv_target{&layout, pages});
    REQUIRE(li.status == errc::ok);
    for (std::uint32_t l = 0; l < L; ++l)
      if (li.handle) REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
    if (li.handle) REQUIRE(hk.finish_load(li.handle) == errc::ok);
    compute(toks, orig, li.tokens);
    errc st;
    save_handle sh = hk.start_save({"t", "s"}, toks, li.tokens, kv_source{&layout, pages}, std::nullopt, &st);
    REQUIRE(st == errc::ok);
    for (std::uint32_t l = 0; l < L; ++l) REQUIRE(hk.save_layer(sh, l) == errc::ok);
    REQUIRE(hk.finish_save(sh) == errc::ok);
    return li.tokens;
  }
  // Every loaded position p holds R(p) k_raw and v_raw of its token.
  double worst_error(const std::vector<token_id>& toks, const std::vector<std::uint64_t>& orig, std::size_t upto) {
    double worst = 0;
    float r[D];
    double d[D];
    for (std::size_t p = 0; p < upto; ++p)
      for (std::uint32_t l = 0; l < L; ++l)
        for (std::uint32_t h = 0; h < H; ++h) {
          raw(toks[p], orig[p], l, h, 0, r);
          rotated(r, std::int64_t(p), d);
          for (std::uint32_t i = 0; i < D; ++i) worst = std::max(worst, std::fabs(at(k, l, p, h)[i] - d[i]));
          raw(toks[p], orig[p], l, h, 1, r);
          if (std::memcmp(r, at(v, l, p, h), sizeof(r)) != 0) worst = 1e9;  // values move as bytes
        }
    return worst;
  }
};
}  // namespace

TEST_CASE("a truncated cache loads at the new positions with keys equal to fresh rotation") {
  for (bool pre_rope : {false, true}) {
    INFO((pre_rope ? "keys stored before RoPE" : "keys stored after RoPE"));
    rig R(pre_rope);
    std::vector<token_id> toks;
    std::vector<std::uint64_t> orig;
    for (std::uint64_t p = 0; p < 150; ++p) {
      toks.push_back(token_id(1000 + p));
      orig.push_back(p);
    }
    CHECK(R.turn(toks, orig) == 0);
    // Overflow: keep a 20-token sink (inside block 1), drop 64 tokens after it.
    truncation_plan plan = plan_truncation(150, 30, 120, 20, TPB, 0.0);
    REQUIRE(plan.needed);
    REQUIRE(plan.drop == 64);
    REQUIRE(R.kv.truncate({"t", "s"}, toks, plan) == errc::ok);
    std::vector<token_id> kept(toks.begin(), toks.begin() + 20);
    kept.insert(kept.end(), toks.begin() + 84, toks.end());
    std::vector<std::uint64_t> kept_orig(orig.begin(), orig.begin() + 20);
    kept_orig.insert(kept_orig.end(), orig.begin() + 84, orig.end());
    CHECK(R.kv.lookup({"t", "s"}, kept).tokens == 86);
    CHECK(R.kv.lookup({"t", "s"}, toks).tokens == 20);  // the old history only shares the sink
    std::vector<std::byte> out(4 * R.kv.block_bytes());
    CHECK(R.kv.get({"t", "s"}, kept, 0, 4, out).status == errc::unsupported);
    // Next turn on the truncated history: 86 tokens come back, placed and re-rotated.
    for (std::uint64_t p = 0; p < 30; ++p) {
      kept.push_back(token_id(5000 + p));
      kept_orig.push_back(100000 + p);
    }
    CHECK(R.turn(kept, kept_orig) == 86);
    // What this turn loaded: positions 0..85 (checked before compute overwrote nothing there).
    CHECK(R.worst_error(kept, kept_orig, 86) < (pre_rope ? 2e-5 : 2e-5));
    // And the turn after that reuses everything, including the new tokens.
    kept.push_back(7);
    kept_orig.push_back(200000);
    CHECK(R.turn(kept, kept_orig) == 116);
    CHECK(R.worst_error(kept, kept_orig, 116) < 2e-5);
  }
}

TEST_CASE("a truncated view without a rope spec is refused, not loaded wrong") {
  kv_geometry g{L, H, D, dtype::f32, TPB};
  store_config c;
  c.geometry = g;
  c.model_name = "trunc";
  c.dram_bytes = 64 * format::slot_bytes(g.validated());
  c.log = logger{&logger::quiet, nullptr};
  store kv(c);
  std::vector<token_id> toks(100);
  for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = token_id(i + 1);
  std::vector<std::byte> blocks(std::size_t(g.validated().blocks_for(100)) * kv.block_bytes());
  REQUIRE(kv.put({"t", "s"}, toks, 0, blocks) == errc::ok);
  auto plan = plan_truncation(100, 10, 90, 8, TPB, 0.0);
  REQUIRE(kv.truncate({"t", "s"}, toks, plan) == errc::ok);
  auto copier = make_host_copy_backend();
  hooks hk(kv, *copier);  // no rope spec
  std::vector<float> mem(64 * PAGE * H * D * L);
  std::vector<std::byte*> kb, vb;
  for (std::uint32_t l = 0; l < L; ++l) {
    kb.push_back(reinterpret_cast<std::byte*>(mem.data()));
    vb.push_back(reinterpret_cast<std::byte*>(mem.data()));
  }
  kv_layout lay{L,
                H,
                D,
                dtype::f32,
                PAGE,
                std::size_t(PAGE) * H * D * 4,
                std::size_t(H) * D * 4,
                std::size_t(D) * 4,
                kb,
                vb,
                memory_space::host};
  std::vector<std::uint32_t> pages(16);
  for (std::uint32_t i = 0; i < 16; ++i) pages[i] = i;
  std::vector<token_id> kept(toks.begin(), toks.begin() + 8);
  kept.insert(kept.end(), toks.begin() + 8 + std::ptrdiff_t(plan.drop), toks.end());
  CHECK(hk.start_load({"t", "s"}, kept, kv_target{&lay, pages}).status == errc::unsupported);
  // Bad plans and stale histories are refused.
  auto stale = plan;
  stale.history = 100;
  CHECK(kv.truncate({"t", "s"}, toks, stale) == errc::invalid_argument);
}

TEST_CASE(
    "re-rotation runs merged across contiguous pages, or one call per run past the run table, give the same "
    "bytes") {
  for (bool pre_rope : {false, true}) {
    INFO((pre_rope ? "keys stored before RoPE" : "keys stored after RoPE"));
    rig table(pre_rope), per_run(pre_rope, 1), merged(pre_rope, 0, true);
    std::vector<token_id> toks;
    std::vector<std::uint64_t> orig;
    for (std::uint64_t p = 0; p < 150; ++p) {
      toks.push_back(token_id(1000 + p));
      orig.push_back(p);
    }
    const truncation_plan plan = plan_truncation(150, 30, 120, 20, TPB, 0.0);
    std::vector<token_id> kept(toks.begin(), toks.begin() + 20);
    kept.insert(kept.end(), toks.begin() + 84, toks.end());
    std::vector<std::uint64_t> kept_orig(orig.begin(), orig.begin() + 20);
    kept_orig.insert(kept_orig.end(), orig.begin() + 84, orig.end());
    for (std::uint64_t p = 0; p < 30; ++p) {  // the next turn's new tokens
      kept.push_back(token_id(5000 + p));
      kept_orig.push_back(100000 + p);
    }
    for (rig* R : {&table, &per_run, &merged}) {
      CHECK(R->turn(toks, orig) == 0);
      REQUIRE(R->kv.truncate({"t", "s"}, toks, plan) == errc::ok);
      CHECK(R->turn(kept, kept_orig) == 86);
      CHECK(R->worst_error(kept, kept_orig, 86) < 2e-5);
    }
    CHECK(per_run.k == table.k);  // same pages: the whole engine memory
    bool same = true;
    for (std::uint64_t p = 0; p < 86; ++p)
      for (std::uint32_t l = 0; l < L; ++l)
        for (std::uint32_t h = 0; h < H; ++h)
          same &= std::memcmp(merged.at(merged.k, l, p, h), table.at(table.k, l, p, h), D * sizeof(float)) == 0;
    CHECK(same);
  }
}

TEST_CASE("a view with more distinct shifts than a load can rotate is refused, not loaded wrong") {
  rig R(false);
  std::vector<token_id> view;
  std::vector<std::uint64_t> orig;
  // Round k: k + 1 new blocks, then the first k of them dropped: the last one moves by
  // -k blocks and nothing before it moves. After 9 rounds the view holds 9 shifts.
  for (std::uint32_t k = 1; k <= 9; ++k) {
    const std::size_t before = view.size();
    for (std::uint32_t i = 0; i < (k + 1) * TPB; ++i) {
      view.push_back(token_id(10 + orig.size()));
      orig.push_back(orig.size());
    }
    CHECK(R.turn(view, orig) == before);                          // loads and re-rotates k - 1 shifts
    if (k == 9) CHECK(R.worst_error(view, orig, before) < 2e-5);  // 8: the most one load takes
    truncation_plan p;
    p.needed = true;
    p.history = view.size();
    p.sink = before;
    p.drop = std::uint64_t(k) * TPB;
    p.kept = p.history - p.drop;
    p.shift = -std::int64_t(p.drop);
    REQUIRE(R.kv.truncate({"t", "s"}, view, p) == errc::ok);
    view.erase(view.begin() + std::ptrdiff_t(p.sink), view.begin() + std::ptrdiff_t(p.sink + p.drop));
    orig.erase(orig.begin() + std::ptrdiff_t(p.sink), orig.begin() + std::ptrdiff_t(p.sink + p.drop));
  }
  CHECK(R.hk.start_load({"t", "s"}, view, kv_target{&R.layout, R.pages}).status == errc::unsupported);
}
