// Truncation on context-window overflow: keep the first `sink` tokens (the system
// prompt), drop the oldest turns after them, and keep the rest of the saved KV at new
// positions instead of recomputing it.
//
// Semantics (docs/truncation.md):
//  - The session's view is its token sequence with KV. Truncation removes view
//    positions [sink, sink + drop) and moves every later token back by `drop`.
//  - `drop` is a multiple of tokens_per_block (whole blocks go), at least what makes
//    history + new tokens fit the context limit, and at least `ratio` of the history
//    after the sink (so a growing conversation does not truncate on every turn).
//    `sink` is kept to the token: inside the block holding position `sink`, the tokens
//    before it stay and the rest of that block goes.
//  - Nothing stored is rewritten. Each kept block remembers its range and its shift;
//    loads copy the range to its new positions and re-rotate the keys there
//    (R(shift) for keys stored after RoPE, R(position) for keys stored before it).
//  - After truncation the view is matched by token ids: a prompt reuses it only if it
//    starts with exactly the kept tokens.
#pragma once

#include <algorithm>
#include <cstdint>

namespace attnstore {

struct truncation_plan {
  bool needed = false;
  std::uint64_t history = 0;  ///< view length before
  std::uint64_t sink = 0;     ///< tokens kept from position 0
  std::uint64_t drop = 0;     ///< tokens removed after the sink (a multiple of tokens_per_block)
  std::uint64_t kept = 0;     ///< history - drop
  std::int64_t shift = 0;     ///< -drop: how far tokens after the dropped range move
};

/// Plans the truncation of a session with `history` tokens that is about to receive
/// `incoming` more, under `context_limit`. Returns needed = false when everything fits,
/// and when it cannot fit even after dropping every whole block after the sink (then
/// the engine must recompute: kept would be the sink alone).
inline truncation_plan plan_truncation(std::uint64_t history, std::uint64_t incoming, std::uint64_t context_limit,
                                       std::uint64_t sink, std::uint32_t tokens_per_block,
                                       double ratio = 0.5) noexcept {
  truncation_plan p;
  p.history = history;
  p.sink = std::min(sink, history);
  if (history + incoming <= context_limit || tokens_per_block == 0) return p;
  const std::uint64_t overflow = history + incoming - context_limit;
  const std::uint64_t after_sink = history - p.sink;
  std::uint64_t want = std::max<std::uint64_t>(overflow, std::uint64_t(double(after_sink) * ratio));
  want = (want + tokens_per_block - 1) / tokens_per_block * tokens_per_block;
  const std::uint64_t most = after_sink / tokens_per_block * tokens_per_block;
  if (want > most || overflow > most) return p;  // cannot fit by truncating
  p.needed = true;
  p.drop = want;
  p.kept = history - want;
  p.shift = -std::int64_t(want);
  return p;
}

}  // namespace attnstore
