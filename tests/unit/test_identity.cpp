// A complete identity (issue 14): the model id covers every descriptor field, and a
// request's keys (LoRA adapter, cache salt, media content hashes at their token
// positions) enter the chain hash where they apply, in memory, on SSD and after a
// restart. Nothing saved under one identity is ever served under another.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "attnstore/async_requests.hpp"
#include "attnstore/format/block_header.hpp"
#include "attnstore/hash.hpp"
#include "attnstore/store.hpp"
#include "attnstore/truncate.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using namespace attnstore::testing;

namespace {

// Two groups, so that each group field can be changed on its own: a full-attention
// group (rotary, rope_dims 0: the whole head) and a sliding-window group.
kv_geometry grouped_geometry() {
  kv_geometry g;
  g.tokens_per_block = 32;
  g.groups = {kv_group{.kind = layer_kind::full, .num_layers = 2, .num_kv_heads = 2, .head_dim = 64},
              kv_group{.kind = layer_kind::sliding_window,
                       .num_layers = 2,
                       .num_kv_heads = 2,
                       .head_dim = 64,
                       .window = 128,
                       .quantization = "none"}};
  return g;
}

model_descriptor base_descriptor() {
  model_descriptor d;
  d.name = "llama-3-8b";
  d.geometry = grouped_geometry().validated();
  d.rope = "neox:128:500000";
  d.tp_size = 2;
  d.weights_revision = "rev-a";
  d.tokenizer = "tok-1";
  d.pp_size = 2;
  d.layout_version = 1;
  return d;
}

// The prompt of the store tests: 5 whole blocks of 32 tokens and a partial one.
constexpr std::size_t prompt_tokens = 170;
const conversation talk{7, prompt_tokens};

// Images at their placeholder tokens: A across blocks 1 and 2, B inside block 4.
constexpr media_span image_a{40, 30, {0xa1, 0xa2}};
constexpr media_span image_b{130, 10, {0xb1, 0xb2}};
const std::vector<media_span> images{image_a, image_b};

request_keys keys_k() { return request_keys{"adapter-a", "salt-1", images}; }

std::uint64_t reusable(store& s, const session_key& key, std::span<const token_id> prompt, const request_keys& keys) {
  return s.lookup(key, prompt, {}, keys).tokens;
}

// Gets the whole conversation under `keys` and returns the tokens delivered; every
// block delivered must be exactly what was saved.
std::uint64_t served(store& s, const session_key& key, const request_keys& keys) {
  const auto toks = talk.toks();
  const std::size_t bb = s.block_bytes();
  std::vector<std::byte> out(std::size_t(talk.blocks()) * bb);
  const get_result g = s.get(key, toks, 0, talk.blocks(), out, keys);
  const auto want = talk.data(bb);
  REQUIRE(std::equal(out.begin(), out.begin() + std::ptrdiff_t(g.blocks * bb), want.begin()));
  return g.tokens;
}

// The chain hashes a store computes for a prompt under keys (one per block).
std::vector<hash128> chain_of(const model_id& model, std::span<const token_id> prompt, const request_keys& keys,
                              std::uint32_t tpb) {
  std::vector<hash128> out;
  hash128 prev{};
  for (std::size_t pos = 0; pos < prompt.size(); pos += tpb) {
    const auto toks = prompt.subspan(pos, std::min<std::size_t>(tpb, prompt.size() - pos));
    prev = chain_hash(prev, model, toks, block_keys(keys, pos, std::uint32_t(toks.size())));
    out.push_back(prev);
  }
  return out;
}

// Chain hashes of the block headers on SSD: session hash (lo, hi) -> block index ->
// chain (the store is closed).
using disk_chains = std::map<std::pair<std::uint64_t, std::uint64_t>, std::map<std::uint32_t, hash128>>;
disk_chains chains_on_disk(const std::string& dir, const kv_geometry& g) {
  disk_chains by;
  const std::size_t slot = format::slot_bytes(g), hb = format::header_bytes(g.tokens_per_block);
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().filename().string().rfind("blocks-", 0) != 0) continue;
    std::ifstream in(f.path(), std::ios::binary);
    std::vector<std::byte> area(hb);
    for (std::size_t off = 0;; off += slot) {
      in.seekg(std::streamoff(off));
      if (!in.read(reinterpret_cast<char*>(area.data()), std::streamsize(hb))) break;
      format::block_header h;
      if (format::read_header(area.data(), hb, g.tokens_per_block, &h) != format::header_status::ok) continue;
      by[{h.session.lo, h.session.hi}][h.block_index] = h.chain;
    }
  }
  return by;
}

}  // namespace

