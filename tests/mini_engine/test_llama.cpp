// Tests of the mini engine's model: safetensors I/O, checkpoint loading, bitwise
// determinism (split prefill, decode, KV copied between caches, SIMD paths, threads),
// layer hooks, and a double-precision reference forward pass.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "llama.hpp"
#include "mini_engine/model_support.hpp"
#include "safetensors.hpp"

using namespace mini;
using namespace mini::testing;
namespace fs = std::filesystem;

namespace {

// A fresh directory under $ATTNSTORE_TEST_TMP (or the system temp dir), removed at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    const char* base = std::getenv("ATTNSTORE_TEST_TMP");
    fs::path root = base && *base ? fs::path(base) : fs::temp_directory_path();
    path = root / ("mini_llama_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str(const char* name = nullptr) const { return name ? (path / name).string() : path.string(); }
};

llama_config small_config() {
  llama_config c;
  c.vocab_size = 96;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.hidden_dim = 160;
  c.max_seq = 1024;
  return c;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string header_file(const std::string& header) {
  std::string s(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[std::size_t(i)] = char((n >> (8 * i)) & 0xFF);
  return s + header;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// JSON and safetensors
// ---------------------------------------------------------------------------------------

TEST_CASE("json reader handles nesting, escapes and numbers") {
  const json::value v = json::parse(
      R"( {"a": [1, -2.5e3, {"b": null}], "s": "x\"\\\/\n\u00e9\ud83d\ude00", "t": true, "f": false, "big": 4096.0} )");
  REQUIRE(v.is_object());
  REQUIRE(v.find("a")->items.size() == 3);
  CHECK(v.find("a")->items[0].as_int() == 1);
  CHECK(v.find("a")->items[1].as_double() == -2500.0);
  CHECK(v.find("a")->items[2].find("b")->is_null());
  CHECK(v.find("s")->as_string() == "x\"\\/\n\xC3\xA9\xF0\x9F\x98\x80");
  CHECK(v.find("t")->boolean);
  CHECK(v.find("big")->as_int() == 4096);
  CHECK(v.find("missing") == nullptr);
  CHECK_THROWS_WITH(json::parse("{\"a\": }"), Catch::Contains("json:"));
  CHECK_THROWS(json::parse("[1, 2"));
  CHECK_THROWS(json::parse("{} x"));
  CHECK_THROWS(json::parse(std::string(2000, '[')));
  CHECK_THROWS(json::parse("1.5").as_int());
  CHECK(json::parse(json::quote("a\"b\\c\n\x01")).as_string() == "a\"b\\c\n\x01");
}

TEST_CASE("16-bit float conversions round to nearest even") {
  using namespace st;
  CHECK(f32_to_bf16(1.0f) == 0x3F80);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F808000u)) == 0x3F80);  // tie -> even
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F818000u)) == 0x3F82);  // tie -> even (up)
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  CHECK(f32_to_f16(1.0f) == 0x3C00);
  CHECK(f32_to_f16(-2.0f) == 0xC000);
  CHECK(f32_to_f16(65504.0f) == 0x7BFF);
  CHECK(f32_to_f16(65520.0f) == 0x7C00);
  CHECK(f32_to_f16(1e10f) == 0x7C00);
  CHECK(f32_to_f16(5.9604644775390625e-8f) == 0x0001);  // smallest subnormal
  CHECK(f32_to_f16(2.98e-8f) == 0x0000);
  CHECK(f32_to_f16(6.103515625e-05f) == 0x0400);    // smallest normal
  CHECK(f32_to_f16(1.0f + 1.0f / 2048) == 0x3C00);  // tie -> even
  CHECK(f32_to_f16(1.0f + 3.0f / 2048) == 0x3C02);  // tie -> even (up)
  CHECK(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
  // Every finite half survives half -> float -> half.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;
    REQUIRE(f32_to_f16(f16_to_f32(std::uint16_t(h))) == h);
  }
}

TEST_CASE("safetensors round trip in F32, BF16 and F16") {
  temp_dir dir;
  std::vector<float> a(6), b(5);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.1f * float(i) - 0.25f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(i) * 3.0f + 0.5f;
  const std::vector<st::tensor_ref> ts = {{"a.weight", {2, 3}, a}, {"b", {5}, b}};
  for (st::dtype dt : {st::dtype::f32, st::dtype::bf16, st::dtype::f16}) {
    const std::string path = dir.str("t.safetensors");
    st::write(path, ts, dt, {{"format", "pt"}});
    st::reader r(path);
    REQUIRE(r.tensors().size() == 2);
    CHECK(r.metadata().at("format") == "pt");
    const st::tensor_info& ia = r.info("a.weight");
    CHECK(ia.type == dt);
    CHECK(ia.shape == std::vector<std::int64_t>{2, 3});
    CHECK(ia.begin % 8 == 0);
    const std::vector<float> ra = r.read_f32("a.weight", std::vector<std::int64_t>{2, 3});
    const std::vector<float> rb = r.read_f32("b");
    for (std::size_t i = 0; i < a.size(); ++i) {
      const float want = dt == st::dtype::f32    ? a[i]
                         : dt == st::dtype::bf16 ? st::round_bf16(a[i])
                                                 : st::round_f16(a[i]);
      CHECK(ra[i] == want);
    }
    for (std::size_t i = 0; i < b.size(); ++i) CHECK(rb[i] == b[i]);  // exact in all three
    CHECK_THROWS_WITH(
        r.read_f32("a.weight", std::vector<std::int64_t>{3, 2}),
        Catch::Contains("t.safetensors") && Catch::Contains("'a.weight' has shape [2, 3], expected [3, 2]"));
    CHECK_THROWS_WITH(r.info("nope"), Catch::Contains("missing tensor 'nope'") && Catch::Contains("t.safetensors"));
  }
  CHECK_THROWS_WITH(st::write(dir.str("x.safetensors"), std::vector<st::tensor_ref>{{"a", {4}, a}}),
                    Catch::Contains("'a'"));
}

