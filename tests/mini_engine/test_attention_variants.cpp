// The mini engine's attention variants through attnstore's layer groups: gpt-oss-style
// alternating sliding-window and full layers (two groups), and DeepSeek-style latent
// attention (one latent group, RoPE on the trailing k_rope part only). Each is checked
// against a double-precision reference, then served turn by turn from the store with
// bitwise the logits of KV kept resident; edits reuse exactly up to the edit; the latent
// cache survives truncation with only its k_rope part re-rotated.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attnstore/hooks.hpp"
#include "driver.hpp"
#include "mini_engine/model_support.hpp"
#include "support/temp_dir.hpp"

using namespace mini;
using namespace mini::testing;

namespace {

constexpr int test_window = 32;

llama_config window_model() {
  llama_config c;
  c.vocab_size = 256;
  c.dim = 64;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.hidden_dim = 128;
  c.max_seq = 4096;
  c.attention = attention_kind::window;
  c.window = test_window;
  return c;
}

llama_config latent_model() {
  llama_config c;
  c.vocab_size = 256;
  c.dim = 64;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.head_dim = 16;
  c.hidden_dim = 128;
  c.max_seq = 4096;
  c.attention = attention_kind::latent;
  c.kv_lora_rank = 32;
  c.rope_dims = 16;
  return c;
}

// ---- a double-precision reference of both variants --------------------------------------

using dvec = std::vector<double>;

dvec ref_linear(const dvec& W, const double* x, int out, int in) {
  dvec y(std::size_t(out), 0.0);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) y[std::size_t(o)] += W[std::size_t(o) * in + i] * x[i];
  return y;
}

dvec ref_rmsnorm(const dvec& x, const dvec& g, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  dvec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * g[i];
  return y;
}

void ref_rope(double* v, int dims, std::size_t pos, double theta) {
  const int half = dims / 2;
  for (int i = 0; i < half; ++i) {
    const double ang = double(pos) * std::pow(theta, -2.0 * i / dims);
    const double x0 = v[i], x1 = v[i + half];
    v[i] = x0 * std::cos(ang) - x1 * std::sin(ang);
    v[i + half] = x1 * std::cos(ang) + x0 * std::sin(ang);
  }
}

// Softmax-weighted sum: out[i] += sum_j p_j * val(j)[i] over keys j in [first, t].
template <class Score, class Value>
void ref_attend(std::size_t first, std::size_t t, Score score, Value value, double* out, int dims) {
  dvec s(t + 1 - first);
  double mx = -1e300;
  for (std::size_t j = first; j <= t; ++j) mx = std::max(mx, s[j - first] = score(j));
  double sum = 0;
  for (auto& e : s) sum += (e = std::exp(e - mx));
  for (std::size_t j = first; j <= t; ++j)
    for (int i = 0; i < dims; ++i) out[i] += s[j - first] / sum * value(j)[i];
}

