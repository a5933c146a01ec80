// Layer groups with the geometries of real models (bench/geometry/real_models.hpp):
// each saved through the hooks from paged engine memory (every group paged on its
// own), restored after edits, truncated where its RoPE allows, reopened, corrupted.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "attnstore/hooks.hpp"
#include "attnstore/truncate.hpp"
#include "geometry/real_models.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::temp_dir;

namespace {

// One group's engine memory: per layer of the group, K (or the latent row) and V pages,
// [page][page_size][head] with padded heads; its own page size and page order.
struct group_memory {
  kv_group k;
  std::uint32_t page_size, pages;
  std::size_t head_stride, token_stride, page_stride;
  std::vector<std::vector<std::byte>> bufs;  // per layer: tensors x pages x page_stride
  std::vector<std::byte*> kb, vb;
  kv_layout layout;
  std::vector<std::uint32_t> table;  // page of position p / page_size
  group_memory(const kv_group& grp, std::uint32_t psize, std::uint64_t capacity, std::uint32_t seed)
      : k(grp), page_size(psize), pages(std::uint32_t((capacity + psize - 1) / psize)) {
    if (k.kind == layer_kind::state) {  // one state per layer for the sequence, no pages
      for (std::uint32_t l = 0; l < k.num_layers; ++l) {
        bufs.emplace_back(k.state_bytes);
        kb.push_back(bufs.back().data());
      }
      layout = kv_layout{.num_layers = k.num_layers, .dtype = k.dtype, .k_base = kb, .where = memory_space::host};
      return;
    }
    head_stride = std::size_t(k.head_dim) * dtype_size(k.dtype) + 16;  // not attnstore's layout
    token_stride = head_stride * k.num_kv_heads;
    page_stride = token_stride * page_size;
    for (std::uint32_t l = 0; l < k.num_layers; ++l) {
      bufs.emplace_back(std::size_t(k.tensors()) * pages * page_stride);
      kb.push_back(bufs.back().data());
      if (k.tensors() == 2) vb.push_back(bufs.back().data() + std::size_t(pages) * page_stride);
    }
    layout = kv_layout{k.num_layers, k.num_kv_heads, k.head_dim, k.dtype, page_size,         page_stride,
                       token_stride, head_stride,    kb,         vb,      memory_space::host};
    table.resize(pages);
    std::iota(table.begin(), table.end(), 0u);
    for (std::uint32_t i = pages; i > 1; --i)  // a shuffled page order per group
      std::swap(table[i - 1], table[attnstore::testing::mix(seed * 977 + i) % i]);
  }
  std::byte* at(std::uint32_t layer_in_group, int side, std::uint64_t pos, std::uint32_t h) {
    return (side ? vb : kb)[layer_in_group] + std::size_t(table[pos / page_size]) * page_stride +
           std::size_t(pos % page_size) * token_stride + h * head_stride;
  }
  std::size_t head_bytes() const { return std::size_t(k.head_dim) * dtype_size(k.dtype); }
  void scrub() {
    for (auto& b : bufs) std::memset(b.data(), 0xEE, b.size());
  }
};

// The whole model's engine memory and the kv_target over it.
struct engine_memory {
  kv_geometry g;
  std::vector<group_memory> groups;
  std::vector<kv_group_target> targets;
  engine_memory(const kv_geometry& geom, std::uint64_t capacity) : g(geom) {
    for (std::uint32_t i = 0; i < g.groups.size(); ++i)
      groups.emplace_back(g.groups[i], i % 2 ? 16 : 32, capacity, i + 1);
    for (auto& m : groups) targets.push_back({&m.layout, m.table});
  }
  kv_target target() const { return kv_target{nullptr, {}, targets}; }
  // What the engine computes for (session, layer, side, pos, head): deterministic bytes.
  static std::uint64_t seed(std::uint64_t session, std::uint32_t l, int side, std::uint64_t pos, std::uint32_t h) {
    return session * 7919 + pos * 131 + l * 17 + std::uint64_t(side) * 3 + h * 100003;
  }
  std::byte* at(std::uint32_t l, int side, std::uint64_t pos, std::uint32_t h) {
    const layer_shape& s = g.layers[l];
    return groups[s.group].at(s.in_group, side, pos, h);
  }
  void fill(std::uint64_t session, std::uint64_t from, std::uint64_t to) {
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      const kv_group& k = g.group_of(l);
      for (std::uint64_t p = from; p < to; ++p)
        for (int side = 0; side < int(k.tensors()); ++side)
          for (std::uint32_t h = 0; h < k.num_kv_heads; ++h)
            attnstore::testing::fill_block({at(l, side, p, h), groups[g.layers[l].group].head_bytes()},
                                           seed(session, l, side, p, h));
    }
  }
  // Positions [0, n) hold exactly what fill() wrote (first mismatch, or n).
  std::uint64_t first_wrong(std::uint64_t session, std::uint64_t n) {
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      const kv_group& k = g.group_of(l);
      std::vector<std::byte> want(groups[g.layers[l].group].head_bytes());
      for (std::uint64_t p = 0; p < n; ++p)
        for (int side = 0; side < int(k.tensors()); ++side)
          for (std::uint32_t h = 0; h < k.num_kv_heads; ++h) {
            attnstore::testing::fill_block(want, seed(session, l, side, p, h));
            if (std::memcmp(want.data(), at(l, side, p, h), want.size()) != 0) return p;
          }
    }
    return n;
  }
  void scrub() {
    for (auto& m : groups) m.scrub();
  }
  // With window_tails: rows that must hold fill()'s bytes after a load of n tokens (every
  // position of other layers, the last `window` of window layers) that do not, and rows
  // of window layers before that which hold anything but the scrub pattern.
  std::pair<std::uint64_t, std::uint64_t> tails_wrong(std::uint64_t session, std::uint64_t n) {
    std::uint64_t wrong = 0, leaked = 0;
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      const kv_group& k = g.group_of(l);
      const std::size_t hb = groups[g.layers[l].group].head_bytes();
      std::vector<std::byte> want(hb), scrubbed(hb, std::byte{0xEE});
      const std::uint64_t from = k.kind == layer_kind::sliding_window && n > k.window ? n - k.window : 0;
      for (std::uint64_t p = 0; p < n; ++p)
        for (int side = 0; side < int(k.tensors()); ++side)
          for (std::uint32_t h = 0; h < k.num_kv_heads; ++h) {
            if (p < from) {
              leaked += std::memcmp(scrubbed.data(), at(l, side, p, h), hb) != 0;
              continue;
            }
            attnstore::testing::fill_block(want, seed(session, l, side, p, h));
            wrong += std::memcmp(want.data(), at(l, side, p, h), hb) != 0;
          }
    }
    return {wrong, leaked};
  }
  // A state layer's state after `tokens` tokens of `session`.
  void fill_state(std::uint64_t session, std::uint64_t tokens) {
    for (std::uint32_t l = 0; l < g.num_layers; ++l)
      if (g.group_of(l).kind == layer_kind::state)
        attnstore::testing::fill_block(groups[g.layers[l].group].bufs[g.layers[l].in_group],
                                       seed(session, l, 9, tokens, 0));
  }
  bool state_is(std::uint64_t session, std::uint64_t tokens) {
    for (std::uint32_t l = 0; l < g.num_layers; ++l)
      if (g.group_of(l).kind == layer_kind::state) {
        const auto& have = groups[g.layers[l].group].bufs[g.layers[l].in_group];
        std::vector<std::byte> want(have.size());
        attnstore::testing::fill_block(want, seed(session, l, 9, tokens, 0));
        if (want != have) return false;
      }
    return true;
  }
};

