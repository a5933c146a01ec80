// The read path: lookup, get, acquire and its read leases, verified SSD read batches.
#include <cstring>

#include "store_impl.hpp"

namespace attnstore {

// ---------------------------------------------------------------- the public reads with keys
// (store.cpp forwards the overloads without keys; these time the calls the same way)

lookup_result store::lookup(const session_key& key, std::span<const token_id> prompt, std::span<block_location> out,
                            const request_keys& keys) noexcept {
  const std::uint64_t t0 = detail::ticks();
  lookup_result r = impl_->lookup(key, prompt, out, keys);
  impl_->latencies_->lookup.observe_ticks(detail::ticks() - t0);
  return r;
}
get_result store::get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                      std::uint32_t block_count, std::span<std::byte> out, const request_keys& keys) noexcept {
  return impl_->timed_load([&] { return impl_->get(key, prompt, first_block, block_count, out, keys); });
}
get_result store::acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                          read_lease& lease, const request_keys& keys) noexcept {
  return impl_->timed_load([&] { return impl_->acquire(key, prompt, views, lease, keys); });
}

// ---------------------------------------------------------------- DRAM slot ownership

void store::impl::lease_dram(std::uint32_t slot) noexcept {
  dram_leases_[slot].fetch_add(1, std::memory_order_acq_rel);
}

void store::impl::unlease_dram(std::uint32_t slot) noexcept {
  // The last lease of a slot whose free was deferred frees it.
  if (dram_leases_[slot].fetch_sub(1, std::memory_order_acq_rel) == (free_pending | 1u)) {
    dram_leases_[slot].store(0, std::memory_order_relaxed);
    dram_->release(slot);
  }
}

bool store::impl::free_dram(std::uint32_t slot) noexcept {
  // Other blocks still hold a shared slot: this holder only lets go.
  if (content_ && !content_->release(tier::dram, slot)) return false;
  // Leases are taken only under the owning record's lock on a published block, and the
  // caller has unlinked the slot from its block first: no lease can start after this.
  // (A shared slot's last holder is the only one left to lease it.)
  const std::uint32_t was = dram_leases_[slot].fetch_or(free_pending, std::memory_order_acq_rel);
  if ((was & ~free_pending) == 0) {
    dram_leases_[slot].store(0, std::memory_order_relaxed);
    dram_->release(slot);
  } else {
    detail::bump(counters_->deferred_frees);
  }
  return true;
}

void store::impl::end_lease(read_lease& lease) noexcept {
  for (std::uint32_t i = 0; i < lease.count_; ++i) unlease_dram(lease.slots_[i]);
  // The pin belongs to the incarnation the lease was taken on, not to whoever holds
  // the key now.
  if (locked_session s = index_->open_record(lease.record_, lease.generation_)) {
    s.unpin();
    erase_if_empty(s);
  }
  lease.owner_ = nullptr;
  lease.count_ = 0;
  open_leases_.fetch_sub(1, std::memory_order_relaxed);
}

// ---------------------------------------------------------------- lookup

errc store::impl::check_keys(const request_keys& keys, std::size_t tokens, const char* what) const noexcept {
  if (keys.media.empty()) return errc::ok;  // lora and salt are any strings
  const char* why = nullptr;
  if (validate_request_keys(keys, tokens, &why) == errc::ok) return errc::ok;
  config_.log(log_level::error, std::string(what) + ": " + why + " (" + std::to_string(keys.media.size()) + " spans, " +
                                    std::to_string(tokens) + " tokens)");
  return errc::invalid_argument;
}

lookup_result store::impl::lookup(const session_key& key, std::span<const token_id> prompt,
                                  std::span<block_location> out, const request_keys& keys) noexcept {
  detail::bump(counters_->lookups);
  lookup_result r;
  const session_hash h = session_of(key);
  if (check_keys(keys, prompt.size(), "store::lookup") != errc::ok) {
    detail::bump(counters_->lookup_misses);  // nothing is reusable for keys that say nothing
    return r;
  }
  locked_session s;
  if (config_.remote) {
    // The remote tier may hold more of it than this store (nothing, or turns that ran on
    // other nodes): fetched into DRAM now, so the load that follows is local.
    s = open_for_load(key, h, prompt, keys, ~0u);
  } else {
    s = index_->open(h, false);
  }
  if (s && s.block_count() > 0) {
    r = index_->lookup(s, model_, prompt, out, keys);
  } else if (sharing_) {
    // A session that holds nothing (a new one) finds what other sessions hold of its
    // prompt: its first load takes those blocks as its own (open_for_load).
    r = match_shared(prompt, keys, tenant_of(key.tenant), ~0u, out);
  }
  if (s)
    note(s, true, prompt.size());
  else
    note_miss(h);
  if (r.tokens > 0) {
    detail::bump(counters_->lookup_hits);
    detail::bump(counters_->tokens_reusable, r.tokens);
  } else {
    detail::bump(counters_->lookup_misses);
  }
  return r;
}