TEST_CASE("safetensors rejects bad files with clear errors") {
  temp_dir dir;
  const std::string p = dir.str("bad.safetensors");
  write_file(p, "abc");
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("bad.safetensors") && Catch::Contains("too short"));
  write_file(p, std::string("\xff\xff\xff\xff\0\0\0\0", 8) + "{}");
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("bad header"));
  write_file(p, header_file("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]"));
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("bad header") && Catch::Contains("json"));
  write_file(
      p, header_file("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}") + std::string(4, '\0'));
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("tensor 'a'") && Catch::Contains("outside"));
  write_file(
      p, header_file("{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}") + std::string(8, '\0'));
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("tensor 'a'") && Catch::Contains("needs 12"));
  write_file(
      p, header_file("{\"a\": {\"dtype\": \"Q4\", \"shape\": [2], \"data_offsets\": [0, 8]}}") + std::string(8, '\0'));
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("unknown dtype 'Q4'"));
  write_file(p, header_file("[1, 2]"));
  CHECK_THROWS_WITH(st::reader(p), Catch::Contains("not a JSON object"));
  CHECK_THROWS_WITH(st::reader(dir.str("absent.safetensors")),
                    Catch::Contains("absent.safetensors") && Catch::Contains("cannot open"));
  // A valid file with an integer tensor: readable header, the tensor cannot become float.
  write_file(
      p, header_file("{\"i\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]}}") + std::string(8, '\0'));
  st::reader r(p);
  CHECK_THROWS_WITH(r.read_f32("i"), Catch::Contains("I32"));
}

// ---------------------------------------------------------------------------------------
// checkpoint loading
// ---------------------------------------------------------------------------------------

TEST_CASE("a saved checkpoint loads back with the same logits (F32, BF16, F16)") {
  const llama_config cfg = small_config();
  const llama_model m = llama_model::random(cfg, 11, 0.05f);
  const auto tokens = make_tokens(40, std::uint32_t(cfg.vocab_size), 1);
  const std::vector<weight_tensor> w = m.weights();
  REQUIRE(w.size() == 3 + 9 * std::size_t(cfg.n_layers));

  SECTION("F32: the very same weights") {
    temp_dir dir;
    m.save(dir.str(), st::dtype::f32);
    const llama_model l = llama_model::load(dir.str());
    CHECK(l.config() == cfg);
    const auto lw = l.weights();
    REQUIRE(lw.size() == w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
      CHECK(lw[i].name == w[i].name);
      CHECK(lw[i].shape == w[i].shape);
      CHECK(same_bits(lw[i].data, w[i].data));
    }
    CHECK(same_bits(prefill_once(l, tokens), prefill_once(m, tokens)));
  }
  SECTION("BF16 and F16: the in-memory model with rounded weights") {
    for (st::dtype dt : {st::dtype::bf16, st::dtype::f16}) {
      temp_dir dir;
      m.save(dir.str(), dt);
      st::reader r(dir.str("model.safetensors"));
      CHECK(r.info("lm_head.weight").type == dt);
      std::vector<weight_tensor> rounded = w;
      for (auto& t : rounded)
        for (auto& v : t.data) v = dt == st::dtype::bf16 ? st::round_bf16(v) : st::round_f16(v);
      const llama_model ref = llama_model::from_weights(cfg, rounded);
      const llama_model l = llama_model::load(dir.str());
      const auto a = prefill_once(l, tokens), b = prefill_once(ref, tokens), c = prefill_once(m, tokens);
      CHECK(same_bits(a, b));
      CHECK_FALSE(same_bits(a, c));  // the rounding did change something
      double diff = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        const double d = std::fabs(double(a[i]) - double(c[i]));
        diff = std::isfinite(d) ? std::max(diff, d) : HUGE_VAL;
      }
      CHECK(diff < 0.05);
    }
  }
}