// ---------------------------------------------------------------- (a) model identity

TEST_CASE("identity: the model id changes with every descriptor field, group fields included", "[unit]") {
  const model_descriptor base = base_descriptor();
  const model_id id = make_model_id(base);
  CHECK(make_model_id(base_descriptor()) == id);  // equal descriptors, equal ids

  std::vector<std::pair<std::string, model_descriptor>> variants;
  auto add = [&](const std::string& what, auto&& change) {
    model_descriptor d = base_descriptor();
    change(d);
    variants.push_back({what, d});
  };
  auto group = [&](const std::string& what, auto&& change) {
    add(what, [&](model_descriptor& d) {
      kv_geometry g = grouped_geometry();
      change(g);
      d.geometry = g.validated();
    });
  };
  add("name", [](model_descriptor& d) { d.name = "llama-3-8b-instruct"; });
  add("weights_revision", [](model_descriptor& d) { d.weights_revision = "rev-b"; });
  add("tokenizer", [](model_descriptor& d) { d.tokenizer = "tok-2"; });
  add("rope", [](model_descriptor& d) { d.rope = "neox:128:10000"; });
  add("keys_pre_rope", [](model_descriptor& d) { d.keys_pre_rope = true; });
  add("tp_rank", [](model_descriptor& d) { d.tp_rank = 1; });
  add("tp_size", [](model_descriptor& d) { d.tp_size = 4; });
  add("pp_rank", [](model_descriptor& d) { d.pp_rank = 1; });
  add("pp_size", [](model_descriptor& d) { d.pp_size = 4; });
  add("layout_version", [](model_descriptor& d) { d.layout_version = 2; });
  group("tokens_per_block", [](kv_geometry& g) { g.tokens_per_block = 16; });
  group("group num_layers", [](kv_geometry& g) { g.groups[0].num_layers = 3; });
  group("group num_kv_heads", [](kv_geometry& g) { g.groups[1].num_kv_heads = 4; });
  group("group head_dim", [](kv_geometry& g) { g.groups[1].head_dim = 128; });
  group("group dtype", [](kv_geometry& g) { g.groups[1].dtype = dtype::bf16; });
  group("group rope_dims", [](kv_geometry& g) { g.groups[0].rope_dims = 32; });
  group("group rotary", [](kv_geometry& g) { g.groups[0].rotary = false; });
  group("group window", [](kv_geometry& g) { g.groups[1].window = 256; });
  group("group quantization", [](kv_geometry& g) { g.groups[1].quantization = "fp8 k_scale=0.5"; });
  group("group chunk", [](kv_geometry& g) {
    g.groups[1].kind = layer_kind::chunked;
    g.groups[1].window = 0;
    g.groups[1].chunk = 8192;
  });
  group("group chunk length", [](kv_geometry& g) {
    g.groups[1].kind = layer_kind::chunked;
    g.groups[1].window = 0;
    g.groups[1].chunk = 4096;
  });
  group("layer order", [](kv_geometry& g) { g.layer_group = {0, 1, 0, 1}; });

  std::vector<model_id> seen{id};
  for (const auto& [what, d] : variants) {
    INFO(what);
    const model_id v = make_model_id(d);
    CHECK_FALSE(v == id);
    CHECK(make_model_id(d) == v);  // deterministic
    for (const model_id& other : seen) CHECK_FALSE(other == v);
    seen.push_back(v);
  }
  CHECK(seen.size() == variants.size() + 1);

  // The kind alone: a one-row, unrotated full group against the same as latent.
  kv_geometry full = grouped_geometry();
  full.groups[0].num_kv_heads = 1;
  full.groups[0].rotary = false;
  kv_geometry latent = full;
  latent.groups[0].kind = layer_kind::latent;
  model_descriptor a = base_descriptor(), b = base_descriptor();
  a.geometry = full.validated();
  b.geometry = latent.validated();
  CHECK_FALSE(make_model_id(a) == make_model_id(b));
}