// ---------------------------------------------------------------- get and acquire

get_result store::impl::get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                            std::uint32_t block_count, std::span<std::byte> out, const request_keys& keys) noexcept {
  detail::bump(counters_->gets);
  const std::size_t bb = geometry_.block_bytes();
  if (out.size() != std::size_t(block_count) * bb || block_count == 0) {
    config_.log(log_level::error,
                "store::get: out is " + std::to_string(out.size()) + " bytes for " + std::to_string(block_count) +
                    " blocks; need block_count >= 1 and block_count x " + std::to_string(bb) + " bytes");
    return {errc::invalid_argument, 0, 0};
  }
  if (check_keys(keys, prompt.size(), "store::get") != errc::ok) return {errc::invalid_argument, 0, 0};
  const session_hash h = session_of(key);
  locked_session s = open_for_load(key, h, prompt, keys, first_block + block_count);
  if (!s) {
    detail::bump(counters_->miss_not_found);
    note_miss(h);
    return {errc::not_found, 0, 0};
  }
  // A truncated view is not whole blocks at block-aligned positions: it is loaded
  // through acquire() (the hooks), which places and re-rotates each kept range.
  if (s.truncated()) return {errc::unsupported, 0, 0};
  return serve_locked(s, prompt, first_block, block_count, out, {}, nullptr, keys);
}

get_result store::impl::acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                                read_lease& lease, const request_keys& keys) noexcept {
  detail::bump(counters_->gets);
  if (lease.capacity() < views.size()) {
    config_.log(log_level::error, "store::acquire: lease capacity " + std::to_string(lease.capacity()) + " for " +
                                      std::to_string(views.size()) + " views");
    return {errc::invalid_argument, 0, 0};
  }
  if (check_keys(keys, prompt.size(), "store::acquire") != errc::ok) return {errc::invalid_argument, 0, 0};
  lease.release();
  const session_hash h = session_of(key);
  {
    // Room for what the load will read from SSD, made before the session is locked so
    // that others' demotions do not run under its lock (a lookup would wait on them).
    lookup_result want;
    if (locked_session s = index_->open(h, false)) want = index_->lookup(s, model_, prompt, {}, keys);
    if (want.ssd_blocks > free_dram_slots())
      make_room(std::min<std::uint32_t>(want.ssd_blocks, std::uint32_t(views.size())), h);
  }
  locked_session s = open_for_load(key, h, prompt, keys, std::uint32_t(views.size()));
  if (!s) {
    detail::bump(counters_->miss_not_found);
    note_miss(h);
    return {errc::not_found, 0, 0};
  }
  get_result res = serve_locked(s, prompt, 0, std::uint32_t(views.size()), {}, views, lease.slots_.data(), keys);
  if (res.status == errc::not_found) res.status = errc::ok;  // fewer blocks than views is normal here
  if (res.blocks > 0) {
    for (std::uint32_t i = 0; i < res.blocks; ++i) lease_dram(lease.slots_[i]);
    lease.owner_ = &owner_;
    open_leases_.fetch_add(1, std::memory_order_relaxed);
    lease.record_ = s.record_id();
    lease.generation_ = s.generation();
    lease.count_ = res.blocks;
    s.pin();  // not a victim while its blocks are being loaded
  }
  return res;
}