TEST_CASE("loading reports missing tensors, wrong shapes and bad configs") {
  const llama_config cfg = small_config();
  const llama_model m = llama_model::random(cfg, 5);
  const std::vector<weight_tensor> w = m.weights();
  temp_dir dir;
  save_config(cfg, dir.str("config.json"));
  auto write_without = [&](const std::string& skip, const std::string& transpose) {
    std::vector<st::tensor_ref> refs;
    for (const auto& t : w) {
      if (t.name == skip) continue;
      std::vector<std::int64_t> shape = t.shape;
      if (t.name == transpose) std::swap(shape[0], shape[1]);
      refs.push_back({t.name, shape, t.data});
    }
    st::write(dir.str("model.safetensors"), refs, st::dtype::bf16);
  };

  write_without("model.layers.1.mlp.up_proj.weight", "");
  CHECK_THROWS_WITH(
      llama_model::load(dir.str()),
      Catch::Contains("model.safetensors") && Catch::Contains("missing tensor 'model.layers.1.mlp.up_proj.weight'"));
  write_without("", "model.layers.0.self_attn.k_proj.weight");
  CHECK_THROWS_WITH(
      llama_model::load(dir.str()),
      Catch::Contains("model.safetensors") &&
          Catch::Contains("'model.layers.0.self_attn.k_proj.weight' has shape [64, 32], expected [32, 64]"));
  write_without("", "");
  CHECK_NOTHROW(llama_model::load(dir.str()));

  // from_weights names the weight too.
  std::vector<weight_tensor> partial(w.begin(), w.end() - 1);
  CHECK_THROWS_WITH(llama_model::from_weights(cfg, partial), Catch::Contains("missing weight 'lm_head.weight'"));
  partial = w;
  partial[1].shape = {cfg.dim + 1};
  CHECK_THROWS_WITH(llama_model::from_weights(cfg, partial),
                    Catch::Contains(partial[1].name) && Catch::Contains("shape"));

  // config.json problems
  write_file(dir.str("config.json"), R"({"vocab_size": 96, "num_hidden_layers": 2})");
  CHECK_THROWS_WITH(llama_model::load(dir.str()), Catch::Contains("config.json") && Catch::Contains("hidden_size"));
  write_file(dir.str("config.json"), R"({"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 160,
    "rope_scaling": {"type": "llama3", "factor": 8.0}})");
  CHECK_THROWS_WITH(llama_model::load(dir.str()), Catch::Contains("rope_scaling"));
  write_file(dir.str("config.json"), "{not json");
  CHECK_THROWS_WITH(llama_model::load(dir.str()), Catch::Contains("config.json"));
  fs::remove(dir.str("config.json"));
  CHECK_THROWS_WITH(llama_model::load(dir.str()), Catch::Contains("config.json"));
}

TEST_CASE("sharded checkpoints and tied embeddings load") {
  const llama_config cfg = small_config();
  const llama_model m = llama_model::random(cfg, 13, 0.05f);
  const auto tokens = make_tokens(20, std::uint32_t(cfg.vocab_size), 6);
  std::vector<weight_tensor> w = m.weights();

  SECTION("model.safetensors.index.json with two shards") {
    temp_dir dir;
    save_config(cfg, dir.str("config.json"));
    std::vector<st::tensor_ref> a, b;
    std::string map;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const bool first = i < w.size() / 2;
      (first ? a : b).push_back({w[i].name, w[i].shape, w[i].data});
      map += std::string(map.empty() ? "" : ",") + json::quote(w[i].name) + ":" +
             (first ? "\"model-00001-of-00002.safetensors\"" : "\"model-00002-of-00002.safetensors\"");
    }
    st::write(dir.str("model-00001-of-00002.safetensors"), a);
    st::write(dir.str("model-00002-of-00002.safetensors"), b);
    write_file(dir.str("model.safetensors.index.json"), "{\"metadata\": {}, \"weight_map\": {" + map + "}}");
    CHECK(same_bits(prefill_once(llama_model::load(dir.str()), tokens), prefill_once(m, tokens)));
  }
  SECTION("tie_word_embeddings without lm_head.weight") {
    temp_dir dir;
    w.back().data = w.front().data;  // lm_head = embeddings
    REQUIRE(w.back().name == "lm_head.weight");
    const llama_model tied = llama_model::from_weights(cfg, w);
    std::vector<st::tensor_ref> refs;
    for (std::size_t i = 0; i + 1 < w.size(); ++i) refs.push_back({w[i].name, w[i].shape, w[i].data});
    st::write(dir.str("model.safetensors"), refs);
    save_config(cfg, dir.str("config.json"));
    CHECK_THROWS_WITH(llama_model::load(dir.str()), Catch::Contains("missing tensor 'lm_head.weight'"));
    std::ifstream in(dir.str("config.json"));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string from = "\"tie_word_embeddings\": false";
    REQUIRE(text.find(from) != std::string::npos);
    text.replace(text.find(from), from.size(), "\"tie_word_embeddings\": true");
    write_file(dir.str("config.json"), text);
    CHECK(same_bits(prefill_once(llama_model::load(dir.str()), tokens), prefill_once(tied, tokens)));
  }
}