TEST_CASE("identity: a store reopened with any identity field changed is refused at open", "[unit]") {
  temp_dir d("identity");
  auto config = [&] {
    store_config c = small_config(d.str(), 8, 8);
    c.weights_revision = "rev-a";
    c.tokenizer = "tok-1";
    c.pp_size = 2;
    c.layout_version = 1;
    return c;
  };
  model_id first{};
  {
    store s(config());
    first = s.model();
  }
  std::vector<std::pair<std::string, store_config>> changed;
  auto add = [&](const std::string& what, auto&& change) {
    store_config c = config();
    change(c);
    changed.push_back({what, c});
  };
  add("weights_revision", [](store_config& c) { c.weights_revision = "rev-b"; });
  add("tokenizer", [](store_config& c) { c.tokenizer = "tok-2"; });
  add("pp_rank", [](store_config& c) { c.pp_rank = 1; });
  add("pp_size", [](store_config& c) { c.pp_size = 3; });
  add("layout_version", [](store_config& c) { c.layout_version = 2; });
  add("tp_rank", [](store_config& c) {
    c.tp_size = 2;
    c.tp_rank = 1;
  });
  for (const auto& [what, c] : changed) {
    INFO(what);
    CHECK_THROWS_WITH(store(c), Catch::Contains("another model"));
  }
  store_config bad = config();
  bad.pp_rank = 2;  // not below pp_size
  CHECK_THROWS_WITH(store(bad), Catch::Contains("pp_rank is 2 with pp_size 2"));
  store s(config());  // the right identity still opens, under the same id
  CHECK(s.model() == first);
}

TEST_CASE("identity: a directory of an older format version is refused, naming both versions", "[unit]") {
  temp_dir d("identity");
  { store s(small_config(d.str(), 8, 8)); }
  // Rewrite the MANIFEST as a format-3 store left it.
  const std::string path = d.str() + "/MANIFEST";
  std::string text;
  {
    std::ifstream in(path);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string now = "format_version=" + std::to_string(format::format_version);
  REQUIRE(format::format_version == 4);
  const auto at = text.find(now);
  REQUIRE(at != std::string::npos);
  text.replace(at, now.size(), "format_version=3");
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
  }
  CHECK_THROWS_WITH(store(small_config(d.str(), 8, 8)),
                    Catch::Contains("format_version=3") && Catch::Contains("format_version=4"));
}

// ---------------------------------------------------------------- hashes

TEST_CASE("identity: block keys are zero without keys, and a zero digest is the plain chain hash", "[unit]") {
  const model_id m = make_model_id(base_descriptor());
  const auto t = make_tokens(1, 32);
  CHECK(block_keys({}, 0, 32).is_zero());
  CHECK(chain_hash({}, m, t, {}) == chain_hash({}, m, t));
  // Media alone keys only the blocks it overlaps: [40, 70) is in blocks 1 and 2.
  const request_keys media_only{{}, {}, images};
  CHECK(block_keys(media_only, 0, 32).is_zero());
  CHECK_FALSE(block_keys(media_only, 32, 32).is_zero());
  CHECK_FALSE(block_keys(media_only, 64, 32).is_zero());
  CHECK(block_keys(media_only, 96, 32).is_zero());
  CHECK_FALSE(block_keys(media_only, 128, 32).is_zero());
  // A lora id or a salt keys every block; each field and each span part matters.
  const hash128 k = block_keys(keys_k(), 64, 32);
  CHECK_FALSE(block_keys({"adapter-a", {}, {}}, 96, 32).is_zero());
  CHECK_FALSE(block_keys({{}, "salt-1", {}}, 96, 32).is_zero());
  CHECK_FALSE(block_keys({"adapter-a", {}, {}}, 96, 32) == block_keys({{}, "adapter-a", {}}, 96, 32));
  CHECK_FALSE(block_keys({"adapter-b", "salt-1", images}, 64, 32) == k);
  CHECK_FALSE(block_keys({"adapter-a", "salt-2", images}, 64, 32) == k);
  for (int part = 0; part < 3; ++part) {
    std::vector<media_span> other = images;
    if (part == 0) other[0].content.lo ^= 1;
    if (part == 1) other[0].first_token += 1;
    if (part == 2) other[0].tokens += 1;
    INFO("span part " << part);
    CHECK_FALSE(block_keys({"adapter-a", "salt-1", other}, 64, 32) == k);
  }
  // Keyed and plain chains differ; a different digest gives a different chain.
  CHECK_FALSE(chain_hash({}, m, t, k) == chain_hash({}, m, t));
  CHECK_FALSE(chain_hash({}, m, t, k) == chain_hash({}, m, t, block_keys({"x", {}, {}}, 0, 32)));
  // Validation.
  CHECK(validate_request_keys(keys_k(), prompt_tokens) == errc::ok);
  CHECK(validate_request_keys(keys_k(), 139) == errc::invalid_argument);  // image_b ends at 140
  const char* why = nullptr;
  const std::vector<media_span> unsorted{image_b, image_a};
  CHECK(validate_request_keys({{}, {}, unsorted}, prompt_tokens, &why) == errc::invalid_argument);
  REQUIRE(why != nullptr);
  CHECK(std::string(why).find("sorted") != std::string::npos);
}