void store::impl::read_ssd_batch(ssd_read_batch& rb) noexcept {
  rb.self = this;
  for (std::size_t i = 0; i < rb.count; ++i) {
    ssd_read_batch::pending_read& p = rb.pending[i];
    p.verdict = errc::device_error;  // fail closed: only a verified completion says otherwise
    const block_meta& m = rb.session->meta(p.block);
    host_arena& arena = p.promoted ? *dram_ : *staging_;
    const std::int32_t region =
        p.promoted ? dram_->region_of(p.buffer_slot) : staging_buffer_base_ + staging_->region_of(p.buffer_slot);
    rb.reqs[i] = io_request{io_op::read,
                            ssd_->file_of(m.ssd_slot),
                            ssd_->offset_of(m.ssd_slot),
                            arena.data(p.buffer_slot),
                            std::uint32_t(slot_bytes_),
                            region,
                            0};
  }
  auto verify_one = [](void* ctx, std::size_t i) noexcept {
    auto& b = *static_cast<ssd_read_batch*>(ctx);
    store::impl& st = *b.self;
    ssd_read_batch::pending_read& p = b.pending[i];
    const block_meta& m = b.session->meta(p.block);
    if (b.reqs[i].result != std::int32_t(st.slot_bytes_)) return;  // stays device_error
    const std::byte* area = static_cast<const std::byte*>(b.reqs[i].buffer);
    const std::size_t bytes = st.geometry_.block_bytes();
    std::uint64_t cs = b.out ? copy_with_checksum(b.out + std::size_t(p.position - b.first_block) * bytes,
                                                  area + st.header_bytes_, bytes)
                             : checksum64(area + st.header_bytes_, bytes);
    format::block_header h;
    const bool ok =
        format::read_header(area, st.header_bytes_, st.geometry_.tokens_per_block, &h) == format::header_status::ok &&
        h.model == st.model_.value &&
        // A borrowed slot's header names the save that wrote it; its content is what
        // counts: chain (model, tokens, keys, the whole prefix), index, keys and checksum.
        (m.borrowed || (h.session == b.session->key().value && h.sequence == m.sequence)) &&
        h.block_index == std::uint32_t(m.saved_pos / st.geometry_.tokens_per_block) && h.chain == m.chain &&
        h.keys == m.keys && h.payload_checksum == m.checksum && cs == m.checksum;
    p.verdict = ok ? errc::ok : errc::checksum_error;
  };
  // Each request's result is set whatever execute() returns; a request whose callback
  // did not run keeps its failed verdict.
  const std::uint64_t t0 = detail::ticks();
  (void)device_->execute(std::span(rb.reqs, rb.count), config_.queue_depth, verify_one, &rb);
  latencies_->ssd_read.observe_ticks(detail::ticks() - t0);
  ++detail::ssd_read_batches;
  for (std::size_t i = 0; i < rb.count; ++i) {
    if (rb.reqs[i].result == std::int32_t(slot_bytes_))
      detail::bump(counters_->ssd_bytes_read, slot_bytes_);
    else
      detail::bump(counters_->io_errors);
  }
}

void store::impl::give_back_read_buffer(const ssd_read_batch& rb, std::size_t i) noexcept {
  const auto& p = rb.pending[i];
  if (rb.reqs[i].result == io_in_doubt) {
    quarantine_buffer();  // the transfer may still land in it
    return;
  }
  if (p.promoted)
    free_dram(p.buffer_slot);
  else
    staging_->release(p.buffer_slot);
}