TEST_CASE("HF config.json keys map onto llama_config") {
  temp_dir dir;
  write_file(dir.str("config.json"), R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "intermediate_size": 5632, "rope_theta": 10000.0, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "torch_dtype": "bfloat16", "tie_word_embeddings": false,
    "rope_scaling": null, "bos_token_id": 1, "nested": {"x": [1, {"y": "z"}]}})");
  const llama_config c = load_config(dir.str("config.json"));
  CHECK(c.vocab_size == 32000);
  CHECK(c.dim == 2048);
  CHECK(c.n_layers == 22);
  CHECK(c.n_heads == 32);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.head_dim == 64);
  CHECK(c.hidden_dim == 5632);
  CHECK(c.rope_theta == 10000.0f);
  CHECK(c.norm_eps == 1e-5f);
  CHECK(c.max_seq == 2048);
  save_config(c, dir.str("again.json"));
  CHECK(load_config(dir.str("again.json")) == c);
}

// ---------------------------------------------------------------------------------------
// determinism
// ---------------------------------------------------------------------------------------

TEST_CASE("split prefill gives bitwise the one-shot logits and KV") {
  const llama_config cfg;  // the default model
  const llama_model m = llama_model::random(cfg, 3);
  const auto tokens = make_tokens(300, std::uint32_t(cfg.vocab_size), 2);
  const std::uint32_t ps = 16;

  paged_kv_cache c1(cfg, 32, ps), c2(cfg, 32, ps);
  sequence s1, s2;
  const auto one = prefill(m, c1, s1, tokens, {300});
  const auto split = prefill(m, c2, s2, tokens, {97, 1, 202});
  CHECK(s1.length == 300);
  CHECK(s2.length == 300);
  CHECK(s1.pages.size() == 19);
  CHECK(same_bits(one, split));
  for (int l = 0; l < cfg.n_layers; ++l)
    for (std::size_t pos = 0; pos < 300; ++pos) {
      const std::size_t o1 = (std::size_t(s1.pages[pos / ps]) * ps + pos % ps) * c1.token_stride_bytes() / 4;
      const std::size_t o2 = (std::size_t(s2.pages[pos / ps]) * ps + pos % ps) * c2.token_stride_bytes() / 4;
      REQUIRE(std::memcmp(c1.k(l) + o1, c2.k(l) + o2, c1.token_stride_bytes()) == 0);
      REQUIRE(std::memcmp(c1.v(l) + o1, c2.v(l) + o2, c1.token_stride_bytes()) == 0);
    }

  // Other chunkings and page sizes agree too.
  paged_kv_cache c3(cfg, 64, 7);
  sequence s3;
  CHECK(same_bits(one, prefill(m, c3, s3, tokens, {1, 63, 236})));
}

TEST_CASE("results do not depend on the SIMD path or the thread count") {
  const llama_config cfg;
  llama_model m = llama_model::random(cfg, 8, 0.05f);
  const auto tokens = make_tokens(77, std::uint32_t(cfg.vocab_size), 4);
  const simd_level saved = simd();
  const auto ref = prefill_once(m, tokens);
  for (int lvl = 0; lvl <= int(best_simd()); ++lvl) {
    INFO("simd level " << lvl);
    CHECK(int(set_simd(simd_level(lvl))) == lvl);
    CHECK(same_bits(prefill_once(m, tokens), ref));
  }
  set_simd(saved);
  // Odd head_dim multiples and page sizes on every path too (scalar attention path).
  llama_config odd = small_config();
  odd.head_dim = 6;
  odd.hidden_dim = 50;
  odd.vocab_size = 37;
  const llama_model mo = llama_model::random(odd, 2, 0.2f);
  const auto to = make_tokens(29, 37, 9);
  const auto ref_odd = prefill_once(mo, to, 5);
  for (int lvl = 0; lvl <= int(best_simd()); ++lvl) {
    set_simd(simd_level(lvl));
    CHECK(same_bits(prefill_once(mo, to, 5), ref_odd));
  }
  set_simd(saved);
  for (int t : {1, 2, 3}) {
    m.set_threads(t);
    CHECK(m.threads() == t);
    CHECK(same_bits(prefill_once(m, tokens), ref));
  }
}

TEST_CASE("greedy decoding is deterministic and matches prefill") {
  const llama_config cfg;
  const llama_model m = llama_model::random(cfg, 21, 0.08f);
  const auto prompt = make_tokens(50, std::uint32_t(cfg.vocab_size), 7);
  auto run = [&](std::vector<std::vector<float>>& all_logits) {
    paged_kv_cache cache(cfg, 8, 16);
    sequence seq;
    std::vector<float> logits = prefill(m, cache, seq, prompt, {prompt.size()});
    std::vector<std::uint32_t> out;
    for (int i = 0; i < 16; ++i) {
      const std::uint32_t next = argmax(logits);
      out.push_back(next);
      m.forward(cache, seq, std::span(&out.back(), 1), seq.length, logits);
      all_logits.push_back(logits);
    }
    return out;
  };
  std::vector<std::vector<float>> l1, l2;
  const auto g1 = run(l1), g2 = run(l2);
  CHECK(g1 == g2);
  REQUIRE(l1.size() == 16);
  for (std::size_t i = 0; i < l1.size(); ++i) CHECK(same_bits(l1[i], l2[i]));
  // The decode steps' logits equal a one-shot prefill of prompt + generated tokens.
  std::vector<std::uint32_t> full = prompt;
  full.insert(full.end(), g1.begin(), g1.end());
  CHECK(same_bits(prefill_once(m, full), l1.back()));
  std::vector<std::uint32_t> part(full.begin(), full.begin() + std::ptrdiff_t(prompt.size() + 8));
  CHECK(same_bits(prefill_once(m, part), l1[7]));
}

