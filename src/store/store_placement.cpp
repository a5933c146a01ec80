// Placement and eviction: DRAM and SSD slots, demotion, victims, drop, truncation, pins.
// Every record lock taken while another is held is a try_lock (through
// cache_index::try_open_record), so no two operations can wait on each other.
#include <algorithm>

#include "attnstore/detail/checkpoint_name.hpp"
#include "store_impl.hpp"

namespace attnstore {

// ---------------------------------------------------------------- freeing

errc store::impl::invalidate_ssd(std::span<const std::uint32_t> slots, bool wipe) noexcept {
  // Erase first so a restart cannot bring the block back. A slot that cannot be erased
  // (after one retry) is quarantined, not reused: reusing it would let a later partial
  // write pair its old header with new data.
  errc status = errc::ok;
  erase_slots(slots, wipe, [&](std::uint32_t slot, bool erased) {
    if (erased) {
      ssd_->release(slot);
    } else {
      detail::bump(counters_->io_errors);
      detail::bump(counters_->quarantined_slots);
      status = errc::device_error;
    }
  });
  return status;
}

void store::impl::retire_block(const session_hash& owner, const block_meta& m) noexcept {
  if (links_ && links_->append(link_of(owner, hash128{}, m), format::retire_magic) != errc::ok)
    detail::bump(counters_->io_errors);
}

errc store::impl::release_chain(std::uint32_t first, bool wipe, bool* kept_shared, const session_hash* owner) noexcept {
  // The blocks are detached from their session (or never were in one).
  std::uint32_t ssd_slots[batch_max];
  std::size_t n = 0;
  errc status = errc::ok;
  for (std::uint32_t b = first; b != no_slot;) {
    block_meta& m = index_->block(b);
    const std::uint32_t next = m.next;
    if (m.dram_slot != no_slot) free_dram(m.dram_slot);
    if (m.ssd_slot != no_slot && kept_shared && m.borrowed) *kept_shared = true;  // its link names the session
    // A slot other blocks still hold stays, header and all (its header may name this
    // session: recovery is told by a tombstone that the session is gone, or by the
    // block's retirement that this block of it is).
    const bool stays = m.ssd_slot != no_slot && content_ && !content_->release(tier::ssd, m.ssd_slot);
    if (owner && m.ssd_slot != no_slot && (stays || m.borrowed)) retire_block(*owner, m);
    if (stays) {
      if (kept_shared) *kept_shared = true;
    } else if (m.ssd_slot != no_slot) {
      ssd_slots[n++] = m.ssd_slot;
      if (n == batch_max) {
        if (invalidate_ssd(std::span(ssd_slots, n), wipe) != errc::ok) status = errc::device_error;
        n = 0;
      }
    }
    index_->release_block(b);
    b = next;
  }
  if (n && invalidate_ssd(std::span(ssd_slots, n), wipe) != errc::ok) status = errc::device_error;
  return status;
}

errc store::impl::drop_locked(locked_session& s, bool wipe) noexcept {
  const session_hash owner = s.key();
  errc e = release_chain(s.truncate(0), wipe, nullptr, &owner);
  erase_record(s);
  return e;
}

// ---------------------------------------------------------------- victims

bool store::impl::evict_some_ssd_victim(std::uint32_t exclude_a, std::uint32_t exclude_b) noexcept {
  // The slot is for exclude_a's blocks: a tenant at its SSD cap gives up its own first.
  std::uint32_t own = no_slot;
  if (exclude_a != no_slot) {
    std::lock_guard lock(policy_mutex_);
    const std::uint32_t t = record_tenant_[exclude_a];
    if (t != no_slot && (*tenants_)[t].over_ssd(1)) own = t;
  }
  locked_session victim;
  if (own != no_slot)
    victim = pick_victim(
        policy::level::ssd,
        [&](locked_session& h) { return h.ssd_blocks() > 0 && record_tenant_[h.record_id()] == own; }, exclude_a,
        exclude_b);
  if (!victim)
    victim = pick_victim(
        policy::level::ssd, [](locked_session& h) { return h.ssd_blocks() > 0; }, exclude_a, exclude_b);
  if (!victim) return false;
  if (own != no_slot && record_tenant_[victim.record_id()] == own) {
    std::lock_guard lock(policy_mutex_);
    ++(*tenants_)[own].quota_evicted_sessions;
  }
  detail::bump(counters_->evicted_sessions);
  detail::bump(counters_->evicted_blocks, victim.block_count());
  drop_locked(victim);
  return true;
}

std::uint32_t store::impl::alloc_ssd(std::uint32_t exclude_a, std::uint32_t exclude_b, bool may_evict) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::uint32_t slot = ssd_->allocate();
    if (slot != no_slot) return slot;
    if (!may_evict || !evict_some_ssd_victim(exclude_a, exclude_b)) break;
  }
  return no_slot;
}