store_config config_for(const models::real_model& m, const std::string& dir) {
  store_config c;
  c.geometry = m.geometry;
  c.model_name = m.name;
  c.tp_size = m.tp_size;
  c.rope = m.rope ? m.rope->to_string() : "none";
  const std::size_t slot = format::slot_bytes(m.geometry.validated());
  c.dram_bytes = 96 * slot;
  c.ssd_directory = dir;
  c.ssd_bytes = 160 * slot;
  c.queue_depth = 8;
  c.background_thread = false;
  c.log = logger{&logger::quiet, nullptr};
  return c;
}

std::vector<token_id> tokens_of(std::uint64_t session, std::size_t n) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id(attnstore::testing::mix(session * 131 + i) % 150000);
  return t;
}

// The first n tokens of a history and one new token: a prompt that extends a saved turn.
std::vector<token_id> prefix_and_one(const std::vector<token_id>& toks, std::uint64_t n) {
  std::vector<token_id> p(toks.begin(), toks.begin() + std::ptrdiff_t(n));
  p.push_back(99);
  return p;
}

// Saves positions [from, tokens.size()) of `session` from engine memory.
void save(hooks& hk, engine_memory& mem, const session_key& key, std::span<const token_id> toks, std::uint64_t from) {
  errc st;
  save_handle sh = hk.start_save(key, toks, from, mem.target(), std::nullopt, &st);
  REQUIRE(st == errc::ok);
  for (std::uint32_t l = 0; l < mem.g.num_layers; ++l) REQUIRE(hk.save_layer(sh, l) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);
}