get_result store::impl::serve_locked(locked_session& s, std::span<const token_id> prompt, std::uint32_t first_block,
                                     std::uint32_t block_count, std::span<std::byte> out, std::span<block_view> views,
                                     std::uint32_t* leased_slots, const request_keys& keys) noexcept {
  // A load of a session a prefetch made resident: how long ahead of its turn it was.
  if (const std::uint64_t at = prefetched_at_[s.record_id()].exchange(0, std::memory_order_relaxed))
    latencies_->prefetch_lead.observe_ticks(detail::ticks() - at);
  // Two modes: copy blocks into `out` (get), or make them resident in DRAM and describe
  // them in `views` and their slots in leased_slots (acquire: the caller leases them).
  const bool resident = out.empty();
  const std::size_t bb = geometry_.block_bytes();
  const hash128 tenant = sharing_ ? tenant_hash_of(s.record_id()) : hash128{};
  get_result res;
  const std::uint32_t end = first_block + block_count;

  // SSD blocks are read in batches; each block is verified (and, when copying, copied
  // out) by the completion callback while the device still works on the rest.
  ssd_read_batch rb{&s, out.data(), first_block};
  bool failed = false;  // a block failed: the verified prefix ends there

  auto fail_at = [&](std::uint32_t position, errc why) {
    if (failed) return;
    failed = true;
    res.status = why;
    res.blocks = position - first_block;
    // Every entry before the failing one matched whole (only the last entry visited
    // can match partially): the delivered tokens are their view counts, whatever a
    // truncated view made of them.
    res.tokens = 0;
    std::uint32_t b = s.block_at(first_block);
    for (std::uint32_t i = 0; i < res.blocks && b != no_slot; ++i, b = s.meta(b).next)
      res.tokens += s.meta(b).view_count;
    if (why == errc::checksum_error) {
      detail::bump(counters_->checksum_failures);
      detail::bump(counters_->miss_checksum);
      const session_hash owner = s.key();
      release_chain(s.truncate(position), false, nullptr, &owner);  // never served, never kept
    } else if (why == errc::device_error) {
      detail::bump(counters_->miss_io_error);
    }
  };
  auto flush = [&] {
    if (rb.count == 0) return;
    // A demand read: background promotions wait for it (they would share the device).
    demand_reads_.fetch_add(1, std::memory_order_relaxed);
    read_ssd_batch(rb);
    demand_reads_.fetch_sub(1, std::memory_order_relaxed);
    // Blocks complete in any order; outcomes are applied in position order.
    for (std::size_t i = 0; i < rb.count; ++i) {
      const ssd_read_batch::pending_read& p = rb.pending[i];
      bool keep = false;
      if (!failed) {
        if (p.verdict != errc::ok) {
          if (p.verdict == errc::checksum_error && content_) content_->forget(tier::ssd, s.meta(p.block).ssd_slot);
          fail_at(p.position, p.verdict);
        } else {
          detail::bump(counters_->blocks_served_ssd);
          res.tokens += p.matched;
          if (p.promoted) {
            s.meta(p.block).dram_slot = p.buffer_slot;
            if (sharing_) offer_copy(s.meta(p.block), tenant, tier::dram);
            detail::bump(counters_->promoted_blocks);
            keep = true;
            if (resident) {
              views[p.position - first_block] = {dram_payload(p.buffer_slot), p.matched, p.first, p.view_position,
                                                 s.meta(p.block).shift};
              leased_slots[p.position - first_block] = p.buffer_slot;
            }
          }
        }
      }
      if (!keep) give_back_read_buffer(rb, i);
    }
    rb.count = 0;
  };

  std::uint32_t i = 0;  // entries walked
  auto visit = [&](const block_match& bm) {
    if (bm.index >= end || failed) return false;
    i = bm.index + 1;
    if (bm.index < first_block) return true;
    block_meta& m = s.meta(bm.block);
    const std::uint32_t matched = bm.tokens;
    if (m.dram_slot == no_slot && sharing_) take_dram_copy(m, tenant);  // another holder's copy: no read
    if (m.dram_slot != no_slot) {
      bool ok = true;
      if (resident) {
        // Verified like a copy: what the engine loads is what was checksummed.
        if (config_.verify_dram_reads) ok = checksum64(dram_payload(m.dram_slot), bb) == m.checksum;
        views[bm.index - first_block] = {dram_payload(m.dram_slot), matched, bm.first, bm.position, m.shift};
        leased_slots[bm.index - first_block] = m.dram_slot;
      } else {
        std::byte* dst = out.data() + std::size_t(bm.index - first_block) * bb;
        if (config_.verify_dram_reads)
          ok = copy_with_checksum(dst, dram_payload(m.dram_slot), bb) == m.checksum;
        else
          std::memcpy(dst, dram_payload(m.dram_slot), bb);
      }
      if (!ok) {
        flush();
        if (content_) content_->forget(tier::dram, m.dram_slot);
        fail_at(bm.index, errc::checksum_error);
        return false;
      }
      detail::bump(counters_->blocks_served_dram);
      res.tokens += matched;
      return true;
    }
    // Reading for a copy promotes only into free DRAM; making a block resident may
    // demote other sessions for room (never this one's).
    std::uint32_t buf = resident ? alloc_dram(s, 0) : dram_->allocate();
    const bool promoted = buf != no_slot;
    if (!promoted && !resident) {
      buf = staging_->allocate();
      if (buf == no_slot) {
        flush();
        buf = staging_->allocate();
      }
    }
    if (buf == no_slot) {
      flush();
      fail_at(bm.index, resident ? errc::no_space : errc::retry);
      return false;
    }
    rb.add(bm.block, bm.index, buf, promoted, matched, bm.first, bm.position);
    if (rb.count == batch_max) flush();
    return true;
  };
  index_->match_prompt(s, model_, prompt, visit, keys);
  flush();
  if (!failed) {
    res.blocks = (i > first_block ? i : first_block) - first_block;
    if (res.blocks < block_count) res.status = errc::not_found;
    if (res.blocks == 0) detail::bump(counters_->miss_prefix_mismatch);
  }
  s.count_tiers();
  note_load(s, prompt.size());
  // Blocks promoted for this load count against the tenant's DRAM cap: its other
  // sessions make the room (never this one, which is being served).
  if (res.blocks > 0) trim_tenant(s, no_slot, true, false);
  erase_if_empty(s);  // a corrupt first block left nothing
  return res;
}

}  // namespace attnstore
