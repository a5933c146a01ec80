// The remote tier (remote_tier.hpp): a session this store holds nothing of is fetched
// into DRAM; after each save the session is written behind.
#include <algorithm>
#include <vector>

#include "store_impl.hpp"

namespace attnstore {

std::uint32_t store::impl::fill_from_remote_locked(locked_session& s, std::span<const token_id> prompt,
                                                   const request_keys& keys, std::uint32_t max_blocks, bool may_demote,
                                                   bool keys_known) noexcept {
  if (!config_.remote) return 0;  // (remote_ids_ is empty then)
  const remote_session& id = remote_ids_[s.record_id()];
  if (id.session.value.is_zero()) return 0;
  // A session held here may be behind the tier (its last turns ran on other nodes). The
  // tier is told which leading entries of the view it holds the prompt matches whole, and
  // how much of the prompt they give: its answer starts after those of them its view has
  // too, and is read only when it gives more of the prompt. Allocations here are per
  // fetch (a network round trip), never per layer.
  const std::uint32_t tpb = geometry_.tokens_per_block;
  std::vector<remote_held_block> held;
  std::uint64_t matched = 0;
  if (s.block_count() > 0) {
    if (s.pins() > 0) return 0;  // a load or save is using its blocks now
    matched = index_->match_prompt(
        s, model_, prompt,
        [&](const block_match& bm) {
          const block_meta& m = s.meta(bm.block);
          if (bm.whole && m.tokens == tpb && held.size() == bm.index)
            held.push_back({m.chain, std::uint32_t(m.saved_pos / tpb), m.view_first, m.view_count});
          return true;
        },
        keys_known ? keys : request_keys{});
    if (matched >= prompt.size()) return 0;  // it holds the whole prompt
  }
  const bool whole_history = prompt.empty();
  // Room for the blocks the prompt needs past those held (demoting others for 16 at
  // most when none is free) and, from free DRAM only, a few more: a truncated view may
  // have more blocks than its tokens fill (each cut can leave a partial block at either
  // side of it).
  const std::uint32_t needed =
      whole_history ? max_blocks : std::min<std::uint32_t>(max_blocks, geometry_.blocks_for(prompt.size()));
  const std::uint32_t base = needed > held.size() ? needed - std::uint32_t(held.size()) : 0;
  const std::uint32_t want = whole_history ? base : std::min<std::uint32_t>(max_blocks, base + 8);
  std::vector<std::uint32_t> slots;
  std::vector<std::byte*> payloads;
  slots.reserve(want);
  for (std::uint32_t i = 0; i < want; ++i) {
    std::uint32_t slot = dram_->allocate();
    if (slot == no_slot && may_demote && i < std::min<std::uint32_t>(base, 16))
      slot = alloc_dram(s, std::uint32_t(held.size()));
    if (slot == no_slot) break;
    slots.push_back(slot);
    payloads.push_back(dram_payload(slot));
  }
  const std::size_t room = slots.size();
  std::vector<token_id> tokens(room * tpb);
  std::vector<remote_block> blocks(room);
  std::vector<std::uint64_t> checksums(room);
  detail::bump(counters_->remote_fetches);
  remote_found found{};
  if (room) found = config_.remote->fetch(id, prompt, {held, matched}, {payloads, tokens, blocks, checksums});
  const std::uint32_t first = found.first;
  const std::uint32_t got = first <= held.size() ? std::min<std::uint32_t>(std::uint32_t(room), found.blocks) : 0;
  // What came back is checked again against this request: entries a view can hold
  // (valid_view_entry, where this view places them), kept token ids that continue the
  // prompt (the last block's at least in part), and the request's own keys digests at
  // the view's positions (when it gave them). The payloads were verified by the tier
  // against their records (remote_tier::fetch's contract); their checksums come back
  // with them, so no second pass over the bytes.
  std::uint32_t keep = 0;
  std::uint64_t start = 0;  // the view position the answer starts at: after the held entries it skipped
  for (std::uint32_t i = 0; i < first && i < held.size(); ++i) start += held[i].view_count;
  std::uint64_t pos = start, reach = start;
  for (; keep < got; ++keep) {
    const remote_block& r = blocks[keep];
    if (!valid_view_entry(r, pos, tpb, r.tokens < tpb)) break;
    std::uint32_t same = r.view_count;  // kept tokens that are the prompt's
    if (!whole_history) {
      same = std::uint32_t(
          common_prefix(std::span<const token_id>(tokens).subspan(std::size_t(keep) * tpb + r.view_first, r.view_count),
                        prompt.subspan(std::min<std::size_t>(pos, prompt.size()))));
      if (same == 0) break;
      const hash128 digest =
          keys.empty() ? hash128{} : detail::block_keys_at(keys, std::int64_t(pos) - r.view_first, r.tokens);
      if (keys_known && !(r.keys == digest)) break;
    }
    reach = pos + same;
    pos += r.view_count;
    // A partial block ends the view; a block the prompt leaves inside ends what is reused.
    if (r.tokens < tpb || same < r.view_count) {
      ++keep;
      break;
    }
  }
  // Worth taking only when it covers more of the prompt than what this store holds.
  if (!whole_history && reach <= matched) keep = 0;
  // Blocks in place (each at its entry's index, as one save writes them) are numbered as
  // one put of blocks [first, first + keep); a view's moved blocks each as a put of its
  // own, so every block's SSD header stays one recovery and reads accept.
  bool one_put = true;
  for (std::uint32_t i = 0; i < keep; ++i) one_put = one_put && blocks[i].index == first + i;
  std::uint32_t head = no_slot, tail = no_slot, made = 0;
  const std::uint64_t put_id = keep ? sequence_.fetch_add(keep, std::memory_order_relaxed) : 0;
  pos = start;
  for (; made < keep; ++made) {
    const remote_block& r = blocks[made];
    const std::uint32_t b = s.new_block(std::span<const token_id>(tokens).subspan(std::size_t(made) * tpb, r.tokens));
    if (b == no_slot) break;
    block_meta& m = s.meta(b);
    m.keys = r.keys;
    m.previous = r.previous;
    m.chain = chain_hash(r.previous, model_, s.tokens_of(b), m.keys);
    m.checksum = checksums[made];
    m.saved_pos = std::uint64_t(r.index) * tpb;
    m.view_first = r.view_first;
    m.view_count = r.view_count;
    m.shift = std::int64_t(pos) - std::int64_t(r.view_first) - std::int64_t(m.saved_pos);
    m.dram_slot = slots[made];
    m.sequence = put_id + made;
    m.put_first_block = one_put ? first : r.index;
    m.put_blocks = one_put ? keep : 1;
    m.published = true;
    s.append(head, tail, b);
    pos += r.view_count;
  }
  for (std::size_t i = made; i < room; ++i) free_dram(slots[i]);
  if (made == 0) {
    detail::bump(counters_->remote_misses);
    return 0;
  }
  // The fetched blocks replace whatever this store held after the blocks it kept.
  const session_hash owner = s.key();
  release_chain(s.publish(first, head, made), false, nullptr, &owner);
  // A view that is not the history as saved is matched token by token (truncate.hpp).
  view_continuation view;
  for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next) continue_view(view, s.meta(b), tpb);
  s.set_truncated(!view.straight());
  if (sharing_) {
    const hash128 tenant = tenant_hash_of(s.record_id());
    for (std::uint32_t b = head; b != no_slot; b = s.meta(b).next) offer_copy(s.meta(b), tenant, tier::dram);
  }
  s.count_tiers();
  note(s, false);
  detail::bump(counters_->remote_blocks_fetched, made);
  return made;
}

