// The save path: put, reserve/commit/abort, and the one routine that writes blocks to SSD.
#include <algorithm>
#include <cstring>

#include "store_impl.hpp"

namespace attnstore {

// ---------------------------------------------------------------- the public saves with keys
// (store.cpp forwards the overloads without keys; these time the calls the same way)

errc store::put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                std::span<const std::byte> blocks, const request_keys& keys) noexcept {
  const std::uint64_t t0 = detail::ticks();
  const errc e = impl_->put(key, tokens, first_block, blocks, keys);
  impl_->latencies_->save.observe_ticks(detail::ticks() - t0);
  return e;
}
errc store::reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                    std::span<std::byte*> payloads, save_reservation& reservation, const request_keys& keys) noexcept {
  return impl_->reserve(key, tokens, first_block, payloads, reservation, keys);
}

// ---------------------------------------------------------------- SSD writes

errc store::impl::write_ssd_blocks(locked_session& s, std::span<const std::uint32_t> blocks,
                                   std::span<const std::uint32_t> ssd_slots, std::span<std::int32_t> results) noexcept {
  errc first = errc::ok;
  const hash128 tenant = tenant_hash_of(s.record_id());
  auto header_of = [&](const block_meta& m) {
    format::block_header h{};
    h.header_bytes = std::uint32_t(header_bytes_);
    h.model = model_.value;
    h.session = s.key().value;
    h.tenant = tenant;
    h.block_index = std::uint32_t(m.saved_pos / geometry_.tokens_per_block);
    h.put_first_block = m.put_first_block;
    h.put_blocks = m.put_blocks;
    h.chain = m.chain;
    h.keys = m.keys;
    h.payload_bytes = std::uint32_t(geometry_.block_bytes());
    h.payload_checksum = m.checksum;
    h.sequence = m.sequence;
    h.tokens_per_block = geometry_.tokens_per_block;
    return h;
  };
  // A block whose content got an SSD copy meanwhile (another holder wrote it) takes it.
  auto took_copy = [&](std::size_t i) {
    if (!take_ssd_copy(s, blocks[i], tenant)) return false;
    ssd_->release(ssd_slots[i]);  // never written: still erased
    results[i] = took_shared_copy;
    return true;
  };
  auto finish = [&](std::size_t i, const io_request& req) {
    results[i] = req.result;
    if (req.result != std::int32_t(slot_bytes_)) {
      detail::bump(counters_->io_errors);
      return;
    }
    detail::bump(counters_->ssd_bytes_written, slot_bytes_);
    // The content's SSD copy from now on, when it has none (before the header claim
    // ends, so a second holder waiting on it finds this copy).
    const block_meta& m = s.meta(blocks[i]);
    if (shareable(m)) (void)content_->offer(content_key(m, tenant), tier::ssd, ssd_slots[i], m.checksum);
  };
  for (std::size_t base = 0; base < blocks.size(); base += batch_max) {
    io_request reqs[batch_max];
    std::size_t which[batch_max], waiting[batch_max];
    std::size_t n = 0, w = 0;
    const std::size_t count = std::min<std::size_t>(batch_max, blocks.size() - base);
    for (std::size_t i = base; i < base + count; ++i) {
      const block_meta& m = s.meta(blocks[i]);
      if (took_copy(i)) continue;
      // The header is built in the slot's own header area (views point at the payload,
      // so no lease reads it); a slot another holder is writing now waits below.
      if (!claim_header(m.dram_slot)) {
        waiting[w++] = i;
        continue;
      }
      format::write_header(dram_->data(m.dram_slot), header_of(m), s.tokens_of(blocks[i]));
      const std::uint32_t ss = ssd_slots[i];
      reqs[n] = io_request{io_op::write,
                           ssd_->file_of(ss),
                           ssd_->offset_of(ss),
                           dram_->data(m.dram_slot),
                           std::uint32_t(slot_bytes_),
                           dram_->region_of(m.dram_slot),
                           0};
      which[n++] = i;
    }
    const std::uint64_t t0 = detail::ticks();
    errc e = n ? device_->execute(std::span(reqs, n), config_.queue_depth) : errc::ok;
    latencies_->ssd_write.observe_ticks(detail::ticks() - t0);
    if (e != errc::ok && first == errc::ok) first = e;
    for (std::size_t k = 0; k < n; ++k) {
      finish(which[k], reqs[k]);
      unclaim_header(s.meta(blocks[which[k]]).dram_slot);
    }
    // Shared DRAM slots another holder was writing: one at a time once it is done,
    // and most find that holder's copy and take it instead.
    for (std::size_t k = 0; k < w; ++k) {
      const std::size_t i = waiting[k];
      const block_meta& m = s.meta(blocks[i]);
      while (!claim_header(m.dram_slot)) std::this_thread::yield();
      if (!took_copy(i)) {
        format::write_header(dram_->data(m.dram_slot), header_of(m), s.tokens_of(blocks[i]));
        io_request req{io_op::write,
                       ssd_->file_of(ssd_slots[i]),
                       ssd_->offset_of(ssd_slots[i]),
                       dram_->data(m.dram_slot),
                       std::uint32_t(slot_bytes_),
                       dram_->region_of(m.dram_slot),
                       0};
        if (errc we = device_->execute(std::span(&req, 1)); we != errc::ok && first == errc::ok) first = we;
        finish(i, req);
      }
      unclaim_header(m.dram_slot);
    }
  }
  return first;
}