dvec ref_forward(const llama_config& c, const std::map<std::string, dvec>& w,
                 const std::vector<std::uint32_t>& tokens) {
  auto W = [&](const std::string& n) -> const dvec& { return w.at(n); };
  const int D = c.dim, H = c.n_heads, KV = c.n_kv_heads, HD = c.head_dim, F = c.hidden_dim;
  const int R = c.kv_lora_rank, DR = c.rope_dims, HDK = HD + DR;
  const std::size_t n = tokens.size();
  std::vector<dvec> x(n);
  const auto& E = W("model.embed_tokens.weight");
  for (std::size_t t = 0; t < n; ++t)
    x[t].assign(E.begin() + std::ptrdiff_t(tokens[t] * D), E.begin() + std::ptrdiff_t((tokens[t] + 1) * D));
  for (int l = 0; l < c.n_layers; ++l) {
    auto N = [&](const char* s) { return "model.layers." + std::to_string(l) + "." + s; };
    std::vector<dvec> q(n), k(n), v(n), row(n), up(n);
    for (std::size_t t = 0; t < n; ++t) {
      const auto xn = ref_rmsnorm(x[t], W(N("input_layernorm.weight")), c.norm_eps);
      if (c.attention == attention_kind::latent) {
        q[t] = ref_linear(W(N("self_attn.q_proj.weight")), xn.data(), H * HDK, D);
        row[t] = ref_linear(W(N("self_attn.kv_a_proj_with_mqa.weight")), xn.data(), R + DR, D);
        for (int h = 0; h < H; ++h) ref_rope(q[t].data() + h * HDK + HD, DR, t, c.rope_theta);
        ref_rope(row[t].data() + R, DR, t, c.rope_theta);
        up[t] = ref_linear(W(N("self_attn.kv_b_proj.weight")), row[t].data(), H * 2 * HD, R);
      } else {
        q[t] = ref_linear(W(N("self_attn.q_proj.weight")), xn.data(), H * HD, D);
        k[t] = ref_linear(W(N("self_attn.k_proj.weight")), xn.data(), KV * HD, D);
        v[t] = ref_linear(W(N("self_attn.v_proj.weight")), xn.data(), KV * HD, D);
        for (int h = 0; h < H; ++h) ref_rope(q[t].data() + h * HD, HD, t, c.rope_theta);
        for (int h = 0; h < KV; ++h) ref_rope(k[t].data() + h * HD, HD, t, c.rope_theta);
      }
    }
    for (std::size_t t = 0; t < n; ++t) {
      dvec att(std::size_t(H * HD), 0.0);
      for (int h = 0; h < H; ++h) {
        if (c.attention == attention_kind::latent) {
          // Key [W_uk c_kv | k_rope], value W_uv c_kv, per head.
          ref_attend(
              0, t,
              [&](std::size_t j) {
                double d = 0;
                for (int i = 0; i < HD; ++i) d += q[t][std::size_t(h * HDK + i)] * up[j][std::size_t(h * 2 * HD + i)];
                for (int i = 0; i < DR; ++i) d += q[t][std::size_t(h * HDK + HD + i)] * row[j][std::size_t(R + i)];
                return d / std::sqrt(double(HDK));
              },
              [&](std::size_t j) { return up[j].data() + h * 2 * HD + HD; }, att.data() + h * HD, HD);
        } else {
          const int g = h / (H / KV);
          const std::size_t first = c.windowed(l) && t + 1 > std::size_t(c.window) ? t + 1 - std::size_t(c.window) : 0;
          ref_attend(
              first, t,
              [&](std::size_t j) {
                double d = 0;
                for (int i = 0; i < HD; ++i) d += q[t][std::size_t(h * HD + i)] * k[j][std::size_t(g * HD + i)];
                return d / std::sqrt(double(HD));
              },
              [&](std::size_t j) { return v[j].data() + g * HD; }, att.data() + h * HD, HD);
        }
      }
      const auto o = ref_linear(W(N("self_attn.o_proj.weight")), att.data(), D, H * HD);
      for (int i = 0; i < D; ++i) x[t][std::size_t(i)] += o[std::size_t(i)];
      const auto xn = ref_rmsnorm(x[t], W(N("post_attention_layernorm.weight")), c.norm_eps);
      const auto gt = ref_linear(W(N("mlp.gate_proj.weight")), xn.data(), F, D);
      const auto u = ref_linear(W(N("mlp.up_proj.weight")), xn.data(), F, D);
      dvec hh(static_cast<std::size_t>(F));
      for (int i = 0; i < F; ++i)
        hh[std::size_t(i)] = gt[std::size_t(i)] / (1.0 + std::exp(-gt[std::size_t(i)])) * u[std::size_t(i)];
      const auto dn = ref_linear(W(N("mlp.down_proj.weight")), hh.data(), D, F);
      for (int i = 0; i < D; ++i) x[t][std::size_t(i)] += dn[std::size_t(i)];
    }
  }
  const auto xn = ref_rmsnorm(x[n - 1], W("model.norm.weight"), c.norm_eps);
  return ref_linear(W("lm_head.weight"), xn.data(), c.vocab_size, D);
}

