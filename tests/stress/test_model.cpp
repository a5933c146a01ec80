// Model-based randomized test of the store and the hooks: several engine threads run
// conversations through one store, and every byte the store hands back is compared with
// what a real model would have computed for the prompt that was asked.
//
// The oracle. A token's K/V bytes are a function of the WHOLE token prefix up to and
// including it (a running 64-bit hash over the token ids), of the layer, K or V, the head
// and the element: stale KV (an older history of the session), foreign KV (another
// session's), torn or never-copied memory all differ from it. Keys that a truncation moved
// by `shift` positions are R(shift) of the oracle keys (RoPE, neox), compared to f16
// precision; everything else is compared bit for bit.
//
// Request keys: a session's history is computed under one of three adapters (no keys, or
// a LoRA adapter and a salt each); a turn sometimes switches adapter (nothing reused, the
// whole view saved under the new keys) and a read sometimes asks under another adapter
// (nothing may be served). Each adapter's prefix hashes start from their own root, so KV
// served across adapters is wrong in every byte.
//
// The model. Each session has its history (token ids) and, per position, the prefix hash
// its KV was computed under and the shift it has moved by (non-zero only after a
// truncation). Sessions are owned by one thread (the model is exact: reuse may never
// exceed the common prefix of the prompt and the history) or shared by all threads (the
// model is a hint; served bytes are checked against the prompt's own prefix hashes, which
// is exact because shared sessions are never truncated).
//
// Operations (random, per thread): turns through the hooks as docs/integration.md shows
// (start_load of the prompt into paged engine memory, start_save from where the load
// ended so a partial last block is re-saved, layer by layer; sometimes finish_save before
// finish_load), turns saved with store::put, edits mid-history (the save starts at the
// edit's block), reads through the hooks and store::get, lookups, demote(key) of any
// session, demote + flush (what write-back mode makes durable), drop, set_queue +
// run_background (prefetch promotions, watermark demotion), an injected clock with TTL
// expiry, truncation (plan_truncation + store::truncate; the truncated view is loaded
// through the hooks with a rope spec and its moved keys checked re-rotated), saves given
// up or finished with layers missing. Each thread has its own hooks and a host copy
// backend that delays and reorders copies (chaos), so a block freed under a load is
// usually reused before the load copies it.
//
// Restarts. Between epochs every thread stops, every session is read back and checked,
// and the store is destroyed and opened again on the same directory. What must come back
// (up to what lookup found before the restart: evictions and the TTL may drop sessions):
// with write_through every acknowledged commit; without it what demote + flush made
// durable; with close_flushes_dram (ATTNSTORE_MODEL_EXPECT_CLOSE=1, for when the store
// gains a close() that writes DRAM-only sessions) everything it held. A truncated view
// comes back up to its sink (store.hpp: "recovers only up to its first dropped block").
// The fault scenario first opens the store on a device whose reads fail now and then,
// checks what it serves, closes it, and expects everything back on the next, clean open.
//
// Checked on every byte: nothing served (hooks loads, store::get) differs from the oracle
// for the prompt asked; every position below the reported reuse (load_info.tokens,
// get_result.tokens) is checked, so an over-reported count shows up as bytes that were
// never copied; an owned session never reuses past the common prefix (lookup, load, get);
// return codes are the documented ones. A wrong byte is reported with the session,
// position, block, layer, K/V, head, element, the operation, a diagnosis (whose KV it
// really is: another session's, a stale history of the same one, never written, torn)
// and the last events of the session and of all threads. Counters go to one summary line.
//
// Knobs: ATTNSTORE_MODEL_OPS=N operations per thread per scenario (default 1200; 600
// under a sanitizer); ATTNSTORE_MODEL_SEED=S; ATTNSTORE_MODEL_EXPECT_CLOSE=1;
// ATTNSTORE_MODEL_AVOID=bits (triage only: leaves out one way for a block under a load
// to be freed, see avoid_bits). Every store and hooks call goes through `store_api`
// (and valid(), no_save(), close_store()): the API is changing.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "attnstore/hooks.hpp"
#include "attnstore/io/fault_device.hpp"
#include "attnstore/store.hpp"
#include "attnstore/truncate.hpp"
#include "support/env.hpp"
#include "support/kv_data.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::mix;
using attnstore::testing::temp_dir;

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define ATTNSTORE_MODEL_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define ATTNSTORE_MODEL_SANITIZED 1
#endif
#endif
#ifndef ATTNSTORE_MODEL_SANITIZED
#define ATTNSTORE_MODEL_SANITIZED 0
#endif

