// shared_tier writes: publish() copies a session's new blocks into records and queues
// them; one writer thread keeps every block the manifest lists (PEXPIRE or TOUCH: there,
// and kept), uploads the absent ones it has records for (SET NX) and then writes the
// manifest, versioned with SET ... GET.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>

#include "attnstore/hash.hpp"
#include "shared_tier_impl.hpp"

namespace attnstore::shared {

bool shared_tier::impl::reserve(std::size_t bytes) noexcept {
  std::uint64_t cur = in_flight.load(std::memory_order_relaxed);
  do {
    if (cur + bytes > cfg.max_bytes_in_flight) return false;
  } while (!in_flight.compare_exchange_weak(cur, cur + bytes, std::memory_order_acq_rel));
  return true;
}

std::unique_ptr<std::byte[]> shared_tier::impl::take_record() {
  {
    std::lock_guard<std::mutex> l(pool_mu);
    if (!pool.empty()) {
      std::unique_ptr<std::byte[]> r = std::move(pool.back());
      pool.pop_back();
      return r;
    }
  }
  return std::unique_ptr<std::byte[]>(new std::byte[shape.record_bytes()]);  // not zeroed: every byte is written
}

void shared_tier::impl::give_back(std::vector<std::unique_ptr<std::byte[]>>& records) noexcept {
  std::lock_guard<std::mutex> l(pool_mu);
  for (auto& r : records) {
    if (!r) continue;
    try {
      pool.push_back(std::move(r));
    } catch (...) {
      r.reset();  // no room to keep it: freed
    }
  }
  records.clear();
}

shared_status shared_tier::publish(const shared_session& session, const publish_request& req) noexcept {
  impl& m = *impl_;
  const std::uint32_t tpb = m.cfg.tokens_per_block;
  if (req.sequence == 0 || req.tokens.empty() || req.tokens.size() > m.cfg.limits.max_tokens)
    return shared_status::invalid_argument;
  const std::size_t count = (req.tokens.size() + tpb - 1) / tpb;
  if (req.payloads.size() != count || (!req.keys.empty() && req.keys.size() != count) ||
      (!req.blocks.empty() && (req.blocks.size() != count || !req.keys.empty())))
    return shared_status::invalid_argument;
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (m.stopping) return shared_status::bad_state;
  }
  const std::size_t uploads =
      std::size_t(std::count_if(req.payloads.begin(), req.payloads.end(), [](const std::byte* p) { return p; }));
  const std::size_t manifest_bytes = manifest_fixed_bytes + count * manifest_block_bytes +
                                     req.tokens.size() * sizeof(token_id) + manifest_trailer_bytes;
  const std::size_t bytes = uploads * m.shape.record_bytes() + manifest_bytes;
  if (!m.reserve(bytes)) {
    detail::bump(m.st.publishes_refused);
    return shared_status::busy;
  }
  try {
    auto job = std::make_unique<detail::write_job>();
    job->bytes = bytes;
    job->session = session;
    session_manifest& man = job->manifest;
    man.session = session.session;
    man.tenant = session.tenant;
    man.tokens_per_block = tpb;
    man.sequence = req.sequence;
    man.tokens.assign(req.tokens.begin(), req.tokens.end());
    shared_status s = req.blocks.empty() ? build_manifest_blocks(man, m.cfg.model, req.keys)
                                         : build_view_blocks(man, m.cfg.model, req.blocks);
    if (s == shared_status::ok) s = encode_manifest(man, job->manifest_record);
    if (s != shared_status::ok) {
      m.release(bytes);
      return s;
    }
    job->upload.reserve(uploads);
    job->records.reserve(uploads);
    for (std::size_t i = 0; i < count; ++i) {
      if (!req.payloads[i]) continue;
      std::unique_ptr<std::byte[]> rec = m.take_record();
      const std::uint64_t cs =
          copy_with_checksum(rec.get() + m.shape.header_bytes(), req.payloads[i], m.shape.block_bytes);
      write_block_header(rec.get(), m.shape, m.cfg.model, man.blocks[i].index, man.blocks[i].chain, man.blocks[i].keys,
                         man.tokens_of(i), cs);
      job->upload.push_back(std::uint32_t(i));
      job->records.push_back(std::move(rec));
    }
    {
      std::lock_guard<std::mutex> l(m.mu);
      if (m.stopping) {
        m.give_back(job->records);
        m.release(bytes);
        return shared_status::bad_state;
      }
      m.queue.push_back(std::move(job));
    }
    m.work_cv.notify_one();
    detail::bump(m.st.publishes);
    return shared_status::ok;
  } catch (...) {
    m.release(bytes);
    return shared_status::error;
  }
}

