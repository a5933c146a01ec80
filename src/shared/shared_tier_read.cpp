// shared_tier reads: a session's manifest, and the blocks of a prefix, received straight into
// the caller's buffers and verified where they land. Everything read here is untrusted
// (records.hpp does the checking).
#include <algorithm>
#include <chrono>
#include <memory>

#include "shared_tier_impl.hpp"

namespace attnstore::shared {

shared_status shared_tier::fetch_manifest(const shared_session& session, session_manifest& out) noexcept {
  impl& m = *impl_;
  out.blocks.clear();
  out.tokens.clear();
  out.sequence = 0;
  const record_key key = manifest_key(m.cfg.model.value, session.session);
  const redis_get_result got = m.reader.get(key.view());
  shared_status s = from_redis(got.status);
  if (s == shared_status::ok) {
    detail::bump(m.st.bytes_read, got.value.size());
    s = decode_manifest(got.value.bytes(), m.expectation(session), out);
  }
  if (s == shared_status::ok) {
    detail::bump(m.st.manifest_hits);
  } else {
    m.st.manifest_misses.add(s);
  }
  return s;
}

namespace {

/// One batch of fetch_blocks, for the per-block callback: block j's header area lands in
/// heads[j x header_bytes, ...), its payload in out[j]; verdict[j] is set when it arrived.
struct fetch_batch {
  const record_shape* shape;
  const model_id* model;
  std::span<const block_ref> refs;
  std::span<std::byte* const> out;
  std::byte* heads;
  shared_status* verdict;
  std::uint64_t* checksums;  // per block of the batch: the payload's, once verified
};

/// Verifies block j as soon as it has arrived, while the rest of the batch is on the wire.
void verify_arrived(void* ctx, std::size_t j) noexcept {
  const fetch_batch& b = *static_cast<const fetch_batch*>(ctx);
  const std::size_t hb = b.shape->header_bytes();
  b.verdict[j] = verify_block_parts({b.heads + j * hb, hb}, b.out[j], *b.shape, *b.model, b.refs[j], &b.checksums[j]);
}

}  // namespace

fetch_result shared_tier::fetch_blocks(std::span<const block_ref> refs, std::span<std::byte* const> out,
                                       std::span<shared_status> status, std::span<std::uint64_t> checksums) noexcept {
  impl& m = *impl_;
  fetch_result res;
  if (refs.size() != out.size() || refs.size() != status.size() ||
      (!checksums.empty() && checksums.size() != refs.size())) {
    std::fill(status.begin(), status.end(), shared_status::invalid_argument);
    res.first_miss = shared_status::invalid_argument;
    return res;
  }
  std::fill(status.begin(), status.end(), shared_status::skipped);
  const auto deadline = std::chrono::steady_clock::now() + m.cfg.cluster.request_timeout;
  // The prefix ends at the first block that is not ok; `end` marks it.
  auto end_at = [&](std::size_t i, shared_status why) {
    status[i] = why;
    res.prefix = std::uint32_t(i);
    res.first_miss = why;
    m.st.block_misses.add(why);
    detail::bump(m.st.blocks_skipped, refs.size() - i - 1);
  };
  try {
    const std::size_t hb = m.shape.header_bytes();
    const std::size_t per_batch = std::min(refs.size(), m.blocks_per_batch);
    std::vector<record_key> keys(per_batch);
    std::vector<redis_read_item> items(per_batch);
    std::vector<shared_status> verdict(per_batch);
    std::vector<std::uint64_t> sums(per_batch);
    // Header areas: received here and checked; payloads go straight to out[i] and are
    // checksummed where they land (verify_block_parts), so a block is copied by nobody.
    auto heads = std::make_unique_for_overwrite<std::byte[]>(per_batch * hb);
    for (std::size_t base = 0; base < refs.size(); base += m.blocks_per_batch) {
      const std::size_t n = std::min(m.blocks_per_batch, refs.size() - base);
      // The caller's refs must be blocks of a view: checked before any network time. (Each
      // block's chain is checked against its own previous chain when it arrives.)
      for (std::size_t i = base; i < base + n; ++i) {
        const block_ref& r = refs[i];
        if (r.tokens.empty() || r.tokens.size() > m.cfg.tokens_per_block || !out[i] ||
            (i + 1 < refs.size() && r.tokens.size() != m.cfg.tokens_per_block)) {
          end_at(i, shared_status::invalid_argument);
          return res;
        }
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        end_at(base, shared_status::timeout);
        return res;
      }
      for (std::size_t j = 0; j < n; ++j) {
        keys[j] = block_key(m.cfg.model.value, refs[base + j].chain);
        items[j] = redis_read_item{keys[j].view(), {heads.get() + j * hb, hb}, {out[base + j], m.cfg.block_bytes}};
        verdict[j] = shared_status::error;  // not arrived
      }
      fetch_batch batch{&m.shape,       &m.cfg.model, refs.subspan(base, n), out.subspan(base, n), heads.get(),
                        verdict.data(), sums.data()};
      m.reader.get_many_into(std::span(items).first(n), &verify_arrived, &batch);
      for (std::size_t j = 0; j < n; ++j) {
        if (items[j].status == redis_status::ok) detail::bump(m.st.bytes_read, items[j].size);
      }
      for (std::size_t j = 0; j < n; ++j) {
        const std::size_t i = base + j;
        shared_status s = from_redis(items[j].status);
        // A value of another length was never written to out[i]; one that fits was verified
        // when it arrived (verdict).
        if (s == shared_status::ok)
          s = items[j].size != m.shape.record_bytes() ? shared_status::verify_failed : verdict[j];
        if (s != shared_status::ok) {
          end_at(i, s);
          return res;
        }
        status[i] = shared_status::ok;
        if (!checksums.empty()) checksums[i] = sums[j];
        res.prefix = std::uint32_t(i + 1);
        detail::bump(m.st.block_hits);
      }
    }
  } catch (...) {  // no memory for the batch's keys
    end_at(res.prefix, shared_status::error);
  }
  return res;
}

}  // namespace attnstore::shared