// Loads what `prompt` can reuse into scrubbed engine memory; returns the tokens loaded.
std::uint64_t load(hooks& hk, engine_memory& mem, const session_key& key, std::span<const token_id> prompt,
                   errc want = errc::ok) {
  mem.scrub();
  load_info li = hk.start_load(key, prompt, mem.target());
  REQUIRE(li.status == want);
  if (!li.handle) return 0;
  for (std::uint32_t l = 0; l < mem.g.num_layers; ++l) REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
  REQUIRE(hk.finish_load(li.handle) == errc::ok);
  return li.tokens;
}

// Flips a payload byte of the newest stored copy of block `index` (of any session).
void flip_payload_byte_of_block(const std::string& dir, const kv_geometry& g, std::uint32_t index) {
  const std::size_t slot = format::slot_bytes(g), hb = format::header_bytes(g.tokens_per_block);
  const int fd = ::open((dir + "/blocks-0000.dat").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  std::vector<std::byte> area(hb);
  std::uint64_t newest = 0;
  off_t at = -1;
  for (std::size_t s = 0; ::pread(fd, area.data(), hb, off_t(s * slot)) == ssize_t(hb); ++s) {
    format::block_header h;
    if (format::read_header(area.data(), hb, g.tokens_per_block, &h) == format::header_status::ok &&
        h.block_index == index && h.sequence >= newest) {
      newest = h.sequence;
      at = off_t(s * slot + hb + 100);
    }
  }
  REQUIRE(at >= 0);
  char byte = 0;
  REQUIRE(::pread(fd, &byte, 1, at) == 1);
  byte ^= 0x10;
  REQUIRE(::pwrite(fd, &byte, 1, at) == 1);
  ::close(fd);
}

}  // namespace

TEST_CASE("geometry groups: real model geometries validate, and state groups are refused with a reason") {
  for (const auto& m : models::all()) {
    INFO(m.name);
    const kv_geometry g = m.geometry.validated();
    CHECK(g.validated() == g);  // idempotent
    CHECK(g.layers.size() == g.num_layers);
    std::size_t sum = 0;
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      CHECK(g.layers[l].offset == sum);
      sum += g.layers[l].bytes;
    }
    CHECK(sum == g.block_bytes());
    CHECK(g.block_bytes() >= (std::size_t(1) << 20));
  }
  const kv_geometry ds = models::deepseek_v3().geometry.validated();
  CHECK(ds.token_bytes() == 61u * 576 * 2);  // one latent row per token per layer: no V
  const kv_geometry oss = models::gpt_oss_20b().geometry.validated();
  CHECK(oss.group_of(0).kind == layer_kind::sliding_window);
  CHECK(oss.group_of(1).kind == layer_kind::full);
  const kv_geometry qwen = models::qwen3_next_80b().geometry.validated();
  CHECK(qwen.checkpoint_bytes() == 36ull * (32 * 128 * 128 + 3 * 8192) * 2);
  CHECK(qwen.token_bytes() == 12u * 2 * 2 * 256 * 2);  // the state layers add nothing per token
  CHECK(qwen.layers[0].bytes == 0);
  CHECK(qwen.layers[1].checkpoint_offset == qwen.groups[0].state_bytes);
  const kv_geometry gemma = models::gemma3_12b().geometry.validated();
  CHECK(gemma.group_of(5).kind == layer_kind::full);
  CHECK(gemma.group_of(4).kind == layer_kind::sliding_window);
}