// Random weights of unit-ish scale (so attention is far from uniform), in checkpoint form.
llama_model reference_weights(const llama_config& c, std::map<std::string, dvec>& ref, float stddev) {
  std::mt19937 rng(std::uint32_t(c.dim * 100 + c.head_dim + int(c.attention)));
  std::normal_distribution<float> nd(0.0f, stddev);
  std::vector<weight_tensor> w = llama_model::random(c, 1).weights();
  for (auto& t : w) {
    const bool norm = t.name.find("norm") != std::string::npos;
    for (auto& v : t.data) v = norm ? 1.0f + 0.3f * nd(rng) : nd(rng);
    ref[t.name].assign(t.data.begin(), t.data.end());
  }
  return llama_model::from_weights(c, w);
}

void check_close(const std::vector<float>& got, const dvec& want) {
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::fabs(want[i]));
    const double d = std::fabs(double(got[i]) - want[i]);
    err = std::isfinite(d) ? std::max(err, d) : HUGE_VAL;
  }
  INFO("max |logit| " << scale << " max error " << err);
  CHECK(scale > 0.1);
  CHECK(err <= 1e-4 * scale);
}

// ---- the store, the hooks and the engines -------------------------------------------------

struct store_rig {
  attnstore::testing::temp_dir dir{"mini-variants"};
  std::unique_ptr<attnstore::store> kv;
  std::unique_ptr<attnstore::copy_backend> copier;
  std::unique_ptr<attnstore::hooks> hk;
  store_rig(const llama_config& c, std::uint32_t tokens_per_block, unsigned chaos_us = 0, bool prefetch = true,
            bool window_tails = false) {
    attnstore::store_config sc;
    sc.geometry = kv_geometry_of(c, tokens_per_block);
    sc.geometry.window_tails = window_tails;
    sc.model_name = "mini-variants-test";
    sc.rope = rope_spec_of(c).to_string();
    sc.dram_bytes = 64 << 20;
    sc.ssd_directory = dir.str();
    sc.ssd_bytes = 128 << 20;
    sc.log = attnstore::logger{&attnstore::logger::quiet, nullptr};
    sc.prefetch = prefetch;
    kv = std::make_unique<attnstore::store>(sc);
    attnstore::host_copy_options ho;
    ho.chaos_max_delay_us = chaos_us;
    copier = attnstore::make_host_copy_backend(ho);
    attnstore::hooks_config hc;
    hc.preload_layers = 1;
    hc.rope = rope_spec_of(c);
    hk = std::make_unique<attnstore::hooks>(*kv, *copier, hc);
  }
  engine_options options(std::uint32_t pages = 512) const {
    engine_options so;
    so.mode = kv_mode::store;
    so.num_pages = pages;
    so.hooks = hk.get();
    so.store = kv.get();
    return so;
  }
};

engine_options plain(kv_mode mode, std::uint32_t pages = 512) {
  engine_options o;
  o.mode = mode;
  o.num_pages = pages;
  return o;
}

// Five-plus turns per session, every turn's conversation past the window.
std::vector<request> conversation(int sessions, int turns, std::uint64_t seed) {
  workload_options w;
  w.sessions = sessions;
  w.turns = turns;
  w.first_user_tokens = 70;
  w.user_min = 10;
  w.user_max = 50;
  w.reply_min = 4;
  w.reply_max = 20;
  w.seed = seed;
  return make_workload(w, 256);
}

void check_restored_equals_resident(const llama_config& cfg, std::uint64_t seed, bool window_tails = false) {
  const auto model = llama_model::random(cfg, seed, 0.08f);
  const auto work = conversation(2, 6, seed);
  for (bool via_ssd : {false, true}) {
    INFO((via_ssd ? "from SSD" : "from DRAM"));
    store_rig rig(cfg, 16, 50, !via_ssd, window_tails);
    engine_options so = rig.options();
    so.demote_after_turn = via_ssd;
    engine stored(model, so);
    engine resident(model, plain(kv_mode::resident));
    // One turn at a time: each prefill loads the history, then saves the new tokens.
    for (std::size_t i = 0; i < work.size(); ++i) {
      const turn_result got = stored.run_turn(work[i]);
      const turn_result want = resident.run_turn(work[i]);
      INFO("turn " << i << " of " << work[i].session << ", history " << got.history_tokens);
      CHECK(got.save_status == attnstore::errc::ok);
      CHECK(got.history_tokens == want.history_tokens);
      if (i >= 2) {
        CHECK(got.reused_tokens == got.history_tokens - 1);  // all but the unfed last reply token
        CHECK(got.history_tokens > std::size_t(2 * test_window));
        if (via_ssd) CHECK(got.ssd_blocks > 0);
      }
      CHECK(got.first_logits == want.first_logits);  // bitwise
      CHECK(got.reply == want.reply);
    }
  }
}