std::size_t store::impl::adopt_written(locked_session& s, std::span<const std::uint32_t> blocks,
                                       std::span<const std::uint32_t> ssd_slots,
                                       std::span<const std::int32_t> results) noexcept {
  std::size_t adopted = 0;
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    if (results[i] == took_shared_copy) {
      ++adopted;  // holds another holder's copy (set by write_ssd_blocks)
    } else if (results[i] == std::int32_t(slot_bytes_)) {
      s.meta(blocks[i]).ssd_slot = ssd_slots[i];
      ++adopted;
    } else if (results[i] == io_in_doubt) {
      // The write may still land: the slot holds nothing we can vouch for, and a later
      // block written there could be overwritten by it.
      detail::bump(counters_->quarantined_slots);
    } else {
      invalidate_ssd(ssd_slots.subspan(i, 1));  // a partial write may have left a header
    }
  }
  return adopted;
}

// ---------------------------------------------------------------- reserve, commit, abort

void store::impl::zero_unused_tail(std::byte* payload, std::uint32_t tokens) const noexcept {
  // Layer-major: each layer's slice holds its tensors (K and V, or one latent row) of
  // [token][row]. Rows past `tokens` in every tensor are cleared, so nothing of the
  // slot's previous occupant is checksummed, stored or served.
  const std::uint32_t tpb = geometry_.tokens_per_block;
  if (tokens >= tpb) return;
  for (std::uint32_t l = 0; l < geometry_.num_layers; ++l) {
    const layer_shape& s = geometry_.layers[l];
    const std::size_t row = geometry_.group_of(l).row_bytes();
    for (std::size_t t = 0; t * s.tensor_bytes < s.bytes; ++t)
      std::memset(payload + s.offset + t * s.tensor_bytes + tokens * row, 0, (tpb - tokens) * row);
  }
}