TEST_CASE("geometry groups: hostile geometries are refused naming the field") {
  kv_geometry g;
  g.groups = {models::full(4, 2, 64)};
  g.num_kv_heads = 3;
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("num_kv_heads/head_dim are set together with groups"));
  g.num_kv_heads = 0;
  g.layer_group = {0, 0, 0};
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("layer_group has 3 entries for 4 layers"));
  g.layer_group = {0, 0, 0, 1};
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("names group 1"));
  g.layer_group = {};
  g.groups[0].window = 8;
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("window is set on a group without one"));
  g.groups[0] = models::window(4, 2, 64, 0);
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("window is 0"));
  g.groups[0] = kv_group{.kind = layer_kind::latent, .num_layers = 4, .num_kv_heads = 2, .head_dim = 576};
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("one row per token"));
  g.groups[0].num_kv_heads = 1;
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("needs rope_dims"));
  g.groups[0].rope_dims = 63;
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("rope_dims is 63"));
  g.groups[0].kind = layer_kind(9);
  CHECK_THROWS_WITH(g.validated(), Catch::Contains("kind"));
  // A layout of the wrong shape for a group is refused by the hooks.
  temp_dir dir("groups-bad");
  store kv(config_for(models::gpt_oss_20b(), dir.str()));
  auto copier_owner = make_host_copy_backend();
  copy_backend& copier = *copier_owner;
  hooks hk(kv, copier, {});
  engine_memory mem(kv.geometry(), 64);
  const auto toks = tokens_of(1, 40);
  kv_target t = mem.target();
  errc st;
  CHECK(!hk.start_save({"t", "s"}, toks, 0, kv_target{&mem.groups[0].layout, mem.groups[0].table}, std::nullopt, &st));
  CHECK(st == errc::invalid_argument);  // one layout for a two-group model
  std::vector<kv_group_target> swapped{t.groups[1], t.groups[0]};
  std::vector<kv_group_target> same_shape_swapped = swapped;
  (void)same_shape_swapped;
  mem.groups[0].layout.num_layers = 11;
  CHECK(!hk.start_save({"t", "s"}, toks, 0, t, std::nullopt, &st));
  CHECK(st == errc::invalid_argument);
}