TEST_CASE("KV copied into other pages of another cache continues bitwise identically") {
  const llama_config cfg;
  const llama_model m = llama_model::random(cfg, 4, 0.05f);
  const auto tokens = make_tokens(180, std::uint32_t(cfg.vocab_size), 3);
  const std::span<const std::uint32_t> all(tokens);
  const std::uint32_t ps = 16;

  paged_kv_cache a(cfg, 16, ps);
  sequence sa;
  prefill(m, a, sa, all.first(133), {133});

  paged_kv_cache b(cfg, 40, ps);
  const auto junk = b.allocate(9);
  b.release(std::span(junk).subspan(2, 4));  // scramble the free list
  sequence sb;
  sb.pages = b.allocate(std::uint32_t(sa.pages.size()));
  for (std::size_t i = 0; i < sa.pages.size(); ++i) CHECK(sb.pages[i] != sa.pages[i]);
  for (int l = 0; l < cfg.n_layers; ++l)
    for (std::size_t i = 0; i < sa.pages.size(); ++i) {
      std::memcpy(b.k(l) + sb.pages[i] * b.page_stride_bytes() / 4, a.k(l) + sa.pages[i] * a.page_stride_bytes() / 4,
                  a.page_stride_bytes());
      std::memcpy(b.v(l) + sb.pages[i] * b.page_stride_bytes() / 4, a.v(l) + sa.pages[i] * a.page_stride_bytes() / 4,
                  a.page_stride_bytes());
    }
  sb.length = sa.length;

  const auto la = prefill(m, a, sa, all.subspan(133), {20, 27});
  const auto lb = prefill(m, b, sb, all.subspan(133), {47});
  CHECK(same_bits(la, lb));
  CHECK(same_bits(la, prefill_once(m, tokens)));
}

namespace {
struct hook_log {
  std::vector<std::pair<char, int>> events;
  const paged_kv_cache* cache = nullptr;
  std::size_t slot_off = 0;  // float offset of the first new token in a layer array
  std::vector<int> bad;      // layers whose cache state was not as documented
};
bool slot_written(const paged_kv_cache& c, int layer, std::size_t off) {
  const float* k = c.k(layer) + off;
  for (std::size_t i = 0; i < c.token_stride_bytes() / 4; ++i)
    if (k[i] != 0.0f) return true;
  return false;
}
}  // namespace

TEST_CASE("layer hooks run in order, once per layer, around the K/V writes") {
  const llama_config cfg = small_config();
  const llama_model m = llama_model::random(cfg, 9, 0.1f);
  const auto tokens = make_tokens(40, std::uint32_t(cfg.vocab_size), 5);
  paged_kv_cache cache(cfg, 8, 8);
  sequence seq;
  hook_log log;
  log.cache = &cache;
  layer_hooks h;
  h.ctx = &log;
  h.before_layer = [](void* ctx, int l) {
    auto& g = *static_cast<hook_log*>(ctx);
    g.events.push_back({'b', l});
    if (slot_written(*g.cache, l, g.slot_off)) g.bad.push_back(l);  // new K not written yet
  };
  h.after_layer = [](void* ctx, int l) {
    auto& g = *static_cast<hook_log*>(ctx);
    g.events.push_back({'a', l});
    if (!slot_written(*g.cache, l, g.slot_off)) g.bad.push_back(l);  // layer l written
    if (l + 1 < g.cache->n_layers() && slot_written(*g.cache, l + 1, g.slot_off)) g.bad.push_back(l);  // l+1 not yet
  };
  std::vector<float> logits(std::size_t(cfg.vocab_size));
  std::vector<std::pair<char, int>> want;
  for (int l = 0; l < cfg.n_layers; ++l) {
    want.push_back({'b', l});
    want.push_back({'a', l});
  }
  std::size_t start = 0;
  for (std::size_t n : {std::size_t(30), std::size_t(1), std::size_t(9)}) {
    log.events.clear();
    // The first new token's slot (its page is allocated during the call: predict its id).
    const std::size_t page_idx = start / cache.page_size();
    const std::uint32_t page = page_idx < seq.pages.size() ? seq.pages[page_idx] : std::uint32_t(seq.pages.size());
    log.slot_off = (std::size_t(page) * cache.page_size() + start % cache.page_size()) * cache.token_stride_bytes() / 4;
    m.forward(cache, seq, std::span(tokens).subspan(start, n), start, logits, &h);
    CHECK(log.events == want);
    CHECK(log.bad.empty());
    start += n;
  }
  // Null hooks and a hooks struct with null members are fine.
  layer_hooks none;
  m.forward(cache, seq, std::span(tokens).first(1), start, logits, &none);
}