TEST_CASE("identity: two tenants with the same salt and prompt share content addresses; other salts do not", "[unit]") {
  temp_dir d("identity");
  const store_config c = small_config(d.str(), 24, 32);
  const auto toks = talk.toks();
  const session_key a{"tenant-a", "chat"}, b{"tenant-b", "chat"}, e{"tenant-c", "chat"};
  const request_keys shared{{}, "shared-salt", {}};
  hash128 ha{}, hb{}, he{};
  model_id model{};
  {
    store s(c);
    model = s.model();
    REQUIRE(s.put(a, toks, 0, talk.data(s.block_bytes()), shared) == errc::ok);
    REQUIRE(s.put(b, toks, 0, talk.data(s.block_bytes()), shared) == errc::ok);
    REQUIRE(s.put(e, toks, 0, talk.data(s.block_bytes()), request_keys{{}, "other-salt", {}}) == errc::ok);
    ha = s.session_of(a).value;
    hb = s.session_of(b).value;
    he = s.session_of(e).value;
    // Sessions stay the tenants' own: the same salt gives no access to another tenant's
    // blocks (prefix sharing is within a tenant by default); within one, a new session
    // with the same prompt and keys finds its whole blocks, and with other keys nothing.
    CHECK(reusable(s, a, toks, shared) == prompt_tokens);
    CHECK(reusable(s, {"tenant-d", "chat"}, toks, shared) == 0);
    const std::uint32_t tpb = test_geometry.tokens_per_block;
    CHECK(reusable(s, {"tenant-a", "other"}, toks, shared) == prompt_tokens / tpb * tpb);
    CHECK(reusable(s, {"tenant-a", "other"}, toks, request_keys{{}, "other-salt", {}}) == 0);
    REQUIRE(s.close() == errc::ok);  // everything on SSD
  }
  // The chains computed by hand are what the store wrote.
  const auto want_shared = chain_of(model, toks, shared, test_geometry.tokens_per_block);
  const auto want_other = chain_of(model, toks, request_keys{{}, "other-salt", {}}, test_geometry.tokens_per_block);
  auto on_disk = chains_on_disk(d.str(), test_geometry.validated());
  auto& ca = on_disk[{ha.lo, ha.hi}];
  auto& cb = on_disk[{hb.lo, hb.hi}];
  auto& ce = on_disk[{he.lo, he.hi}];
  REQUIRE(ca.size() == talk.blocks());
  REQUIRE(cb.size() == talk.blocks());
  REQUIRE(ce.size() == talk.blocks());
  CHECK(ca == cb);  // the same content addresses, block by block
  for (std::uint32_t i = 0; i < talk.blocks(); ++i) {
    INFO("block " << i);
    CHECK(ca[i] == want_shared[i]);
    CHECK(ce[i] == want_other[i]);
    CHECK_FALSE(ce[i] == ca[i]);
  }
}