shared_status shared_tier::flush(std::chrono::milliseconds limit) noexcept {
  impl& m = *impl_;
  std::unique_lock<std::mutex> l(m.mu);
  const bool idle = m.idle_cv.wait_for(l, limit, [&] { return (m.queue.empty() && !m.working) || m.stopping; });
  return idle ? shared_status::ok : shared_status::timeout;
}

void shared_tier::impl::run_writer() noexcept {
  std::unique_lock<std::mutex> l(mu);
  for (;;) {
    work_cv.wait(l, [&] { return stopping || !queue.empty(); });
    if (stopping) break;
    std::unique_ptr<detail::write_job> job = std::move(queue.front());
    queue.pop_front();
    working = true;
    l.unlock();
    write(*job);
    release(job->bytes);
    job.reset();
    l.lock();
    working = false;
    if (queue.empty()) idle_cv.notify_all();
  }
  working = false;
  idle_cv.notify_all();
}

void shared_tier::impl::write(detail::write_job& job) noexcept {
  // Until a publish of the session finds or stores every block it lists, the tier may
  // lack blocks its store believes published: the store is told to carry them again
  // (shared_tier::incomplete). A failed manifest write needs no blocks again: the next
  // publish writes the manifest anyway.
  bool whole = false;
  try {
    shared_status why = shared_status::ok;
    const std::size_t good = write_blocks(job, &why);
    give_back(job.records);  // the payload copies are done with
    session_manifest& man = job.manifest;
    whole = good == man.blocks.size();
    incomplete.set(job.session.session, !whole);
    if (good == 0) {
      if (cfg.log.fn != &logger::quiet) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "shared tier: block 0 of a publish failed (%.*s); no manifest written",
                      int(to_string(why).size()), to_string(why).data());
        cfg.log(log_level::debug, msg);
      }
      return;
    }
    if (!whole) {
      // Cut before the first block that is not in the tier: blocks before it are full.
      man.blocks.resize(good);
      man.tokens.resize(good * std::size_t(cfg.tokens_per_block));
      if (encode_manifest(man, job.manifest_record) != shared_status::ok) {
        st.write_failures.add(shared_status::error);
        return;
      }
      detail::bump(st.manifests_truncated);
    }
    write_manifest(job, job.manifest_record);
  } catch (...) {
    st.write_failures.add(shared_status::error);
    if (!whole) incomplete.set(job.session.session, true);
  }
}