errc store::impl::reserve_locked(locked_session& s, std::span<const token_id> tokens, std::uint32_t first_block,
                                 save_reservation& r, const request_keys& keys) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  if (tokens.empty() || first_block >= total) {
    config_.log(log_level::error, "store: save of " + std::to_string(tokens.size()) + " tokens (" +
                                      std::to_string(total) + " blocks) from first_block " +
                                      std::to_string(first_block) + "; need tokens and first_block < blocks");
    return errc::invalid_argument;
  }
  // The stored view up to position first_block x tokens_per_block must be these
  // tokens under these keys: chain hashes (computed with the keys) for untruncated
  // blocks, token ids and the blocks' key digests in a truncated view.
  const bool keyed = !keys.empty();
  const std::uint64_t boundary = std::uint64_t(first_block) * tpb;
  hash128 prev{};
  view_continuation after;  // what the new blocks continue
  std::uint64_t pos = 0;
  std::uint32_t from = 0;
  std::uint32_t b = s.first_block();
  for (; b != no_slot && pos < boundary; b = s.meta(b).next, ++from) {
    const block_meta& m = s.meta(b);
    if (pos + m.view_count > boundary || pos + m.view_count > tokens.size()) return errc::rejected;
    const auto want = tokens.subspan(pos, m.view_count);
    const hash128 digest =
        keyed ? detail::block_keys_at(keys, std::int64_t(m.saved_pos) + m.shift, m.tokens) : hash128{};
    if (s.truncated()) {
      const auto have = s.tokens_of(b).subspan(m.view_first, m.view_count);
      if (!std::equal(have.begin(), have.end(), want.begin()) || !(m.keys == digest)) return errc::rejected;
    } else if (!(m.chain == chain_hash(prev, model_, want, digest))) {
      return errc::rejected;
    }
    prev = m.chain;
    continue_view(after, m, tpb);
    pos += m.view_count;
  }
  if (pos != boundary) return errc::rejected;
  // The blocks this save replaces stay published until commit. Those already on SSD
  // give their DRAM copy up now, so a session that fills most of DRAM can still be
  // replaced; nothing is lost if the save fails (a lease still reading one keeps it).
  for (std::uint32_t o = b; o != no_slot; o = s.meta(o).next) {
    block_meta& m = s.meta(o);
    if (m.dram_slot != no_slot && m.ssd_slot != no_slot) {
      free_dram(m.dram_slot);
      m.dram_slot = no_slot;
    }
  }
  s.count_tiers();
  note(s, false);
  r = save_reservation{};
  r.owner_ = &owner_;
  r.record_ = s.record_id();
  r.generation_ = s.generation();
  r.first_block_ = first_block;
  r.blocks_ = total - first_block;
  r.prev_chain_ = prev;
  r.from_entry_ = from;
  prev = after.previous();
  std::uint32_t tail = no_slot, head = no_slot;
  for (std::uint32_t i = first_block; i < total; ++i) {
    const std::size_t begin = std::size_t(i) * tpb;
    const auto toks = tokens.subspan(begin, std::min<std::size_t>(tpb, tokens.size() - begin));
    std::uint32_t nb = s.new_block(toks);
    if (nb != no_slot) {
      s.append(head, tail, nb);
      block_meta& m = s.meta(nb);
      m.saved_pos = begin;
      m.keys = keyed ? block_keys(keys, begin, std::uint32_t(toks.size())) : hash128{};
      m.previous = prev;
      m.chain = chain_hash(prev, model_, toks, m.keys);
      continue_view(after, m, tpb);
      prev = after.previous();
      m.dram_slot = alloc_dram(s, no_slot);  // may demote any of this session's published blocks
      if (m.dram_slot != no_slot) zero_unused_tail(dram_payload(m.dram_slot), std::uint32_t(toks.size()));
    }
    if (nb == no_slot || s.meta(nb).dram_slot == no_slot) {
      release_chain(head);
      r.owner_ = nullptr;  // nothing to abort
      r = save_reservation{};
      return errc::no_space;
    }
  }
  r.head_ = head;
  open_saves_.fetch_add(1, std::memory_order_relaxed);
  s.pin();  // the session cannot be evicted under an open save
  return errc::ok;
}

void store::impl::drop_reservation(save_reservation& r, const session_hash* owner) noexcept {
  if (r.head_ != no_slot) open_saves_.fetch_sub(1, std::memory_order_relaxed);
  release_chain(r.head_, false, nullptr, owner);
  r.head_ = no_slot;
  r.owner_ = nullptr;
}