// ---------------------------------------------------------------- demotion

errc store::impl::demote_locked(locked_session& s, std::uint32_t until_position, std::uint32_t exclude, bool may_evict,
                                std::uint32_t* freed) noexcept {
  if (!ssd_) return errc::unsupported;
  std::uint32_t blocks[batch_max], slots[batch_max];
  std::int32_t results[batch_max];
  errc status = errc::ok;
  std::uint32_t pos = 0, let_go = 0;
  const hash128 tenant = sharing_ ? tenant_hash_of(s.record_id()) : hash128{};
  auto drop_dram_copy = [&](block_meta& m) {
    if (free_dram(m.dram_slot)) ++let_go;
    m.dram_slot = no_slot;
    detail::bump(counters_->demoted_blocks);
  };
  for (std::uint32_t b = s.first_block(); b != no_slot && pos < until_position && status == errc::ok;) {
    // Gather up to batch_max DRAM-only blocks, then write them as one batch.
    std::size_t n = 0;
    for (; b != no_slot && pos < until_position && n < batch_max; b = s.meta(b).next, ++pos) {
      block_meta& m = s.meta(b);
      if (m.dram_slot == no_slot) continue;
      // Already durable, or its content is (another holder's SSD copy): the DRAM copy just goes.
      if (m.ssd_slot != no_slot || (content_ && take_ssd_copy(s, b, tenant))) {
        drop_dram_copy(m);
        continue;
      }
      std::uint32_t ss = alloc_ssd(s.record_id(), exclude, may_evict);
      if (ss == no_slot) {
        status = errc::no_space;
        break;
      }
      blocks[n] = b;
      slots[n] = ss;
      ++n;
    }
    if (n == 0) continue;
    errc e = write_ssd_blocks(s, std::span(blocks, n), std::span(slots, n), std::span(results, n));
    adopt_written(s, std::span(blocks, n), std::span(slots, n), std::span(results, n));
    for (std::size_t i = 0; i < n; ++i) {
      block_meta& m = s.meta(blocks[i]);
      if (m.ssd_slot != no_slot) drop_dram_copy(m);  // written: the DRAM copy goes (the copy stays on failure)
    }
    if (e != errc::ok) status = e;
  }
  if (freed) *freed += let_go;
  s.count_tiers();
  note(s, false);
  // What went to SSD counts against the tenant's SSD cap; only where data may be
  // dropped for room (not background work, not close).
  if (may_evict) trim_tenant(s, exclude, false, false);
  return status;
}