TEST_CASE("history loaded by before_layer, layer by layer, gives the same logits") {
  // What the attnstore hook does: the history's KV arrives in before_layer(l).
  const llama_config cfg;
  const llama_model m = llama_model::random(cfg, 12, 0.05f);
  const auto tokens = make_tokens(100, std::uint32_t(cfg.vocab_size), 8);
  const std::span<const std::uint32_t> all(tokens);
  paged_kv_cache src(cfg, 8, 16);
  sequence ss;
  prefill(m, src, ss, all.first(70), {70});

  struct loader {
    const paged_kv_cache* src;
    const sequence* ss;
    paged_kv_cache* dst;
    const sequence* ds;
    int loaded = 0;
  };
  paged_kv_cache dst(cfg, 8, 16);
  sequence ds;
  ds.pages = dst.allocate(3);
  std::swap(ds.pages[0], ds.pages[2]);
  ds.length = 70;
  loader ld{&src, &ss, &dst, &ds};
  layer_hooks h;
  h.ctx = &ld;
  h.before_layer = [](void* ctx, int l) {
    auto& L = *static_cast<loader*>(ctx);
    const std::size_t pf = L.src->page_stride_bytes() / 4;
    for (std::size_t i = 0; i < 5; ++i) {  // whole pages, the partial last one included
      std::memcpy(L.dst->k(l) + L.ds->pages[i] * pf, L.src->k(l) + L.ss->pages[i] * pf, L.src->page_stride_bytes());
      std::memcpy(L.dst->v(l) + L.ds->pages[i] * pf, L.src->v(l) + L.ss->pages[i] * pf, L.src->page_stride_bytes());
    }
    ++L.loaded;
  };
  // ds needs its 5 pages before the call; grow it now (forward would grow it itself otherwise).
  const auto more = dst.allocate(2);
  ds.pages.insert(ds.pages.end(), more.begin(), more.end());
  std::vector<float> logits(std::size_t(cfg.vocab_size));
  m.forward(dst, ds, all.subspan(70), 70, logits, &h);
  CHECK(ld.loaded == cfg.n_layers);
  CHECK(same_bits(logits, prefill_once(m, tokens)));
}

// ---------------------------------------------------------------------------------------
// reference: a straightforward double-precision Llama
// ---------------------------------------------------------------------------------------
namespace {

struct ref_model {
  llama_config c;
  std::map<std::string, std::vector<double>> w;
  const std::vector<double>& W(const std::string& n) const { return w.at(n); }
};

std::vector<double> ref_linear(const std::vector<double>& W, const std::vector<double>& x, int out, int in) {
  std::vector<double> y(std::size_t(out), 0.0);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) y[std::size_t(o)] += W[std::size_t(o) * in + i] * x[std::size_t(i)];
  return y;
}

std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<double>& g, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * g[i];
  return y;
}

void ref_rope(double* v, int hd, std::size_t pos, double theta) {
  const int half = hd / 2;
  for (int i = 0; i < half; ++i) {
    const double ang = double(pos) * std::pow(theta, -2.0 * i / hd);
    const double x0 = v[i], x1 = v[i + half];
    v[i] = x0 * std::cos(ang) - x1 * std::sin(ang);
    v[i + half] = x1 * std::cos(ang) + x0 * std::sin(ang);
  }
}

std::vector<double> ref_forward(const ref_model& m, const std::vector<std::uint32_t>& tokens) {
  const llama_config& c = m.c;
  const int D = c.dim, H = c.n_heads, KV = c.n_kv_heads, HD = c.head_dim, F = c.hidden_dim;
  const std::size_t n = tokens.size();
  std::vector<std::vector<double>> x(n);
  const auto& E = m.W("model.embed_tokens.weight");
  for (std::size_t t = 0; t < n; ++t)
    x[t].assign(E.begin() + std::ptrdiff_t(tokens[t] * D), E.begin() + std::ptrdiff_t((tokens[t] + 1) * D));
  for (int l = 0; l < c.n_layers; ++l) {
    auto N = [&](const char* s) { return "model.layers." + std::to_string(l) + "." + s; };
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (std::size_t t = 0; t < n; ++t) {
      const auto xn = ref_rmsnorm(x[t], m.W(N("input_layernorm.weight")), c.norm_eps);
      q[t] = ref_linear(m.W(N("self_attn.q_proj.weight")), xn, H * HD, D);
      k[t] = ref_linear(m.W(N("self_attn.k_proj.weight")), xn, KV * HD, D);
      v[t] = ref_linear(m.W(N("self_attn.v_proj.weight")), xn, KV * HD, D);
      for (int h = 0; h < H; ++h) ref_rope(q[t].data() + h * HD, HD, t, c.rope_theta);
      for (int h = 0; h < KV; ++h) ref_rope(k[t].data() + h * HD, HD, t, c.rope_theta);
    }
    for (std::size_t t = 0; t < n; ++t) {
      std::vector<double> att(std::size_t(H * HD), 0.0);
      for (int h = 0; h < H; ++h) {
        const int g = h / (H / KV);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (std::size_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int i = 0; i < HD; ++i) d += q[t][std::size_t(h * HD + i)] * k[j][std::size_t(g * HD + i)];
          s[j] = d / std::sqrt(double(HD));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (std::size_t j = 0; j <= t; ++j)
          for (int i = 0; i < HD; ++i) att[std::size_t(h * HD + i)] += s[j] / sum * v[j][std::size_t(g * HD + i)];
      }
      const auto o = ref_linear(m.W(N("self_attn.o_proj.weight")), att, D, H * HD);
      for (int i = 0; i < D; ++i) x[t][std::size_t(i)] += o[std::size_t(i)];
      const auto xn = ref_rmsnorm(x[t], m.W(N("post_attention_layernorm.weight")), c.norm_eps);
      const auto gt = ref_linear(m.W(N("mlp.gate_proj.weight")), xn, F, D);
      const auto up = ref_linear(m.W(N("mlp.up_proj.weight")), xn, F, D);
      std::vector<double> hh(static_cast<std::size_t>(F));
      for (int i = 0; i < F; ++i)
        hh[std::size_t(i)] = gt[std::size_t(i)] / (1.0 + std::exp(-gt[std::size_t(i)])) * up[std::size_t(i)];
      const auto dn = ref_linear(m.W(N("mlp.down_proj.weight")), hh, D, F);
      for (int i = 0; i < D; ++i) x[t][std::size_t(i)] += dn[std::size_t(i)];
    }
  }
  const auto xn = ref_rmsnorm(x[n - 1], m.W("model.norm.weight"), c.norm_eps);
  return ref_linear(m.W("lm_head.weight"), xn, c.vocab_size, D);
}

}  // namespace

