// A store directory's LINKS file (docs/format.md "Shared blocks"): which session blocks
// are held in an SSD slot that another block's save wrote (a shared prefix stored once).
// A slot's header names the session that wrote it; a block of any other session that
// holds the slot is known to recovery only by its link: append-only fixed-size records,
// each checksummed, so a torn last record is simply not read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "attnstore/hash.hpp"
#include "attnstore/types.hpp"

namespace attnstore::format {

inline constexpr std::uint32_t link_magic = 0x4b4e4c41;    // "ALNK" little-endian
inline constexpr std::uint32_t retire_magic = 0x52545241;  // "ARTR": a block its session let go of

/// A link (magic ALNK): one block of `session` held in another block's slot, found again
/// at recovery as the slot whose header has `chain`, `block_index` and `checksum`.
/// A retirement (magic ARTR): `session` let go of its block (chain, block_index,
/// sequence) while other sessions still hold its slot, so the slot outlives the block;
/// recovery must not take the slot's header (or the session's link) as the session's.
struct link_record {
  hash128 session;                //   0: the holder (hash_session)
  hash128 tenant;                 //  16: the holder's tenant (hash_tenant)
  hash128 chain;                  //  32: chain hash of the block
  std::uint64_t checksum;         //  48: payload checksum the holder verified
  std::uint64_t sequence;         //  56: the holder's sequence number for the block
  std::uint32_t block_index;      //  64
  std::uint32_t put_first_block;  //  68: of the holder's put (or adoption) that made it
  std::uint32_t put_blocks;       //  72
  std::uint32_t magic;            //  76
  std::uint64_t record_checksum;  //  80: XXH3-64 of bytes [0, 80)
};
static_assert(sizeof(link_record) == 88);

inline void seal(link_record& r, std::uint32_t magic = link_magic) noexcept {
  r.magic = magic;
  r.record_checksum = checksum64(&r, offsetof(link_record, record_checksum));
}

inline bool sealed(const link_record& r) noexcept {
  return (r.magic == link_magic || r.magic == retire_magic) &&
         r.record_checksum == checksum64(&r, offsetof(link_record, record_checksum));
}

/// The well-formed records of `path` in file order; none when it does not exist. Bad
/// records (torn, damaged) are skipped and counted in *bad.
inline std::vector<link_record> read_links(const std::string& path, std::uint64_t* bad = nullptr) {
  std::vector<link_record> out;
  if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
    link_record r;
    std::size_t n;
    while ((n = std::fread(&r, 1, sizeof(r), f)) > 0) {
      if (n == sizeof(r) && sealed(r))
        out.push_back(r);
      else if (bad)
        ++*bad;
    }
    std::fclose(f);
  }
  return out;
}

}  // namespace attnstore::format