std::uint32_t store::impl::demote_some_victim(std::uint32_t exclude, bool background, const hash128* only_tenant,
                                              bool* moved) noexcept {
  // `want` runs under the policy mutex, so it may ask the policy and the tenant table.
  // A tenant is matched by its hash: an entry index may be reused once its tenant is gone.
  auto of_tenant = [&](std::uint32_t rec) {
    const std::uint32_t t = record_tenant_[rec];
    return t != no_slot && (*tenants_)[t].tenant == *only_tenant;
  };
  locked_session victim = pick_victim(
      policy::level::dram,
      [&](locked_session& h) {
        return h.dram_blocks() > 0 && !(background && policy_->queued(h.record_id())) &&
               (!only_tenant || of_tenant(h.record_id()));
      },
      exclude, no_slot);
  if (!victim) return 0;
  bool dropped = false;
  const std::uint32_t before = victim.dram_blocks();
  const std::uint32_t freed = demote_victim(victim, exclude, background, &dropped);
  if (moved) *moved = dropped || victim.dram_blocks() < before;
  if (only_tenant && freed > 0) {
    std::lock_guard lock(policy_mutex_);
    if (const std::uint32_t t = tenants_->find(*only_tenant); t != no_slot) {
      if (dropped)
        ++(*tenants_)[t].quota_evicted_sessions;
      else
        (*tenants_)[t].quota_demoted_blocks += freed;
    }
  }
  return freed;
}

std::uint32_t store::impl::demote_victim(locked_session& victim, std::uint32_t exclude, bool background,
                                         bool* dropped) noexcept {
  // What counts is the DRAM slots that left use: a block of a shared prefix other
  // sessions hold frees nothing when this one lets go.
  std::uint32_t freed = 0;
  // Background work takes only free SSD slots: it must not drop data to make room.
  const errc e = demote_locked(victim, no_slot, exclude, !background, &freed);
  if (background) return freed;
  if ((e == errc::no_space || e == errc::unsupported) && victim.dram_blocks() > 0) {
    // No SSD tier, or SSD full of protected data: the cache gives the victim up rather
    // than refusing the new blocks. An I/O error is not a reason to drop data: the
    // victim keeps its DRAM copies and the request finds no room.
    detail::bump(counters_->evicted_sessions);
    detail::bump(counters_->evicted_blocks, victim.block_count());
    const std::uint32_t before = dram_->used();
    drop_locked(victim);
    *dropped = true;
    return freed + (before > dram_->used() ? before - dram_->used() : 0);
  }
  return freed;
}

void store::impl::make_room(std::uint32_t blocks, const session_hash& for_session, const hash128* tenant) noexcept {
  const std::uint32_t self = index_->find(for_session);  // not the session being served
  // A tenant that would pass its DRAM cap makes the room from its own sessions.
  for (std::uint32_t round = 0; tenant && round < index_->max_sessions(); ++round) {
    {
      std::lock_guard lock(policy_mutex_);
      const std::uint32_t t = tenants_->find(*tenant);
      if (t == no_slot || !(*tenants_)[t].over_dram(blocks)) break;
    }
    if (demote_some_victim(self, false, tenant) == 0) break;
  }
  if (free_dram_slots() >= blocks) return;
  // A victim whose blocks are all shared with others frees nothing but moves: the
  // next one is tried. One that could not move (an I/O error) ends it.
  for (int attempt = 0; attempt < 16 && free_dram_slots() < blocks; ++attempt) {
    bool moved = false;
    if (demote_some_victim(self, false, nullptr, &moved) == 0 && !moved) break;
  }
}

std::uint32_t store::impl::alloc_dram(locked_session& self, std::uint32_t self_keep_from) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::uint32_t slot = dram_->allocate();
    if (slot != no_slot) return slot;
    bool moved = false;
    if (demote_some_victim(self ? self.record_id() : no_slot, false, nullptr, &moved) || moved) continue;
    // Nobody else to demote: move this session's own older blocks down.
    if (self && self_keep_from > 0 && self.dram_blocks() > 0 && ssd_) {
      const std::uint32_t before = dram_->used();
      (void)demote_locked(self, self_keep_from, no_slot);
      if (dram_->used() < before) continue;
    }
    break;
  }
  return no_slot;
}