TEST_CASE("forward matches a double-precision reference") {
  struct shape {
    int dim, heads, kv, hd, hidden, layers;
  };
  // head_dim 4 and 12: scalar attention path; 8 and 16: vector path (plus a partial chunk).
  for (const shape s : {shape{16, 4, 2, 4, 24, 1}, shape{16, 2, 1, 8, 40, 2}, shape{32, 2, 2, 16, 48, 2},
                        shape{24, 2, 1, 12, 36, 1}, shape{48, 3, 1, 40, 20, 1}}) {
    llama_config c;
    c.vocab_size = 33;
    c.dim = s.dim;
    c.n_heads = s.heads;
    c.n_kv_heads = s.kv;
    c.head_dim = s.hd;
    c.hidden_dim = s.hidden;
    c.n_layers = s.layers;
    c.rope_theta = 500.0f;  // visible rotation within a short sequence
    c.max_seq = 64;
    INFO("dim " << s.dim << " heads " << s.heads << "/" << s.kv << " head_dim " << s.hd);
    std::mt19937 rng(std::uint32_t(s.dim * 100 + s.hd));
    std::normal_distribution<float> nd(0.0f, 0.4f);
    // Build the weights in checkpoint form from a random model's names and shapes.
    std::vector<weight_tensor> w = llama_model::random(c, 1).weights();
    ref_model ref{c, {}};
    for (auto& t : w) {
      const bool norm = t.name.find("norm") != std::string::npos;
      for (auto& v : t.data) v = norm ? 1.0f + 0.3f * nd(rng) : nd(rng);
      ref.w[t.name].assign(t.data.begin(), t.data.end());
    }
    const llama_model m = llama_model::from_weights(c, w);
    const auto tokens = make_tokens(21, 33, std::uint32_t(s.hd));
    const std::vector<double> want = ref_forward(ref, tokens);
    auto check = [&](const std::vector<float>& got) {
      double scale = 0, err = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        scale = std::max(scale, std::fabs(want[i]));
        const double d = std::fabs(double(got[i]) - want[i]);
        err = std::isfinite(d) ? std::max(err, d) : HUGE_VAL;  // NaN must not hide
      }
      INFO("max |logit| " << scale << " max error " << err);
      CHECK(scale > 0.1);
      CHECK(err <= 1e-4 * scale);
    };
    paged_kv_cache cache(c, 8, 4);
    sequence seq;
    check(prefill(m, cache, seq, tokens, {21}));
    paged_kv_cache cache2(c, 8, 3);
    sequence seq2;
    check(prefill(m, cache2, seq2, tokens, {5, 1, 15}));
  }
}

// ---------------------------------------------------------------------------------------
// cache, arguments, misc
// ---------------------------------------------------------------------------------------