namespace {

// ---------------------------------------------------------------- sizes

constexpr std::uint32_t n_layers = 4, n_heads = 2, head_dim = 64, tpb = 16, page_tokens = 8;
const kv_geometry geom{n_layers, n_heads, head_dim, dtype::f16, tpb};  // 32 KiB blocks
constexpr std::size_t row_bytes = head_dim * 2;                        // one head of K or V, f16
constexpr std::size_t context_limit = 192;                             // history + new tokens, at most
constexpr std::size_t max_new_tokens = 40;
constexpr std::size_t max_prompt = context_limit + max_new_tokens;
constexpr std::uint32_t max_blocks = std::uint32_t((max_prompt + tpb - 1) / tpb);
constexpr std::uint32_t engine_pages = std::uint32_t((max_prompt + page_tokens - 1) / page_tokens) + 3;
constexpr unsigned n_threads = 4, owned_per_thread = 3, n_shared = 4;
constexpr std::uint64_t ms = 1000000;  // clock units (ns)
constexpr std::uint64_t no_cap = std::numeric_limits<std::uint64_t>::max();
const rope_spec model_rope{rope_style::neox, head_dim};

using attnstore::testing::env_u64;

// After a restart, are DRAM-only sessions expected back? Yes: store::close() (called by
// close_store before each restart) writes them to SSD.
constexpr bool close_flushes_dram = true;
bool expect_close_flush() { return close_flushes_dram || env_u64("ATTNSTORE_MODEL_EXPECT_CLOSE", 0) != 0; }

// ---------------------------------------------------------------- the oracle

/// What a position's KV was computed from: the prefix hash, and how far a truncation
/// moved it since (its keys then are R(shift) of the computed ones).
struct kv_desc {
  std::uint64_t hash = 0;
  std::int64_t shift = 0;
};
constexpr std::uint64_t root_hash = 0x243F6A8885A308D3ull;
/// Request keys (issue 14): a session's turns run under adapter 0 (no keys), 1 or 2 (a
/// LoRA adapter each, and a salt). KV computed under one adapter is another function of
/// the prefix: the oracle starts each adapter's running hash from its own root, so KV
/// served across adapters differs from the oracle in every byte.
constexpr std::uint8_t adapters = 3;
inline std::uint64_t root_of(std::uint8_t adapter) {
  return adapter ? mix(root_hash + 0x9E3779B97F4A7C15ull * adapter) : root_hash;
}
inline const request_keys& keys_of(std::uint8_t adapter) {
  static const request_keys table[adapters] = {
      {}, {.lora = "adapter-a", .salt = "salt-1"}, {.lora = "adapter-b", .salt = "salt-1"}};
  return table[adapter % adapters];
}
inline std::uint64_t next_hash(std::uint64_t prev, token_id t) {
  return mix(prev ^ (std::uint64_t(t) * 0x9E3779B97F4A7C15ull + 0x7F4A7C15ull));
}

/// One head of K (side 0) or V (side 1) of one layer: head_dim f16 values in +-[2^-6, 1).
inline void oracle_row(std::uint64_t hash, std::uint32_t layer, int side, std::uint32_t head, std::uint16_t* out) {
  std::uint64_t s = mix(hash ^ (0xD1B54A32D192ED03ull * (1 + (layer * 2 + std::uint32_t(side)) * n_heads + head)));
  for (std::uint32_t i = 0; i < head_dim; i += 4) {
    s = mix(s);
    for (int j = 0; j < 4; ++j) {
      const std::uint16_t r = std::uint16_t(s >> (16 * j));
      out[i + j] = std::uint16_t(((r & 1u) << 15) | ((9u + ((r >> 1) & 31u) % 6u) << 10) | (r >> 6));
    }
  }
}

inline double half_to_double(std::uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0    ? std::ldexp(double(m), -24)
                   : e == 31 ? (m ? std::nan("") : std::numeric_limits<double>::infinity())
                             : std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

const std::vector<double>& inv_freq() {
  static const std::vector<double> f = [] {
    std::vector<double> v(head_dim / 2);
    for (std::uint32_t i = 0; i < head_dim / 2; ++i) v[i] = std::pow(10000.0, -2.0 * double(i) / double(head_dim));
    return v;
  }();
  return f;
}

/// -1 when `got` holds what the oracle says for (d, layer, side, head), else the first
/// element that differs. Moved keys: R(shift) of the oracle's, to f16 precision.
inline int check_row(const std::byte* got, const kv_desc& d, std::uint32_t layer, int side, std::uint32_t head) {
  std::uint16_t want[head_dim], g[head_dim];
  oracle_row(d.hash, layer, side, head, want);
  if (side == 1 || d.shift == 0) {
    if (std::memcmp(got, want, row_bytes) == 0) return -1;
    std::memcpy(g, got, row_bytes);
    for (std::uint32_t i = 0; i < head_dim; ++i)
      if (g[i] != want[i]) return int(i);
    return -1;
  }
  std::memcpy(g, got, row_bytes);
  const auto& inv = inv_freq();
  constexpr std::uint32_t half = head_dim / 2;
  for (std::uint32_t i = 0; i < half; ++i) {
    const double a = double(d.shift) * inv[i];
    const double x0 = half_to_double(want[i]), x1 = half_to_double(want[i + half]);
    const double e0 = x0 * std::cos(a) - x1 * std::sin(a), e1 = x0 * std::sin(a) + x1 * std::cos(a);
    if (!(std::fabs(half_to_double(g[i]) - e0) <= 4e-3)) return int(i);
    if (!(std::fabs(half_to_double(g[i + half]) - e1) <= 4e-3)) return int(i + half);
  }
  return -1;
}

// ---------------------------------------------------------------- every store and hooks call

/// The store and hooks calls the test makes, in one place: load_handle/save_handle are
/// becoming distinct types with an explicit operator bool, acquire/release a lease API
/// (the test never calls them; the hooks do), and the store gains close().
template <class Handle>
bool valid(const Handle& h) {
  return static_cast<bool>(h);
}
/// An empty save handle (later: save_handle{}).
inline save_handle no_save() { return save_handle{}; }

/// Closes a store before it is destroyed, when the store has close(); returns what
/// close() said (ok when it has none).
template <class Store>
errc close_store(std::unique_ptr<Store>& st) {
  errc e = errc::ok;
  if constexpr (requires(Store & s) { s.close(); }) e = st->close();
  st.reset();
  return e;
}

struct store_api {
  store& st;
  hooks& hk;
  lookup_result lookup(const session_key& k, std::span<const token_id> prompt, const request_keys& keys) {
    return st.lookup(k, prompt, {}, keys);
  }
  get_result get(const session_key& k, std::span<const token_id> prompt, std::uint32_t first, std::uint32_t count,
                 std::span<std::byte> out, const request_keys& keys) {
    return st.get(k, prompt, first, count, out, keys);
  }
  errc put(const session_key& k, std::span<const token_id> toks, std::uint32_t first, std::span<const std::byte> b,
           const request_keys& keys) {
    return st.put(k, toks, first, b, keys);
  }
  load_info start_load(const session_key& k, std::span<const token_id> prompt, const kv_target& t,
                       const request_keys& keys) {
    return hk.start_load(k, prompt, t, std::nullopt, keys);
  }
  errc wait_layer(load_info& li, std::uint32_t layer) { return hk.wait_layer(li.handle, layer); }
  errc finish_load(load_info& li) { return hk.finish_load(li.handle); }
  save_handle start_save(const session_key& k, std::span<const token_id> toks, std::uint64_t from, const kv_source& s,
                         errc* status, const request_keys& keys) {
    return hk.start_save(k, toks, from, s, std::nullopt, status, keys);
  }
  errc save_layer(save_handle& h, std::uint32_t layer) { return hk.save_layer(h, layer); }
  errc finish_save(save_handle& h) { return hk.finish_save(h); }
  void abort_save(save_handle& h) { hk.abort_save(h); }
  errc drop(const session_key& k) { return st.drop(k); }
  errc demote(const session_key& k) { return st.demote(k); }
  errc flush() { return st.flush(); }
  errc truncate(const session_key& k, std::span<const token_id> history, const truncation_plan& p) {
    return st.truncate(k, history, p);
  }
  void set_queue(std::span<const session_key> keys) { hk.set_queue(keys); }
  std::uint32_t run_background() { return st.run_background(); }
};

// ---------------------------------------------------------------- engine memory

/// Paged engine KV memory, [page][token][head][dim] per layer and K/V, pages of 8 tokens
/// (blocks are 16) in a scattered page table, optionally with padded heads.
struct engine_memory {
  std::size_t head_stride, token_stride, page_stride, layer_stride;
  std::vector<std::byte> k, v;
  std::vector<std::byte*> kb, vb;
  std::vector<std::uint32_t> table;
  kv_layout layout{};
  engine_memory(std::size_t head_pad, std::mt19937_64& rng) {
    head_stride = row_bytes + head_pad;
    token_stride = head_stride * n_heads;
    page_stride = token_stride * page_tokens;
    layer_stride = page_stride * engine_pages;
    k.assign(layer_stride * n_layers, std::byte{0xEE});
    v.assign(k.size(), std::byte{0xEE});
    for (std::uint32_t l = 0; l < n_layers; ++l) {
      kb.push_back(k.data() + l * layer_stride);
      vb.push_back(v.data() + l * layer_stride);
    }
    table.resize(engine_pages);
    std::iota(table.begin(), table.end(), 0u);
    std::shuffle(table.begin(), table.end(), rng);
    layout = kv_layout{n_layers,     n_heads,     head_dim, dtype::f16, page_tokens,       page_stride,
                       token_stride, head_stride, kb,       vb,         memory_space::host};
  }
  std::byte* at(std::uint32_t l, int side, std::size_t pos, std::uint32_t h) {
    return (side ? vb : kb)[l] + table[pos / page_tokens] * page_stride + (pos % page_tokens) * token_stride +
           h * head_stride;
  }
  void scrub() {
    std::memset(k.data(), 0xEE, k.size());
    std::memset(v.data(), 0xEE, v.size());
  }
  kv_target target() const { return kv_target{&layout, table}; }
};

/// Row (layer, side, token t, head h) of a block in the store's layout.
inline std::byte* block_row(std::byte* block, std::uint32_t l, int side, std::uint32_t t, std::uint32_t h) {
  return block + l * geom.layer_bytes() + std::size_t(side) * geom.half_layer_bytes() +
         (std::size_t(t) * n_heads + h) * row_bytes;
}

// ---------------------------------------------------------------- sessions (the model)

struct session_state {
  std::mutex m;
  std::uint32_t id = 0;
  std::string name;
  int owner = -1;  // thread index, -1: shared
  std::vector<token_id> tokens;
  std::vector<kv_desc> descs;
  std::uint64_t durable = 0;         // write-back: tokens demote + flush made durable
  std::uint64_t trunc_cap = no_cap;  // truncated view: a restart recovers up to the sink at most
  std::uint32_t truncations = 0;
  bool truncated = false;    // the stored view is truncated (store::get refuses it)
  std::uint8_t adapter = 0;  // the request keys its history was computed under
  std::mt19937_64 rng;       // token ids
  // Restart bookkeeping (main thread, between epochs).
  std::uint64_t expect_after = 0, held_before = 0;
  std::uint64_t ssd_prefix_before = 0;  // tokens of the leading blocks only on SSD before the restart

  // Three tenants, by name: the tenant-caps scenario caps two of them.
  session_key key() const {
    static const std::string tenants[3] = {"model", "tenant-a", "tenant-b"};
    return {tenants[(name.size() + std::size_t(name.back())) % 3], name};
  }
  bool shifted() const {
    for (const auto& d : descs)
      if (d.shift) return true;
    return false;
  }
  token_id draw() { return token_id(rng() & 0x7FFFFFFFu); }
  void reset() {
    tokens.clear();
    descs.clear();
    durable = 0;
    trunc_cap = no_cap;
    truncated = false;
  }
};

struct snapshot {
  std::vector<token_id> tokens;
  std::vector<kv_desc> descs;
  bool shifted = false;
  bool truncated = false;
  std::uint8_t adapter = 0;
};

/// Shared prefixes (issue 14): half the conversations start with one of two system
/// prompts of three blocks, so sessions hold blocks with equal chains and the store
/// keeps one copy of them. KV is a function of the prefix, so the oracle needs nothing
/// new; only the bound on reuse grows: a prompt may also reuse the whole blocks it has
/// in common with a system prompt (other sessions' copies), never more.
const std::vector<token_id>& system_prompt(unsigned k) {
  static const std::array<std::vector<token_id>, 2> prompts = [] {
    std::array<std::vector<token_id>, 2> p{std::vector<token_id>(3 * tpb), std::vector<token_id>(3 * tpb)};
    std::mt19937_64 g(0x5eed5);
    for (auto& v : p)
      for (auto& x : v) x = token_id(g() & 0x7FFFFFFFu);
    return p;
  }();
  return prompts[k & 1];
}
inline std::size_t shared_bound(std::span<const token_id> toks) {
  std::size_t best = 0;
  for (unsigned k = 0; k < 2; ++k) {
    const auto& sp = system_prompt(k);
    std::size_t n = 0;
    while (n < sp.size() && n < toks.size() && sp[n] == toks[n]) ++n;
    best = std::max(best, n / tpb * tpb);
  }
  return best;
}

/// A prompt, what each of its positions must hold when served, and its common prefix
/// with the model's history.
struct prompt_t {
  std::vector<token_id> toks;
  std::vector<kv_desc> want;
  std::size_t cp = 0;
  std::uint8_t adapter = 0;  // the request's keys: keys_of(adapter)
  const request_keys& keys() const { return keys_of(adapter); }
  /// What the store may reuse: the common prefix, or the whole blocks shared with a
  /// system prompt (another session's copies), whichever is longer.
  std::size_t reusable() const { return std::max(cp, shared_bound(toks)); }
};

/// `adapter`: the request's keys, when not the history's (then nothing is common).
prompt_t make_prompt(const snapshot& snap, std::size_t keep, std::optional<std::size_t> edit_at,
                     std::span<const token_id> extra, token_id edit_token,
                     std::optional<std::uint8_t> adapter = std::nullopt) {
  prompt_t p;
  p.adapter = adapter.value_or(snap.adapter);
  p.toks.assign(snap.tokens.begin(), snap.tokens.begin() + std::ptrdiff_t(keep));
  p.cp = keep;
  if (edit_at && *edit_at < keep) {
    p.toks[*edit_at] = edit_token;
    p.cp = *edit_at;
  }
  if (p.adapter != snap.adapter) p.cp = 0;
  p.toks.insert(p.toks.end(), extra.begin(), extra.end());
  p.want.resize(p.toks.size());
  for (std::size_t i = 0; i < p.toks.size(); ++i)
    p.want[i] =
        i < p.cp ? snap.descs[i] : kv_desc{next_hash(i ? p.want[i - 1].hash : root_of(p.adapter), p.toks[i]), 0};
  return p;
}

// ---------------------------------------------------------------- events and failures

enum op_kind : std::uint8_t {
  op_turn,
  op_turn_put,
  op_edit,
  op_read,
  op_get,
  op_lookup,
  op_demote,
  op_persist,
  op_drop,
  op_queue,
  op_clock,
  op_truncate,
  op_abort,
  op_verify,
  op_count
};
constexpr const char* op_names[op_count] = {"turn(hooks)", "turn(put)", "edit",    "read(hooks)", "get",
                                            "lookup",      "demote",    "persist", "drop",        "set_queue",
                                            "clock",       "truncate",  "abort",   "verify"};

struct event {
  std::uint64_t seq = 0;
  std::uint32_t session = ~0u;
  std::uint8_t thread = 0, op = 0;
  errc status = errc::ok;
  const char* step = "";
  std::uint64_t a = 0, b = 0, c = 0;
};

class event_log {
 public:
  void add(unsigned thread, op_kind op, std::uint32_t session, const char* step, errc st, std::uint64_t a = 0,
           std::uint64_t b = 0, std::uint64_t c = 0) {
    std::lock_guard lock(m_);
    event& e = ring_[next_ % ring_.size()];
    e = {++next_, session, std::uint8_t(thread), std::uint8_t(op), st, step, a, b, c};
  }
  /// The last `n` events (of one session, or of all when session is ~0u), oldest first.
  std::string dump(std::uint32_t session, std::size_t n, const std::vector<std::string>& names) {
    std::lock_guard lock(m_);
    std::vector<const event*> picked;
    for (std::uint64_t i = next_; i > 0 && picked.size() < n && next_ - i < ring_.size(); --i) {
      const event& e = ring_[(i - 1) % ring_.size()];
      if (session == ~0u || e.session == session) picked.push_back(&e);
    }
    std::string out;
    for (auto it = picked.rbegin(); it != picked.rend(); ++it) {
      const event& e = **it;
      char line[256];
      std::snprintf(line, sizeof line, "      #%llu t%u %-11s %-8s %s(%llu, %llu, %llu) -> %s\n",
                    (unsigned long long)e.seq, unsigned(e.thread), op_names[e.op],
                    e.session < names.size() ? names[e.session].c_str() : "-", e.step, (unsigned long long)e.a,
                    (unsigned long long)e.b, (unsigned long long)e.c, std::string(to_string(e.status)).c_str());
      out += line;
    }
    return out;
  }

 private:
  std::mutex m_;
  std::array<event, 8192> ring_{};
  std::uint64_t next_ = 0;
};

/// Who computed a V row: found by its first 8 bytes (per layer).
class kv_registry {
 public:
  struct origin {
    std::uint32_t session, position;
    std::uint64_t hash;
  };
  static std::uint64_t tag(std::uint64_t hash, std::uint32_t layer) {
    std::uint16_t row[head_dim];
    oracle_row(hash, layer, 1, 0, row);
    std::uint64_t t;
    std::memcpy(&t, row, 8);
    return t;
  }
  void add(std::uint64_t hash, std::uint32_t session, std::uint32_t position) {
    if (size_.load(std::memory_order_relaxed) > 3000000) return;  // bounded for soaks
    for (std::uint32_t l = 0; l < n_layers; ++l) {
      const std::uint64_t t = tag(hash, l);
      shard& s = shards_[t % shards_.size()];
      std::lock_guard lock(s.m);
      if (s.map.emplace(t, origin{session, position, hash}).second) size_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  bool find(const std::byte* v_row, origin& o) {
    std::uint64_t t;
    std::memcpy(&t, v_row, 8);
    shard& s = shards_[t % shards_.size()];
    std::lock_guard lock(s.m);
    auto it = s.map.find(t);
    if (it == s.map.end()) return false;
    o = it->second;
    return true;
  }

 private:
  struct shard {
    std::mutex m;
    std::unordered_map<std::uint64_t, origin> map;
  };
  std::array<shard, 64> shards_;
  std::atomic<std::uint64_t> size_{0};
};

/// Whose bytes a wrong row holds.
enum diagnosis : unsigned { dg_foreign, dg_stale, dg_unwritten, dg_k_only, dg_unknown, dg_count };
constexpr const char* diagnosis_names[dg_count] = {"another session's", "stale (same session)", "never written",
                                                   "K torn (V right)", "unknown bytes"};

/// Failures are kept (the first few in full) per class; wrong bytes per diagnosis.
enum fail_class : unsigned {
  fail_wrong_bytes,  // + diagnosis
  fail_over_reuse = fail_wrong_bytes + dg_count,
  fail_lost_commit,
  fail_bad_code,
  fail_classes
};
constexpr const char* fail_names[fail_classes] = {"wrong bytes: another session's KV",
                                                  "wrong bytes: stale KV of the session",
                                                  "wrong bytes: never written",
                                                  "wrong bytes: K differs, V right (torn)",
                                                  "wrong bytes: unknown",
                                                  "reuse over-reported",
                                                  "lost commit",
                                                  "undocumented return code"};

/// ATTNSTORE_MODEL_AVOID: bits that leave out one way for a block under a load to be freed,
/// to tell the failures apart while the store is fixed (0, the default, runs everything).
enum avoid_bits : unsigned {
  avoid_overlap = 1,         // start_save only after finish_load (the documented turn overlaps them)
  avoid_foreign_demote = 2,  // demote(key) only by the session's owner thread, never of shared sessions
  avoid_shared_drop = 4,     // shared sessions are never dropped
  avoid_shared_saves = 8,    // shared sessions are only read (turns on them become reads)
  avoid_background = 16,     // no set_queue/run_background/clock operations
};

struct scenario {
  const char* name;
  bool write_through = false;
  bool faults = false;
  /// Each restart first opens the store on a device whose reads fail now and then (and
  /// checks what it serves), closes it, and only then opens it on a healthy device: a
  /// transient read error during recovery must not cost acknowledged history.
  bool faulty_recovery = false;
  bool background_thread = false;
  std::uint64_t ttl_ms = 0;
  std::size_t dram_blocks = 40, ssd_blocks = 100;
  unsigned epochs = 3;
  bool tenant_caps = false;  // two of the three tenants capped in DRAM and SSD
};

struct counters {
  std::array<std::atomic<std::uint64_t>, op_count> ops{};
  std::atomic<std::uint64_t> ops_run{0};  // operations the threads ran (they stop after 400 failures)
  std::atomic<std::uint64_t> loads{0}, loaded_tokens{0}, gets{0}, lookups{0};
  std::atomic<std::uint64_t> blocks_checked{0}, positions_checked{0}, bytes_checked{0};
  std::atomic<std::uint64_t> saves_ok{0}, saves_failed{0}, truncations{0}, persisted{0}, restarts{0};
  std::atomic<std::uint64_t> wrong_blocks{0}, wrong_positions{0}, over_reuse{0}, lost_commits{0}, bad_codes{0};
  std::atomic<std::uint64_t> wrong_ops{0};                       // operations that served a wrong byte
  std::array<std::atomic<std::uint64_t>, dg_count> diagnoses{};  // of their first wrong row
  std::atomic<std::uint64_t> held_less_before_restart{0}, recovered_sessions{0};
  std::atomic<std::uint64_t> faulty_restarts{0}, refused_opens{0};
  std::atomic<std::uint64_t> short_closes{0};  // close() reported blocks it could not write out
};

/// Everything the threads share.
struct world {
  const scenario* sc = nullptr;
  std::vector<std::unique_ptr<session_state>> sessions;
  std::vector<std::string> names;
  std::atomic<std::uint64_t> clock{1000 * ms};
  counters n;
  event_log log;
  kv_registry registry;
  std::mutex fail_mutex;
  std::array<std::vector<std::string>, fail_classes> failures;  // the first ones of each class, in full
  std::array<std::atomic<std::uint64_t>, fail_classes> failure_counts{};
  std::atomic<std::uint64_t> failure_count{0};
  int epoch = 0;
  unsigned avoid = 0;          // ATTNSTORE_MODEL_AVOID triage bits
  fault_config open_faults{};  // faults of the device while the store opens (recovery)

  bool stop() const { return failure_count.load(std::memory_order_relaxed) > 400; }
  void fail(fail_class c, std::uint32_t session, const std::string& what) {
    ++failure_count;
    const std::uint64_t k = failure_counts[c].fetch_add(1);
    if (k >= 4) return;
    std::string msg = "[" + std::string(fail_names[c]) + "] " + what + "\n    last events of " +
                      (session < names.size() ? names[session] : "-") + ":\n" + log.dump(session, 14, names);
    if (k == 0) msg += "    last events of all threads:\n" + log.dump(~0u, 24, names);
    std::lock_guard lock(fail_mutex);
    failures[c].push_back(msg);
  }
};

// ---------------------------------------------------------------- an engine thread

enum class turn_kind { hooks, put, edit };

class worker {
 public:
  worker(world& w, unsigned id, std::uint64_t seed, store& st)
      : w_(w), id_(id), rng_(seed), st_(st), mem_(id % 2 ? 16 : 0, rng_) {
    host_copy_options ho;
    ho.chaos_max_delay_us = 60;  // late, reordered copies: a slot freed under a load gets reused first
    ho.chaos_seed = seed;
    ho.max_streams = 5;  // 2 read, 1 write, 2 hash lanes
    copier_ = make_host_copy_backend(ho);
    hooks_config hc;
    hc.preload_layers = 1 + id % 2;
    hc.max_loads = 4;
    hc.max_saves = 4;
    hc.rope = model_rope;
    hk_ = std::make_unique<hooks>(st, *copier_, hc);
    blocks_.resize(std::size_t(max_blocks) * geom.block_bytes());
    for (auto& s : w_.sessions)
      if (s->owner == int(id_)) owned_.push_back(s.get());
  }
  ~worker() {
    hk_.reset();
    copier_.reset();
  }

  void run(std::uint64_t ops) {
    for (std::uint64_t i = 0; i < ops && !w_.stop(); ++i) {
      ++w_.n.ops_run;
      w_.clock.fetch_add(rnd(3) * ms);
      session_state& s = pick();
      const bool owned = s.owner == int(id_);
      const unsigned roll = rnd(100);
      op_kind op = roll < 28   ? op_turn
                   : roll < 36 ? op_turn_put
                   : roll < 43 ? op_edit
                   : roll < 53 ? op_read
                   : roll < 64 ? op_get
                   : roll < 70 ? op_lookup
                   : roll < 76 ? op_demote
                   : roll < 79 ? (owned ? op_persist : op_lookup)
                   : roll < 82 ? op_drop
                   : roll < 88 ? op_queue
                   : roll < 91 ? op_clock
                   : roll < 96 ? (owned ? op_truncate : op_turn)
                               : op_abort;
      // Triage knobs (ATTNSTORE_MODEL_AVOID): leave out one way for another thread to free
      // or replace blocks a load may be reading.
      const bool saves = op == op_turn || op == op_turn_put || op == op_edit || op == op_abort;
      if (!owned && (w_.avoid & avoid_shared_saves) && saves) op = op_read;
      if (!owned && (w_.avoid & avoid_shared_drop) && op == op_drop) op = op_lookup;
      if ((w_.avoid & avoid_background) && (op == op_queue || op == op_clock)) op = op_lookup;
      session_state* demotee = w_.sessions[rnd(w_.sessions.size())].get();
      if ((w_.avoid & avoid_foreign_demote) && op == op_demote) {
        if (owned_.empty()) continue;
        demotee = owned_[rnd(owned_.size())];
      }
      switch (op) {
        case op_turn:
          turn(s, turn_kind::hooks);
          break;
        case op_turn_put:
          turn(s, turn_kind::put);
          break;
        case op_edit:
          turn(s, turn_kind::edit);
          break;
        case op_read:
          read_hooks(s);
          break;
        case op_get:
          get(s);
          break;
        case op_lookup:
          lookup(s);
          break;
        case op_demote:
          demote(*demotee);
          break;
        case op_persist:
          persist(s);
          break;
        case op_drop:
          drop(s, op_drop, "drop");
          // Shared sessions that are only read get a new history from the dropper, so
          // drops keep meeting loads (a put into an empty session frees nothing).
          if (!owned && (w_.avoid & avoid_shared_saves)) refill(s);
          break;
        case op_queue:
          queue();
          break;
        case op_clock:
          clock();
          break;
        case op_truncate:
          truncate_op(s);
          break;
        default:
          abort_save(s);
          break;
      }
    }
  }

  /// Main thread, between epochs: how much of the session's history the store holds.
  std::uint64_t held(session_state& s) {
    if (s.tokens.empty()) return 0;
    return api().lookup(s.key(), s.tokens, keys_of(s.adapter)).tokens;
  }
  /// Tokens of the session's leading blocks that are only on SSD: what survives a
  /// restart whose close() could not write DRAM blocks out.
  std::uint64_t ssd_prefix(session_state& s) {
    if (s.tokens.empty()) return 0;
    std::vector<block_location> where(geom.validated().blocks_for(s.tokens.size()));
    const lookup_result r = st_.lookup(s.key(), s.tokens, where, keys_of(s.adapter));
    std::uint64_t tokens = 0;
    for (std::uint32_t b = 0; b < r.blocks && b < where.size() && where[b].where == tier::ssd; ++b)
      tokens += where[b].tokens;
    return tokens;
  }

  /// Main thread, between epochs: the session's whole history through the hooks and
  /// store::get, checked. Returns what lookup finds.
  std::uint64_t verify(session_state& s) {
    snapshot snap = take(s);
    if (snap.tokens.empty()) return 0;
    const token_id extra = token_id(rng_() & 0x7FFFFFFFu);
    prompt_t p = make_prompt(snap, snap.tokens.size(), std::nullopt, std::span(&extra, 1), 0);
    const std::uint64_t found = api().lookup(s.key(), p.toks, p.keys()).tokens;
    load_and_check(s, p, op_verify, false);
    if (!snap.shifted) get_and_check(s, p, 0, op_verify);
    return found;
  }

 private:
  std::uint32_t rnd(std::uint64_t n) { return n ? std::uint32_t(rng_() % n) : 0; }
  store_api api() { return store_api{st_, *hk_}; }
  session_state& pick() {
    if (!owned_.empty() && rnd(100) < 65) return *owned_[rnd(owned_.size())];
    return *w_.sessions[n_threads * owned_per_thread + rnd(n_shared)];
  }
  bool owns(const session_state& s) const { return s.owner == int(id_); }
  bool faults() const { return w_.sc->faults; }
  void event(op_kind op, const session_state* s, const char* step, errc e, std::uint64_t a = 0, std::uint64_t b = 0,
             std::uint64_t c = 0) {
    w_.log.add(id_, op, s ? s->id : ~0u, step, e, a, b, c);
  }
  std::string where(op_kind op, const session_state& s) const {
    return std::string(w_.sc->name) + ": epoch " + std::to_string(w_.epoch) + ", thread " + std::to_string(id_) + ", " +
           op_names[op] + " on session " + s.name + (s.owner >= 0 ? " (owned)" : " (shared)");
  }
  /// A return code outside the documented set is a failure.
  void code(op_kind op, const session_state& s, const char* call, errc e, std::initializer_list<errc> allowed) {
    for (errc a : allowed)
      if (a == e) return;
    ++w_.n.bad_codes;
    w_.fail(fail_bad_code, s.id,
            where(op, s) + ": " + call + " returned " + std::string(to_string(e)) +
                (faults() ? "" : " (no faults are injected in this scenario)"));
  }

  snapshot take(session_state& s) {
    std::lock_guard lock(s.m);
    return {s.tokens, s.descs, s.shifted(), s.truncated, s.adapter};
  }
  std::vector<token_id> draw(session_state& s, std::size_t n) {
    std::lock_guard lock(s.m);
    std::vector<token_id> t(n);
    for (auto& x : t) x = s.draw();
    return t;
  }
  void reset_model(session_state& s) {
    std::lock_guard lock(s.m);
    s.reset();
  }

  // ---- checking what was served

  struct check_state {
    std::uint64_t wrong_mask = 0;  // blocks with a wrong byte
    bool reported = false;
  };
  /// Reports a wrong row: where, what it should be, and whose KV it really is.
  void wrong(op_kind op, session_state& s, check_state& cs, const prompt_t& p, std::size_t pos, std::uint32_t l,
             int side, std::uint32_t h, int elem, const std::byte* row, const std::byte* v_row, const char* served_by,
             std::uint64_t reused) {
    ++w_.n.wrong_positions;
    cs.wrong_mask |= 1ull << std::min<std::size_t>(63, pos / tpb);
    if (cs.reported) return;
    cs.reported = true;
    ++w_.n.wrong_ops;
    std::uint16_t want[head_dim], got[head_dim];
    oracle_row(p.want[pos].hash, l, side, h, want);
    std::memcpy(got, row, row_bytes);
    std::string why;
    kv_registry::origin o{};
    std::uint8_t first8[8];
    std::memcpy(first8, v_row, 8);
    diagnosis dg;
    if (std::all_of(first8, first8 + 8, [](std::uint8_t b) { return b == 0xEE; })) {
      dg = dg_unwritten;
      why = "never written: the engine memory still holds the scrub pattern (reuse over-reported?)";
    } else if (w_.registry.find(v_row, o)) {
      dg = o.session != s.id ? dg_foreign : o.hash == p.want[pos].hash ? dg_k_only : dg_stale;
      why = dg == dg_foreign
                ? "another session's KV: " + w_.names[o.session] + " position " + std::to_string(o.position)
            : dg == dg_k_only
                ? "the right token's V but another K: torn (overwritten while copied) or mis-rotated"
                : "stale KV of this session: position " + std::to_string(o.position) + " of another history";
    } else {
      dg = dg_unknown;
      why = "bytes no session ever computed (freed, reused or torn memory?)";
    }
    ++w_.n.diagnoses[dg];
    char buf[160];
    std::snprintf(buf, sizeof buf, "elem %d got 0x%04x (%g) want 0x%04x (%g)", elem, got[elem],
                  half_to_double(got[elem]), want[elem], half_to_double(want[elem]));
    w_.fail(fail_class(unsigned(fail_wrong_bytes) + unsigned(dg)), s.id,
            where(op, s) + ": " + served_by + " served a wrong byte at position " + std::to_string(pos) + " (block " +
                std::to_string(pos / tpb) + ") layer " + std::to_string(l) + (side ? " V" : " K") + " head " +
                std::to_string(h) + ": " + buf + " (shift " + std::to_string(p.want[pos].shift) + "); prompt " +
                std::to_string(p.toks.size()) + " tokens, common prefix with the history " + std::to_string(p.cp) +
                ", reuse reported " + std::to_string(reused) + "; diagnosis: " + why);
  }
  void finish_check(check_state& cs) { w_.n.wrong_blocks += std::uint64_t(std::popcount(cs.wrong_mask)); }

  /// Positions [0, upto) of layer l in engine memory against the prompt's oracle.
  void check_layer(op_kind op, session_state& s, check_state& cs, const prompt_t& p, std::uint64_t upto,
                   std::uint32_t l, std::uint64_t reused) {
    for (std::size_t pos = 0; pos < upto; ++pos)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t h = 0; h < n_heads; ++h) {
          const std::byte* row = mem_.at(l, side, pos, h);
          const int e = check_row(row, p.want[pos], l, side, h);
          if (e >= 0) wrong(op, s, cs, p, pos, l, side, h, e, row, mem_.at(l, 1, pos, 0), "hooks load", reused);
        }
    w_.n.positions_checked += upto;
    w_.n.bytes_checked += upto * 2 * n_heads * row_bytes;
    if (l == n_layers - 1) w_.n.blocks_checked += geom.blocks_for(upto);
  }

  /// The engine's compute of layer l for positions [from, n): the oracle's bytes.
  void compute_layer(std::uint32_t l, const std::vector<kv_desc>& descs, std::size_t from, std::size_t n) {
    std::uint16_t row[head_dim];
    for (std::size_t pos = from; pos < n; ++pos)
      for (int side = 0; side < 2; ++side)
        for (std::uint32_t h = 0; h < n_heads; ++h) {
          oracle_row(descs[pos].hash, l, side, h, row);
          std::memcpy(mem_.at(l, side, pos, h), row, row_bytes);
        }
  }

  /// The engine's start_load and the codes it may return.
  load_info start_load(op_kind op, session_state& s, const prompt_t& p, bool shifted) {
    load_info li = api().start_load(s.key(), p.toks, mem_.target(), p.keys());
    ++w_.n.loads;
    event(op, &s, "start_load", li.status, p.toks.size(), li.tokens, li.blocks);
    std::initializer_list<errc> ok_codes = {errc::ok, errc::retry, errc::no_space};
    if (shifted && li.status == errc::unsupported) return li;  // too many shifts in the view: recompute
    if (faults() && (li.status == errc::device_error || li.status == errc::checksum_error)) return li;
    code(op, s, "start_load", li.status, ok_codes);
    return li;
  }
  std::uint64_t loaded_tokens(op_kind op, session_state& s, const prompt_t& p, const load_info& li) {
    const std::uint64_t t = valid(li.handle) ? li.tokens : 0;
    if (!valid(li.handle) && li.tokens != 0)
      w_.fail(fail_over_reuse, s.id,
              where(op, s) + ": start_load reported " + std::to_string(li.tokens) + " tokens without a handle");
    if (t > p.toks.size()) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op, s) + ": start_load reported " + std::to_string(t) + " tokens for a prompt of " +
                  std::to_string(p.toks.size()));
      return p.toks.size();
    }
    if (owns(s) && t > p.reusable()) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op, s) + ": start_load reused " + std::to_string(t) + " tokens but the prompt shares only " +
                  std::to_string(p.cp) + " with the history (status " + std::string(to_string(li.status)) + ")");
    }
    w_.n.loaded_tokens += t;
    return t;
  }

  /// A read through the hooks: load, check every layer, finish.
  void load_and_check(session_state& s, const prompt_t& p, op_kind op, bool shifted) {
    mem_.scrub();
    load_info li = start_load(op, s, p, shifted);
    const std::uint64_t t = loaded_tokens(op, s, p, li);
    if (!valid(li.handle)) return;
    check_state cs;
    for (std::uint32_t l = 0; l < n_layers; ++l) {
      const errc e = api().wait_layer(li, l);
      code(op, s, "wait_layer", e, {errc::ok});
      if (rnd(4) == 0) std::this_thread::yield();
      check_layer(op, s, cs, p, t, l, t);
    }
    const errc e = api().finish_load(li);
    event(op, &s, "finish_load", e, t);
    code(op, s, "finish_load", e, {errc::ok});
    finish_check(cs);
    if (cs.wrong_mask) drop(s, op, "drop(after wrong bytes)");  // the engine would not save them back
  }

  /// store::get of blocks [first, ...) of the prompt, checked.
  void get_and_check(session_state& s, const prompt_t& p, std::uint32_t first, op_kind op) {
    const std::uint32_t blocks = geom.blocks_for(p.toks.size());
    if (first >= blocks) first = 0;
    const std::uint32_t count = blocks - first;
    const std::size_t bb = geom.block_bytes();
    std::span<std::byte> out(blocks_.data(), std::size_t(count) * bb);
    std::memset(out.data(), 0xEE, out.size());
    const get_result r = api().get(s.key(), p.toks, first, count, out, p.keys());
    ++w_.n.gets;
    event(op, &s, "get", r.status, p.toks.size(), first, r.tokens);
    {
      std::lock_guard lock(s.m);  // a truncated view is refused (not in get()'s documented codes)
      if (r.status == errc::unsupported && s.truncated) return;
    }
    if (faults())
      code(op, s, "get", r.status,
           {errc::ok, errc::not_found, errc::no_space, errc::retry, errc::device_error, errc::checksum_error});
    else
      code(op, s, "get", r.status, {errc::ok, errc::not_found, errc::no_space, errc::retry});
    const std::uint64_t base = std::uint64_t(first) * tpb;
    if (r.blocks > count || r.tokens > std::uint64_t(r.blocks) * tpb || (r.blocks == 0 && r.tokens) ||
        base + r.tokens > p.toks.size()) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op, s) + ": get(first " + std::to_string(first) + ", count " + std::to_string(count) +
                  ") returned " + std::to_string(r.blocks) + " blocks, " + std::to_string(r.tokens) +
                  " tokens for a prompt of " + std::to_string(p.toks.size()));
      return;
    }
    if (owns(s) && r.tokens && base + r.tokens > p.reusable()) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op, s) + ": get reused up to position " + std::to_string(base + r.tokens) +
                  " but the prompt shares only " + std::to_string(p.cp) + " with the history");
    }
    check_state cs;
    for (std::uint64_t pos = base; pos < base + r.tokens; ++pos) {
      std::byte* block = out.data() + std::size_t(pos / tpb - first) * bb;
      const std::uint32_t t = std::uint32_t(pos % tpb);
      for (std::uint32_t l = 0; l < n_layers; ++l)
        for (int side = 0; side < 2; ++side)
          for (std::uint32_t h = 0; h < n_heads; ++h) {
            const std::byte* row = block_row(block, l, side, t, h);
            const int e = check_row(row, p.want[pos], l, side, h);
            if (e >= 0)
              wrong(op, s, cs, p, pos, l, side, h, e, row, block_row(block, l, 1, t, 0), "store::get", r.tokens);
          }
    }
    w_.n.positions_checked += r.tokens;
    w_.n.blocks_checked += r.blocks;
    w_.n.bytes_checked += r.tokens * geom.token_bytes();
    finish_check(cs);
    if (cs.wrong_mask) drop(s, op, "drop(after wrong bytes)");
  }

  // ---- operations

  /// One prefill as docs/integration.md shows it: load the reusable prefix, save from
  /// where the load ended (a partial last block re-saved whole), layer by layer.
  void turn(session_state& s, turn_kind kind) {
    const op_kind op = kind == turn_kind::hooks ? op_turn : kind == turn_kind::put ? op_turn_put : op_edit;
    ++w_.n.ops[op];
    std::size_t incoming = 1 + rnd(max_new_tokens);
    snapshot snap = take(s);
    if (snap.tokens.size() + incoming > context_limit) {
      if (owns(s))
        truncate_session(s, snap, incoming);
      else if (w_.avoid & avoid_shared_drop)
        return read_hooks(s);
      else
        drop(s, op, "drop(context full)");  // a shared conversation starts over
      snap = take(s);
      if (snap.tokens.size() + incoming > context_limit) {
        drop(s, op, "drop(cannot truncate)");
        snap = take(s);
      }
    }
    std::optional<std::size_t> edit_at;
    token_id edit_token = 0;
    if (kind == turn_kind::edit && !snap.tokens.empty()) {
      edit_at = rnd(snap.tokens.size());
      edit_token = draw(s, 1)[0];
    }
    std::vector<token_id> fresh = draw(s, incoming);
    if (snap.tokens.empty() && rnd(2) == 0) {  // a new conversation under a system prompt
      const auto& sp = system_prompt(rnd(2));
      fresh.insert(fresh.begin(), sp.begin(), sp.end());
      if (fresh.size() > context_limit) fresh.resize(context_limit);
    }
    // Sometimes the turn runs under other request keys (another adapter): nothing of
    // the history may be reused, and the whole view is saved under the new keys.
    std::optional<std::uint8_t> switch_to;
    if (rnd(12) == 0) switch_to = std::uint8_t((snap.adapter + 1 + rnd(adapters - 1)) % adapters);
    const prompt_t p = make_prompt(snap, snap.tokens.size(), edit_at, fresh, edit_token, switch_to);
    const std::size_t n = p.toks.size();

    mem_.scrub();
    load_info li = start_load(op, s, p, snap.shifted);
    const std::uint64_t loaded = loaded_tokens(op, s, p, li);
    const std::size_t from = std::size_t(std::min<std::uint64_t>(loaded, n - 1));  // the engine computes >= 1 token
    // What the engine computes now: positions [from, n) under this prompt's prefix.
    std::vector<kv_desc> next(n);
    for (std::size_t i = 0; i < n; ++i)
      next[i] = i < from ? p.want[i] : kv_desc{next_hash(i ? next[i - 1].hash : root_of(p.adapter), p.toks[i]), 0};
    for (std::size_t i = from; i < n; ++i) w_.registry.add(next[i].hash, s.id, std::uint32_t(i));

    const bool via_put = kind == turn_kind::put;
    // Triage only: the save starts after the load finished (not the documented overlap).
    const bool serial = !via_put && (w_.avoid & avoid_overlap);
    std::uint64_t save_from = from;
    errc st = errc::ok;
    save_handle sh = no_save();
    auto open_save = [&] {
      sh = api().start_save(s.key(), p.toks, save_from, mem_.target(), &st, p.keys());
      event(op, &s, "start_save", st, n, save_from);
      if (!valid(sh) && st == errc::rejected && save_from > 0) {  // the stored prefix went: save it all
        save_from = 0;
        sh = api().start_save(s.key(), p.toks, 0, mem_.target(), &st, p.keys());
        event(op, &s, "start_save", st, n, 0);
      }
      code(op, s, "start_save", st, {errc::ok, errc::rejected, errc::no_space, errc::retry});
    };
    if (!via_put && !serial) open_save();
    check_state cs;
    for (std::uint32_t l = 0; l < n_layers; ++l) {
      if (valid(li.handle)) code(op, s, "wait_layer", api().wait_layer(li, l), {errc::ok});
      check_layer(op, s, cs, p, loaded, l, loaded);
      if (rnd(3) == 0) std::this_thread::yield();  // other threads' saves and prefetches run meanwhile
      compute_layer(l, next, from, n);
      if (valid(sh)) code(op, s, "save_layer", api().save_layer(sh, l), {errc::ok});
    }
    const bool save_first = valid(sh) && !serial && rnd(5) == 0;  // finish_save before finish_load, sometimes
    errc saved = errc::bad_state;
    auto finish_save = [&] {
      saved = api().finish_save(sh);
      event(op, &s, "finish_save", saved, n, save_from);
      if (faults())
        code(op, s, "finish_save", saved,
             {errc::ok, errc::rejected, errc::not_found, errc::no_space, errc::device_error});
      else
        code(op, s, "finish_save", saved, {errc::ok, errc::rejected, errc::not_found, errc::no_space});
    };
    if (save_first) finish_save();
    if (valid(li.handle)) {
      const errc e = api().finish_load(li);
      event(op, &s, "finish_load", e, loaded);
      code(op, s, "finish_load", e, {errc::ok});
    }
    if (serial) {
      open_save();
      for (std::uint32_t l = 0; valid(sh) && l < n_layers; ++l)
        code(op, s, "save_layer", api().save_layer(sh, l), {errc::ok});
    }
    if (valid(sh) && !save_first) finish_save();
    if (via_put) {
      // store::put of blocks [from's block, ...) gathered from engine memory.
      std::uint32_t fb = std::uint32_t(save_from / tpb);
      auto put_from = [&](std::uint32_t first) {
        const std::uint32_t total = geom.blocks_for(n);
        std::memset(blocks_.data(), 0, std::size_t(total - first) * geom.block_bytes());
        for (std::size_t pos = std::size_t(first) * tpb; pos < n; ++pos) {
          std::byte* block = blocks_.data() + std::size_t(pos / tpb - first) * geom.block_bytes();
          for (std::uint32_t l = 0; l < n_layers; ++l)
            for (int side = 0; side < 2; ++side)
              for (std::uint32_t h = 0; h < n_heads; ++h)
                std::memcpy(block_row(block, l, side, std::uint32_t(pos % tpb), h), mem_.at(l, side, pos, h),
                            row_bytes);
        }
        return api().put(s.key(), p.toks, first,
                         std::span<const std::byte>(blocks_.data(), std::size_t(total - first) * geom.block_bytes()),
                         p.keys());
      };
      saved = put_from(fb);
      event(op, &s, "put", saved, n, fb);
      if (saved == errc::rejected && fb > 0) {
        save_from = 0;
        saved = put_from(0);
        event(op, &s, "put", saved, n, 0);
      }
      if (faults())
        code(op, s, "put", saved, {errc::ok, errc::rejected, errc::no_space, errc::device_error});
      else
        code(op, s, "put", saved, {errc::ok, errc::rejected, errc::no_space});
    }
    finish_check(cs);
    if (cs.wrong_mask) {
      drop(s, op, "drop(after wrong bytes)");
      return;
    }
    if (saved == errc::ok) {
      ++w_.n.saves_ok;
      std::lock_guard lock(s.m);
      s.tokens = p.toks;
      s.descs = std::move(next);
      s.adapter = p.adapter;
      const std::uint64_t first_token = save_from / tpb * tpb;
      s.durable = std::min(s.durable, first_token);
      if (first_token == 0) {  // the whole view is new: nothing truncated is left
        s.trunc_cap = no_cap;
        s.truncated = false;
      }
    } else {
      ++w_.n.saves_failed;
    }
  }

  /// A whole new history written with store::put (triage mode: shared sessions only read).
  void refill(session_state& s) {
    const std::vector<token_id> toks = draw(s, 16 + rnd(context_limit - 16));
    const prompt_t p = make_prompt(snapshot{}, 0, std::nullopt, toks, 0);
    const std::uint32_t blocks = geom.blocks_for(toks.size());
    std::memset(blocks_.data(), 0, std::size_t(blocks) * geom.block_bytes());
    std::uint16_t row[head_dim];
    for (std::size_t pos = 0; pos < toks.size(); ++pos) {
      w_.registry.add(p.want[pos].hash, s.id, std::uint32_t(pos));
      std::byte* block = blocks_.data() + std::size_t(pos / tpb) * geom.block_bytes();
      for (std::uint32_t l = 0; l < n_layers; ++l)
        for (int side = 0; side < 2; ++side)
          for (std::uint32_t h = 0; h < n_heads; ++h) {
            oracle_row(p.want[pos].hash, l, side, h, row);
            std::memcpy(block_row(block, l, side, std::uint32_t(pos % tpb), h), row, row_bytes);
          }
    }
    const errc e =
        api().put(s.key(), toks, 0,
                  std::span<const std::byte>(blocks_.data(), std::size_t(blocks) * geom.block_bytes()), p.keys());
    event(op_drop, &s, "put(refill)", e, toks.size());
    if (e != errc::ok) return;
    std::lock_guard lock(s.m);
    s.tokens = toks;
    s.descs = p.want;
    s.adapter = p.adapter;
  }

  /// A prompt to read with: the history, a prefix, the history and more, or an edit.
  prompt_t read_prompt(session_state& s, const snapshot& snap) {
    std::vector<token_id> extra;
    const std::size_t h = snap.tokens.size();
    const unsigned r = rnd(10);
    std::size_t keep = h;
    std::optional<std::size_t> edit_at;
    if (h == 0 || r >= 6) {
      extra.resize(1 + rnd(tpb));
      for (auto& x : extra) x = token_id(rng_() & 0x7FFFFFFFu);
    }
    if (h > 0 && (r == 4 || r == 5)) keep = 1 + rnd(h);
    if (h > 0 && r >= 8) edit_at = rnd(h);
    (void)s;
    std::optional<std::uint8_t> other;  // a read under other keys reuses nothing
    if (rnd(10) == 0) other = std::uint8_t((snap.adapter + 1 + rnd(adapters - 1)) % adapters);
    return make_prompt(snap, keep, edit_at, extra, token_id(rng_() & 0x7FFFFFFFu), other);
  }

  void read_hooks(session_state& s) {
    ++w_.n.ops[op_read];
    const snapshot snap = take(s);
    load_and_check(s, read_prompt(s, snap), op_read, snap.shifted);
  }

  void get(session_state& s) {
    ++w_.n.ops[op_get];
    const snapshot snap = take(s);
    const prompt_t p = read_prompt(s, snap);
    get_and_check(s, p, rnd(3), op_get);
  }

  void lookup(session_state& s) {
    ++w_.n.ops[op_lookup];
    const snapshot snap = take(s);
    const prompt_t p = read_prompt(s, snap);
    const lookup_result r = api().lookup(s.key(), p.toks, p.keys());
    ++w_.n.lookups;
    event(op_lookup, &s, "lookup", errc::ok, p.toks.size(), r.tokens, r.blocks);
    // Blocks of a truncated view may hold fewer tokens than a block.
    const bool whole = !snap.truncated;
    if (r.tokens > p.toks.size() || r.blocks != r.dram_blocks + r.ssd_blocks ||
        (r.blocks &&
         (r.tokens > std::uint64_t(r.blocks) * tpb || (whole && r.tokens <= std::uint64_t(r.blocks - 1) * tpb)))) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op_lookup, s) + ": lookup of " + std::to_string(p.toks.size()) + " tokens found " +
                  std::to_string(r.tokens) + " tokens in " + std::to_string(r.blocks) + " blocks (" +
                  std::to_string(r.dram_blocks) + " DRAM, " + std::to_string(r.ssd_blocks) + " SSD)");
    } else if (owns(s) && r.tokens > p.reusable()) {
      ++w_.n.over_reuse;
      w_.fail(fail_over_reuse, s.id,
              where(op_lookup, s) + ": lookup found " + std::to_string(r.tokens) +
                  " reusable tokens but the prompt shares only " + std::to_string(p.cp) + " with the history");
    }
  }

  void demote(session_state& s) {
    ++w_.n.ops[op_demote];
    const errc e = api().demote(s.key());
    event(op_demote, &s, "demote", e);
    if (faults())
      code(op_demote, s, "demote", e, {errc::ok, errc::not_found, errc::no_space, errc::device_error});
    else
      code(op_demote, s, "demote", e, {errc::ok, errc::not_found, errc::no_space});
  }

  /// Write-back mode: demote + flush makes the session's history durable.
  void persist(session_state& s) {
    ++w_.n.ops[op_persist];
    const errc d = api().demote(s.key());
    const errc f = api().flush();
    event(op_persist, &s, "demote+flush", d == errc::ok ? f : d);
    if (!faults()) code(op_persist, s, "flush", f, {errc::ok});
    if (d != errc::ok || f != errc::ok) return;
    std::lock_guard lock(s.m);  // owned: nobody else changes what the session holds
    const std::uint64_t held = api().lookup(s.key(), s.tokens, keys_of(s.adapter)).tokens;
    s.durable = held;
    ++w_.n.persisted;
  }

  void drop(session_state& s, op_kind op, const char* why) {
    if (op == op_drop) ++w_.n.ops[op_drop];
    const errc e = api().drop(s.key());
    event(op, &s, why, e);
    if (faults())
      code(op, s, "drop", e, {errc::ok, errc::not_found, errc::device_error});
    else
      code(op, s, "drop", e, {errc::ok, errc::not_found});
    reset_model(s);
  }

  void queue() {
    ++w_.n.ops[op_queue];
    std::vector<session_key> keys;
    for (unsigned i = 0, k = 1 + rnd(6); i < k; ++i) keys.push_back(w_.sessions[rnd(w_.sessions.size())]->key());
    api().set_queue(keys);
    std::uint32_t done = 0;
    if (!w_.sc->background_thread) done = api().run_background();
    event(op_queue, nullptr, "set_queue+run_background", errc::ok, keys.size(), done);
  }

  void clock() {
    ++w_.n.ops[op_clock];
    const bool jump = w_.sc->ttl_ms && rnd(8) == 0;
    const std::uint64_t by = jump ? w_.sc->ttl_ms * ms * 5 / 4 : rnd(50) * ms;
    w_.clock.fetch_add(by);
    std::uint32_t done = 0;
    if (!w_.sc->background_thread) done = api().run_background();
    event(op_clock, nullptr, jump ? "clock(past the TTL)+run_background" : "clock+run_background", errc::ok, by / ms,
          done);
  }

  void truncate_op(session_state& s) {
    ++w_.n.ops[op_truncate];
    snapshot snap = take(s);
    if (snap.tokens.size() < 3 * tpb) return turn(s, turn_kind::hooks);
    truncate_session(s, snap, 1 + rnd(max_new_tokens));
  }

  /// Context overflow on an owned session: truncate the stored view as the engine would
  /// (plan_truncation + store::truncate); if the store refuses, drop and recompute.
  void truncate_session(session_state& s, const snapshot& snap, std::size_t incoming) {
    const std::size_t h = snap.tokens.size();
    const std::size_t limit = h + incoming > context_limit ? context_limit : h + incoming - 1;  // force one
    const std::uint64_t sink = rnd(3) == 0 ? tpb * rnd(3) : rnd(40);
    const double ratio = rnd(3) * 0.25;
    const truncation_plan plan = plan_truncation(h, incoming, limit, sink, tpb, ratio);
    if (!plan.needed) {  // cannot fit by truncating: start over
      drop(s, op_truncate, "drop(no truncation fits)");
      return;
    }
    const errc e = api().truncate(s.key(), snap.tokens, plan);
    event(op_truncate, &s, "truncate", e, plan.history, plan.sink, plan.drop);
    code(op_truncate, s, "truncate", e, {errc::ok, errc::not_found, errc::invalid_argument, errc::rejected});
    std::lock_guard lock(s.m);
    auto cut_t = [&](auto& v) {
      v.erase(v.begin() + std::ptrdiff_t(plan.sink), v.begin() + std::ptrdiff_t(plan.sink + plan.drop));
    };
    cut_t(s.tokens);
    cut_t(s.descs);
    if (e == errc::ok) {
      for (std::size_t i = plan.sink; i < s.descs.size(); ++i) s.descs[i].shift -= std::int64_t(plan.drop);
      s.trunc_cap = std::min<std::uint64_t>(s.trunc_cap, plan.sink);
      s.durable = std::min<std::uint64_t>(s.durable, plan.sink);
      ++s.truncations;
      s.truncated = true;
      ++w_.n.truncations;
    } else {
      // The store does not hold this view (evicted, expired, a shorter history): the
      // engine drops it and recomputes the kept tokens next turn.
      (void)api().drop(s.key());
      for (std::size_t i = 0; i < s.descs.size(); ++i)
        s.descs[i] = {next_hash(i ? s.descs[i - 1].hash : root_of(s.adapter), s.tokens[i]), 0};
      s.durable = 0;
      s.trunc_cap = no_cap;
    }
  }

  /// A save given up (or finished with layers missing): nothing may change.
  void abort_save(session_state& s) {
    ++w_.n.ops[op_abort];
    const snapshot snap = take(s);
    if (snap.tokens.empty() || snap.tokens.size() + 8 > context_limit) return;
    const std::vector<token_id> fresh = draw(s, 1 + rnd(8));
    const prompt_t p = make_prompt(snap, snap.tokens.size(), std::nullopt, fresh, 0);
    const std::uint64_t from =
        std::min<std::uint64_t>(api().lookup(s.key(), p.toks, p.keys()).tokens, p.toks.size() - 1);
    errc st = errc::ok;
    save_handle sh = api().start_save(s.key(), p.toks, from, mem_.target(), &st, p.keys());
    event(op_abort, &s, "start_save", st, p.toks.size(), from);
    code(op_abort, s, "start_save", st, {errc::ok, errc::rejected, errc::no_space, errc::retry});
    if (!valid(sh)) return;
    const std::uint32_t layers = rnd(n_layers);  // fewer than all
    for (std::uint32_t l = 0; l < layers; ++l) code(op_abort, s, "save_layer", api().save_layer(sh, l), {errc::ok});
    if (rnd(2)) {
      const errc e = api().finish_save(sh);
      event(op_abort, &s, "finish_save(layers missing)", e, layers);
      code(op_abort, s, "finish_save with layers missing", e, {errc::bad_state});
    } else {
      api().abort_save(sh);
      event(op_abort, &s, "abort_save", errc::ok, layers);
    }
  }

  world& w_;
  unsigned id_;
  std::mt19937_64 rng_;
  store& st_;
  engine_memory mem_;
  std::unique_ptr<copy_backend> copier_;
  std::unique_ptr<hooks> hk_;
  std::vector<std::byte> blocks_;
  std::vector<session_state*> owned_;
};

