// On-disk block header. docs/format.md specifies it byte by byte; keep the two in step.
//
// A stored block occupies one SSD slot: [header: header_bytes][payload: block_bytes,
// padded to 4096]. The header is little-endian and starts with fixed fields, then the
// block's token ids, then zero padding to header_bytes (a multiple of 4096).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "attnstore/hash.hpp"
#include "attnstore/types.hpp"

namespace attnstore::format {

inline constexpr std::uint64_t block_magic = 0x314b4c4253544e41ull;  // "ANTSBLK1" little-endian
// 2: put-numbered sequences, MANIFEST capacity and secret. 3: the tenant hash in every
// header (offline purge by tenant, tenant accounting rebuilt at recovery). 4: the
// block's request-key digest in every header (recovery recomputes keyed chains), the
// complete model identity, layer groups in the MANIFEST.
inline constexpr std::uint32_t format_version = 4;
inline constexpr std::size_t fixed_header_bytes = 144;
inline constexpr std::size_t sector = 4096;
/// Sequence numbers stay below this (2^62: a million puts a second for 146,000 years), so
/// "one more than the largest" can never wrap; a header claiming more is damaged.
inline constexpr std::uint64_t max_sequence = std::uint64_t(1) << 62;
/// Recovery takes no block or tombstone numbered at or above this (half the limit) as a
/// starting point: it is damaged. So a store always reopens with at least 2^61
/// sequences ahead of it, and never numbers new blocks where reads would refuse them.
inline constexpr std::uint64_t max_start_sequence = max_sequence / 2;

constexpr std::size_t round_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }

/// Header area for blocks of `tokens_per_block` tokens.
constexpr std::size_t header_bytes(std::uint32_t tokens_per_block) noexcept {
  return round_up(fixed_header_bytes + std::size_t(tokens_per_block) * sizeof(token_id), sector);
}

/// Size of one stored block (one SSD slot, one DRAM arena slot).
constexpr std::size_t slot_bytes(const kv_geometry& g) noexcept {
  return header_bytes(g.tokens_per_block) + round_up(g.block_bytes(), sector);
}

/// The fixed part, exactly as laid out on disk (x86-64 and AArch64 are little-endian;
/// a big-endian port must byte-swap here).
struct block_header {
  std::uint64_t magic;             //   0
  std::uint32_t version;           //   8
  std::uint32_t header_bytes;      //  12
  hash128 model;                   //  16
  hash128 session;                 //  32
  std::uint32_t block_index;       //  48
  std::uint32_t token_count;       //  52
  hash128 chain;                   //  56
  std::uint32_t payload_bytes;     //  72
  std::uint32_t put_first_block;   //  76: block_index of the first block its put wrote
  std::uint64_t payload_checksum;  //  80
  std::uint64_t sequence;          //  88: the put's blocks have consecutive sequences
  std::uint32_t tokens_per_block;  //  96
  std::uint32_t put_blocks;        // 100: blocks its put wrote (all or none are valid)
  hash128 tenant;                  // 104: the session's tenant, keyed by the store's secret (hash_tenant)
  hash128 keys;                    // 120: block_keys() of the request that saved it (zero: none)
  std::uint64_t header_checksum;   // 136: XXH3-64 of bytes [0,136) and the token ids
};
static_assert(sizeof(block_header) == fixed_header_bytes);
static_assert(offsetof(block_header, chain) == 56);
static_assert(offsetof(block_header, tenant) == 104);
static_assert(offsetof(block_header, keys) == 120);
static_assert(offsetof(block_header, header_checksum) == 136);
static_assert(offsetof(block_header, header_checksum) + sizeof(std::uint64_t) == fixed_header_bytes,
              "header_checksum stays the last fixed field");

inline std::uint64_t compute_header_checksum(const std::byte* area) noexcept {
  block_header h;
  std::memcpy(&h, area, sizeof(h));
  const std::size_t tokens = h.token_count <= h.tokens_per_block ? h.token_count : 0;
  // Hash the fixed fields before the checksum, then the token ids, as one buffer view:
  // both live in the same area, so hash [0,136) and [144, 144+4n) and combine.
  std::uint64_t a = checksum64(area, offsetof(block_header, header_checksum));
  std::uint64_t b = checksum64(area + fixed_header_bytes, tokens * sizeof(token_id));
  return a ^ (b * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull);
}

