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
                      off_sequence = 64, off_blocks = 72, off_tokens = 76, off_reserved0 = 80, off_reserved1 = 84;
static_assert(off_reserved1 + 4 == manifest_fixed_bytes);
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
  // The untruncated view of these tokens: every block whole, in place, after the one
  // before.
  std::vector<remote_block> blocks;
  try {
    blocks.resize(count);
  } catch (...) {
    return shared_status::error;
  }
  hash128 previous{};
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint32_t n = std::uint32_t(std::min<std::size_t>(tpb, m.tokens.size() - i * tpb));
    const hash128 k = keys.empty() ? hash128{} : keys[i];
    blocks[i] = remote_block{previous, k, std::uint32_t(i), n, 0, n};
    previous = chain_hash(previous, model, std::span<const token_id>(m.tokens).subspan(i * tpb, n), k);
  }
  return build_view_blocks(m, model, blocks);
}

namespace {

/// Computes every block's chain and checks that each block at its saved position continues
/// the view before it. A manifest can name only blocks of this model holding exactly its
/// token ids. A block at its saved position was saved after the view before it, and
/// continues it as a store's save makes it (view_continuation: the block before it while
/// the view is the history as saved, else the view's digest): a manifest that claims other
/// context for it is refused. (A block that truncation moved continues its own dropped
/// predecessor, which no reader can see.)
bool chain_view(session_manifest& m, const model_id& model) noexcept {
  const std::uint32_t tpb = m.tokens_per_block;
  view_continuation view;
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    manifest_block& b = m.blocks[i];
    b.chain = chain_hash(b.previous, model, m.tokens_of(i), b.keys);
    const std::uint64_t saved = std::uint64_t(b.index) * tpb;
    if (saved == view.position() && !(b.previous == view.previous())) return false;
    view.add(b.chain, b.previous, saved, b.tokens, b.view_first, b.view_count, tpb);
  }
  return true;
}

}  // namespace

shared_status build_view_blocks(session_manifest& m, const model_id& model,
                                std::span<const remote_block> blocks) noexcept {
  const std::uint32_t tpb = m.tokens_per_block;
  if (tpb == 0 || blocks.empty() || m.tokens.size() != (blocks.size() - 1) * std::size_t(tpb) + blocks.back().tokens)
    return shared_status::invalid_argument;
  try {
    m.blocks.resize(blocks.size());
  } catch (...) {
    return shared_status::error;
  }
  for (std::size_t i = 0; i < blocks.size(); ++i) static_cast<remote_block&>(m.blocks[i]) = blocks[i];
  if (check_view(m) != shared_status::ok || !chain_view(m, model)) return shared_status::invalid_argument;
  m.model = model.value;
  return shared_status::ok;
}

shared_status check_view(const session_manifest& m) noexcept {
  const std::uint64_t tpb = m.tokens_per_block;
  if (tpb == 0 || m.blocks.empty() || m.tokens.size() != (m.blocks.size() - 1) * tpb + m.blocks.back().tokens)
    return shared_status::invalid_argument;
  std::uint64_t position = 0;  // view position of the block's first kept token
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    if (!valid_view_entry(m.blocks[i], position, m.tokens_per_block, i + 1 == m.blocks.size()))
      return shared_status::invalid_argument;
    position += m.blocks[i].view_count;
  }
  return shared_status::ok;
}

std::size_t manifest_record_bytes(const session_manifest& m) noexcept {
  return manifest_fixed_bytes + m.blocks.size() * manifest_block_bytes + m.tokens.size() * sizeof(token_id) +
         manifest_trailer_bytes;
}

shared_status encode_manifest(const session_manifest& m, std::vector<std::byte>& out) noexcept {
  if (m.tokens.size() > 0xffffffffull || check_view(m) != shared_status::ok) return shared_status::invalid_argument;
  try {
    out.resize(manifest_record_bytes(m));
  } catch (...) {
    return shared_status::error;
  }
  std::byte* p = out.data();
  store(p + off_magic, manifest_magic);
  store(p + off_version, manifest_version);
  store(p + off_tpb, m.tokens_per_block);
  store(p + off_model, m.model);
  store(p + off_session, m.session.value);
  store(p + off_tenant, m.tenant);
  store(p + off_sequence, m.sequence);
  store(p + off_blocks, std::uint32_t(m.blocks.size()));
  store(p + off_tokens, std::uint32_t(m.tokens.size()));
  store(p + off_reserved0, std::uint32_t(0));
  store(p + off_reserved1, std::uint32_t(0));
  std::byte* q = p + manifest_fixed_bytes;
  for (const manifest_block& b : m.blocks) {  // the chain is not stored: readers compute it
    store(q, b.previous);
    store(q + 16, b.keys);
    store(q + 32, b.tokens);
    store(q + 36, b.index);
    store(q + 40, b.view_first);
    store(q + 44, b.view_count);
    q += manifest_block_bytes;
  }
  std::memcpy(q, m.tokens.data(), m.tokens.size() * sizeof(token_id));
  q += m.tokens.size() * sizeof(token_id);
  store(q, checksum64(p, std::size_t(q - p)));
  return shared_status::ok;
}

shared_status decode_manifest(std::span<const std::byte> value, const manifest_expectation& expect,
                              session_manifest& out) noexcept {
  auto fail = [&] {
    out.blocks.clear();
    out.tokens.clear();
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
  if (tpb == 0 || tpb != expect.tokens_per_block || tokens == 0 || tokens > expect.limits.max_tokens ||
      blocks != (tokens + tpb - 1) / tpb || load<std::uint32_t>(p + off_reserved0) != 0 ||
      load<std::uint32_t>(p + off_reserved1) != 0)
    return fail();
  // Counts are bounded above, so this cannot overflow.
  const std::uint64_t want =
      manifest_fixed_bytes + blocks * manifest_block_bytes + tokens * sizeof(token_id) + manifest_trailer_bytes;
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
  for (std::size_t i = 0; i < blocks; ++i) {
    const std::byte* e = p + manifest_fixed_bytes + i * manifest_block_bytes;
    manifest_block& b = out.blocks[i];
    b.previous = load<hash128>(e);
    b.keys = load<hash128>(e + 16);
    b.tokens = load<std::uint32_t>(e + 32);
    b.index = load<std::uint32_t>(e + 36);
    b.view_first = load<std::uint32_t>(e + 40);
    b.view_count = load<std::uint32_t>(e + 44);
  }
  if (check_view(out) != shared_status::ok) return fail();
  if (!chain_view(out, expect.model)) return fail();
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
