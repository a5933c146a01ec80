// store_remote: remote_tier on shared_tier (include/attnstore/shared/store_remote.hpp).
#include "attnstore/shared/store_remote.hpp"

#include <algorithm>
#include <vector>

#include "attnstore/hash.hpp"

namespace attnstore::shared {

store_remote::store_remote(shared_tier_config config)
    : tier_(std::make_unique<shared_tier>(config)), deleter_(std::make_unique<redis_cluster>(config.cluster)) {}

store_remote::~store_remote() = default;

remote_session store_remote::identify(const session_key& key) const noexcept {
  const shared_session s = tier_->identify(key);
  return {s.session, s.tenant};
}

remote_found store_remote::fetch(const remote_session& session, std::span<const token_id> prompt,
                                 const remote_held& held, const remote_fetch& out) noexcept {
  const std::uint32_t tpb = tier_->config().tokens_per_block;
  const std::size_t room =
      std::min({out.payloads.size(), out.blocks.size(), out.checksums.size(), out.tokens.size() / tpb});
  remote_found found;
  if (room == 0) return found;
  try {  // the vectors below grow once per fetch (a network round trip), never per layer
    session_manifest m;
    if (tier_->fetch_manifest({session.session, session.tenant}, m) != shared_status::ok) return found;
    // The view's blocks whose kept tokens the prompt starts with (every block, when there is
    // no prompt), and the one it leaves inside (the KV of its tokens before the first
    // difference is valid); the leading ones that are the caller's own blocks are not read
    // again, nor anything when the caller's view gives as much of the prompt.
    std::size_t end = 0, pos = 0, first = 0, reach = 0;
    bool same = true;
    for (; end < m.blocks.size(); ++end) {
      const manifest_block& b = m.blocks[end];
      const auto t = m.view_tokens_of(end);
      const std::size_t matched =
          prompt.empty() ? t.size() : common_prefix(t, prompt.subspan(std::min(pos, prompt.size())));
      if (matched == 0) break;
      same = same && matched == t.size() && end < held.blocks.size() && b.chain == held.blocks[end].chain &&
             b.index == held.blocks[end].index && b.view_first == held.blocks[end].view_first &&
             b.view_count == held.blocks[end].view_count;
      if (same) first = end + 1;
      if (end >= first + room) break;
      reach = pos + matched;
      pos += t.size();
      if (matched < t.size()) {
        ++end;
        break;
      }
    }
    if (end <= first || (!prompt.empty() && reach <= held.tokens)) return found;
    const std::size_t n = end - first;
    std::vector<block_ref> refs(n);
    std::vector<shared_status> status(n);
    for (std::size_t i = 0; i < n; ++i) refs[i] = m.ref(first + i);
    // The checksums are the ones the tier verified each payload against where it landed.
    const fetch_result r = tier_->fetch_blocks(refs, out.payloads.first(n), status, out.checksums.first(n));
    for (std::uint32_t i = 0; i < r.prefix; ++i) {
      const manifest_block& b = m.blocks[first + i];
      const auto t = m.tokens_of(first + i);
      std::copy(t.begin(), t.end(), out.tokens.begin() + std::ptrdiff_t(std::size_t(i) * tpb));
      out.blocks[i] = b;  // what it is and keeps; the chain is the caller's to compute
    }
    found.first = std::uint32_t(first);
    found.blocks = r.prefix;
    return found;
  } catch (...) {
    return {};  // no memory for the manifest: a miss
  }
}

errc store_remote::publish(const remote_session& session, std::span<const token_id> tokens,
                           std::span<const remote_block> blocks, std::span<const std::byte* const> payloads) noexcept {
  publish_request req;
  req.sequence = next_manifest_sequence(0);  // the wall clock: a later turn on any node orders after
  req.tokens = tokens;
  req.blocks = blocks;
  req.payloads = payloads;
  const shared_status s = tier_->publish({session.session, session.tenant}, req);
  return s == shared_status::ok ? errc::ok : s == shared_status::busy ? errc::retry : to_errc(s);
}

void store_remote::drop(const remote_session& session) noexcept {
  // A write-behind still queued for the session would put its manifest back after the
  // DEL: what is queued goes out first (bounded by the cluster's request timeout).
  (void)tier_->flush(tier_->config().cluster.request_timeout);
  const record_key k = manifest_key(tier_->config().model.value, session.session);
  (void)deleter_->del(k.view());
}

double store_remote::retention_s() const noexcept {
  const auto& c = tier_->config();
  auto ttl = std::chrono::milliseconds::max();
  for (const auto t : {c.block_ttl, c.manifest_ttl})
    if (t.count() > 0) ttl = std::min(ttl, t);
  return ttl == std::chrono::milliseconds::max() ? 86400.0 : double(ttl.count()) / 1000;
}

bool store_remote::incomplete(const remote_session& session) const noexcept {
  return tier_->incomplete({session.session, session.tenant});
}

}  // namespace attnstore::shared