TEST_CASE(
    "geometry groups: every real geometry saves, restores after edits, truncates, survives restart and "
    "corruption") {
  for (auto m : {models::deepseek_v3(), models::gpt_oss_20b(), models::gemma3_12b(), models::llama3_70b()}) {
    DYNAMIC_SECTION(m.name) {
      temp_dir dir("groups");
      const kv_geometry g = m.geometry.validated();
      const std::uint32_t T = g.tokens_per_block;
      // Long enough to reach past every window (Gemma 3: 1024) with room for edits.
      std::uint64_t window = 0;
      for (const auto& k : g.groups) window = std::max<std::uint64_t>(window, k.window);
      const std::uint64_t n1 = std::max<std::uint64_t>(6 * T, window + 3 * T) + T / 2;  // turn 1 ends mid-block
      const std::uint64_t n2 = n1 + 2 * T + 3;
      const auto toks = tokens_of(7, n2);
      const session_key key{"tenant", "conv"};
      auto copier_owner = make_host_copy_backend();
      copy_backend& copier = *copier_owner;
      engine_memory mem(g, n2 + 64);
      hooks_config hc;
      hc.rope = m.rope;
      {
        store kv(config_for(m, dir.str()));
        REQUIRE(kv.geometry() == g);
        hooks hk(kv, copier, hc);
        // Two turns, the second extending the first's partial block.
        mem.fill(7, 0, n2);
        save(hk, mem, key, std::span(toks).first(n1), 0);
        save(hk, mem, key, toks, n1);
        CHECK(hk.lookup(key, toks).tokens == n2);
        CHECK(load(hk, mem, key, toks) == n2);
        CHECK(mem.first_wrong(7, n2) == n2);
        // Edits: inside the last window, and far outside it. Every group is stored for
        // every position, so reuse ends at the edit, and what is loaded is exactly the
        // history before it.
        for (std::uint64_t edit : {n2 - 5, n2 - window / 2 - 1, std::uint64_t(T) + 1, std::uint64_t(0)}) {
          INFO("edit at " << edit);
          auto edited = toks;
          edited[edit] ^= 0x5555;
          const std::uint64_t want = edit;
          CHECK(hk.lookup(key, edited).tokens == want);
          CHECK(load(hk, mem, key, edited) == want);
          CHECK(mem.first_wrong(7, want) == want);
        }
        REQUIRE(kv.close() == errc::ok);
      }
      {  // restart: the SSD copy serves the same bytes
        store kv(config_for(m, dir.str()));
        hooks hk(kv, copier, hc);
        CHECK(load(hk, mem, key, toks) == n2);
        CHECK(mem.first_wrong(7, n2) == n2);
        // Truncation: drop two blocks after a one-block sink; the rest moves back.
        truncation_plan plan{};
        plan.needed = true;
        plan.history = n2;
        plan.sink = T;
        plan.drop = 2 * T;
        plan.kept = n2 - 2 * T;
        plan.shift = -std::int64_t(2 * T);
        REQUIRE(kv.truncate(key, toks, plan) == errc::ok);
        std::vector<token_id> view(toks.begin(), toks.begin() + T);
        view.insert(view.end(), toks.begin() + 3 * T, toks.end());
        bool variant_other = false;
        for (const auto& k : g.groups) variant_other |= k.rotated_dims() && k.rope_variant != 0;
        if (variant_other) {
          // Gemma 3: the global layers' RoPE is not the configured one: refused, not guessed.
          load(hk, mem, key, view, errc::unsupported);
        } else {
          REQUIRE(load(hk, mem, key, view) == view.size());
          // Sink unchanged; moved tokens: non-rotated parts bitwise, rotated parts equal
          // to the stored keys rotated by the shift with the same spec.
          CHECK(mem.first_wrong(7, T) == T);
          rope_angles delta(*m.rope, 1);
          delta.fill(plan.shift, 0, 1);
          std::uint64_t bad = 0;
          for (std::uint32_t l = 0; l < g.num_layers; ++l) {
            const kv_group& k = g.group_of(l);
            const std::size_t hb = std::size_t(k.head_dim) * dtype_size(k.dtype);
            std::vector<std::byte> want(hb);
            for (std::uint64_t q = T; q < view.size(); q += 7)
              for (int side = 0; side < int(k.tensors()); ++side)
                for (std::uint32_t h = 0; h < k.num_kv_heads; ++h) {
                  attnstore::testing::fill_block(want, engine_memory::seed(7, l, side, q + 2 * T, h));
                  if (side == 0 && k.rotated_dims())
                    (void)rerotate(want.data() + std::size_t(k.rope_first()) * dtype_size(k.dtype), k.dtype, 1, 1, hb,
                                   hb, delta);
                  bad += std::memcmp(want.data(), mem.at(l, side, q, h), hb) != 0;
                }
          }
          CHECK(bad == 0);
        }
        REQUIRE(kv.close() == errc::ok);
      }
      {  // corruption: a flipped payload byte on SSD is a miss from that block on, never served
        const auto other = tokens_of(8, 4 * T);
        {
          store kv(config_for(m, dir.str()));
          hooks hk(kv, copier, hc);
          mem.fill(8, 0, 4 * T);
          save(hk, mem, {"tenant", "other"}, other, 0);
          REQUIRE(kv.close() == errc::ok);  // its blocks go to SSD
        }
        flip_payload_byte_of_block(dir.str(), g, 2);  // the newest block 2: this session's
        store kv(config_for(m, dir.str()));
        hooks hk(kv, copier, hc);
        const std::uint64_t got = load(hk, mem, {"tenant", "other"}, other, errc::checksum_error);
        CHECK(got == 2 * T);
        CHECK(mem.first_wrong(8, got) == got);
      }
    }
  }
}

