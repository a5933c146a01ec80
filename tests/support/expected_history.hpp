// Expected state for tests that check every read of a store against what was
// acknowledged (RocksDB's db_stress keeps an expected state beside the database the
// same way). A session's history is its tokens plus, per block, the version its payload
// was made with: block b of session s at version v holds make_blocks(.., s, b, 1, v), so
// every served byte has exactly one right value, and a stale version of a block with the
// same tokens is told apart from the current one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "attnstore/store.hpp"
#include "support/kv_data.hpp"

namespace attnstore::testing {

struct history {
  std::vector<token_id> tokens;
  std::vector<std::uint64_t> versions;  ///< per block
};

/// The history after a put of `tokens` from `first_block` whose payloads are version `v`.
inline history after_put(const history& old, std::vector<token_id> tokens, std::uint32_t first_block, std::uint64_t v,
                         const kv_geometry& g) {
  history h;
  h.tokens = std::move(tokens);
  const std::uint32_t n = g.blocks_for(h.tokens.size());
  h.versions.resize(n);
  for (std::uint32_t b = 0; b < n; ++b) h.versions[b] = b < first_block ? old.versions.at(b) : v;
  return h;
}

/// Payload of one block of a history.
inline std::vector<std::byte> history_block(const history& h, std::uint64_t session, std::uint32_t b,
                                            std::size_t block_bytes) {
  return make_blocks(block_bytes, session, b, 1, h.versions.at(b));
}

/// Blocks [first, end) of a history back to back: what put() takes.
inline std::vector<std::byte> history_payload(const history& h, std::uint64_t session, std::uint32_t first,
                                              std::size_t block_bytes) {
  std::vector<std::byte> out;
  out.reserve((h.versions.size() - first) * block_bytes);
  for (std::uint32_t b = first; b < h.versions.size(); ++b) {
    auto one = history_block(h, session, b, block_bytes);
    out.insert(out.end(), one.begin(), one.end());
  }
  return out;
}

inline std::size_t common_prefix(std::span<const token_id> a, std::span<const token_id> b) {
  std::size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

/// Checks that the store holds `want` for the session: lookup finds all of it (or,
/// with `allow_prefix`, a prefix ending at a block boundary), every probe prompt
/// matches exactly as far as it agrees with what is held (so nothing beyond it, such
/// as an older, longer version, is served), and get() returns the held blocks
/// bit-exact. `want` null: the session must not be found by any probe. Returns ""
/// or what differs; `held` gets the tokens held.
inline std::string check_holds(store& s, const session_key& key, std::uint64_t session, const history* want,
                               std::span<const std::vector<token_id>> probes, bool allow_prefix,
                               std::uint64_t* held = nullptr) {
  const kv_geometry& g = s.geometry();
  const std::size_t bb = s.block_bytes();
  if (held) *held = 0;
  if (!want) {
    for (std::size_t i = 0; i < probes.size(); ++i)
      if (const auto t = s.lookup(key, probes[i]).tokens; t != 0)
        return "lookup found " + std::to_string(t) + " tokens of probe #" + std::to_string(i) +
               " (a history once put); expected nothing stored";
    return "";
  }
  const std::size_t len = want->tokens.size();
  const std::uint64_t have = s.lookup(key, want->tokens).tokens;
  if (held) *held = have;
  if (have != len) {
    if (!allow_prefix) return "lookup found " + std::to_string(have) + " of the " + std::to_string(len) + " tokens";
    if (have % g.tokens_per_block)
      return "lookup found " + std::to_string(have) + " of the " + std::to_string(len) +
             " tokens: a prefix that ends inside a block";
  }
  for (std::size_t i = 0; i < probes.size(); ++i) {
    const std::uint64_t expect = std::min<std::uint64_t>(common_prefix(probes[i], want->tokens), have);
    const std::uint64_t got = s.lookup(key, probes[i]).tokens;
    if (got != expect)
      return "probe #" + std::to_string(i) + " (" + std::to_string(probes[i].size()) + " tokens, agrees with the " +
             "expected history for " + std::to_string(common_prefix(probes[i], want->tokens)) + "): lookup found " +
             std::to_string(got) + " tokens, expected " + std::to_string(expect);
  }
  if (have == 0) return "";
  const std::uint32_t nb = g.blocks_for(have);
  std::vector<std::byte> out(std::size_t(nb) * bb);
  const get_result r = s.get(key, want->tokens, 0, nb, out);
  if (r.status != errc::ok || r.blocks != nb || r.tokens != have)
    return "get returned " + std::string(to_string(r.status)) + " with " + std::to_string(r.blocks) + " blocks, " +
           std::to_string(r.tokens) + " tokens; expected " + std::to_string(nb) + " blocks, " + std::to_string(have) +
           " tokens";
  for (std::uint32_t b = 0; b < nb; ++b)
    if (std::memcmp(out.data() + std::size_t(b) * bb, history_block(*want, session, b, bb).data(), bb) != 0)
      return "block " + std::to_string(b) + " served with wrong bytes";
  return "";
}

/// What get() served of a history, checked: every block it delivered must be
/// bit-exact (a miss or a shorter verified prefix is fine). Returns "" or what is wrong.
struct served {
  get_result result;
  std::string wrong;
};
inline served serve_and_check(store& s, const session_key& key, std::uint64_t session, const history& h) {
  const std::size_t bb = s.block_bytes();
  const std::uint32_t nb = s.geometry().blocks_for(h.tokens.size());
  std::vector<std::byte> out(std::size_t(nb) * bb, std::byte{0xA5});
  served r{s.get(key, h.tokens, 0, nb, out), {}};
  const std::uint32_t tpb = s.geometry().tokens_per_block;
  if (r.result.blocks > nb || r.result.tokens > h.tokens.size() ||
      (r.result.blocks > 0 && r.result.tokens <= std::uint64_t(r.result.blocks - 1) * tpb) ||
      (r.result.blocks == 0 && r.result.tokens != 0)) {
    r.wrong = "get returned " + std::to_string(r.result.blocks) + " blocks with " + std::to_string(r.result.tokens) +
              " tokens for a history of " + std::to_string(h.tokens.size()) + " tokens";
    return r;
  }
  for (std::uint32_t b = 0; b < r.result.blocks; ++b)
    if (std::memcmp(out.data() + std::size_t(b) * bb, history_block(h, session, b, bb).data(), bb) != 0) {
      r.wrong = "get (" + std::string(to_string(r.result.status)) + ", " + std::to_string(r.result.blocks) +
                " blocks) served block " + std::to_string(b) + " with wrong bytes";
      return r;
    }
  return r;
}

}  // namespace attnstore::testing