std::size_t shared_tier::impl::write_blocks(detail::write_job& job, shared_status* why) {
  const std::size_t count = job.manifest.blocks.size();
  std::size_t first_bad = count;
  auto failed = [&](std::size_t block, shared_status s) {
    st.write_failures.add(s);
    if (block < first_bad) {
      first_bad = block;
      *why = s;
    }
  };
  std::vector<record_key> keys;
  std::vector<std::string_view> views;
  std::vector<redis_status> there;
  std::vector<redis_set_item> items;
  std::vector<std::uint32_t> item_of;  // items[k] uploads block item_of[k]
  std::vector<redis_status> set_st;
  std::size_t next_upload = 0;  // into job.upload (ascending) and job.records
  for (std::size_t base = 0; base < count; base += blocks_per_batch) {
    const std::size_t n = std::min(blocks_per_batch, count - base);
    keys.clear();
    views.clear();
    for (std::size_t j = 0; j < n; ++j) keys.push_back(block_key(cfg.model.value, job.manifest.blocks[base + j].chain));
    for (const record_key& k : keys) views.push_back(k.view());
    // Every block the manifest lists is kept (its TTL and LRU age start again) and found
    // there or not. Blocks are content-addressed: a record there is this very record (a
    // reader verifies it anyway); only the answer crosses the network for those. A block
    // published before and lost since (evicted, expired, its node restarted) ends the
    // manifest here unless this publish carries it again.
    there.assign(n, redis_status::internal_error);
    writer.touch_many(views, cfg.block_ttl, there);
    items.clear();
    item_of.clear();
    for (std::size_t j = 0; j < n; ++j) {
      const std::uint32_t block = std::uint32_t(base + j);
      const bool carried = next_upload < job.upload.size() && job.upload[next_upload] == block;
      const std::byte* record = carried ? job.records[next_upload++].get() : nullptr;
      if (there[j] == redis_status::ok) {
        detail::bump(st.blocks_present);
      } else if (there[j] == redis_status::not_found && record) {
        items.push_back(
            redis_set_item{views[j], std::span<const std::byte>(record, shape.record_bytes()), cfg.block_ttl, true});
        item_of.push_back(block);
      } else {
        failed(block, from_redis(there[j]));
      }
    }
    if (items.empty()) continue;
    set_st.assign(items.size(), redis_status::internal_error);
    writer.set_many(items, set_st);  // NX: a record written meanwhile by another store stays
    for (std::size_t k = 0; k < items.size(); ++k) {
      if (set_st[k] == redis_status::ok) {
        detail::bump(st.blocks_written);
        detail::bump(st.bytes_written, items[k].value.size());
      } else if (set_st[k] == redis_status::exists) {
        detail::bump(st.blocks_present);
      } else {
        failed(item_of[k], from_redis(set_st[k]));
      }
    }
  }
  return first_bad;
}

void shared_tier::impl::write_manifest(const detail::write_job& job, std::span<const std::byte> record) {
  const record_key key = manifest_key(cfg.model.value, job.session.session);
  const manifest_expectation expect = expectation(job.session);
  // `cur` is what this writer wants the key to hold: its own manifest, or a newer one it
  // displaced. Every value a SET ... GET displaces comes back to its writer, who re-stores
  // the larger of the two: so the largest sequence survives (up to manifest_retries rounds).
  std::vector<std::byte> held;  // a displaced manifest being put back (owned copy)
  std::span<const std::byte> cur = record;
  std::uint64_t cur_seq = job.manifest.sequence;
  session_manifest displaced;
  bool ours = true;
  for (unsigned round = 0;; ++round) {
    redis_get_result r = writer.swap(key.view(), cur, cfg.manifest_ttl);
    if (r.status != redis_status::ok && r.status != redis_status::not_found) {
      st.write_failures.add(from_redis(r.status));
      return;
    }
    detail::bump(st.bytes_written, cur.size());
    if (r.status == redis_status::not_found) break;  // nothing was displaced
    detail::bump(st.bytes_read, r.value.size());
    // Junk, or a manifest of another session, model or tenant, under this key: gone for good.
    if (decode_manifest(r.value.bytes(), expect, displaced) != shared_status::ok) break;
    if (displaced.sequence <= cur_seq) break;  // what we displaced was older: ours stays
    // A newer manifest was displaced: it goes back.
    if (ours) detail::bump(st.manifests_superseded);
    ours = false;
    if (round >= cfg.manifest_retries) {
      st.write_failures.add(shared_status::error);
      return;
    }
    held.assign(r.value.data(), r.value.data() + r.value.size());
    cur = held;
    cur_seq = displaced.sequence;
  }
  if (ours) detail::bump(st.manifests_written);
}

}  // namespace attnstore::shared