errc store::impl::commit_locked(locked_session& s, save_reservation& r, bool checksums_known) noexcept {
  const std::uint32_t tpb = geometry_.tokens_per_block;
  const std::size_t bb = geometry_.block_bytes();
  auto fail = [&](errc e) {
    const session_hash owner = s.key();  // links its blocks took this commit are retired
    drop_reservation(r, &owner);
    s.unpin();
    erase_if_empty(s);
    if (e == errc::no_space) detail::bump(counters_->no_space);
    if (e == errc::rejected)
      detail::bump(counters_->put_rejected);
    else
      detail::bump(counters_->put_failed);
    return e;
  };
  if (closed_.load(std::memory_order_acquire)) return fail(errc::bad_state);
  // The prefix the reservation extends may have changed since (an edit, a drop, a
  // truncation).
  if (r.from_entry_ > 0) {
    std::uint32_t b = s.block_at(r.from_entry_ - 1);
    if (b == no_slot || !(s.meta(b).chain == r.prev_chain_) ||
        s.meta(b).saved_pos + s.meta(b).view_first + s.meta(b).view_count + s.meta(b).shift !=
            std::uint64_t(r.first_block_) * tpb)
      return fail(errc::rejected);
  }
  // The put's blocks are numbered now, in commit order: recovery orders versions of a
  // block by these numbers and groups a put's blocks by them (docs/format.md).
  const std::uint64_t put_id = sequence_.fetch_add(r.blocks_, std::memory_order_relaxed);
  if (put_id + r.blocks_ >= format::max_sequence) {  // 2^61 puts after the last open: never in practice
    config_.log(log_level::error, "store: block sequence numbers exhausted (2^62); new saves are refused");
    return fail(errc::no_space);
  }
  {
    std::uint32_t k = 0;
    for (std::uint32_t b = r.head_; b != no_slot; b = s.meta(b).next, ++k) {
      block_meta& m = s.meta(b);
      if (!checksums_known) m.checksum = checksum64(dram_payload(m.dram_slot), bb);
      m.sequence = put_id + k;
      m.put_first_block = r.first_block_;
      m.put_blocks = r.blocks_;
    }
  }
  // Whole blocks whose content another session holds in DRAM keep one copy: the
  // reserved slot goes back. Others become their content's DRAM copy.
  const hash128 tenant = sharing_ ? tenant_hash_of(s.record_id()) : hash128{};
  if (sharing_)
    for (std::uint32_t b = r.head_; b != no_slot; b = s.meta(b).next) {
      block_meta& m = s.meta(b);
      if (!shareable(m)) continue;
      if (content_->holders(tier::dram, m.dram_slot) > 0) continue;  // holds a shared copy (put found it)
      const detail::content_table::key k = content_key(m, tenant);
      if (const std::uint32_t d = content_->share(k, tier::dram, m.checksum); d != no_slot) {
        free_dram(m.dram_slot);
        m.dram_slot = d;
      } else {
        (void)content_->offer(k, tier::dram, m.dram_slot, m.checksum);
      }
    }
  if (config_.write_through && ssd_) {
    // Durable means the whole history: blocks taken from a shared prefix that has no
    // SSD copy yet (a new session's) are written (or given a copy) with the new ones.
    std::uint32_t bl[batch_max], slots[batch_max];
    std::int32_t results[batch_max];
    std::uint32_t earlier = s.first_block();
    for (std::uint32_t i = 0; i < r.from_entry_ && earlier != no_slot; ++i) {
      const std::uint32_t next = s.meta(earlier).next;
      block_meta& m = s.meta(earlier);
      if (m.ssd_slot == no_slot && m.dram_slot != no_slot && !(content_ && take_ssd_copy(s, earlier, tenant))) {
        const std::uint32_t slot = alloc_ssd(s.record_id(), no_slot);
        if (slot == no_slot) return fail(errc::no_space);
        std::int32_t result = 0;
        const errc e = write_ssd_blocks(s, std::span(&earlier, 1), std::span(&slot, 1), std::span(&result, 1));
        if (adopt_written(s, std::span(&earlier, 1), std::span(&slot, 1), std::span(&result, 1)) != 1)
          return fail(e != errc::ok ? e : errc::device_error);
      }
      earlier = next;
    }
    for (std::uint32_t b = r.head_; b != no_slot;) {
      std::size_t n = 0;
      for (; b != no_slot && n < batch_max; b = s.meta(b).next) {
        if (content_ && take_ssd_copy(s, b, tenant)) continue;  // another holder's SSD copy
        slots[n] = alloc_ssd(s.record_id(), no_slot);
        if (slots[n] == no_slot) {
          for (std::size_t k = 0; k < n; ++k) ssd_->release(slots[k]);  // never written: still erased
          return fail(errc::no_space);
        }
        bl[n++] = b;
      }
      if (n == 0) continue;
      errc e = write_ssd_blocks(s, std::span(bl, n), std::span(slots, n), std::span(results, n));
      if (adopt_written(s, std::span(bl, n), std::span(slots, n), std::span(results, n)) != n)
        return fail(e != errc::ok ? e : errc::device_error);
    }
    if (errc e = device_->sync(); e != errc::ok) return fail(e);
    if (errc e = sync_links(); e != errc::ok) return fail(e);
  }
  // Replaced blocks go after the new ones are published: their SSD copies are erased,
  // their DRAM slots freed once no lease reads them.
  const session_hash owner = s.key();
  release_chain(s.publish(r.from_entry_, r.head_, r.blocks_), false, nullptr, &owner);
  if (r.from_entry_ == 0) s.set_truncated(false);  // the whole view is new
  detail::bump(counters_->put_blocks, r.blocks_);
  r.head_ = no_slot;
  r.owner_ = nullptr;
  open_saves_.fetch_sub(1, std::memory_order_relaxed);
  s.unpin();
  note(s, true);
  publish_remote_locked(s);             // write-behind to the remote tier (copies the new blocks, never waits)
  trim_tenant(s, no_slot, true, true);  // back under its caps, from its own sessions
  // Demote ahead of need, so the next saves find free DRAM without waiting.
  want_demotion_if_low();
  return errc::ok;
}