// ---------------------------------------------------------------- (b) reuse by keys

TEST_CASE("identity: a save with keys is reused only under the same keys", "[unit]") {
  temp_dir d("identity");
  store s(small_config(d.str(), 16, 32));
  const session_key key{"t", "chat"};
  const auto toks = talk.toks();
  REQUIRE(s.put(key, toks, 0, talk.data(s.block_bytes()), keys_k()) == errc::ok);

  SECTION("in DRAM") {}
  SECTION("on SSD") { REQUIRE(s.demote(key) == errc::ok); }

  CHECK(reusable(s, key, toks, keys_k()) == prompt_tokens);
  CHECK(served(s, key, keys_k()) == prompt_tokens);
  // The next turn: the stored prompt, then more; the partial last block is reused whole.
  auto longer = toks;
  const auto more = make_tokens(99, 40);
  longer.insert(longer.end(), more.begin(), more.end());
  CHECK(reusable(s, key, longer, keys_k()) == prompt_tokens);

  // Another adapter, another salt, or no keys: nothing, not even a token-wise partial
  // match of block 0 (its tokens are the same).
  CHECK(reusable(s, key, toks, request_keys{"adapter-b", "salt-1", images}) == 0);
  CHECK(served(s, key, request_keys{"adapter-b", "salt-1", images}) == 0);
  CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-2", images}) == 0);
  CHECK(served(s, key, request_keys{"adapter-a", "salt-2", images}) == 0);
  CHECK(reusable(s, key, toks, {}) == 0);
  CHECK(served(s, key, {}) == 0);
  CHECK(reusable(s, key, longer, request_keys{"adapter-a", "salt-2", images}) == 0);
  CHECK(reusable(s, key, std::span(toks).first(20), request_keys{"adapter-b", "salt-1", images}) == 0);

  // Another image at the same placeholder tokens ends reuse at the first block it is in.
  std::vector<media_span> edited = images;
  edited[1].content.hi ^= 1;  // image B, block 4 (tokens 128..159)
  CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-1", edited}) == 128);
  CHECK(served(s, key, request_keys{"adapter-a", "salt-1", edited}) == 128);
  edited = images;
  edited[0].content.lo ^= 1;  // image A, blocks 1 and 2
  CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-1", edited}) == 32);
  CHECK(served(s, key, request_keys{"adapter-a", "salt-1", edited}) == 32);
  // The same image at other placeholder positions is another prompt too.
  edited = images;
  edited[1].first_token = 131;
  CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-1", edited}) == 128);
  // Without image B the block that held it is not served (not even partly).
  CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-1", std::span(images).first(1)}) == 128);
  // The same images: everything, and every block still verifies.
  CHECK(served(s, key, keys_k()) == prompt_tokens);

  // acquire() matches the same way.
  read_lease lease(talk.blocks());
  std::vector<block_view> views(talk.blocks());
  get_result g = s.acquire(key, toks, views, lease, keys_k());
  CHECK(g.status == errc::ok);
  CHECK(g.tokens == prompt_tokens);
  g = s.acquire(key, toks, views, lease, request_keys{"adapter-b", "salt-1", images});
  CHECK(g.status == errc::ok);
  CHECK(g.blocks == 0);
  lease.release();
}

TEST_CASE("identity: blocks before a request's first image are shared with plain requests", "[unit]") {
  store s(small_config("", 16, 0));
  const session_key key{"t", "chat"};
  const auto toks = talk.toks();
  const request_keys media_only{{}, {}, images};
  REQUIRE(s.put(key, toks, 0, talk.data(s.block_bytes()), media_only) == errc::ok);
  CHECK(reusable(s, key, toks, media_only) == prompt_tokens);
  CHECK(reusable(s, key, toks, {}) == 32);  // block 0 holds no image: the same KV
  CHECK(reusable(s, key, std::span(toks).first(20), {}) == 20);
}