TEST_CASE("geometry groups: the hooks carry a request's keys (LoRA, salt, image hashes) into saves and loads") {
  temp_dir dir("groups-keys");
  const auto m = models::gpt_oss_20b();
  store kv(config_for(m, dir.str()));
  const kv_geometry& g = kv.geometry();
  const std::uint32_t T = g.tokens_per_block;
  auto copier_owner = make_host_copy_backend();
  hooks hk(kv, *copier_owner, {});
  engine_memory mem(g, 8 * T);
  const auto toks = tokens_of(3, 6 * T);
  const media_span image{2 * T + 5, 40, hash128{11, 12}};
  const request_keys keys{.lora = "sql-adapter", .salt = "acme", .media = std::span(&image, 1)};
  const session_key key{"acme", "c1"};
  mem.fill(3, 0, toks.size());
  errc st;
  save_handle sh = hk.start_save(key, toks, 0, mem.target(), std::nullopt, &st, keys);
  REQUIRE(st == errc::ok);
  for (std::uint32_t l = 0; l < g.num_layers; ++l) REQUIRE(hk.save_layer(sh, l) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);

  CHECK(hk.lookup(key, toks, keys).tokens == toks.size());
  CHECK(hk.lookup(key, toks).tokens == 0);  // saved under keys: a plain request reuses nothing
  request_keys other = keys;
  other.lora = "chat-adapter";
  CHECK(hk.lookup(key, toks, other).tokens == 0);
  other = keys;
  other.salt = "globex";
  CHECK(hk.lookup(key, toks, other).tokens == 0);
  const media_span edited_image{2 * T + 5, 40, hash128{11, 13}};
  other = keys;
  other.media = std::span(&edited_image, 1);
  CHECK(hk.lookup(key, toks, other).tokens == 2 * T);  // reuse ends at the block the image starts in

  mem.scrub();
  load_info li = hk.start_load(key, toks, mem.target(), std::nullopt, other);
  REQUIRE(li.status == errc::ok);
  CHECK(li.tokens == 2 * T);
  for (std::uint32_t l = 0; l < g.num_layers; ++l) REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
  REQUIRE(hk.finish_load(li.handle) == errc::ok);
  CHECK(mem.first_wrong(3, 2 * T) == 2 * T);
  // Hostile keys: an image past the prompt is refused, nothing loaded or saved.
  const media_span outside{toks.size() + 10, 4, hash128{1, 2}};
  request_keys bad = keys;
  bad.media = std::span(&outside, 1);
  CHECK(hk.start_load(key, toks, mem.target(), std::nullopt, bad).status == errc::invalid_argument);
  CHECK(!hk.start_save(key, toks, 0, mem.target(), std::nullopt, &st, bad));
  CHECK(st == errc::invalid_argument);
}