// ---------------------------------------------------------------- one scenario

struct store_box {
  std::unique_ptr<store> st;
  fault_device* faults = nullptr;
};

store_config make_config(const scenario& sc, const std::string& dir, world& w, fault_device** faults) {
  store_config c;
  c.geometry = geom;
  c.model_name = "model-test";
  c.rope = model_rope.to_string();
  const std::size_t slot = format::slot_bytes(geom.validated());
  c.dram_bytes = sc.dram_blocks * slot;
  c.ssd_directory = dir;
  c.ssd_bytes = sc.ssd_blocks * slot;
  c.queue_depth = 8;
  c.write_through = sc.write_through;
  c.background_thread = sc.background_thread;
  c.session_ttl_ms = sc.ttl_ms;
  if (sc.tenant_caps)
    c.tenant_quotas = {{"tenant-a", sc.dram_blocks / 4 * slot, sc.ssd_blocks / 4 * slot},
                       {"tenant-b", sc.dram_blocks / 5 * slot, sc.ssd_blocks / 3 * slot}};
  c.demote_low_watermark = 0.15;
  c.demote_high_watermark = 0.30;
  c.clock = [&w] { return w.clock.load(std::memory_order_relaxed); };
  c.log = logger{&logger::quiet, nullptr};
  c.wrap_device = [faults, &w](std::unique_ptr<block_device> inner, const ssd_space&) -> std::unique_ptr<block_device> {
    auto d = std::make_unique<fault_device>(std::move(inner), w.open_faults);  // none until the threads run
    *faults = d.get();
    return d;
  };
  return c;
}