TEST_CASE("identity: an incremental save must extend a prefix saved under the same keys", "[unit]") {
  store s(small_config("", 16, 0));
  const session_key key{"t", "chat"};
  const auto toks = talk.toks();
  const request_keys k{"adapter-a", "salt-1", {}};
  const std::size_t bb = s.block_bytes();
  REQUIRE(s.put(key, std::span(toks).first(64), 0, make_blocks(bb, talk.id, 0, 2), k) == errc::ok);
  const auto tail = talk.data(bb, 2);
  CHECK(s.put(key, toks, 2, tail, request_keys{"adapter-b", "salt-1", {}}) == errc::rejected);
  CHECK(s.put(key, toks, 2, tail) == errc::rejected);
  std::vector<std::byte*> payloads(talk.blocks() - 2);
  save_reservation r;
  CHECK(s.reserve(key, toks, 2, payloads, r, request_keys{"adapter-a", "salt-2", {}}) == errc::rejected);
  REQUIRE(s.put(key, toks, 2, tail, k) == errc::ok);
  CHECK(reusable(s, key, toks, k) == prompt_tokens);
  CHECK(served(s, key, k) == prompt_tokens);
}

TEST_CASE("identity: a truncated view is matched under its keys only", "[unit]") {
  store s(small_config("", 16, 0));
  const session_key key{"t", "chat"};
  const auto toks = talk.toks();
  const request_keys k{{}, "salt-1", {}};
  REQUIRE(s.put(key, toks, 0, talk.data(s.block_bytes()), k) == errc::ok);
  const truncation_plan plan = plan_truncation(prompt_tokens, 100, 200, 4, 32, 0.0);
  REQUIRE(plan.needed);
  REQUIRE(s.truncate(key, toks, plan) == errc::ok);
  std::vector<token_id> view(toks.begin(), toks.begin() + std::ptrdiff_t(plan.sink));
  view.insert(view.end(), toks.begin() + std::ptrdiff_t(plan.sink + plan.drop), toks.end());
  REQUIRE(view.size() == plan.kept);
  CHECK(reusable(s, key, view, k) == plan.kept);
  CHECK(reusable(s, key, view, request_keys{{}, "salt-2", {}}) == 0);
  CHECK(reusable(s, key, view, {}) == 0);
}

// ---------------------------------------------------------------- (d) restart

TEST_CASE("identity: keyed blocks survive a restart and are served under their keys only", "[unit]") {
  temp_dir d("identity");
  const session_key key{"t", "chat"}, plain{"t", "plain"};
  const auto toks = talk.toks();
  const bool clean = GENERATE(true, false);
  INFO((clean ? "clean close" : "no clean close: whole slots scanned"));
  {
    store_config c = small_config(d.str(), 16, 32);
    if (!clean) c.write_through = true;
    store s(c);
    REQUIRE(s.put(key, toks, 0, talk.data(s.block_bytes()), keys_k()) == errc::ok);
    REQUIRE(s.put(plain, toks, 0, talk.data(s.block_bytes())) == errc::ok);
    if (clean) {
      REQUIRE(s.close() == errc::ok);
    } else {
      REQUIRE(s.flush() == errc::ok);
      // Leave no CLEAN mark: the destructor's close would write one. Remove it after.
    }
  }
  if (!clean) std::filesystem::remove(d.str() + "/CLEAN");
  store s(small_config(d.str(), 16, 32));
  CHECK(s.stats().recovered_blocks == 2 * talk.blocks());
  CHECK(s.stats().recovery_dropped_blocks == 0);
  CHECK(reusable(s, key, toks, keys_k()) == prompt_tokens);
  CHECK(served(s, key, keys_k()) == prompt_tokens);
  CHECK(reusable(s, key, toks, request_keys{"adapter-b", "salt-1", images}) == 0);
  CHECK(reusable(s, key, toks, {}) == 0);
  std::vector<media_span> edited = images;
  edited[1].content.hi ^= 1;
  CHECK(served(s, key, request_keys{"adapter-a", "salt-1", edited}) == 128);
  // A plain save is plain after a restart as well.
  CHECK(reusable(s, plain, toks, {}) == prompt_tokens);
  CHECK(reusable(s, plain, toks, keys_k()) == 0);
}

// ---------------------------------------------------------------- (e) hostile keys

