// Policy events and background work: the engine queue, prefetch (SSD -> DRAM
// promotion), watermark demotion, the TTL, and the store's thread.
#include <algorithm>
#include <chrono>

#include "attnstore/detail/checkpoint_name.hpp"
#include "store_impl.hpp"

namespace attnstore {

// ---------------------------------------------------------------- policy events

// What the prefetcher drives: the store's promotions run on the background thread.
struct store::impl::prefetch_target {
  store::impl* self;
  bool beyond_queue = false;  // planning likely returners (after the queue window)
  // Every published block has a DRAM or an SSD slot: the rest of the session is SSD-only.
  std::uint32_t ssd_only_blocks(std::uint32_t rec) const noexcept {
    return self->held_[rec] - self->policy_->blocks(rec, policy::level::dram);
  }
  // Queues the promotion; the DRAM is taken when it runs (only free DRAM, or DRAM of
  // sessions that are not queued), so a full queue of jobs is the only refusal here.
  std::uint32_t start_promotion(std::uint32_t rec, std::uint32_t max_blocks, std::uint64_t ticket) noexcept {
    if (!beyond_queue && self->no_room_until_ && self->now() < self->no_room_until_) return 0;
    if (beyond_queue) {  // only free DRAM above what the watermark keeps for saves
      const std::uint32_t spare = self->watermark_.spare(self->free_dram_slots());
      if (spare == 0) return 0;
      max_blocks = std::min(max_blocks, spare);
    }
    std::lock_guard lock(self->work_mutex_);
    if (self->job_count_ == self->jobs_.size()) return 0;
    self->jobs_[(self->job_head_ + self->job_count_++) % self->jobs_.size()] = {rec, max_blocks, ticket, beyond_queue};
    detail::bump(self->counters_->prefetch_started);
    return max_blocks;
  }
  // Nothing is reserved before the job runs, and a job whose ticket is stale does nothing.
  void abort_promotion(std::uint32_t, std::uint64_t) noexcept {}
};

std::uint64_t store::impl::now() const noexcept {
  if (config_.clock) return config_.clock();
  return std::uint64_t(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

void store::impl::note(locked_session& s, bool accessed, std::size_t prompt_tokens) noexcept {
  const std::uint32_t rec = s.record_id();
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  if (!policy_->live(rec)) policy_->on_insert(rec, t, identity_of(s.key()));
  // Blocks first, then the access: a policy that learns reads "an access after which the
  // session holds more blocks" as a turn's end, and one without new blocks as a return.
  policy_->on_blocks(rec, policy::level::dram, s.dram_blocks());
  policy_->on_blocks(rec, policy::level::ssd, s.ssd_blocks());
  account_locked(rec, s.dram_blocks(), s.ssd_blocks());
  if (accessed) policy_->on_access(rec, t);
  if (prompt_tokens > 0) policy_->on_prompt(rec, prompt_tokens);
  set_held_locked(rec, s.block_count());
}

void store::impl::note_load(locked_session& s, std::size_t prompt_tokens) noexcept {
  const std::uint32_t rec = s.record_id();
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  if (!policy_->live(rec)) policy_->on_insert(rec, t, identity_of(s.key()));
  // The access first: blocks a load promoted from SSD are copies, not a saved turn.
  policy_->on_access(rec, t);
  policy_->on_blocks(rec, policy::level::dram, s.dram_blocks());
  policy_->on_blocks(rec, policy::level::ssd, s.ssd_blocks());
  account_locked(rec, s.dram_blocks(), s.ssd_blocks());
  if (prompt_tokens > 0) policy_->on_prompt(rec, prompt_tokens);
  set_held_locked(rec, s.block_count());
}

void store::impl::note_miss(const session_hash& key) noexcept {
  // Only a learning policy (predictive, or an embedder's own) does anything with a miss:
  // spare the built-in ones the clock read and the policy lock.
  if (!predictive_ && !config_.make_policy) return;
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  policy_->on_miss(identity_of(key), t);
}

void store::impl::erase_record(locked_session& s) noexcept {
  if (config_.remote) {  // the record may next hold another session
    remote_ids_[s.record_id()] = {};
    remote_record& rr = remote_state_[s.record_id()];
    rr.declined.store(false, std::memory_order_relaxed);
    rr.resend_wait = rr.resend_round = 0;
  }
  {
    std::lock_guard lock(policy_mutex_);
    const std::uint32_t rec = s.record_id();
    if (prefetcher_) {
      prefetch_target target{this};
      if (prefetcher_->cancel(rec, target)) detail::bump(counters_->prefetch_cancelled);
    }
    policy_->on_erase(rec);
    set_held_locked(rec, 0);
    account_locked(rec, 0, 0);
    if (const std::uint32_t t = record_tenant_[rec]; t != no_slot) {
      record_tenant_[rec] = no_slot;
      --(*tenants_)[t].sessions;
      tenants_->remove_if_unused(t);
    }
  }
  prefetched_at_[s.record_id()].store(0, std::memory_order_relaxed);  // its next session was not prefetched
  s.erase();
}

// ---------------------------------------------------------------- the engine queue and prefetch

void store::impl::plan_prefetch_locked(bool likely) noexcept {
  if (!prefetcher_) return;
  prefetch_target target{this};
  std::uint32_t started;
  if (likely && predictive_) {
    // After the queue window, sessions likely to return soon (into free DRAM only).
    started = prefetcher_->plan(*policy_, target, [&](auto&& visit) {
      target.beyond_queue = true;
      predictive_->for_each_likely(likely_per_plan, visit);
    });
  } else {
    started = prefetcher_->plan(*policy_, target);
  }
  if (started > 0) wake_background();
}

void store::impl::set_held_locked(std::uint32_t rec, std::uint32_t blocks) noexcept {
  held_sessions_ += (blocks > 0) - (held_[rec] > 0);
  held_total_ += blocks;
  held_total_ -= held_[rec];
  held_[rec] = blocks;
}

void store::impl::size_windows_locked(std::size_t queued) noexcept {
  // The paper's rules divide capacities by the mean session size: distinct blocks per
  // stored session (a block with a DRAM and an SSD copy counts once).
  const std::uint64_t mean = held_sessions_ ? std::max<std::uint64_t>(1, held_total_ / held_sessions_) : 0;
  // An embedder's own policy keeps its own window unless one is configured.
  if (config_.eviction_window) {
    policy_->set_window(config_.eviction_window);
  } else if (!config_.make_policy) {
    const std::uint64_t ssd_blocks = ssd_ ? ssd_->capacity() : 0;
    policy_->set_window(mean ? policy::paper_eviction_window(dram_->capacity(), ssd_blocks, mean)
                             : std::uint32_t(queued));
  }
  if (prefetcher_ && config_.prefetch_window == 0 && mean) {
    const std::uint64_t for_prefetch =
        config_.dram_for_prefetch_bytes ? config_.dram_for_prefetch_bytes : config_.dram_bytes / 4;
    prefetcher_->set_window(policy::paper_prefetch_window(for_prefetch, mean * geometry_.block_bytes()));
  }
}

void store::impl::set_queue(std::span<const session_key> waiting) noexcept {
  const std::size_t n = std::min<std::size_t>(waiting.size(), config_.queue_window);
  std::lock_guard queue_lock(queue_mutex_);
  // Hashing and the index look-ups happen before the policy mutex is taken.
  for (std::size_t k = 0; k < n; ++k) {
    queue_hashes_[k] = session_of(waiting[k]);
    queue_records_[k] = index_->find(queue_hashes_[k]);
  }
  // Queued sessions held nowhere here may be in the remote tier: fetched ahead of their
  // turn, as the prefetcher promotes from SSD (a bounded list; the strings are copied).
  if (config_.remote) {
    bool added = false;
    {
      std::lock_guard lock(work_mutex_);
      for (std::size_t k = 0; k < n; ++k)
        if (queue_records_[k] == no_slot) added |= queue_remote_job_locked(waiting[k]);
    }
    if (added) work_cv_.notify_one();
  }
  const std::uint64_t t = now();
  std::lock_guard lock(policy_mutex_);
  // A queued session that is not stored has come back: a policy that evicted it learns
  // its idle time (a ghost is counted once; later calls find it counted).
  if (predictive_ || config_.make_policy)
    for (std::size_t k = 0; k < n; ++k)
      if (queue_records_[k] == no_slot) policy_->on_miss(identity_of(queue_hashes_[k]), t);
  // A record found here but erased before the policy hears of it is not live in the
  // policy, which skips it.
  policy_->set_queue(std::span<const std::uint32_t>(queue_records_.data(), n), t);
  size_windows_locked(n);
  plan_prefetch_locked(false);
}

errc store::impl::hint(const session_key& key, policy::session_hint hint) noexcept {
  const session_hash h = session_of(key);  // outside the policy mutex
  const std::uint64_t t = now();
  const std::uint32_t found = index_->find(h);
  {
    std::lock_guard lock(policy_mutex_);
    if (found == no_slot || !policy_->live(found)) return errc::not_found;
    policy_->on_hint(found, hint, t);
    if (hint != policy::session_hint::composing) return errc::ok;
    // A user about to send may be worth bringing up from SSD now.
    plan_prefetch_locked(true);
  }
  // ... and the turn may be routed to another node: a save the policy declined to
  // publish (the session's, or its checkpoint's) is asked about again, by the
  // background: a hint never waits for a session.
  if (config_.remote) {
    detail::checkpoint_name companion;
    const bool checkpointed = geometry_.checkpoint_bytes() > 0 && detail::checkpoint_key(key, companion);
    const std::uint32_t companion_record = checkpointed ? index_->find(session_of(companion.key)) : no_slot;
    const auto declined = [&](std::uint32_t rec) {
      return rec != no_slot && remote_state_[rec].declined.load(std::memory_order_relaxed);
    };
    bool added = false;
    if (declined(found) || declined(companion_record)) {
      std::lock_guard lock(work_mutex_);
      added = queue_remote_job_locked(key);
      if (checkpointed) added = queue_remote_job_locked(companion.key) || added;
    }
    if (added) work_cv_.notify_one();
  }
  return errc::ok;
}

// ---------------------------------------------------------------- promotion

std::uint32_t store::impl::promote_locked(locked_session& s, std::uint32_t max_blocks, bool may_demote) noexcept {
  if (!ssd_) return 0;
  ssd_read_batch rb{&s, nullptr, 0};
  const hash128 tenant = sharing_ ? tenant_hash_of(s.record_id()) : hash128{};
  std::uint32_t promoted = 0, asked = 0, batches = 0;
  bool stop = false;
  auto flush = [&] {
    // A request reading from SSD goes first: after the first batch, yield to it (the
    // session's lock too); the prefetcher plans the rest again.
    if (batches++ > 0 && demand_reads_.load(std::memory_order_relaxed) > 0) {
      for (std::size_t i = 0; i < rb.count; ++i) free_dram(rb.pending[i].buffer_slot);
      asked -= std::uint32_t(rb.count);
      rb.count = 0;
      stop = true;
      return;
    }
    read_ssd_batch(rb);
    for (std::size_t i = 0; i < rb.count; ++i) {  // in view order
      const ssd_read_batch::pending_read& p = rb.pending[i];
      if (!stop && p.verdict == errc::ok) {
        s.meta(p.block).dram_slot = p.buffer_slot;
        if (sharing_) offer_copy(s.meta(p.block), tenant, tier::dram);
        ++promoted;
        continue;
      }
      give_back_read_buffer(rb, i);
      if (!stop && p.verdict == errc::checksum_error) {
        if (content_) content_->forget(tier::ssd, s.meta(p.block).ssd_slot);
        detail::bump(counters_->checksum_failures);
        const session_hash owner = s.key();
        release_chain(s.truncate(p.position), false, nullptr, &owner);  // a corrupt block and all after it go
      }
      stop = true;
    }
    rb.count = 0;
  };
  std::uint32_t pos = 0;
  for (std::uint32_t b = s.first_block(); b != no_slot && asked < max_blocks && !stop; b = s.meta(b).next, ++pos) {
    block_meta& m = s.meta(b);
    if (m.dram_slot == no_slot && m.ssd_slot != no_slot && sharing_ && take_dram_copy(m, tenant)) {
      ++promoted;  // another holder's DRAM copy: resident without a read
      ++asked;
      continue;
    }
    if (m.dram_slot != no_slot || m.ssd_slot == no_slot) continue;
    // Likely returners (no demotion) take only the DRAM above what the watermark keeps
    // for saves.
    if (!may_demote && watermark_.spare(free_dram_slots()) == 0) break;
    std::uint32_t buf = dram_->allocate();
    for (int attempt = 0; buf == no_slot && may_demote && attempt < 16; ++attempt) {
      if (!demote_some_victim(s.record_id(), true)) break;
      buf = dram_->allocate();
    }
    if (buf == no_slot) break;
    rb.add(b, pos, buf, true, 0, 0, 0);
    ++asked;
    if (rb.count == promote_batch) flush();
  }
  if (rb.count) flush();
  if (asked) {
    s.count_tiers();
    note(s, false);
    detail::bump(counters_->promoted_blocks, promoted);
    detail::bump(counters_->prefetched_blocks, promoted);
    erase_if_empty(s);  // a corrupt first block left nothing
  }
  return promoted;
}

void store::impl::run_promotion(const promotion_job& job) noexcept {
  // Requests reading from SSD go first; wait for them before taking the session's lock
  // (a request for this very session must not find it held by a waiting prefetch).
  for (int waited = 0; demand_reads_.load(std::memory_order_relaxed) > 0 && waited < 20000; ++waited)
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  // A busy session is being loaded or saved right now: prefetching it is moot (the
  // periodic plan comes back to it if it is still waiting).
  locked_session s = index_->try_open_record(job.record);
  bool current = false;
  if (s) {
    std::lock_guard lock(policy_mutex_);
    current = prefetcher_->ticket(job.record) == job.ticket;  // not cancelled meanwhile
  }
  const std::uint32_t got = current ? promote_locked(s, job.blocks, !job.beyond_queue) : 0;
  if (got > 0) prefetched_at_[job.record].store(detail::ticks(), std::memory_order_relaxed);
  std::lock_guard lock(policy_mutex_);
  if (prefetcher_->complete(job.record, job.ticket)) detail::bump(counters_->prefetch_completed);
  if (got > 0) {
    plan_prefetch_locked(false);  // the bytes in flight went down: start the next ones
  } else if (current && !job.beyond_queue) {
    // No DRAM could be freed for it (or its reads failed): queued promotions pause
    // briefly rather than retrying at every set_queue.
    no_room_until_ = now() + 100000000ull;
  }
}

bool store::impl::queue_remote_job_locked(const session_key& key) {
  const auto same = [&](const remote_job& j) { return j.tenant == key.tenant && j.session == key.session; };
  if (std::find_if(remote_jobs_.begin(), remote_jobs_.end(), same) != remote_jobs_.end()) return false;
  if (remote_jobs_.size() >= max_remote_jobs) {
    detail::bump(counters_->remote_jobs_dropped);
    return false;
  }
  remote_jobs_.push_back({std::string(key.tenant), std::string(key.session)});
  return true;
}

void store::impl::run_remote_job(const session_key& key) noexcept {
  const session_hash h = session_of(key);
  if (index_->find(h) != no_slot) {  // here already (its turn came, a fetch did, or it was saved here)
    locked_session s = index_->open(h, false);
    if (s && remote_state_[s.record_id()].declined.load(std::memory_order_relaxed))
      publish_remote_locked(s);  // asks the policy again
    return;
  }
  errc why = errc::ok;
  locked_session s = open_or_evict(h, &why);
  if (!s) return;
  if (s.block_count() == 0 && assign_tenant(s, tenant_of(key.tenant)) == errc::ok) {
    remember_remote(s, key);
    // Its whole history (no prompt yet), into free DRAM only: a prefetch demotes nobody.
    if (fill_from_remote_locked(s, {}, {}, std::max<std::uint32_t>(1, free_dram_slots() / 2), false) > 0)
      detail::bump(counters_->remote_prefetches);
  }
  erase_if_empty(s);
}

// ---------------------------------------------------------------- TTL, watermark, the thread

std::uint32_t store::impl::expire_idle() noexcept {
  if (config_.session_ttl_ms == 0) return 0;
  const std::uint64_t ttl = config_.session_ttl_ms * 1000000ull;
  const std::uint64_t t = now();
  std::uint32_t dropped = 0;
  for (;;) {
    locked_session victim;
    {
      std::lock_guard lock(policy_mutex_);
      const std::uint32_t rec = policy_->next_expired(t, ttl);
      if (rec == policy::no_record) break;
      victim = index_->try_open_record(rec);
      if (!victim || victim.pins() > 0) {  // busy or pinned: in use, so not idle
        victim.reset();
        policy_->refresh_idle(rec, t);
        continue;
      }
    }
    drop_locked(victim);
    detail::bump(counters_->expired_sessions);
    ++dropped;
  }
  return dropped;
}

void store::impl::want_demotion_if_low() noexcept {
  if (!watermark_.should_start(free_dram_slots())) return;
  {
    std::lock_guard lock(work_mutex_);
    demotion_wanted_ = true;
  }
  wake_background();
}

std::uint32_t store::impl::run_background() noexcept {
  std::uint32_t done = 0;
  for (;;) {
    promotion_job job;
    {
      std::lock_guard lock(work_mutex_);
      if (job_count_ == 0) break;
      job = jobs_[job_head_];
      job_head_ = (job_head_ + 1) % jobs_.size();
      --job_count_;
    }
    run_promotion(job);
    ++done;
  }
  for (;;) {
    remote_job job;
    {
      std::lock_guard lock(work_mutex_);
      if (remote_jobs_.empty()) break;
      job = std::move(remote_jobs_.front());
      remote_jobs_.erase(remote_jobs_.begin());
    }
    run_remote_job({job.tenant, job.session});
    ++done;
  }
  if (prefetcher_) {
    // Once a second: sessions skipped while busy, and (predictive) sessions that became
    // likely returners as they aged.
    const std::uint64_t t = now();
    std::uint64_t due = next_plan_.load(std::memory_order_relaxed);
    if (t >= due && next_plan_.compare_exchange_strong(due, t + 1000000000ull)) {
      std::lock_guard lock(policy_mutex_);
      plan_prefetch_locked(true);
    }
  }
  bool demote;
  {
    std::lock_guard lock(work_mutex_);
    demote = demotion_wanted_;
    demotion_wanted_ = false;
  }
  // Loads and promotions fill DRAM too, not only saves.
  demote = demote || watermark_.should_start(free_dram_slots());
  if (demote) {
    std::uint64_t demoted = 0;
    while (watermark_.below_high(free_dram_slots())) {
      const std::uint32_t n = demote_some_victim(no_slot, true);
      if (n == 0) break;
      demoted += n;
      ++done;
    }
    if (demoted) detail::bump(counters_->watermark_demoted_blocks, demoted);
  }
  if (config_.session_ttl_ms) {
    const std::uint64_t t = now();
    std::uint64_t due = next_ttl_check_.load(std::memory_order_relaxed);
    if (t >= due && next_ttl_check_.compare_exchange_strong(due, t + config_.session_ttl_ms * 250000ull))
      done += expire_idle();  // checked every quarter of the TTL
  }
  return done;
}

void store::impl::drain() noexcept {
  if (!worker_.joinable()) return;
  std::unique_lock lock(work_mutex_);
  idle_cv_.wait(lock,
                [&] { return stopping_ || (job_count_ == 0 && !demotion_wanted_ && remote_jobs_.empty() && !busy_); });
}

void store::impl::background_loop() noexcept {
  const auto period = std::chrono::milliseconds(
      config_.session_ttl_ms ? std::clamp<std::uint64_t>(config_.session_ttl_ms / 4, 10, 1000) : 1000);
  std::unique_lock lock(work_mutex_);
  while (!stopping_) {
    work_cv_.wait_for(lock, period,
                      [&] { return stopping_ || job_count_ > 0 || demotion_wanted_ || !remote_jobs_.empty(); });
    if (stopping_) break;
    busy_ = true;
    lock.unlock();
    (void)run_background();
    lock.lock();
    busy_ = false;
    idle_cv_.notify_all();
  }
  idle_cv_.notify_all();
}

void store::impl::stop_background() noexcept {
  if (!worker_.joinable()) return;
  {
    std::lock_guard lock(work_mutex_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  worker_.join();
}

}  // namespace attnstore