/// Writes a header (and the token ids) into the first header_bytes of a slot.
inline void write_header(std::byte* area, const block_header& fields, std::span<const token_id> tokens) noexcept {
  block_header h = fields;
  h.magic = block_magic;
  h.version = format_version;
  h.token_count = std::uint32_t(tokens.size());
  h.header_checksum = 0;
  std::memset(area, 0, h.header_bytes);
  std::memcpy(area, &h, sizeof(h));
  std::memcpy(area + fixed_header_bytes, tokens.data(), tokens.size() * sizeof(token_id));
  h.header_checksum = compute_header_checksum(area);
  std::memcpy(area + offsetof(block_header, header_checksum), &h.header_checksum, sizeof(std::uint64_t));
}

/// Why a header was rejected.
enum class header_status : std::uint8_t { ok, empty, bad_magic, bad_version, bad_checksum, bad_fields };

/// Reads and checks a header: magic, version, checksum, sizes against `expect_header_bytes`
/// and `tokens_per_block`. The token ids follow at area + fixed_header_bytes.
inline header_status read_header(const std::byte* area, std::size_t expect_header_bytes, std::uint32_t tokens_per_block,
                                 block_header* out) noexcept {
  block_header h;
  std::memcpy(&h, area, sizeof(h));
  if (h.magic == 0 && h.version == 0) return header_status::empty;
  if (h.magic != block_magic) return header_status::bad_magic;
  if (h.version != format_version) return header_status::bad_version;
  if (h.header_bytes != expect_header_bytes || h.tokens_per_block != tokens_per_block || h.token_count == 0 ||
      h.token_count > tokens_per_block || h.put_blocks == 0 || h.block_index < h.put_first_block ||
      h.block_index - h.put_first_block >= h.put_blocks || h.sequence < h.block_index - h.put_first_block ||
      h.sequence >= max_sequence)
    return header_status::bad_fields;
  if (compute_header_checksum(area) != h.header_checksum) return header_status::bad_checksum;
  *out = h;
  return header_status::ok;
}

/// What a slot holds, as recovery judges it (and `attnstore verify` reports it).
enum class slot_verdict : std::uint8_t {
  empty,        ///< never written, or erased
  ok,           ///< a block of this store's model, header and (when checked) payload intact
  junk,         ///< the header is damaged, of another format version, or claims impossible sizes
  foreign,      ///< a valid header of another model or block size
  bad_payload,  ///< a valid header over a payload whose checksum does not match (a torn write)
};

constexpr const char* to_string(slot_verdict v) noexcept {
  switch (v) {
    case slot_verdict::empty:
      return "empty";
    case slot_verdict::ok:
      return "ok";
    case slot_verdict::junk:
      return "damaged header";
    case slot_verdict::foreign:
      return "block of another model or geometry";
    case slot_verdict::bad_payload:
      return "payload checksum mismatch";
  }
  return "unknown";
}

/// What a slot must be to count as a block of a store.
struct slot_expectation {
  std::size_t header_bytes = 0;
  std::uint32_t tokens_per_block = 0;
  hash128 model{};
  std::size_t payload_bytes = 0;
  std::uint64_t max_put_blocks = 0;  ///< a put can hold no more blocks than both tiers
};

/// Judges one slot from its first header_bytes (and, with `payload`, the payload that
/// follows them). The one rule recovery and offline verification share.
inline slot_verdict judge_slot(const std::byte* area, const slot_expectation& e, bool payload,
                               block_header* out) noexcept {
  block_header h;
  const header_status st = read_header(area, e.header_bytes, e.tokens_per_block, &h);
  if (st == header_status::empty) return slot_verdict::empty;
  if (st != header_status::ok || std::uint64_t(h.put_blocks) > e.max_put_blocks) return slot_verdict::junk;
  *out = h;
  if (!(h.model == e.model) || h.payload_bytes != e.payload_bytes) return slot_verdict::foreign;
  if (payload && checksum64(area + e.header_bytes, h.payload_bytes) != h.payload_checksum)
    return slot_verdict::bad_payload;
  return slot_verdict::ok;
}

}  // namespace attnstore::format