errc store::impl::reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                          std::span<std::byte*> payloads, save_reservation& r, const request_keys& keys) noexcept {
  if (r) abort(r);
  if (closed_.load(std::memory_order_acquire)) return errc::bad_state;
  if (check_keys(keys, tokens.size(), "store::reserve") != errc::ok) return errc::invalid_argument;
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  if (first_block < total && payloads.size() < total - first_block) {
    config_.log(log_level::error, "store::reserve: payloads has " + std::to_string(payloads.size()) +
                                      " entries, need " + std::to_string(total - first_block));
    return errc::invalid_argument;
  }
  const session_hash h = session_of(key);
  const hash128 tenant = tenant_of(key.tenant);
  if (first_block < total) make_room(total - first_block, h, &tenant);
  errc why = errc::ok;
  locked_session s = open_or_evict(h, &why);
  if (!s) return why == errc::ok ? errc::no_space : why;
  errc e = assign_tenant(s, tenant);
  remember_remote(s, key);
  // A new session saving past a prefix it never stored (the engine reused shared
  // blocks without loading them through this store) takes them first.
  if (e == errc::ok && first_block > 0) adopt_shared_locked(s, tokens, keys, first_block);
  if (e == errc::ok) e = reserve_locked(s, tokens, first_block, r, keys);
  if (e != errc::ok) {
    erase_if_empty(s);
    return e;
  }
  std::size_t i = 0;
  for (std::uint32_t b = r.head_; b != no_slot; b = s.meta(b).next) payloads[i++] = dram_payload(s.meta(b).dram_slot);
  return errc::ok;
}

