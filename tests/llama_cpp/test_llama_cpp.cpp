// attnstore behind llama.cpp (include/attnstore/llama_cpp.hpp), on a generated tiny
// Llama: restored KV gives bitwise the logits of KV that never left the context,
// batched the same way; edits reuse exactly up to the edit; restarts, corruption and
// model changes never restore wrong KV; other sequences are untouched.
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>

#include "attnstore/format/block_header.hpp"
#include "attnstore/llama_cpp.hpp"
#include "chat_engine.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::temp_dir;
namespace lc = attnstore::llama_cpp;

namespace {

constexpr std::uint32_t block_tokens = 16;

llama_chat::model_spec tiny_spec(std::uint64_t seed = 1) {
  llama_chat::model_spec s;
  s.embd = 128;
  s.layers = 3;
  s.heads = 4;
  s.kv_heads = 2;
  s.ff = 256;
  s.vocab = 300;
  s.ctx_train = 4096;
  s.seed = seed;
  return s;
}

std::string model_path(std::uint64_t seed = 1) {
  static const std::string dir = [] {
    const char* base = std::getenv("ATTNSTORE_TEST_TMP");
    std::string d = std::string(base && *base ? base : "/tmp") + "/llama-models";
    std::filesystem::create_directories(d);
    return d;
  }();
  const auto spec = tiny_spec(seed);
  return llama_chat::ensure_model(dir + "/" + spec.name() + ".gguf", spec);
}

struct model_deleter {
  void operator()(llama_model* m) const { llama_model_free(m); }
};
struct context_deleter {
  void operator()(llama_context* c) const { llama_free(c); }
};
using model_ptr = std::unique_ptr<llama_model, model_deleter>;
using context_ptr = std::unique_ptr<llama_context, context_deleter>;

model_ptr load(const std::string& path) {
  static bool once = [] {
    llama_chat::quiet_llama_logs();
    llama_backend_init();
    return true;
  }();
  (void)once;
  llama_model_params mp = llama_model_default_params();
  model_ptr m(llama_model_load_from_file(path.c_str(), mp));
  REQUIRE(m);
  return m;
}

struct setup {
  llama_chat::context_options opts;
  std::string path = model_path();
  model_ptr model = load(path);
  llama_context_params params() const { return llama_chat::context_params(opts); }
  /// A new context, or null: no Catch assertion, for threads other than the test's (Catch
  /// is not thread-safe).
  context_ptr context_quiet() const { return context_ptr(llama_init_from_model(model.get(), params())); }
  context_ptr context() const {
    context_ptr c = context_quiet();
    REQUIRE(c);
    return c;
  }
  lc::model_binding binding() const { return lc::bind(model.get(), params(), path, block_tokens); }
};

store_config config_for(const lc::model_binding& b, const std::string& ssd_dir = "") {
  store_config c;
  b.configure(c);
  c.dram_bytes = 64ull << 20;
  c.background_thread = false;
  c.prefetch = false;
  c.demote_low_watermark = 0;
  if (!ssd_dir.empty()) {
    c.ssd_directory = ssd_dir;
    c.ssd_bytes = 64ull << 20;
    c.require_direct_io = false;  // tmpfs in some CI containers
  }
  return c;
}

/// A conversation: its tokens so far and where each turn's segment started.
struct conversation {
  std::vector<llama_token> tokens;
  std::vector<std::size_t> cuts;
  std::uint64_t seed;
  void add_turn(const std::vector<llama_token>& reply, std::size_t user_tokens, std::uint32_t vocab) {
    cuts.push_back(tokens.size());
    tokens.insert(tokens.end(), reply.begin(), reply.end());
    const auto user = llama_chat::random_tokens(seed * 131 + cuts.size(), user_tokens, vocab);
    tokens.insert(tokens.end(), user.begin(), user.end());
  }
};

/// Decodes tokens[from, end) and a reply of `reply_len` greedy tokens, returns every
/// step's logits (concatenated) and the reply; the reply's cells are removed after.
struct step_out {
  std::vector<float> logits;
  std::vector<llama_token> reply;
  const char* failed = nullptr;  // the decode that failed (run_turn_quiet), null when none did
};
/// run_turn with no Catch assertion, for threads other than the test's (Catch is not
/// thread-safe): a failed decode ends the turn there and is named in `failed`.
step_out run_turn_quiet(llama_context* ctx, llama_seq_id seq, const conversation& c, std::size_t from,
                        std::size_t reply_len) {
  step_out out;
  const std::size_t end = c.tokens.size();
  if (!llama_chat::decode_span(ctx, seq, c.tokens, from, end, c.cuts)) {
    out.failed = "decode_span";
    return out;
  }
  std::vector<float> l;
  llama_token t = llama_chat::greedy(ctx, &l);
  out.logits.insert(out.logits.end(), l.begin(), l.end());
  for (std::size_t i = 0; i < reply_len; ++i) {
    out.reply.push_back(t);
    if (i + 1 == reply_len) break;
    if (!llama_chat::decode_one(ctx, seq, t, llama_pos(end + i))) {
      out.failed = "decode_one";
      return out;
    }
    t = llama_chat::greedy(ctx, &l);
    out.logits.insert(out.logits.end(), l.begin(), l.end());
  }
  llama_memory_seq_rm(llama_get_memory(ctx), seq, llama_pos(end), -1);
  return out;
}
step_out run_turn(llama_context* ctx, llama_seq_id seq, const conversation& c, std::size_t from,
                  std::size_t reply_len) {
  step_out out = run_turn_quiet(ctx, seq, c, from, reply_len);
  INFO("failed: " << (out.failed ? out.failed : "none"));
  REQUIRE(out.failed == nullptr);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

void flip_first_block_payload(const std::string& dir, const kv_geometry& g) {
  const std::size_t slot = format::slot_bytes(g), hb = format::header_bytes(g.tokens_per_block);
  int fd = ::open((dir + "/blocks-0000.dat").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  std::vector<std::byte> area(hb);
  int flipped = 0;
  for (std::size_t s = 0; ::pread(fd, area.data(), hb, off_t(s * slot)) == ssize_t(hb); ++s) {
    format::block_header h;
    if (format::read_header(area.data(), hb, g.tokens_per_block, &h) != format::header_status::ok || h.block_index != 0)
      continue;
    char byte = 0;
    const off_t at = off_t(s * slot + hb + 1000);
    REQUIRE(::pread(fd, &byte, 1, at) == 1);
    byte ^= 0x04;
    REQUIRE(::pwrite(fd, &byte, 1, at) == 1);
    ++flipped;
  }
  ::close(fd);
  REQUIRE(flipped > 0);
}

constexpr std::size_t first_prompt = 150, user_len = 23, reply_len = 6;
const session_key key{"tenant", "conversation-1"};

}  // namespace

TEST_CASE("llama.cpp: restored turns give bitwise the logits of resident KV", "[llama_cpp]") {
  const bool flash = GENERATE(true, false);
  const ggml_type kv_type = GENERATE(GGML_TYPE_F16, GGML_TYPE_Q8_0);
  const bool ssd = GENERATE(false, true);
  if (!flash && kv_type == GGML_TYPE_Q8_0) return;  // llama.cpp: quantized V needs flash attention
  CAPTURE(flash, ggml_type_name(kv_type), ssd);

  setup s;
  s.opts.flash_attn = flash;
  s.opts.kv_type = kv_type;
  s.opts.n_ctx = 1024;
  const lc::model_binding b = s.binding();
  temp_dir dir("llama");
  store kv(config_for(b, ssd ? dir.str() : ""));
  context_ptr resident = s.context(), restored = s.context();
  lc::session_cache cache(kv, restored.get(), b, /*scratch_seq=*/1);

  conversation c{llama_chat::random_tokens(7, first_prompt, 300), {}, 7};
  c.cuts.push_back(0);
  std::vector<llama_token> reply;
  std::size_t history = 0;
  for (int turn = 0; turn < 6; ++turn) {
    if (turn > 0) c.add_turn(reply, user_len, 300);
    // Resident: the context keeps its KV from turn to turn.
    step_out want = run_turn(resident.get(), 0, c, history, reply_len);
    // Restored: the context starts empty every turn.
    llama_memory_clear(llama_get_memory(restored.get()), true);
    if (ssd && turn > 0) {
      const lookup_result where =
          kv.lookup(key, std::span(reinterpret_cast<const token_id*>(c.tokens.data()), history));
      REQUIRE(where.tokens == history);
      REQUIRE(where.dram_blocks == 0);  // served from SSD
    }
    const lc::restore_result r = cache.restore(key, c.tokens, 0);
    REQUIRE(r.status == errc::ok);
    REQUIRE(r.tokens == history);
    step_out got = run_turn(restored.get(), 0, c, r.tokens, reply_len);
    REQUIRE(same_bits(got.logits, want.logits));
    REQUIRE(got.reply == want.reply);
    REQUIRE(cache.save(key, c.tokens, 0) == errc::ok);
    if (ssd) REQUIRE(kv.demote(key) == errc::ok);
    history = c.tokens.size();
    reply = want.reply;
  }
  // Only new blocks were read out: every turn's cells, not the whole history again.
  const std::size_t turns_tokens = c.tokens.size();
  CHECK(cache.stats().extracted_cells < turns_tokens + 6 * block_tokens);
}

TEST_CASE("llama.cpp: an edit mid-history reuses exactly up to the edited token", "[llama_cpp]") {
  setup s;
  s.opts.n_ctx = 1024;
  const lc::model_binding b = s.binding();
  store kv(config_for(b));
  context_ptr ctx = s.context(), ref = s.context();
  lc::session_cache cache(kv, ctx.get(), b, 1);

  conversation c{llama_chat::random_tokens(11, first_prompt, 300), {0}, 11};
  step_out first = run_turn(ctx.get(), 0, c, 0, reply_len);
  REQUIRE(cache.save(key, c.tokens, 0) == errc::ok);
  c.add_turn(first.reply, user_len, 300);

  const std::size_t edit = GENERATE(std::size_t(37), std::size_t(48), std::size_t(1), std::size_t(149));
  CAPTURE(edit);
  conversation edited = c;
  edited.tokens[edit] = edited.tokens[edit] == 5 ? 6 : 5;
  edited.cuts.push_back(edit);

  llama_memory_clear(llama_get_memory(ctx.get()), true);
  const lc::restore_result r = cache.restore(key, edited.tokens, 0);
  REQUIRE(r.status == errc::ok);
  REQUIRE(r.tokens == edit);
  step_out got = run_turn(ctx.get(), 0, edited, r.tokens, reply_len);

  // Reference: the original first segment decoded as it was, cut back to the edit,
  // then the edited rest: the same batching the restored prefix had.
  REQUIRE(llama_chat::decode_span(ref.get(), 0, c.tokens, 0, first_prompt, {0}));
  llama_memory_seq_rm(llama_get_memory(ref.get()), 0, llama_pos(edit), -1);
  step_out want = run_turn(ref.get(), 0, edited, edit, reply_len);
  REQUIRE(same_bits(got.logits, want.logits));
}

TEST_CASE("llama.cpp: restart from SSD, and a flipped bit recomputes instead of restoring", "[llama_cpp]") {
  setup s;
  s.opts.n_ctx = 1024;
  const lc::model_binding b = s.binding();
  temp_dir dir("llama-restart");
  conversation c{llama_chat::random_tokens(13, first_prompt, 300), {0}, 13};
  std::vector<step_out> want;
  {
    context_ptr resident = s.context();
    std::vector<llama_token> reply;
    std::size_t history = 0;
    for (int turn = 0; turn < 4; ++turn) {
      if (turn > 0) c.add_turn(reply, user_len, 300);
      want.push_back(run_turn(resident.get(), 0, c, history, reply_len));
      reply = want.back().reply;
      history = c.tokens.size();
    }
  }
  // Save the first three turns' history through a store that is then closed.
  conversation three = c;
  three.tokens.resize(c.cuts[3]);
  {
    store kv(config_for(b, dir.str()));
    context_ptr ctx = s.context();
    lc::session_cache cache(kv, ctx.get(), b, 1);
    REQUIRE(llama_chat::decode_span(ctx.get(), 0, three.tokens, 0, three.tokens.size(), three.cuts));
    REQUIRE(cache.save(key, three.tokens, 0) == errc::ok);
  }
  SECTION("restart: the fourth turn restores the history and matches") {
    store kv(config_for(b, dir.str()));
    context_ptr ctx = s.context();
    lc::session_cache cache(kv, ctx.get(), b, 1);
    const lc::restore_result r = cache.restore(key, c.tokens, 0);
    REQUIRE(r.status == errc::ok);
    REQUIRE(r.tokens == c.cuts[3]);
    step_out got = run_turn(ctx.get(), 0, c, r.tokens, reply_len);
    REQUIRE(same_bits(got.logits, want[3].logits));
  }
  SECTION("a bit flipped in the first block: nothing restored, recompute gives the same replies") {
    flip_first_block_payload(dir.str(), b.geometry.validated());
    store kv(config_for(b, dir.str()));
    context_ptr ctx = s.context();
    lc::session_cache cache(kv, ctx.get(), b, 1);
    const lc::restore_result r = cache.restore(key, c.tokens, 0);
    REQUIRE(r.status == errc::checksum_error);
    REQUIRE(r.tokens == 0);
    REQUIRE(llama_memory_seq_pos_max(llama_get_memory(ctx.get()), 0) == -1);
    step_out got = run_turn(ctx.get(), 0, c, r.tokens, reply_len);
    REQUIRE(same_bits(got.logits, want[3].logits));
    REQUIRE(got.reply == want[3].reply);
  }
}

TEST_CASE("llama.cpp: another model, KV type or attention layout restores nothing", "[llama_cpp]") {
  setup s;
  s.opts.n_ctx = 512;
  const lc::model_binding base = s.binding();
  temp_dir dir("llama-identity");
  {
    store kv(config_for(base, dir.str()));
    context_ptr ctx = s.context();
    lc::session_cache cache(kv, ctx.get(), base, 1);
    const auto toks = llama_chat::random_tokens(3, 100, 300);
    REQUIRE(llama_chat::decode_span(ctx.get(), 0, toks, 0, toks.size(), {}));
    REQUIRE(cache.save(key, toks, 0) == errc::ok);
  }
  setup other_weights;
  other_weights.path = model_path(2);  // same shape, other weights
  other_weights.model = load(other_weights.path);
  other_weights.opts = s.opts;
  setup q8 = {};
  q8.opts = s.opts;
  q8.opts.kv_type = GGML_TYPE_Q8_0;
  setup no_flash = {};
  no_flash.opts = s.opts;
  no_flash.opts.flash_attn = false;
  for (setup* o : {&other_weights, &q8, &no_flash}) {
    const lc::model_binding b = o->binding();
    CAPTURE(b.fingerprint);
    REQUIRE(b.fingerprint != base.fingerprint);
    // The store written under the first fingerprint refuses to open under this one...
    REQUIRE_THROWS_AS(store(config_for(b, dir.str())), std::runtime_error);
    // ...and a store of this fingerprint is refused by a cache bound to the other.
    store mine(config_for(b));
    context_ptr ctx = o->context();
    REQUIRE_THROWS_AS(lc::session_cache(mine, ctx.get(), base, 1), std::invalid_argument);
  }
  // Unchanged settings: the same fingerprint.
  REQUIRE(s.binding().fingerprint == base.fingerprint);
}

TEST_CASE("llama.cpp: a restore into one sequence leaves the others untouched", "[llama_cpp]") {
  setup s;
  s.opts.n_ctx = 1024;
  s.opts.seqs = 3;  // 0: conversation A, 1: B restored, 2: scratch
  const lc::model_binding b = s.binding();
  store kv(config_for(b));
  const session_key key_b{"tenant", "conversation-b"};
  conversation conv_b{llama_chat::random_tokens(21, 120, 300), {0}, 21};
  {
    context_ptr ctx = s.context();
    lc::session_cache cache(kv, ctx.get(), b, 2);
    REQUIRE(llama_chat::decode_span(ctx.get(), 1, conv_b.tokens, 0, conv_b.tokens.size(), conv_b.cuts));
    REQUIRE(cache.save(key_b, conv_b.tokens, 1) == errc::ok);
  }
  // The reference decodes B into sequence 1 where the other context restores it, so
  // both hold the same cells; A's logits must not see the difference.
  context_ptr decoded = s.context(), restored = s.context();
  lc::session_cache cache(kv, restored.get(), b, 2);
  conversation a{llama_chat::random_tokens(23, 90, 300), {0}, 23};
  std::vector<llama_token> reply;
  std::size_t history = 0;
  conversation b_next = conv_b;
  b_next.add_turn({}, 10, 300);
  auto state_of = [](llama_context* ctx, llama_seq_id seq) {
    std::vector<std::uint8_t> blob(llama_state_seq_get_size(ctx, seq));
    REQUIRE(llama_state_seq_get_data(ctx, blob.data(), blob.size(), seq) == blob.size());
    return blob;
  };
  for (int turn = 0; turn < 5; ++turn) {
    CAPTURE(turn);
    if (turn > 0) a.add_turn(reply, user_len, 300);
    llama_memory_seq_rm(llama_get_memory(decoded.get()), 1, -1, -1);
    REQUIRE(llama_chat::decode_span(decoded.get(), 1, conv_b.tokens, 0, conv_b.tokens.size(), conv_b.cuts));
    run_turn(decoded.get(), 1, b_next, conv_b.tokens.size(), 2);
    step_out want = run_turn(decoded.get(), 0, a, history, reply_len);

    const auto a_before = state_of(restored.get(), 0);
    const lc::restore_result r = cache.restore(key_b, b_next.tokens, 1);
    REQUIRE(r.tokens == conv_b.tokens.size());
    REQUIRE(state_of(restored.get(), 0) == a_before);  // the restore did not touch A's cells
    run_turn(restored.get(), 1, b_next, r.tokens, 2);
    step_out got = run_turn(restored.get(), 0, a, history, reply_len);
    REQUIRE(same_bits(got.logits, want.logits));
    history = a.tokens.size();
    reply = want.reply;
  }
}

TEST_CASE("llama.cpp: hostile input is refused, not acted on", "[llama_cpp]") {
  setup s;
  s.opts.n_ctx = 512;
  const lc::model_binding b = s.binding();
  store kv(config_for(b));
  context_ptr ctx = s.context();
  lc::session_cache cache(kv, ctx.get(), b, 1);
  const auto toks = llama_chat::random_tokens(5, 60, 300);
  REQUIRE(cache.restore(key, toks, 1).status == errc::invalid_argument);  // the scratch sequence
  REQUIRE(cache.restore(key, toks, 7).status == errc::invalid_argument);  // no such sequence
  REQUIRE(cache.restore(key, toks, -1).status == errc::invalid_argument);
  std::vector<llama_token> negative = toks;
  negative[3] = -5;
  REQUIRE(cache.restore(key, negative, 0).status == errc::invalid_argument);
  // A save must describe exactly what the sequence holds.
  REQUIRE(llama_chat::decode_span(ctx.get(), 0, toks, 0, 40, {}));
  REQUIRE(cache.save(key, toks, 0) == errc::invalid_argument);  // 60 tokens claimed, 40 held
  REQUIRE(cache.save(key, std::span(toks).first(40), 0) == errc::ok);
  REQUIRE(cache.restore(key, toks, 0).tokens == 40);
  REQUIRE_THROWS_AS(lc::session_cache(kv, ctx.get(), b, 9), std::invalid_argument);
  llama_context_params auto_fa = s.params();
  auto_fa.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
  REQUIRE_THROWS_AS(lc::bind(s.model.get(), auto_fa, s.path, block_tokens), std::invalid_argument);
}

TEST_CASE("llama.cpp: two engines racing on one session get only KV of their own tokens", "[llama_cpp]") {
  // Two contexts on two threads save and restore under the same session key. Their
  // conversations share a first segment and then differ: whatever either finds must be
  // the KV of its own tokens. From the second round on a restore may end inside a turn
  // (its own earlier save holds the whole turn), so the last token is decoded alone
  // and its KV is batched differently from the reference: equal within 0.05 (f16 KV rounds the
  // difference up to a few ulps), and the
  // same greedy replies. KV of the other conversation would be off by O(1).
  setup s;
  s.opts.n_ctx = 1024;
  s.opts.threads = 1;
  const lc::model_binding b = s.binding();
  store_config cfg = config_for(b);
  cfg.dram_bytes = 8ull << 20;  // tight: saves evict each other's blocks too
  store kv(cfg);
  const auto shared = llama_chat::random_tokens(31, 100, 300);
  constexpr int turns = 6;
  const float tolerance = std::getenv("DEBUG_RACE") ? 0.0f : 0.05f;

  // The threads make no Catch assertion (Catch is not thread-safe): a worker notes what
  // failed and stops; the test's thread checks after the join.
  struct worker {
    conversation conv;
    std::vector<step_out> want;
    std::uint64_t restored = 0, mismatches = 0;
    const char* failed = nullptr;  // the call that failed and stopped it, null when none did
  };
  worker w[2];
  for (int i = 0; i < 2; ++i) {
    w[i].conv = conversation{shared, {0}, std::uint64_t(40 + i)};
    context_ptr resident = s.context();
    std::vector<llama_token> reply;
    std::size_t history = 0;
    for (int turn = 0; turn < turns; ++turn) {
      if (turn > 0) w[i].conv.add_turn(reply, user_len, 300);
      w[i].want.push_back(run_turn(resident.get(), 0, w[i].conv, history, reply_len));
      reply = w[i].want.back().reply;
      history = w[i].conv.tokens.size();
    }
  }
  auto run = [&](worker& me) {
    context_ptr ctx = s.context_quiet();
    if (!ctx) {
      me.failed = "llama_init_from_model";
      return;
    }
    lc::session_cache cache(kv, ctx.get(), b, 1);
    for (int round = 0; round < 3; ++round)
      for (int turn = 0; turn < turns; ++turn) {
        conversation upto = me.conv;
        upto.tokens.resize(turn + 1 < turns ? me.conv.cuts[turn + 1] : me.conv.tokens.size());
        upto.cuts.resize(turn + 1);
        llama_memory_clear(llama_get_memory(ctx.get()), true);
        const lc::restore_result r = cache.restore(key, upto.tokens, 0);
        me.restored += r.tokens;
        step_out got = run_turn_quiet(ctx.get(), 0, upto, r.tokens, reply_len);
        if (got.failed) {
          me.failed = got.failed;
          return;
        }
        if (got.reply != me.want[turn].reply || max_diff(got.logits, me.want[turn].logits) > tolerance) {
          ++me.mismatches;
          if (std::getenv("DEBUG_RACE"))
            std::fprintf(stderr, "conv %llu round %d turn %d restored %u of %zu status %d reply %d diff %g\n",
                         (unsigned long long)me.conv.seed, round, turn, r.tokens, upto.tokens.size(), int(r.status),
                         int(got.reply == me.want[turn].reply), double(max_diff(got.logits, me.want[turn].logits)));
        }
        (void)cache.save(key, upto.tokens, 0);  // rejected or no_space under the race is fine
      }
  };
  std::thread t0(run, std::ref(w[0])), t1(run, std::ref(w[1]));
  t0.join();
  t1.join();
  for (const worker& x : w) {
    INFO("worker of conversation " << x.conv.seed << ": " << (x.failed ? x.failed : "nothing") << " failed");
    CHECK(x.failed == nullptr);
  }
  CHECK(w[0].mismatches == 0);
  CHECK(w[1].mismatches == 0);
  CHECK(w[0].restored + w[1].restored > 0);
}
