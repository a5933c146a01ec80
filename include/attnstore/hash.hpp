// XXH3 hashing: chain hashes over token ids, payload checksums, fused copy+checksum.
//
// Compiled in attnstore_io with run-time dispatch to the AVX-512, AVX2 or SSE2 XXH3
// kernel (the shared libxxhash is SSE2 only: ~19 GB/s against ~55 GB/s with AVX2 here).
// Results are identical on every path and in every process: no seeds, no randomness.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "attnstore/status.hpp"
#include "attnstore/types.hpp"

namespace attnstore {

/// XXH3-64 of a buffer: the payload checksum of a stored block.
std::uint64_t checksum64(const void* data, std::size_t bytes) noexcept;

/// XXH3-128 of a buffer.
hash128 hash_bytes128(const void* data, std::size_t bytes) noexcept;

/// Chain hash of one block: XXH3-128 over (previous chain hash, model id, token ids).
/// The first block of a session uses a zero `previous`. `keys_digest` is the block's
/// block_keys(): zero (a request without keys) gives exactly the plain chain hash;
/// otherwise the model id is first mixed with it (docs/format.md "Hashes"), so a block
/// keyed by a LoRA adapter, a cache salt or an image never matches one keyed otherwise.
hash128 chain_hash(hash128 previous, const model_id& model, std::span<const token_id> tokens,
                   const hash128& keys_digest = {}) noexcept;

/// One step of a truncated view's digest: `view` (zero before the first entry) followed
/// by a block with chain `chain`, saved as block `saved_block` of its history, of which
/// the view keeps tokens [view_first, view_first + view_count). A block saved after a
/// view that is not its history as saved continues this digest instead of the last
/// block's chain (view_continuation, below): its KV was computed over the view,
/// so two different views never give its chain one value. Domain-tagged XXH3-128.
hash128 view_link(const hash128& view, const hash128& chain, std::uint64_t saved_block, std::uint32_t view_first,
                  std::uint32_t view_count) noexcept;

/// What a block saved after the leading entries of a session's view continues (its
/// `previous` chain), fed those entries in order. While they are the history as it was
/// saved (straight: whole blocks at their saved positions, each after the one before), the
/// last one's chain, as a chain of blocks always was. After a truncation they are not: the
/// KV saved after them was computed over the view, so it continues a digest of the whole
/// view (view_link over every entry), and never shares a chain (hence a shared slot, or a
/// key in the remote tier) with a block saved after another view. Every block a save
/// writes continues what is before it, the blocks of that save included.
class view_continuation {
 public:
  /// The next entry: a block with chain `chain` continuing `previous`, saved at position
  /// `saved_pos` with `tokens` tokens, of which the view keeps [view_first, view_first +
  /// view_count).
  void add(const hash128& chain, const hash128& previous, std::uint64_t saved_pos, std::uint32_t tokens,
           std::uint32_t view_first, std::uint32_t view_count, std::uint32_t tokens_per_block) noexcept {
    straight_ = straight_ && view_first == 0 && view_count == tokens && saved_pos == position_ && previous == chain_ &&
                tokens_per_block > 0 && saved_pos % tokens_per_block == 0;
    digest_ = view_link(digest_, chain, tokens_per_block ? saved_pos / tokens_per_block : 0, view_first, view_count);
    chain_ = chain;
    position_ += view_count;
  }
  /// The `previous` of a block saved after the entries added so far.
  hash128 previous() const noexcept { return straight_ ? chain_ : digest_; }
  /// Whether the entries so far are the history as saved.
  bool straight() const noexcept { return straight_; }
  /// View position after them.
  std::uint64_t position() const noexcept { return position_; }

 private:
  hash128 chain_{}, digest_{};
  std::uint64_t position_ = 0;
  bool straight_ = true;
};

/// What a request's keys contribute to the block holding tokens
/// [block_first_token, block_first_token + tokens): zero when the request has no lora,
/// no salt and no media span overlapping the block (its KV is then that of the plain
/// tokens, and it is shared with requests without keys); otherwise a domain-tagged
/// XXH3-128 of the lora id, the salt and each overlapping span's first_token (relative
/// to block_first_token), tokens and content hash. `keys` must be valid
/// (validate_request_keys). Allocation-free.
hash128 block_keys(const request_keys& keys, std::uint64_t block_first_token, std::uint32_t tokens) noexcept;

/// Checks request keys against a prompt of `prompt_tokens` tokens: media spans sorted
/// by first_token, non-overlapping, each with tokens > 0 and inside the prompt. Returns
/// ok, or invalid_argument with `*why` (when given) set to a static message naming
/// the first fault. Allocation-free.
errc validate_request_keys(const request_keys& keys, std::size_t prompt_tokens, const char** why = nullptr) noexcept;

namespace detail {
/// block_keys for a block whose token 0 sits at a view position that may be negative
/// (a truncated view: saved position + shift). block_keys(k, f, n) equals
/// block_keys_at(k, std::int64_t(f), n).
hash128 block_keys_at(const request_keys& keys, std::int64_t block_first_token, std::uint32_t tokens) noexcept;
}  // namespace detail

/// Hash of a session key; the tenant and session are length-prefixed, so
/// ("ab","c") and ("a","bc") differ. `secret` keys the hash: a store uses its own
/// (kept in its MANIFEST), so clients who choose session ids cannot choose where in the
/// index they land, and a store's hashes mean nothing to another store.
session_hash hash_session(const session_key& key, const hash128& secret = {}) noexcept;

/// Hash of a tenant id, keyed like hash_session (its own domain, so it never equals a
/// session's hash): what block headers, quotas and metrics name a tenant by, never the
/// id in clear.
hash128 hash_tenant(std::string_view tenant, const hash128& secret = {}) noexcept;

/// Copies `bytes` from src to dst and returns checksum64 of the data, in one pass over
/// memory: each chunk is hashed while it is still in cache.
std::uint64_t copy_with_checksum(void* dst, const void* src, std::size_t bytes) noexcept;

/// checksum64 of data fed in pieces: after reset(), update() with the pieces in order,
/// and digest() is checksum64 of them back to back. What a save uses to hash each layer
/// of a block as it lands. Plain storage (no allocation); reset() before first use.
class checksum_stream {
 public:
  void reset() noexcept;
  void update(const void* data, std::size_t bytes) noexcept;
  std::uint64_t digest() const noexcept;

 private:
  alignas(64) unsigned char state_[640];  // an XXH3 state (src/hash_kernel.inl checks the size)
};

/// Name of the XXH3 kernel chosen at start-up ("avx512", "avx2" or "sse2").
std::string_view hash_kernel_name() noexcept;

}  // namespace attnstore