errc store::impl::commit(save_reservation& r, std::span<const std::uint64_t> checksums, bool checksums_given) noexcept {
  if (!r) return errc::bad_state;
  detail::bump(counters_->puts);
  if (checksums_given && checksums.size() != r.blocks_) {
    config_.log(log_level::error, "store::commit: " + std::to_string(checksums.size()) + " checksums for " +
                                      std::to_string(r.blocks_) + " reserved blocks");
    abort(r);
    detail::bump(counters_->put_failed);
    return errc::invalid_argument;
  }
  // Only the incarnation the blocks were reserved in: a session dropped meanwhile (and
  // perhaps saved again under the same key) must not receive them.
  locked_session s = index_->open_record(r.record_, r.generation_);
  if (!s) {
    drop_reservation(r);
    detail::bump(counters_->put_failed);
    return errc::not_found;
  }
  if (checksums_given) {
    std::size_t i = 0;
    for (std::uint32_t b = r.head_; b != no_slot; b = s.meta(b).next) s.meta(b).checksum = checksums[i++];
  }
  return commit_locked(s, r, checksums_given);
}

void store::impl::abort(save_reservation& r) noexcept {
  if (!r) return;
  drop_reservation(r);
  if (locked_session s = index_->open_record(r.record_, r.generation_)) {
    s.unpin();
    erase_if_empty(s);
  }
}

// ---------------------------------------------------------------- put

errc store::impl::put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                      std::span<const std::byte> blocks, const request_keys& keys) noexcept {
  detail::bump(counters_->puts);
  const std::uint32_t total = geometry_.blocks_for(tokens.size());
  const std::size_t bb = geometry_.block_bytes();
  if (tokens.empty() || first_block >= total || blocks.size() != std::size_t(total - first_block) * bb) {
    config_.log(log_level::error,
                "store::put: got " + std::to_string(tokens.size()) + " tokens (" + std::to_string(total) +
                    " blocks), first_block " + std::to_string(first_block) + " and " + std::to_string(blocks.size()) +
                    " bytes; need tokens non-empty, first_block < blocks and (blocks - first_block) x " +
                    std::to_string(bb) + " bytes");
    detail::bump(counters_->put_failed);
    return errc::invalid_argument;
  }
  if (check_keys(keys, tokens.size(), "store::put") != errc::ok) {
    detail::bump(counters_->put_failed);
    return errc::invalid_argument;
  }
  if (closed_.load(std::memory_order_acquire)) {
    detail::bump(counters_->put_failed);
    return errc::bad_state;
  }
  const session_hash h = session_of(key);
  const hash128 tenant = tenant_of(key.tenant);
  make_room(total - first_block, h, &tenant);
  errc why = errc::ok;
  locked_session s = open_or_evict(h, &why);
  if (!s) {
    detail::bump(counters_->no_space);
    detail::bump(counters_->put_failed);
    return why == errc::ok ? errc::no_space : why;
  }
  save_reservation r;
  errc e = assign_tenant(s, tenant);
  remember_remote(s, key);
  if (e == errc::ok && first_block > 0) adopt_shared_locked(s, tokens, keys, first_block);  // as reserve() does
  if (e == errc::ok) e = reserve_locked(s, tokens, first_block, r, keys);
  if (e != errc::ok) {
    erase_if_empty(s);
    detail::bump(e == errc::rejected ? counters_->put_rejected : counters_->put_failed);
    if (e == errc::no_space) detail::bump(counters_->no_space);
    return e;
  }
  const std::byte* src = blocks.data();  // (tenant: the record's, which assign_tenant set from it)
  for (std::uint32_t b = r.head_; b != no_slot; b = s.meta(b).next, src += bb) {
    block_meta& m = s.meta(b);
    // A whole block whose content is held in DRAM already is not copied: one hashing
    // pass over the source, and the reserved slot goes back.
    if (shareable(m)) {
      const detail::content_table::key k = content_key(m, tenant);
      const detail::content_table::copies c = content_->find(k);
      std::uint32_t d = no_slot;
      if (c.dram != no_slot && checksum64(src, bb) == c.checksum &&
          (d = content_->share(k, tier::dram, c.checksum)) != no_slot) {
        free_dram(m.dram_slot);
        m.dram_slot = d;
        m.checksum = c.checksum;
        continue;
      }
    }
    m.checksum = copy_with_checksum(dram_payload(m.dram_slot), src, bb);  // one pass: copy + hash
  }
  return commit_locked(s, r, true);
}

}  // namespace attnstore
