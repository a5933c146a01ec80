// The shared tier's records (include/attnstore/shared/records.hpp): keys, block records in
// the SSD layout, session manifests. Every reader here takes hostile bytes.
#include "attnstore/shared/records.hpp"

#include <chrono>
#include <cstring>
#include <new>

#include "attnstore/hash.hpp"

namespace attnstore::shared {

namespace {

constexpr char hex_digits[] = "0123456789abcdef";

/// Appends 32 lowercase hex digits of h (hi, then lo).
char* put_hex(char* p, const hash128& h) noexcept {
  for (int i = 15; i >= 0; --i) *p++ = hex_digits[(h.hi >> (i * 4)) & 0xf];
  for (int i = 15; i >= 0; --i) *p++ = hex_digits[(h.lo >> (i * 4)) & 0xf];
  return p;
}

char* put_text(char* p, std::string_view s) noexcept {
  std::memcpy(p, s.data(), s.size());
  return p + s.size();
}

record_key make_key(const hash128& model, std::string_view kind, const hash128& tag) noexcept {
  record_key k;
  char* p = k.bytes.data();
  p = put_text(p, "ats:");
  p = put_hex(p, model);
  p = put_text(p, kind);
  p = put_text(p, "{");
  p = put_hex(p, tag);
  p = put_text(p, "}");
  k.size = std::uint8_t(p - k.bytes.data());
  return k;
}

// Little-endian field access (x86-64 and AArch64; a big-endian port byte-swaps here, as
// format/block_header.hpp says for the SSD header).
template <class T>
T load(const std::byte* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T>
void store(std::byte* p, const T& v) noexcept {
  std::memcpy(p, &v, sizeof v);
}

// Offsets of the manifest's fixed fields (docs/shared_tier.md).
constexpr std::size_t off_magic = 0, off_version = 8, off_tpb = 12, off_model = 16, off_session = 32, off_tenant = 48,
                      off_sequence = 64, off_blocks = 72, off_tokens = 76, off_extra = 80, off_reserved = 84;
static_assert(off_reserved + 4 == manifest_fixed_bytes);
static_assert(sizeof(hash128) == 16 && sizeof(token_id) == 4);

}  // namespace

record_key block_key(const hash128& model, const hash128& chain) noexcept { return make_key(model, ":b:", chain); }

record_key manifest_key(const hash128& model, const session_hash& session) noexcept {
  return make_key(model, ":m:", session.value);
}

// ---------------------------------------------------------------------------- block records

void write_block_header(std::byte* area, const record_shape& shape, const model_id& model, std::uint32_t index,
                        const hash128& chain, const hash128& keys, std::span<const token_id> tokens,
                        std::uint64_t payload_checksum) noexcept {
  format::block_header h{};
  h.header_bytes = std::uint32_t(shape.header_bytes());
  h.model = model.value;
  h.session = {};  // content-addressed: no session, no tenant
  h.tenant = {};
  h.block_index = index;
  h.put_first_block = index;
  h.put_blocks = 1;
  h.sequence = 0;
  h.chain = chain;
  h.keys = keys;
  h.payload_bytes = std::uint32_t(shape.block_bytes);
  h.payload_checksum = payload_checksum;
  h.tokens_per_block = shape.tokens_per_block;
  format::write_header(area, h, tokens);
}

namespace {

/// Every check of a block record but its payload checksum, on its header area (exactly
/// shape.header_bytes()). ok with *checksum the payload checksum the header claims.
shared_status verify_block_header(std::span<const std::byte> area, const record_shape& shape, const model_id& model,
                                  const block_ref& ref, std::uint64_t* checksum) noexcept {
  // The size first: judge_slot reads the whole header area.
  if (area.size() != shape.header_bytes() || shape.block_bytes > 0xffffffffull || ref.tokens.empty() ||
      ref.tokens.size() > shape.tokens_per_block)
    return shared_status::verify_failed;
  const format::slot_expectation expect{.header_bytes = shape.header_bytes(),
                                        .tokens_per_block = shape.tokens_per_block,
                                        .model = model.value,
                                        .payload_bytes = shape.block_bytes,
                                        .max_put_blocks = 1};
  format::block_header h;
  if (format::judge_slot(area.data(), expect, false, &h) != format::slot_verdict::ok)
    return shared_status::verify_failed;
  if (!h.session.is_zero() || !h.tenant.is_zero() || h.put_blocks != 1 || h.put_first_block != h.block_index ||
      h.sequence != 0)
    return shared_status::verify_failed;
  if (!(h.chain == ref.chain) || !(h.keys == ref.keys) || h.block_index != ref.index ||
      h.token_count != ref.tokens.size())
    return shared_status::verify_failed;
  const std::byte* ids = area.data() + format::fixed_header_bytes;
  if (std::memcmp(ids, ref.tokens.data(), ref.tokens.size_bytes()) != 0) return shared_status::verify_failed;
  // The chain continues from the block before (ref.previous) through these very tokens:
  // a block of another position, session history or key set does not.
  if (!(chain_hash(ref.previous, model, ref.tokens, h.keys) == h.chain)) return shared_status::verify_failed;
  *checksum = h.payload_checksum;
  return shared_status::ok;
}

}  // namespace

shared_status verify_block_record(std::span<const std::byte> value, const record_shape& shape, const model_id& model,
                                  const block_ref& ref, std::byte* out) noexcept {
  if (value.size() != shape.record_bytes()) return shared_status::verify_failed;
  std::uint64_t expected = 0;
  const shared_status s = verify_block_header(value.first(shape.header_bytes()), shape, model, ref, &expected);
  if (s != shared_status::ok) return s;
  const std::uint64_t cs = copy_with_checksum(out, value.data() + shape.header_bytes(), shape.block_bytes);
  return cs == expected ? shared_status::ok : shared_status::verify_failed;
}

shared_status verify_block_parts(std::span<const std::byte> head, const std::byte* payload, const record_shape& shape,
                                 const model_id& model, const block_ref& ref,
                                 std::uint64_t* payload_checksum) noexcept {
  std::uint64_t expected = 0;
  const shared_status s = verify_block_header(head, shape, model, ref, &expected);
  if (s != shared_status::ok) return s;
  if (checksum64(payload, shape.block_bytes) != expected) return shared_status::verify_failed;
  if (payload_checksum) *payload_checksum = expected;
  return shared_status::ok;
}

// ------------------------------------------------------------------------- manifest records

shared_status build_manifest_blocks(session_manifest& m, const model_id& model,
                                    std::span<const hash128> keys) noexcept {
  const std::uint32_t tpb = m.tokens_per_block;
  if (tpb == 0 || m.tokens.empty()) return shared_status::invalid_argument;
  const std::size_t count = (m.tokens.size() + tpb - 1) / tpb;
  if (!keys.empty() && keys.size() != count) return shared_status::invalid_argument;
  try {
    m.blocks.resize(count);
  } catch (...) {
    return shared_status::error;
  }
  hash128 previous{};
  for (std::size_t i = 0; i < count; ++i) {
    manifest_block& b = m.blocks[i];
    b.tokens = std::uint32_t(std::min<std::size_t>(tpb, m.tokens.size() - i * tpb));
    b.keys = keys.empty() ? hash128{} : keys[i];
    b.chain = chain_hash(previous, model, m.tokens_of(i), b.keys);
    previous = b.chain;
  }
  m.model = model.value;
  return shared_status::ok;
}

std::size_t manifest_record_bytes(const session_manifest& m) noexcept {
  return manifest_fixed_bytes + m.blocks.size() * manifest_block_bytes + m.tokens.size() * sizeof(token_id) +
         m.extra.size() + manifest_trailer_bytes;
}

shared_status encode_manifest(const session_manifest& m, std::vector<std::byte>& out) noexcept {
  const std::uint32_t tpb = m.tokens_per_block;
  if (tpb == 0 || m.tokens.empty() || m.blocks.size() != (m.tokens.size() + tpb - 1) / tpb ||
      m.tokens.size() > 0xffffffffull || m.extra.size() > 0xffffffffull)
    return shared_status::invalid_argument;
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    const std::size_t want = std::min<std::size_t>(tpb, m.tokens.size() - i * tpb);
    if (m.blocks[i].tokens != want) return shared_status::invalid_argument;
  }
  try {
    out.resize(manifest_record_bytes(m));
  } catch (...) {
    return shared_status::error;
  }
  std::byte* p = out.data();
  store(p + off_magic, manifest_magic);
  store(p + off_version, manifest_version);
  store(p + off_tpb, tpb);
  store(p + off_model, m.model);
  store(p + off_session, m.session.value);
  store(p + off_tenant, m.tenant);
  store(p + off_sequence, m.sequence);
  store(p + off_blocks, std::uint32_t(m.blocks.size()));
  store(p + off_tokens, std::uint32_t(m.tokens.size()));
  store(p + off_extra, std::uint32_t(m.extra.size()));
  store(p + off_reserved, std::uint32_t(0));
  std::byte* q = p + manifest_fixed_bytes;
  for (const manifest_block& b : m.blocks) {
    store(q, b.chain);
    store(q + 16, b.keys);
    store(q + 32, b.tokens);
    store(q + 36, std::uint32_t(0));
    q += manifest_block_bytes;
  }
  std::memcpy(q, m.tokens.data(), m.tokens.size() * sizeof(token_id));
  q += m.tokens.size() * sizeof(token_id);
  if (!m.extra.empty()) std::memcpy(q, m.extra.data(), m.extra.size());
  q += m.extra.size();
  store(q, checksum64(p, std::size_t(q - p)));
  return shared_status::ok;
}

shared_status decode_manifest(std::span<const std::byte> value, const manifest_expectation& expect,
                              session_manifest& out) noexcept {
  auto fail = [&] {
    out.blocks.clear();
    out.tokens.clear();
    out.extra.clear();
    out.sequence = 0;
    return shared_status::verify_failed;
  };
  const std::byte* p = value.data();
  const std::size_t size = value.size();
  if (size < manifest_fixed_bytes + manifest_trailer_bytes) return fail();
  if (load<std::uint64_t>(p + off_magic) != manifest_magic || load<std::uint32_t>(p + off_version) != manifest_version)
    return fail();
  const std::uint32_t tpb = load<std::uint32_t>(p + off_tpb);
  const std::uint64_t blocks = load<std::uint32_t>(p + off_blocks);
  const std::uint64_t tokens = load<std::uint32_t>(p + off_tokens);
  const std::uint64_t extra = load<std::uint32_t>(p + off_extra);
  if (tpb == 0 || tpb != expect.tokens_per_block || tokens == 0 || tokens > expect.limits.max_tokens ||
      extra > expect.limits.max_extra_bytes || blocks != (tokens + tpb - 1) / tpb ||
      load<std::uint32_t>(p + off_reserved) != 0)
    return fail();
  // Counts are bounded above, so this cannot overflow.
  const std::uint64_t want =
      manifest_fixed_bytes + blocks * manifest_block_bytes + tokens * sizeof(token_id) + extra + manifest_trailer_bytes;
  if (want != size) return fail();
  if (checksum64(p, size - manifest_trailer_bytes) != load<std::uint64_t>(p + size - manifest_trailer_bytes))
    return fail();
  // An intact record: now whose it is.
  if (!(load<hash128>(p + off_model) == expect.model.value) ||
      !(load<hash128>(p + off_session) == expect.session.value) || !(load<hash128>(p + off_tenant) == expect.tenant))
    return fail();
  try {
    out.blocks.resize(blocks);
    out.tokens.resize(tokens);
    out.extra.resize(extra);
  } catch (...) {
    fail();
    return shared_status::error;
  }
  out.model = expect.model.value;
  out.session = expect.session;
  out.tenant = expect.tenant;
  out.tokens_per_block = tpb;
  out.sequence = load<std::uint64_t>(p + off_sequence);
  const std::byte* ids = p + manifest_fixed_bytes + blocks * manifest_block_bytes;
  std::memcpy(out.tokens.data(), ids, tokens * sizeof(token_id));
  if (extra) std::memcpy(out.extra.data(), ids + tokens * sizeof(token_id), extra);
  hash128 previous{};
  for (std::size_t i = 0; i < blocks; ++i) {
    const std::byte* e = p + manifest_fixed_bytes + i * manifest_block_bytes;
    manifest_block& b = out.blocks[i];
    b.chain = load<hash128>(e);
    b.keys = load<hash128>(e + 16);
    b.tokens = load<std::uint32_t>(e + 32);
    const std::uint64_t full = std::min<std::uint64_t>(tpb, tokens - std::uint64_t(i) * tpb);
    if (b.tokens != full || load<std::uint32_t>(e + 36) != 0) return fail();
    // A manifest can name only blocks of this model holding exactly its token ids.
    if (!(chain_hash(previous, expect.model, out.tokens_of(i), b.keys) == b.chain)) return fail();
    previous = b.chain;
  }
  return shared_status::ok;
}

std::uint64_t next_manifest_sequence(std::uint64_t previous) noexcept {
  const auto now =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  const std::uint64_t clock = now > 0 ? std::uint64_t(now) : 0;
  return std::max(previous + 1, clock);
}

}  // namespace attnstore::shared