void run_scenario(const scenario& sc, std::uint64_t ops_per_thread, std::uint64_t seed) {
  INFO("scenario " << sc.name << ", seed " << seed << ", " << ops_per_thread
                   << " ops per thread, ATTNSTORE_MODEL_AVOID=" << env_u64("ATTNSTORE_MODEL_AVOID", 0));
  temp_dir dir("model");
  world w;
  w.sc = &sc;
  w.avoid = unsigned(env_u64("ATTNSTORE_MODEL_AVOID", 0));
  for (unsigned t = 0; t < n_threads; ++t)
    for (unsigned i = 0; i < owned_per_thread; ++i) {
      auto s = std::make_unique<session_state>();
      s->name = "o" + std::to_string(t) + "." + std::to_string(i);
      s->owner = int(t);
      w.sessions.push_back(std::move(s));
    }
  for (unsigned i = 0; i < n_shared; ++i) {
    auto s = std::make_unique<session_state>();
    s->name = "sh" + std::to_string(i);
    w.sessions.push_back(std::move(s));
  }
  for (std::uint32_t i = 0; i < w.sessions.size(); ++i) {
    w.sessions[i]->id = i;
    w.sessions[i]->rng.seed(seed * 1000003 + i);
    w.names.push_back(w.sessions[i]->name);
  }
  fault_device* faults = nullptr;
  const store_config cfg = make_config(sc, dir.str(), w, &faults);
  fault_config fc;
  fc.error_rate = 0.01;
  fc.short_rate = 0.02;
  fc.again_rate = 0.02;
  fc.seed = seed;
  const bool close_flush = expect_close_flush();

  std::unique_ptr<store> st;
  store_stats total;  // the counters of every store opened, summed
  auto add_stats = [&](const store_stats& x) {
    total.demoted_blocks += x.demoted_blocks;
    total.promoted_blocks += x.promoted_blocks;
    total.prefetched_blocks += x.prefetched_blocks;
    total.watermark_demoted_blocks += x.watermark_demoted_blocks;
    total.evicted_sessions += x.evicted_sessions;
    total.evicted_blocks += x.evicted_blocks;
    total.expired_sessions += x.expired_sessions;
    total.checksum_failures += x.checksum_failures;
    total.io_errors += x.io_errors;
    total.no_space += x.no_space;
    total.adopted_blocks += x.adopted_blocks;
    total.dedup_dram_blocks = std::max(total.dedup_dram_blocks, x.dedup_dram_blocks + x.dedup_ssd_blocks);  // peak seen
  };
  double thread_secs = 0;
  const std::uint64_t per_epoch = std::max<std::uint64_t>(1, ops_per_thread / sc.epochs);
  for (unsigned epoch = 0; epoch <= sc.epochs; ++epoch) {
    w.epoch = int(epoch);
    if (epoch > 0 && sc.faulty_recovery) {
      fault_config rf;
      rf.error_rate = 0.1;
      rf.fail_writes = false;
      rf.seed = seed + epoch;
      w.open_faults = rf;
      try {
        st = std::make_unique<store>(cfg);  // refusing to open is fine (fails closed)
        faults->set_faults(fault_config{});
        worker main(w, n_threads, seed * 41 + epoch, *st);
        for (auto& sp : w.sessions) {
          sp->truncated = false;
          const std::uint64_t found = main.verify(*sp);
          w.log.add(n_threads, op_verify, sp->id, "after restart with read errors: lookup", errc::ok, sp->tokens.size(),
                    found, sp->expect_after);
        }
        ++w.n.faulty_restarts;
      } catch (const std::exception&) {
        ++w.n.refused_opens;
      }
      w.open_faults = fault_config{};
      if (st) {
        add_stats(st->stats());
        close_store(st);
      }
    }
    st = std::make_unique<store>(cfg);
    if (epoch > 0) {
      // After a restart: what was expected to survive is found in full, and right.
      ++w.n.restarts;
      worker main(w, n_threads, seed * 31 + epoch, *st);
      std::vector<std::uint64_t> found_all;  // looked up first: loads may demote or evict others
      for (auto& sp : w.sessions) found_all.push_back(main.held(*sp));
      for (auto& sp : w.sessions) {
        session_state& s = *sp;
        s.truncated = false;  // a recovered session is an untruncated prefix
        (void)main.verify(s);
        const std::uint64_t found = found_all[s.id];
        w.log.add(n_threads, op_verify, s.id, "after restart: lookup", errc::ok, s.tokens.size(), found,
                  s.expect_after);
        if (found > 0) ++w.n.recovered_sessions;
        if (found < s.expect_after) {
          ++w.n.lost_commits;
          w.fail(fail_lost_commit, s.id,
                 std::string(sc.name) + ": restart " + std::to_string(epoch) +
                     (sc.faulty_recovery ? " (after an open with read errors)" : "") + " lost history of session " +
                     s.name + (s.owner >= 0 ? " (owned)" : " (shared)") + ": " + std::to_string(s.expect_after) +
                     " tokens expected back (held before the restart " + std::to_string(s.held_before) + ", history " +
                     std::to_string(s.tokens.size()) + ", durable by demote+flush " + std::to_string(s.durable) +
                     ", truncation cap " + (s.trunc_cap == no_cap ? std::string("none") : std::to_string(s.trunc_cap)) +
                     (sc.write_through ? ", write-through" : ", write-back") + "), found " + std::to_string(found));
        }
      }
    }
    if (epoch == sc.epochs) break;
    if (sc.faults) faults->set_faults(fc);
    const auto t0 = std::chrono::steady_clock::now();
    {
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < n_threads; ++t)
        threads.emplace_back([&, t] {
          worker wk(w, t, seed * 7919 + t * 104729 + epoch, *st);
          wk.run(per_epoch);
        });
      for (auto& t : threads) t.join();
    }
    thread_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sc.faults) faults->set_faults(fault_config{});
    // Quiet: every session checked, and what must survive the restart noted.
    {
      worker main(w, n_threads, seed * 37 + epoch, *st);
      for (auto& sp : w.sessions) (void)main.verify(*sp);
      for (auto& sp : w.sessions) {  // after every load: a load may demote or evict another session
        session_state& s = *sp;
        const std::uint64_t held = main.held(s);
        w.log.add(n_threads, op_verify, s.id, "before restart: lookup", errc::ok, s.tokens.size(), held, s.durable);
        s.held_before = held;
        s.ssd_prefix_before = main.ssd_prefix(s);
        if (held < s.tokens.size() && s.owner >= 0) ++w.n.held_less_before_restart;
        std::uint64_t expect = held;  // evictions and the TTL may have dropped some: not a loss
        if (!sc.write_through && !close_flush) expect = s.owner >= 0 ? std::min(expect, s.durable) : 0;
        s.expect_after = std::min(expect, s.trunc_cap);
      }
    }
    add_stats(st->stats());
    if (close_store(st) != errc::ok) {
      // close() could not write every DRAM block out (the SSD was full of other
      // sessions' data it must not drop, or out of time): it said so, and only what was
      // on SSD is owed. What comes back must still be right.
      ++w.n.short_closes;
      for (auto& sp : w.sessions) sp->expect_after = std::min(sp->expect_after, sp->ssd_prefix_before);
    }
  }

  add_stats(st->stats());
  const store_stats& ss = total;
  const double secs = std::max(thread_secs, 1e-9);
  const std::uint64_t ops_run = w.n.ops_run.load();
  std::string ops_line;
  for (unsigned k = 0; k < op_count; ++k)
    if (auto v = w.n.ops[k].load()) ops_line += " " + std::string(op_names[k]) + "=" + std::to_string(v);
  ops_line += "\n      operations that served wrong bytes: " + std::to_string(w.n.wrong_ops.load()) + " (";
  for (unsigned d = 0; d < dg_count; ++d)
    ops_line += std::string(d ? ", " : "") + diagnosis_names[d] + " " + std::to_string(w.n.diagnoses[d].load());
  ops_line += ")";
  ops_line += "; closes that could not write every DRAM block out: " + std::to_string(w.n.short_closes.load());
  if (sc.faulty_recovery)
    ops_line += "; opens with read errors: " + std::to_string(w.n.faulty_restarts.load()) + " (" +
                std::to_string(w.n.refused_opens.load()) + " refused)";
  std::printf(
      "model %-34s seed %llu: %llu ops in %.2f s (%.0f ops/s), %llu loads (%llu tokens), %llu gets, %llu lookups, "
      "%llu saves ok / %llu failed, %llu truncations, %llu persisted, %llu restarts (%llu sessions back); checked "
      "%llu blocks, %llu positions, %.1f MiB; wrong blocks %llu (positions %llu), over-reuse %llu, lost commits "
      "%llu, bad codes %llu; store: %llu demoted (%llu by the watermark), %llu promoted (%llu prefetched), %llu "
      "sessions evicted, %llu expired, %llu no_space, %llu io errors, %llu checksum failures; shared prefixes: %llu "
      "blocks adopted, %llu held in shared slots at the last close\n      ops:%s\n",
      sc.name, (unsigned long long)seed, (unsigned long long)ops_run, secs, double(ops_run) / secs,
      (unsigned long long)w.n.loads.load(), (unsigned long long)w.n.loaded_tokens.load(),
      (unsigned long long)w.n.gets.load(), (unsigned long long)w.n.lookups.load(),
      (unsigned long long)w.n.saves_ok.load(), (unsigned long long)w.n.saves_failed.load(),
      (unsigned long long)w.n.truncations.load(), (unsigned long long)w.n.persisted.load(),
      (unsigned long long)w.n.restarts.load(), (unsigned long long)w.n.recovered_sessions.load(),
      (unsigned long long)w.n.blocks_checked.load(), (unsigned long long)w.n.positions_checked.load(),
      double(w.n.bytes_checked.load()) / double(1 << 20), (unsigned long long)w.n.wrong_blocks.load(),
      (unsigned long long)w.n.wrong_positions.load(), (unsigned long long)w.n.over_reuse.load(),
      (unsigned long long)w.n.lost_commits.load(), (unsigned long long)w.n.bad_codes.load(),
      (unsigned long long)ss.demoted_blocks, (unsigned long long)ss.watermark_demoted_blocks,
      (unsigned long long)ss.promoted_blocks, (unsigned long long)ss.prefetched_blocks,
      (unsigned long long)ss.evicted_sessions, (unsigned long long)ss.expired_sessions, (unsigned long long)ss.no_space,
      (unsigned long long)ss.io_errors, (unsigned long long)ss.checksum_failures, (unsigned long long)ss.adopted_blocks,
      (unsigned long long)ss.dedup_dram_blocks, ops_line.c_str());
  close_store(st);

  std::string all;
  for (unsigned c = 0; c < fail_classes; ++c) {
    for (const auto& f : w.failures[c]) all += f + "\n";
    if (w.failure_counts[c].load() > w.failures[c].size())
      all += "... and " + std::to_string(w.failure_counts[c].load() - w.failures[c].size()) + " more of [" +
             fail_names[c] + "]\n";
  }
  {
    INFO(all);
    CHECK(w.failure_count.load() == 0);
  }
  CHECK(w.n.wrong_blocks.load() == 0);
  CHECK(w.n.over_reuse.load() == 0);
  CHECK(w.n.lost_commits.load() == 0);
  CHECK(w.n.bad_codes.load() == 0);
  CHECK(w.n.positions_checked.load() > 0);
}