// Builds a conversation, edits one token of it at `at` (counted from the end when
// negative), and runs the next turn with the edited history: the store serves exactly
// the tokens before the edit, and the logits are bitwise those of a from-scratch run.
void check_edit(const llama_model& model, std::int64_t at) {
  const llama_config& cfg = model.config();
  store_rig rig(cfg, 16);
  engine stored(model, rig.options());
  engine scratch(model, plain(kv_mode::recompute));
  const auto work = conversation(1, 4, 11);
  const std::string s = work[0].session;
  for (std::size_t i = 0; i + 1 < work.size(); ++i)
    REQUIRE(stored.run_turn(work[i]).save_status == attnstore::errc::ok);
  auto edited = stored.history(s);
  const std::size_t with_kv = edited.size() - 1;  // the last reply token was never fed
  const std::size_t e = at >= 0 ? std::size_t(at) : std::size_t(std::int64_t(with_kv) + at);
  REQUIRE(e < with_kv);
  INFO("history " << edited.size() << " tokens, edit at " << e);
  edited[e] = (edited[e] + 1) % std::uint32_t(cfg.vocab_size);
  std::vector<std::uint32_t> prompt = edited;
  prompt.insert(prompt.end(), work.back().user_tokens.begin(), work.back().user_tokens.end());
  // The resume rule: every group holds every position, so the reusable prefix is the
  // chain-matching one, token-granular: everything before the edit.
  CHECK(rig.hk->lookup({"mini", s}, prompt).tokens == e);
  stored.edit_history(s, edited);
  scratch.edit_history(s, edited);
  const turn_result got = stored.run_turn(work.back());
  const turn_result want = scratch.run_turn(work.back());
  CHECK(got.save_status == attnstore::errc::ok);
  CHECK(got.reused_tokens == e);
  CHECK(got.prefill_tokens == prompt.size() - e);
  CHECK(want.reused_tokens == 0);
  CHECK(got.first_logits == want.first_logits);  // bitwise
  CHECK(got.reply == want.reply);
  // The edited branch was saved: the turn after it reuses the whole (edited) history.
  const request next{s, make_tokens(12, 256, 5), 6};
  const turn_result got2 = stored.run_turn(next);
  const turn_result want2 = scratch.run_turn(next);
  CHECK(got2.reused_tokens == got2.history_tokens - 1);
  CHECK(got2.first_logits == want2.first_logits);
}