TEST_CASE("identity: invalid request keys are refused and nothing is stored", "[unit]") {
  temp_dir d("identity");
  store s(small_config(d.str(), 16, 32));
  const auto toks = talk.toks();
  const std::size_t bb = s.block_bytes();
  const auto data = talk.data(bb);
  const std::vector<std::vector<media_span>> hostile{
      {image_b, image_a},                    // unsorted
      {{40, 30, {1, 1}}, {60, 20, {2, 2}}},  // overlapping
      {{160, 20, {1, 1}}},                   // past the end of the prompt
      {{prompt_tokens, 1, {1, 1}}},          // starts at the end
      {{40, 0, {1, 1}}},                     // empty
      {{~std::uint64_t(0) - 2, 8, {1, 1}}},  // wraps around
      {{10, 5, {1, 1}}, {10, 5, {2, 2}}},    // the same placeholders twice
  };
  for (std::size_t i = 0; i < hostile.size(); ++i) {
    INFO("case " << i);
    const request_keys k{"adapter-a", "salt-1", hostile[i]};
    const std::string name = "hostile-" + std::to_string(i);  // session_key only views it
    const session_key key{"t", name};
    CHECK(validate_request_keys(k, prompt_tokens) == errc::invalid_argument);
    CHECK(s.put(key, toks, 0, data, k) == errc::invalid_argument);
    std::vector<std::byte*> payloads(talk.blocks());
    save_reservation r;
    CHECK(s.reserve(key, toks, 0, payloads, r, k) == errc::invalid_argument);
    CHECK_FALSE(r);
    // Nothing of it was stored, under any keys.
    CHECK(reusable(s, key, toks, {}) == 0);
    CHECK(reusable(s, key, toks, request_keys{"adapter-a", "salt-1", {}}) == 0);
  }
  CHECK(s.stats().sessions == 0);
  // Reads with hostile keys are refused too, even of a stored session.
  const session_key key{"t", "chat"};
  REQUIRE(s.put(key, toks, 0, data, keys_k()) == errc::ok);
  const request_keys bad{"adapter-a", "salt-1", hostile[0]};
  CHECK(reusable(s, key, toks, bad) == 0);
  std::vector<std::byte> out(std::size_t(talk.blocks()) * bb);
  CHECK(s.get(key, toks, 0, talk.blocks(), out, bad).status == errc::invalid_argument);
  read_lease lease(talk.blocks());
  std::vector<block_view> views(talk.blocks());
  CHECK(s.acquire(key, toks, views, lease, bad).status == errc::invalid_argument);
  // A prompt shorter than where an image sits is refused as well.
  CHECK(s.get(key, std::span(toks).first(100), 0, 1, std::span(out).first(bb), keys_k()).status ==
        errc::invalid_argument);
  // The asynchronous requests refuse them at submission.
  async_requests io(s);
  CHECK(io.submit_load(1, key, toks, 0, talk.blocks(), out, bad) == errc::invalid_argument);
  CHECK(io.submit_save(2, {"t", "async"}, toks, 0, data, bad) == errc::invalid_argument);
  CHECK(io.outstanding() == 0);
  // ... and carry good ones through.
  REQUIRE(io.submit_save(3, {"t", "async"}, toks, 0, data, keys_k()) == errc::ok);
  REQUIRE(io.wait(3));
  REQUIRE(io.submit_load(4, {"t", "async"}, toks, 0, talk.blocks(), out, keys_k()) == errc::ok);
  REQUIRE(io.wait(4));
  finished_request done[2];
  REQUIRE(io.get_finished(done) == 2);
  CHECK(done[0].status == errc::ok);
  CHECK(done[1].status == errc::ok);
  CHECK(done[1].tokens == prompt_tokens);
  CHECK(out == data);
  const session_key keys_batch[2] = {{"t", "async"}, {"t", "async"}};
  const std::span<const token_id> prompts[2] = {toks, toks};
  const request_keys per_request[2] = {keys_k(), request_keys{"adapter-b", "salt-1", images}};
  lookup_result results[2];
  io.lookup_batch(keys_batch, prompts, results, per_request);
  CHECK(results[0].tokens == prompt_tokens);
  CHECK(results[1].tokens == 0);
}