std::uint64_t ops_per_thread() { return env_u64("ATTNSTORE_MODEL_OPS", ATTNSTORE_MODEL_SANITIZED ? 600 : 1200); }
std::uint64_t model_seed() { return env_u64("ATTNSTORE_MODEL_SEED", 20240611); }

}  // namespace

TEST_CASE("model: write-back store, hooks and get, prefetch, watermark, TTL, truncation, restarts", "[model]") {
  scenario sc{"write-back"};
  sc.ttl_ms = 4000;
  run_scenario(sc, ops_per_thread(), model_seed());
}

TEST_CASE("model: write-through store: every acknowledged commit survives a restart", "[model]") {
  scenario sc{"write-through, background thread"};
  sc.write_through = true;
  sc.background_thread = true;
  run_scenario(sc, ops_per_thread(), model_seed() + 1);
}

TEST_CASE("model: tenant caps trim sessions under every other operation", "[model]") {
  scenario sc{"write-back, tenant caps, background thread"};
  sc.tenant_caps = true;
  sc.background_thread = true;
  run_scenario(sc, ops_per_thread() / 2, model_seed() + 3);
}

TEST_CASE("model: write-through store on a fault-injecting device", "[model]") {
  scenario sc{"write-through, faults"};
  sc.write_through = true;
  sc.faults = true;
  sc.faulty_recovery = true;
  sc.ttl_ms = 4000;
  run_scenario(sc, ops_per_thread() / 2, model_seed() + 2);
}