// Loads what the store holds of `prompt` into fresh pages of `cache`; returns the tokens.
std::size_t load_into(attnstore::hooks& hk, const attnstore::session_key& key, std::span<const std::uint32_t> prompt,
                      paged_kv_cache& cache, const cache_view& view, sequence& seq) {
  seq.pages = cache.allocate(std::uint32_t((prompt.size() + cache.page_size() - 1) / cache.page_size()));
  std::reverse(seq.pages.begin(), seq.pages.end());  // not the order the engine used
  std::vector<attnstore::kv_group_target> groups;
  const attnstore::load_info li = hk.start_load(key, prompt, view.target(seq.pages, groups));
  REQUIRE(li.status == attnstore::errc::ok);
  if (!li.handle) return 0;
  for (int l = 0; l < cache.n_layers(); ++l) REQUIRE(hk.wait_layer(li.handle, std::uint32_t(l)) == attnstore::errc::ok);
  REQUIRE(hk.finish_load(li.handle) == attnstore::errc::ok);
  seq.length = li.tokens;
  return li.tokens;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// the models
// ---------------------------------------------------------------------------------------

TEST_CASE("window attention: even layers attend only the last window tokens") {
  llama_config c = window_model();
  c.vocab_size = 33;
  c.dim = 32;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 16;
  c.hidden_dim = 40;
  c.rope_theta = 500.0f;
  c.max_seq = 128;
  c.window = 8;
  std::map<std::string, dvec> ref;
  const llama_model m = reference_weights(c, ref, 0.4f);
  const auto tokens = make_tokens(29, 33, 3);  // well past the window
  const dvec want = ref_forward(c, ref, tokens);
  paged_kv_cache cache(c, 16, 4);
  sequence seq;
  check_close(prefill(m, cache, seq, tokens, {29}), want);
  paged_kv_cache cache2(c, 16, 3);
  sequence seq2;
  const auto split = prefill(m, cache2, seq2, tokens, {5, 1, 12, 11});
  check_close(split, want);
  CHECK(same_bits(split, prefill_once(m, tokens)));
  // The mask matters: the same weights with every layer full give other logits.
  llama_config full = c;
  full.attention = attention_kind::full;
  full.window = 0;
  const dvec want_full = ref_forward(full, ref, tokens);
  double d = 0;
  for (std::size_t i = 0; i < want.size(); ++i) d = std::max(d, std::fabs(want[i] - want_full[i]));
  CHECK(d > 0.1);
  // Up to the window, windowed layers are full ones: bitwise the Llama of the same seed.
  const llama_model w = llama_model::random(window_model(), 9, 0.08f);
  llama_config fc = window_model();
  fc.attention = attention_kind::full;
  fc.window = 0;
  const llama_model f = llama_model::random(fc, 9, 0.08f);
  const auto shortp = make_tokens(test_window, 256, 4), longp = make_tokens(test_window + 1, 256, 4);
  CHECK(same_bits(prefill_once(w, shortp), prefill_once(f, shortp)));
  CHECK_FALSE(same_bits(prefill_once(w, longp), prefill_once(f, longp)));
}

TEST_CASE("latent attention matches a double-precision MLA reference and caches one row per token") {
  llama_config c = latent_model();
  c.vocab_size = 33;
  c.dim = 32;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.hidden_dim = 40;
  c.kv_lora_rank = 24;
  c.rope_dims = 8;
  c.rope_theta = 500.0f;
  c.max_seq = 128;
  std::map<std::string, dvec> ref;
  const llama_model m = reference_weights(c, ref, 0.25f);
  const auto tokens = make_tokens(21, 33, 8);
  const dvec want = ref_forward(c, ref, tokens);
  paged_kv_cache cache(c, 8, 4);
  CHECK(cache.tensors() == 1);
  CHECK(cache.n_kv_heads() == 1);
  CHECK(cache.head_dim() == 24 + 8);
  CHECK(cache.v(0) == nullptr);
  sequence seq;
  const auto one = prefill(m, cache, seq, tokens, {21});
  check_close(one, want);
  paged_kv_cache cache2(c, 8, 3);
  sequence seq2;
  const auto split = prefill(m, cache2, seq2, tokens, {5, 1, 15});
  CHECK(same_bits(one, split));
  // The cached row is [c_kv | k_rope rotated by its position], as the reference computes it.
  const auto& kva = ref.at("model.layers.0.self_attn.kv_a_proj_with_mqa.weight");
  const auto& E = ref.at("model.embed_tokens.weight");
  double err = 0, scale = 0;
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    dvec x(E.begin() + std::ptrdiff_t(tokens[t] * 32), E.begin() + std::ptrdiff_t((tokens[t] + 1) * 32));
    const auto xn = ref_rmsnorm(x, ref.at("model.layers.0.input_layernorm.weight"), c.norm_eps);
    auto row = ref_linear(kva, xn.data(), 32, 32);
    ref_rope(row.data() + 24, 8, t, c.rope_theta);
    const float* got = cache.k(0) + (std::size_t(seq.pages[t / 4]) * 4 + t % 4) * 32;
    for (int i = 0; i < 32; ++i) {
      scale = std::max(scale, std::fabs(row[std::size_t(i)]));
      err = std::max(err, std::fabs(got[i] - row[std::size_t(i)]));
    }
  }
  CHECK(err <= 1e-5 * scale);
  // Configuration errors name the field.
  llama_config bad = latent_model();
  bad.n_kv_heads = 2;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("n_kv_heads"));
  bad = latent_model();
  bad.rope_dims = 7;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("rope_dims"));
  bad = window_model();
  bad.window = 0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("window"));
  CHECK_THROWS_WITH(save_config(latent_model(), "/nonexistent/config.json"), Catch::Contains("full-attention"));
}