TEST_CASE("geometry groups: a hybrid model (Qwen3-Next) resumes only at its state checkpoint, verified like KV") {
  temp_dir dir("groups-state");
  const auto m = models::qwen3_next_80b();
  const kv_geometry g = m.geometry.validated();
  const std::uint32_t T = g.tokens_per_block;
  auto copier_owner = make_host_copy_backend();
  copy_backend& copier = *copier_owner;
  engine_memory mem(g, 8 * T);
  const auto toks = tokens_of(5, 6 * T);
  const std::uint64_t n1 = 2 * T + 7, n2 = 4 * T + 3;
  const session_key key{"acme", "hybrid"};
  auto extended = [&](std::uint64_t n) { return prefix_and_one(toks, n); };
  {
    store kv(config_for(m, dir.str()));
    hooks hk(kv, copier, {});
    mem.fill(5, 0, toks.size());
    mem.fill_state(5, n1);
    save(hk, mem, key, std::span(toks).first(n1), 0);
    mem.fill_state(5, n2);
    save(hk, mem, key, std::span(toks).first(n2), n1);
    // The prompt extends the saved history: everything, the state at its end.
    CHECK(hk.lookup(key, extended(n2)).tokens == n2);
    CHECK(load(hk, mem, key, extended(n2)) == n2);
    CHECK(mem.first_wrong(5, n2) == n2);
    CHECK(mem.state_is(5, n2));
    // Anything else has no state to resume from (one checkpoint: the last turn's end):
    // a prompt that stops at the first turn, an edit inside the history, another salt.
    CHECK(hk.lookup(key, extended(n1)).tokens == 0);
    CHECK(load(hk, mem, key, extended(n1)) == 0);
    auto edited = extended(n2);
    edited[3 * T] ^= 1;
    CHECK(hk.lookup(key, edited).tokens == 0);
    CHECK(load(hk, mem, key, edited) == 0);
    const request_keys salted{.salt = "other"};
    CHECK(hk.lookup(key, extended(n2), salted).tokens == 0);
    REQUIRE(kv.close() == errc::ok);
  }
  {  // restart: both the attention blocks and the checkpoint come back from SSD
    store kv(config_for(m, dir.str()));
    hooks hk(kv, copier, {});
    mem.scrub();
    CHECK(load(hk, mem, key, extended(n2)) == n2);
    CHECK(mem.first_wrong(5, n2) == n2);
    CHECK(mem.state_is(5, n2));
    REQUIRE(kv.close() == errc::ok);
  }
  {  // a flipped byte in the checkpoint: nothing is resumed, nothing wrong is served
    const std::size_t slot = format::slot_bytes(g), hb = format::header_bytes(T);
    const int fd = ::open((dir.str() + "/blocks-0000.dat").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    std::vector<std::byte> area(hb);
    bool flipped = false;
    for (std::size_t s = 0; !flipped && ::pread(fd, area.data(), hb, off_t(s * slot)) == ssize_t(hb); ++s) {
      format::block_header h;
      // Block 10 exists only in the checkpoint (26 blocks; the history has 5).
      if (format::read_header(area.data(), hb, T, &h) != format::header_status::ok || h.block_index != 10) continue;
      char byte = 0;
      REQUIRE(::pread(fd, &byte, 1, off_t(s * slot + hb + 5000)) == 1);
      byte ^= 0x20;
      REQUIRE(::pwrite(fd, &byte, 1, off_t(s * slot + hb + 5000)) == 1);
      flipped = true;
    }
    ::close(fd);
    REQUIRE(flipped);
    store kv(config_for(m, dir.str()));
    hooks hk(kv, copier, {});
    mem.scrub();
    const std::uint64_t got = load(hk, mem, key, extended(n2), errc::checksum_error);
    CHECK(got == 0);
    // A new turn saves a new checkpoint, and the session resumes again.
    mem.fill(5, 0, toks.size());
    mem.fill_state(5, n2 + 5);
    save(hk, mem, key, std::span(toks).first(n2 + 5), 0);
    CHECK(load(hk, mem, key, extended(n2 + 5)) == n2 + 5);
    CHECK(mem.state_is(5, n2 + 5));
    // Closing the session drops its checkpoint too, and so does a bare store drop.
    REQUIRE(hk.close_session(key) == errc::ok);
    CHECK(kv.stats().sessions == 0);
    save(hk, mem, key, std::span(toks).first(n2 + 5), 0);
    CHECK(kv.stats().sessions == 2);  // the session and its checkpoint
    REQUIRE(kv.drop(key) == errc::ok);
    CHECK(kv.stats().sessions == 0);
    CHECK(kv.drop(key) == errc::not_found);
    // Offline too: `attnstore drop` erases the checkpoint's slots with the session's.
    save(hk, mem, key, std::span(toks).first(n2 + 5), 0);
    REQUIRE(kv.close() == errc::ok);
  }
  {
    const std::string cli = std::string(ATTNSTORE_CLI) + " drop " + dir.str() + " --session acme/hybrid > /dev/null";
    REQUIRE(std::system(cli.c_str()) == 0);
    store kv(config_for(m, dir.str()));
    CHECK(kv.stats().sessions == 0);
  }
}

TEST_CASE("geometry groups: window_tails keeps a sliding window only before the checkpoint, and saves its bytes") {
  temp_dir dir("groups-tails"), dir_full("groups-tails-full");
  auto m = models::gpt_oss_20b();
  const kv_geometry full_g = m.geometry.validated();
  m.geometry.window_tails = true;
  m.geometry.tokens_per_block = full_g.tokens_per_block;  // same blocks, fewer layers in them
  const kv_geometry g = m.geometry.validated();
  CHECK(g.block_bytes() * 2 == full_g.block_bytes());  // half of gpt-oss's layers are window layers
  CHECK(g.checkpoint_bytes() == 12ull * 2 * 128 * 8 * 64 * 2);
  CHECK(g.describe() != full_g.describe());  // another model id: another layout
  const std::uint32_t T = g.tokens_per_block;
  auto copier_owner = make_host_copy_backend();
  copy_backend& copier = *copier_owner;
  engine_memory mem(g, 40 * T);
  const auto toks = tokens_of(9, 36 * T);
  const std::uint64_t n1 = 12 * T + 5, n2 = 33 * T + 11;
  const session_key key{"acme", "long"};
  auto extended = [&](std::uint64_t n) { return prefix_and_one(toks, n); };
  std::uint64_t bytes_tails = 0, bytes_full = 0;
  {
    store kv(config_for(m, dir.str()));
    hooks hk(kv, copier, {});
    mem.fill(9, 0, toks.size());
    save(hk, mem, key, std::span(toks).first(n1), 0);
    save(hk, mem, key, std::span(toks).first(n2), n1);
    CHECK(hk.lookup(key, extended(n2)).tokens == n2);
    CHECK(load(hk, mem, key, extended(n2)) == n2);
    const auto [wrong, leaked] = mem.tails_wrong(9, n2);
    CHECK(wrong == 0);   // full layers everywhere, window layers in their last window
    CHECK(leaked == 0);  // window layers before it were neither stored nor loaded
    // Resume points are the checkpoint only: the first turn's end and edits reuse nothing.
    CHECK(hk.lookup(key, extended(n1)).tokens == 0);
    auto edited = extended(n2);
    edited[n2 - 3] ^= 1;  // inside the last window
    CHECK(hk.lookup(key, edited).tokens == 0);
    CHECK(load(hk, mem, key, edited) == 0);
    bytes_tails = kv.stats().dram_used_bytes;
    REQUIRE(kv.close() == errc::ok);
  }
  {  // restart: the tail comes back from SSD with the blocks
    store kv(config_for(m, dir.str()));
    hooks hk(kv, copier, {});
    CHECK(load(hk, mem, key, extended(n2)) == n2);
    const auto [wrong, leaked] = mem.tails_wrong(9, n2);
    CHECK(wrong == 0);
    CHECK(leaked == 0);
    // A short session (under one window) keeps all of its window rows.
    const session_key small{"acme", "short"};
    mem.fill(9, 0, 50);
    save(hk, mem, small, std::span(toks).first(50), 0);
    mem.scrub();
    load_info li = hk.start_load(small, extended(50), mem.target());
    REQUIRE(li.tokens == 50);
    for (std::uint32_t l = 0; l < g.num_layers; ++l) REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
    REQUIRE(hk.finish_load(li.handle) == errc::ok);
    CHECK(mem.first_wrong(9, 50) == 50);
  }
  {  // the same history without window_tails, for the bytes it takes
    models::real_model plain = models::gpt_oss_20b();
    store kv(config_for(plain, dir_full.str()));
    hooks hk(kv, copier, {});
    engine_memory mem_full(full_g, 40 * T);
    mem_full.fill(9, 0, toks.size());
    save(hk, mem_full, key, std::span(toks).first(n1), 0);
    save(hk, mem_full, key, std::span(toks).first(n2), n1);
    bytes_full = kv.stats().dram_used_bytes;
  }
  INFO("DRAM bytes with window tails " << bytes_tails << ", every layer in full " << bytes_full);
  CHECK(bytes_tails < bytes_full * 6 / 10);  // 34 blocks of half the size plus a 3 MiB checkpoint
}