locked_session store::impl::open_or_evict(const session_hash& key, errc* why) noexcept {
  for (int attempt = 0; attempt < 16; ++attempt) {
    errc e = errc::ok;
    locked_session s = index_->open(key, true, &e);
    if (s) return s;
    if (e != errc::retry) {  // the key's shard is at its limit: evicting elsewhere cannot help
      if (why) *why = e;
      return {};
    }
    // Every record is live: drop the policy's first victim, from SSD, else from DRAM,
    // else any idle session that holds no blocks (the policy ranks only those with some).
    auto any = [](locked_session&) { return true; };
    locked_session victim = pick_victim(policy::level::ssd, any, no_slot, no_slot);
    if (!victim) victim = pick_victim(policy::level::dram, any, no_slot, no_slot);
    for (std::uint32_t rec = 0; !victim && rec < index_->max_sessions(); ++rec) {
      locked_session h = index_->try_open_record(rec);
      if (h && h.pins() == 0 && h.block_count() == 0) victim = std::move(h);
    }
    if (!victim) break;
    detail::bump(counters_->evicted_sessions);
    detail::bump(counters_->evicted_blocks, victim.block_count());
    drop_locked(victim);
  }
  if (why) *why = errc::no_space;
  return {};
}

// ---------------------------------------------------------------- drop, pin, demote, truncate

errc store::impl::drop(const session_key& key) noexcept {
  errc e = errc::not_found;
  if (config_.remote) config_.remote->drop(config_.remote->identify(key));  // (its checkpoint's: below)
  if (locked_session s = index_->open(session_of(key), false)) e = drop_session_locked(s);
  // A model that keeps a checkpoint (state groups, window tails): the hooks save it as a
  // companion session; a drop of the session deletes it too.
  detail::checkpoint_name companion;
  if (geometry_.checkpoint_bytes() > 0 && detail::checkpoint_key(key, companion)) {
    if (config_.remote) config_.remote->drop(config_.remote->identify(companion.key));
    if (locked_session c = index_->open(session_of(companion.key), false)) {
      const errc ce = drop_session_locked(c);
      if (e == errc::not_found) e = ce;
    }
  }
  return e;
}

errc store::impl::drop_session_locked(locked_session& s) noexcept {
  const session_hash h = s.key();
  // Erasures of blocks the session's saves replaced are made durable first: a drop cut
  // short by a power loss can then leave only a prefix of the latest history, never an
  // older history brought back by undone erasures.
  if (ssd_ && s.ssd_blocks() > 0 && device_->sync() != errc::ok) detail::bump(counters_->io_errors);
  // A deletion deletes: SSD slots are zeroed whole (KV and token ids), not just their
  // headers, and the zeroes are made durable before this returns. Slots of a shared
  // prefix that other sessions still hold stay (their KV is theirs as much).
  bool kept_shared = false;
  errc e = release_chain(s.truncate(0), true, &kept_shared);
  erase_record(s);
  detail::bump(counters_->dropped_sessions);
  // A header that could not be zeroed, or a shared slot or link that names the
  // session, would bring it back at the next restart: a tombstone (session, sequence
  // bound) tells recovery to ignore them.
  if (e != errc::ok || kept_shared) e = write_tombstone(h) ? errc::ok : errc::device_error;
  if (ssd_ && device_->sync() != errc::ok) {
    detail::bump(counters_->io_errors);
    if (!write_tombstone(h)) e = errc::device_error;
  }
  return e;
}