TEST_CASE("store geometry of the variants: two alternating groups, or one latent group") {
  const attnstore::kv_geometry w = kv_geometry_of(window_model(), 16).validated();
  REQUIRE(w.groups.size() == 2);
  CHECK(w.groups[0].kind == attnstore::layer_kind::sliding_window);
  CHECK(w.groups[0].window == std::uint32_t(test_window));
  CHECK(w.groups[1].kind == attnstore::layer_kind::full);
  for (std::uint32_t l = 0; l < 4; ++l) CHECK(w.layers[l].group == l % 2);
  const attnstore::kv_geometry m = kv_geometry_of(latent_model(), 16).validated();
  REQUIRE(m.groups.size() == 1);
  CHECK(m.groups[0].kind == attnstore::layer_kind::latent);
  CHECK(m.groups[0].head_dim == 32 + 16);
  CHECK(m.groups[0].rope_first() == 32);
  CHECK(m.groups[0].rotated_dims() == 16);
  CHECK(m.token_bytes() == 3u * 48 * 4);  // one row per token per layer, no V
  // The engine's layouts: each group lists only its layers, in model order, over the same pages.
  const llama_config wc = window_model();
  paged_kv_cache cache(wc, 4, 16);
  cache_view view(cache, wc);
  REQUIRE(view.groups() == 2);
  CHECK(view.layout(0).k_base[1] == reinterpret_cast<std::byte*>(cache.k(2)));
  CHECK(view.layout(1).v_base[1] == reinterpret_cast<std::byte*>(cache.v(3)));
  const std::vector<std::uint32_t> pages{2, 0};
  std::vector<attnstore::kv_group_target> groups;
  const attnstore::kv_target t = view.target(pages, groups);
  CHECK_NOTHROW(t.check_against(w));
  CHECK(t.groups.size() == 2);
  CHECK(t.group(1).pages.data() == pages.data());
  const llama_config lc = latent_model();
  paged_kv_cache lcache(lc, 4, 16);
  cache_view lview(lcache, lc);
  CHECK(lview.layout().v_base.empty());
  CHECK_NOTHROW(lview.target(pages, groups).check_against(m));
}

// ---------------------------------------------------------------------------------------
// served from the store
// ---------------------------------------------------------------------------------------

TEST_CASE("window model: 6 turns restored from the store give bitwise the logits of resident KV") {
  check_restored_equals_resident(window_model(), 21);
}

// The window layers kept only as their last window before the checkpoint: each turn
// resumes there, and the windowed kernel must never need what was not kept.
TEST_CASE("window model with window_tails: 6 turns restored from the store give bitwise the logits of resident KV") {
  check_restored_equals_resident(window_model(), 23, true);
}

TEST_CASE("latent model: 6 turns restored from the store give bitwise the logits of resident KV") {
  check_restored_equals_resident(latent_model(), 22);
}

TEST_CASE("window model: an edit reuses exactly the tokens before it and resumes as a from-scratch run") {
  const auto model = llama_model::random(window_model(), 31, 0.08f);
  // Inside the last window (near its end and its start), then outside it, then the first token.
  for (std::int64_t at : {std::int64_t(-3), std::int64_t(-test_window + 2), std::int64_t(-2 * test_window - 5),
                          std::int64_t(17), std::int64_t(0)}) {
    DYNAMIC_SECTION("edit at " << at) { check_edit(model, at); }
  }
}

TEST_CASE("latent model: an edit reuses exactly the tokens before it and resumes as a from-scratch run") {
  const auto model = llama_model::random(latent_model(), 32, 0.08f);
  for (std::int64_t at : {std::int64_t(-3), std::int64_t(-20), std::int64_t(16)}) {
    DYNAMIC_SECTION("edit at " << at) { check_edit(model, at); }
  }
}