void store::impl::publish_remote_locked(locked_session& s) noexcept {
  if (!config_.remote) return;  // (remote_ids_ is empty then)
  const remote_session& id = remote_ids_[s.record_id()];
  if (s.block_count() == 0 || id.session.value.is_zero()) return;
  // A session unlikely to return is not worth the network and the tier's space; it is
  // published later if its user is seen typing (run_remote_job). Marked declined before
  // the policy is asked: a hint that races this save then always finds it to re-ask.
  remote_record& rr = remote_state_[s.record_id()];
  rr.declined.store(true, std::memory_order_relaxed);
  bool worth;
  {
    std::lock_guard lock(policy_mutex_);
    worth = policy_->worth_sharing(s.record_id());
  }
  if (!worth) {
    detail::bump(counters_->remote_publishes_declined);
    return;
  }
  rr.declined.store(false, std::memory_order_relaxed);
  // The tier may have lost blocks published before (a failed write, eviction, a server
  // restarted): every block still in DRAM goes again, and the tier sends only the absent
  // ones. A lost block that is only on SSD here cannot be sent, and the tier stays
  // incomplete: resends then back off (after 1, 3, 7, ... 63 publishes).
  bool resend = false;
  if (!config_.remote->incomplete(id)) {
    rr.resend_wait = rr.resend_round = 0;
  } else if (rr.resend_wait > 0) {
    --rr.resend_wait;
  } else {
    resend = true;
  }
  std::vector<token_id> tokens;
  std::vector<remote_block> blocks;
  std::vector<const std::byte*> payloads;
  tokens.reserve(std::size_t(s.block_count()) * geometry_.tokens_per_block);
  blocks.reserve(s.block_count());
  payloads.reserve(s.block_count());
  // Up to the first block that is neither in DRAM nor published (only on SSD: not read
  // back for this), and at most one partial block, the last.
  const auto collect = [&](bool all_in_dram) {
    tokens.clear();
    blocks.clear();
    payloads.clear();
    for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next) {
      const block_meta& m = s.meta(b);
      if (!m.published && m.dram_slot == no_slot) break;
      const auto t = s.tokens_of(b);
      tokens.insert(tokens.end(), t.begin(), t.end());
      blocks.push_back(remote_block{m.previous, m.keys, std::uint32_t(m.saved_pos / geometry_.tokens_per_block),
                                    m.tokens, m.view_first, m.view_count});
      const bool send = m.dram_slot != no_slot && (all_in_dram || !m.published);
      payloads.push_back(send ? dram_payload(m.dram_slot) : nullptr);
      if (m.tokens < geometry_.tokens_per_block) break;
    }
  };
  collect(resend);
  if (payloads.empty()) return;
  errc e = config_.remote->publish(id, tokens, blocks, payloads);
  if (e != errc::ok && resend) {  // all of it is over the tier's bound: the new blocks at least
    resend = false;
    collect(false);
    e = config_.remote->publish(id, tokens, blocks, payloads);
  }
  if (e != errc::ok) {
    detail::bump(counters_->remote_publishes_skipped);  // over the tier's bound, or failing: local tiers only
    return;
  }
  if (resend) {
    detail::bump(counters_->remote_resends);
    rr.resend_wait = std::uint8_t((2u << std::min<std::uint8_t>(rr.resend_round, 5)) - 1);
    if (rr.resend_round < 5) ++rr.resend_round;
  }
  std::size_t i = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot && i < payloads.size(); b = s.meta(b).next, ++i)
    s.meta(b).published = true;
  detail::bump(counters_->remote_publishes);
}

}  // namespace attnstore
