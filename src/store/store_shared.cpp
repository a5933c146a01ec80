// Shared prefixes: blocks with equal chain hashes held once per tier by every session
// that has them (content_table.hpp), found by sessions that never stored them, and
// known to recovery through the LINKS file (format/links.hpp).
#include "store_impl.hpp"

namespace attnstore {

format::link_record store::impl::link_of(const session_hash& owner, const hash128& tenant,
                                         const block_meta& m) const noexcept {
  format::link_record r{};
  r.session = owner.value;
  r.tenant = tenant;
  r.chain = m.chain;
  r.checksum = m.checksum;
  r.sequence = m.sequence;
  r.block_index = std::uint32_t(m.saved_pos / geometry_.tokens_per_block);
  r.put_first_block = m.put_first_block;
  r.put_blocks = m.put_blocks;
  return r;
}

errc store::impl::link_borrowed(locked_session& s, std::uint32_t b, const hash128& tenant) noexcept {
  if (!links_) return errc::unsupported;
  const errc e = links_->append(link_of(s.key(), tenant, s.meta(b)));
  if (e != errc::ok) {
    detail::bump(counters_->io_errors);
    config_.log(log_level::error, "store: cannot append to " + detail::link_log::path_in(config_.ssd_directory) +
                                      "; the block keeps a copy of its own");
  }
  return e;
}

bool store::impl::take_ssd_copy(locked_session& s, std::uint32_t b, const hash128& tenant) noexcept {
  block_meta& m = s.meta(b);
  if (!shareable(m) || !links_ || links_->full() || m.ssd_slot != no_slot) return false;
  const std::uint32_t slot = content_->share(content_key(m, tenant), tier::ssd, m.checksum);
  if (slot == no_slot) return false;
  m.ssd_slot = slot;
  m.borrowed = true;
  // Without its link the block would be lost at a restart: it writes its own copy.
  if (link_borrowed(s, b, tenant) != errc::ok) {
    if (content_->release(tier::ssd, slot))
      (void)invalidate_ssd(std::span(&slot, 1));  // its last holder went meanwhile
    m.ssd_slot = no_slot;
    m.borrowed = false;
    return false;
  }
  return true;
}

bool store::impl::take_dram_copy(block_meta& m, const hash128& tenant) noexcept {
  if (!shareable(m) || m.dram_slot != no_slot) return false;
  const std::uint32_t slot = content_->share(content_key(m, tenant), tier::dram, m.checksum);
  if (slot == no_slot) return false;
  m.dram_slot = slot;
  return true;
}

lookup_result store::impl::match_shared(std::span<const token_id> prompt, const request_keys& keys,
                                        const hash128& tenant, std::uint32_t max_blocks,
                                        std::span<block_location> out) noexcept {
  lookup_result r;
  if (!sharing_) return r;
  const std::uint32_t tpb = geometry_.tokens_per_block;
  hash128 prev{};
  for (std::uint32_t i = 0; i < max_blocks && std::uint64_t(i + 1) * tpb <= prompt.size(); ++i) {
    const std::uint64_t first = std::uint64_t(i) * tpb;
    const hash128 digest = keys.empty() ? hash128{} : block_keys(keys, first, tpb);
    prev = chain_hash(prev, model_, prompt.subspan(first, tpb), digest);
    const detail::content_table::copies c = content_->find(content_key(prev, i, tenant));
    if (c.dram == no_slot && c.ssd == no_slot) break;
    const bool in_dram = c.dram != no_slot;
    if (i < out.size()) out[i] = block_location{in_dram ? tier::dram : tier::ssd, in_dram ? c.dram : c.ssd, tpb};
    ++r.blocks;
    r.tokens += tpb;
    ++(in_dram ? r.dram_blocks : r.ssd_blocks);
  }
  return r;
}

std::uint32_t store::impl::adopt_shared_locked(locked_session& s, std::span<const token_id> prompt,
                                               const request_keys& keys, std::uint32_t max_blocks) noexcept {
  if (!sharing_ || s.block_count() != 0) return 0;
  const hash128 tenant = tenant_hash_of(s.record_id());
  const std::uint32_t tpb = geometry_.tokens_per_block;
  std::uint32_t head = no_slot, tail = no_slot, count = 0;
  hash128 prev{};
  for (std::uint32_t i = 0; i < max_blocks && std::uint64_t(i + 1) * tpb <= prompt.size(); ++i) {
    const std::uint64_t first = std::uint64_t(i) * tpb;
    const auto toks = prompt.subspan(first, tpb);
    const hash128 digest = keys.empty() ? hash128{} : block_keys(keys, first, tpb);
    const hash128 chain = chain_hash(prev, model_, toks, digest);
    const detail::content_table::key k = content_key(chain, i, tenant);
    const detail::content_table::copies c = content_->find(k);
    // Each copy is taken (one more holder) or found gone since: what is left decides.
    const std::uint32_t dram = c.dram != no_slot ? content_->share(k, tier::dram, c.checksum) : no_slot;
    const std::uint32_t ssd =
        c.ssd != no_slot && links_ && !links_->full() ? content_->share(k, tier::ssd, c.checksum) : no_slot;
    const std::uint32_t b = dram == no_slot && ssd == no_slot ? no_slot : s.new_block(toks);
    if (b == no_slot) {
      if (dram != no_slot) free_dram(dram);
      if (ssd != no_slot && content_->release(tier::ssd, ssd)) (void)invalidate_ssd(std::span(&ssd, 1));
      break;
    }
    block_meta& m = s.meta(b);
    m.previous = prev;
    m.chain = prev = chain;
    m.keys = digest;
    m.checksum = c.checksum;
    m.saved_pos = first;
    m.dram_slot = dram;
    m.ssd_slot = ssd;
    m.borrowed = ssd != no_slot;
    s.append(head, tail, b);
    ++count;
  }
  if (count == 0) return 0;
  // Numbered as one put of blocks [0, count): recovery judges it like the session's own.
  const std::uint64_t put_id = sequence_.fetch_add(count, std::memory_order_relaxed);
  std::uint32_t k = 0, kept = count;
  for (std::uint32_t b = head; b != no_slot; b = s.meta(b).next, ++k) {
    block_meta& m = s.meta(b);
    m.sequence = put_id + k;
    m.put_first_block = 0;
    m.put_blocks = count;
    if (m.borrowed && link_borrowed(s, b, tenant) != errc::ok) {
      if (content_->release(tier::ssd, m.ssd_slot)) (void)invalidate_ssd(std::span(&m.ssd_slot, 1));
      m.ssd_slot = no_slot;
      m.borrowed = false;
    }
    if (kept == count && m.dram_slot == no_slot && m.ssd_slot == no_slot) kept = k;  // a block with no copy ends it
  }
  if (kept == 0) {
    const session_hash owner = s.key();
    release_chain(head, false, nullptr, &owner);  // its links go with it
    return 0;
  }
  std::uint32_t cut = head;
  for (std::uint32_t i = 0; i + 1 < kept; ++i) cut = s.meta(cut).next;
  const std::uint32_t rest = s.meta(cut).next;
  s.meta(cut).next = no_slot;
  const session_hash owner = s.key();
  release_chain(rest, false, nullptr, &owner);
  s.publish(0, head, kept);
  s.set_truncated(false);
  s.count_tiers();
  note(s, false);
  detail::bump(counters_->adopted_blocks, kept);
  return kept;
}

locked_session store::impl::open_for_load(const session_key& key, const session_hash& h,
                                          std::span<const token_id> prompt, const request_keys& keys,
                                          std::uint32_t max_blocks) noexcept {
  locked_session s = index_->open(h, false);
  if (s && config_.remote) remember_remote(s, key);
  if (s && s.block_count() > 0) {
    // Held here, perhaps behind the remote tier (the last turns ran on other nodes).
    if (config_.remote) fill_from_remote_locked(s, prompt, keys, max_blocks);
    return s;
  }
  if (!sharing_ && !config_.remote) return s;
  const hash128 tenant = tenant_of(key.tenant);
  // Without a remote tier a record is made only for what the shared copies hold.
  if (!config_.remote && match_shared(prompt, keys, tenant, max_blocks).blocks == 0) return s;
  if (!s) {
    errc why = errc::ok;
    s = open_or_evict(h, &why);
    if (!s) return s;
    if (assign_tenant(s, tenant) != errc::ok) {
      erase_if_empty(s);
      return {};
    }
    remember_remote(s, key);
  }
  // Shared copies here first (a system prompt, say); what follows them, the turns that
  // ran on other nodes, comes from the remote tier.
  (void)adopt_shared_locked(s, prompt, keys, max_blocks);
  fill_from_remote_locked(s, prompt, keys, max_blocks);
  if (s.block_count() == 0) {
    erase_if_empty(s);
    return {};
  }
  return s;
}

}  // namespace attnstore