TEST_CASE("latent model: truncation re-rotates only the k_rope part of the cached rows") {
  const llama_config cfg = latent_model();
  const auto model = llama_model::random(cfg, 5, 0.08f);
  const std::size_t window = 256;
  workload_options w;
  w.sessions = 1;
  w.turns = 18;
  w.first_user_tokens = 60;
  w.user_min = 20;
  w.user_max = 40;
  w.reply_min = 10;
  w.reply_max = 20;
  const auto work = make_workload(w, 256);

  store_rig rig(cfg, 16);
  engine_options so = rig.options(256);
  so.context_limit = window;
  so.sink_tokens = 24;
  so.forced_replies = true;
  engine reuse(model, so);
  engine_options ro = so;
  ro.mode = kv_mode::recompute;
  ro.hooks = nullptr;
  ro.store = nullptr;
  ro.truncation_block = 16;
  engine recompute(model, ro);

  std::size_t truncated_turns = 0, agree = 0, checked_rows = 0;
  double diff_sum = 0, unrelated_sum = 0;
  std::vector<float> previous;
  for (std::size_t i = 0; i < work.size(); ++i) {
    const auto a = reuse.run_turn(work[i]);
    const auto b = recompute.run_turn(work[i]);
    INFO("turn " << i);
    REQUIRE(a.prompt_tokens == b.prompt_tokens);  // the same truncation on both sides
    CHECK(a.save_status == attnstore::errc::ok);
    if (i > 0) CHECK(a.reused_tokens > 0);
    if (a.truncations == 0) {
      CHECK(a.first_logits == b.first_logits);  // before any truncation: bitwise
      continue;
    }
    ++truncated_turns;
    if (a.truncated) CHECK(a.reused_tokens >= 24);  // the sink and the kept turns come back
    agree += argmax(a.first_logits) == argmax(b.first_logits);
    diff_sum += rel_diff(a.first_logits, b.first_logits);
    if (!previous.empty()) unrelated_sum += rel_diff(previous, b.first_logits);
    previous = b.first_logits;
    if (!a.truncated) continue;
    // Layer 0's rows depend on the token and its position only: what the store serves
    // for the truncated history must be what a fresh prefill of it writes, c_kv bit
    // for bit (never rotated) and k_rope up to the re-rotation's rounding.
    const auto& hist = reuse.history("session-0");
    const std::span<const std::uint32_t> view(hist.data(), hist.size() - 1);
    paged_kv_cache loaded(cfg, 64, 16), fresh(cfg, 64, 16);
    cache_view lview(loaded, cfg);
    sequence ls, fs;
    REQUIRE(load_into(*rig.hk, {"mini", "session-0"}, view, loaded, lview, ls) == view.size());
    prefill(model, fresh, fs, view, {view.size()});
    const int R = cfg.kv_lora_rank, RW = cfg.kv_lora_rank + cfg.rope_dims;
    double err = 0, scale = 0, moved = 0;
    bool ckv_bitwise = true;
    for (std::size_t p = 0; p < view.size(); ++p) {
      const float* x = loaded.k(0) + (std::size_t(ls.pages[p / 16]) * 16 + p % 16) * std::size_t(RW);
      const float* y = fresh.k(0) + (std::size_t(fs.pages[p / 16]) * 16 + p % 16) * std::size_t(RW);
      ckv_bitwise &= std::memcmp(x, y, std::size_t(R) * 4) == 0;
      for (int d = R; d < RW; ++d) {
        scale = std::max(scale, double(std::fabs(y[d])));
        err = std::max(err, double(std::fabs(x[d] - y[d])));
        if (p >= 24) moved += x[d] != y[d];  // re-rotated, so not bit for bit
      }
      ++checked_rows;
    }
    CHECK(ckv_bitwise);
    CHECK(err <= 1e-5 * scale);
    CHECK(moved > 0);
  }
  CHECK(truncated_turns >= 4);
  CHECK(checked_rows > 0);
  const double mean_diff = diff_sum / double(truncated_turns);
  const double mean_unrelated = unrelated_sum / double(truncated_turns - 1);
  INFO("top-1 agreement " << double(agree) / double(truncated_turns) << ", mean relative logit difference " << mean_diff
                          << " vs " << mean_unrelated << " between turns");
  CHECK(mean_diff < 0.25 * mean_unrelated);
  CHECK(double(agree) / double(truncated_turns) >= 0.5);
}