errc store::impl::truncate(const session_key& key, std::span<const token_id> history,
                           const truncation_plan& plan) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  if (!plan.needed || plan.drop == 0 || plan.drop % tpb || plan.sink + plan.drop > plan.history)
    return errc::invalid_argument;
  if (history.size() < plan.history) return errc::invalid_argument;
  const session_hash h = session_of(key);
  locked_session s = index_->open(h, false);
  // Held nowhere here, or behind the remote tier (its last turns ran on other nodes): the
  // view to cut comes from the tier first, so a turn that overflows the context window on
  // any node keeps its saved KV. (Truncation has no request keys: the keys digests are
  // taken as the tier gives them and checked when the load comes.)
  if (config_.remote && (!s || s.token_count() != plan.history)) {
    const std::uint32_t most = geometry_.blocks_for(plan.history) + 8;
    if (!s) {
      s = open_for_load(key, h, {}, {}, most);
    } else if (s.pins() == 0) {
      remember_remote(s, key);
      (void)fill_from_remote_locked(s, history.first(plan.history), {}, most, true, false);
    }
  }
  if (!s) return errc::not_found;
  if (s.pins() > 0) return errc::rejected;
  if (s.token_count() != plan.history) return errc::invalid_argument;
  // The view must be `history` (token by token) before any of it is cut.
  {
    std::uint64_t pos = 0;
    for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next) {
      const block_meta& m = s.meta(b);
      const auto have = s.tokens_of(b).subspan(m.view_first, m.view_count);
      if (!std::equal(have.begin(), have.end(), history.begin() + std::ptrdiff_t(pos))) return errc::invalid_argument;
      pos += m.view_count;
    }
  }
  const std::uint64_t cut_begin = plan.sink, cut_end = plan.sink + plan.drop;
  std::uint32_t kept_head = no_slot, kept_tail = no_slot, gone_head = no_slot, gone_tail = no_slot;
  auto append = [&](std::uint32_t& head, std::uint32_t& tail, std::uint32_t b) {
    s.meta(b).next = no_slot;
    if (tail == no_slot)
      head = b;
    else
      s.meta(tail).next = b;
    tail = b;
  };
  std::uint64_t pos = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot;) {
    block_meta& m = s.meta(b);
    const std::uint32_t next = m.next;
    const std::uint64_t vs = pos, ve = pos + m.view_count;
    pos = ve;
    if (ve <= cut_begin) {
      append(kept_head, kept_tail, b);  // inside the sink
    } else if (vs >= cut_end) {
      m.shift -= std::int64_t(plan.drop);  // after the cut: moves back
      append(kept_head, kept_tail, b);
    } else if (vs >= cut_begin && ve <= cut_end) {
      append(gone_head, gone_tail, b);  // entirely cut
    } else if (vs < cut_begin) {
      m.view_count = std::uint32_t(cut_begin - vs);  // the sink's boundary block keeps its head
      append(kept_head, kept_tail, b);
    } else {
      const std::uint32_t skip = std::uint32_t(cut_end - vs);  // keeps its tail, moved back
      m.view_first += skip;
      m.view_count -= skip;
      m.shift -= std::int64_t(plan.drop);
      append(kept_head, kept_tail, b);
    }
    b = next;
  }
  s.relink(kept_head);
  s.set_truncated(true);
  const session_hash owner = s.key();
  (void)release_chain(gone_head, false, nullptr, &owner);
  note(s, true);
  // The cut view goes to the tier now (a manifest: its blocks are there already), so a
  // node the next turn lands on finds it even if this node never saves again.
  publish_remote_locked(s);
  return errc::ok;
}

errc store::impl::pin(const session_key& key) noexcept {
  locked_session s = index_->open(session_of(key), false);
  if (!s) return errc::not_found;
  s.pin();
  return errc::ok;
}

errc store::impl::unpin(const session_key& key) noexcept {
  locked_session s = index_->open(session_of(key), false);
  if (!s) return errc::not_found;
  s.unpin();
  return errc::ok;
}

errc store::impl::keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept {
  locked_session s = index_->open(key, false);
  if (!s) return errc::not_found;
  note(s, false);  // makes sure the policy knows the session
  std::lock_guard lock(policy_mutex_);
  policy_->on_blocks(s.record_id(), policy::level::hbm, blocks);
  return errc::ok;
}

bool store::impl::hbm_victim(session_hash& out) noexcept {
  locked_session victim = pick_victim(
      policy::level::hbm, [](locked_session&) { return true; }, no_slot, no_slot);
  if (!victim) return false;
  out = victim.key();
  return true;
}

errc store::impl::demote(const session_key& key) noexcept {
  if (!ssd_) return errc::unsupported;
  locked_session s = index_->open(session_of(key), false);
  if (!s) return errc::not_found;
  return demote_locked(s, no_slot, no_slot);
}

}  // namespace attnstore