TEST_CASE("paged_kv_cache geometry and page allocator") {
  const llama_config cfg;
  paged_kv_cache c(cfg, 10, 16);
  CHECK(c.page_size() == 16);
  CHECK(c.num_pages() == 10);
  CHECK(c.head_stride_bytes() == std::size_t(cfg.head_dim) * 4);
  CHECK(c.token_stride_bytes() == std::size_t(cfg.n_kv_heads * cfg.head_dim) * 4);
  CHECK(c.page_stride_bytes() == 16 * c.token_stride_bytes());
  CHECK(c.layer_bytes() == 10 * c.page_stride_bytes());
  CHECK(reinterpret_cast<std::uintptr_t>(c.k(0)) % 4096 == 0);
  CHECK(reinterpret_cast<const char*>(c.v(0)) - reinterpret_cast<const char*>(c.k(0)) ==
        std::ptrdiff_t(c.layer_bytes()));
  CHECK(c.k(1) == c.v(0) + c.layer_bytes() / 4);
  const auto a = c.allocate(4);
  CHECK(a == std::vector<std::uint32_t>{0, 1, 2, 3});
  CHECK(c.free_pages() == 6);
  CHECK_THROWS_WITH(c.allocate(7), Catch::Contains("out of pages"));
  CHECK(c.free_pages() == 6);
  c.release(std::span(a).subspan(1, 2));
  CHECK(c.free_pages() == 8);
  CHECK_THROWS_AS(c.release(std::span(a).subspan(1, 1)), std::invalid_argument);  // double release
  const std::vector<std::uint32_t> oob = {10};
  CHECK_THROWS_AS(c.release(oob), std::invalid_argument);
  const std::vector<std::uint32_t> dup = {0, 0};
  CHECK_THROWS_AS(c.release(dup), std::invalid_argument);
  CHECK(c.free_pages() == 8);
  CHECK(c.allocate(8).size() == 8);
  CHECK(c.free_pages() == 0);
  paged_kv_cache moved(std::move(c));
  CHECK(moved.num_pages() == 10);
  CHECK_THROWS(paged_kv_cache(cfg, 0, 16));
  CHECK_THROWS(paged_kv_cache(cfg, 4, 0));
}

TEST_CASE("forward rejects bad arguments before touching anything") {
  const llama_config cfg = small_config();
  const llama_model m = llama_model::random(cfg, 1);
  paged_kv_cache cache(cfg, 4, 8);
  sequence seq;
  std::vector<float> logits(std::size_t(cfg.vocab_size));
  const std::vector<std::uint32_t> ok = {1, 2, 3}, bad_tok = {1, 96};
  CHECK_THROWS_AS(m.forward(cache, seq, {}, 0, logits), std::invalid_argument);
  CHECK_THROWS_AS(m.forward(cache, seq, ok, 1, logits), std::invalid_argument);  // length != start
  CHECK_THROWS_AS(m.forward(cache, seq, bad_tok, 0, logits), std::invalid_argument);
  std::vector<float> small(5);
  CHECK_THROWS_AS(m.forward(cache, seq, ok, 0, small), std::invalid_argument);
  llama_config other = cfg;
  other.n_kv_heads = 4;
  paged_kv_cache wrong(other, 4, 8);
  CHECK_THROWS_AS(m.forward(wrong, seq, ok, 0, logits), std::invalid_argument);
  CHECK(seq.pages.empty());
  CHECK(cache.free_pages() == 4);
  const auto big = make_tokens(40, 96, 1);  // 5 pages > 4
  CHECK_THROWS_WITH(m.forward(cache, seq, big, 0, logits), Catch::Contains("out of pages"));
  CHECK(seq.length == 0);
  m.forward(cache, seq, ok, 0, logits);
  CHECK(seq.length == 3);
  CHECK(seq.pages.size() == 1);
  llama_config tiny = cfg;
  tiny.max_seq = 4;
  const llama_model mt = llama_model::random(tiny, 1);
  sequence s2;
  paged_kv_cache c2(tiny, 4, 8);
  CHECK_THROWS_AS(mt.forward(c2, s2, make_tokens(5, 96, 2), 0, logits), std::invalid_argument);
}

TEST_CASE("argmax, flops and random weights") {
  const std::vector<float> l = {0.5f, 2.0f, std::nanf(""), 2.0f, -1.0f};
  CHECK(argmax(l) == 1);
  CHECK_THROWS(argmax(std::span<const float>()));
  const llama_config cfg;
  const llama_model m = llama_model::random(cfg, 1);
  const double params = double(cfg.param_count());
  // Roughly 2*params per token plus attention; strictly growing with the history.
  const double f = m.forward_flops(2048, 0);
  CHECK(f > 2 * (params - 2.0 * cfg.vocab_size * cfg.dim) * 2048 * 0.7);
  CHECK(m.forward_flops(256, 2048) > m.forward_flops(256, 0));
  CHECK(m.forward_flops(0, 0) == 0);
  // Seeded weights are reproducible and differ between seeds.
  const auto w1 = llama_model::random(cfg, 1).weights(), w1b = m.weights(), w2 = llama_model::random(cfg, 2).weights();
  CHECK(same_bits(w1[1].data, w1b[1].data));  // a norm: all ones
  CHECK(same_bits(w1[2].data, w1b[2].data));
  CHECK_FALSE(same_bits(w1[2].data, w2[2].data));
  double sum = 0, sq = 0;
  for (float v : w1[2].data) {
    sum += v;
    sq += double(v) * v;
  }
  const double n = double(w1[2].data.size());
  CHECK(std::fabs(sum / n) < 0.002);
  CHECK(std::sqrt(sq / n) == Approx(0.02).epsilon(0.05));
}
