// eviction_policy bodies: session bookkeeping, the queue with its protection window,
// and the idle list behind the TTL.
#pragma once

namespace attnstore::policy {

inline eviction_policy::eviction_policy(std::uint32_t max_sessions) {
  if (max_sessions == 0) throw std::invalid_argument("eviction_policy: max_sessions is 0, must be at least 1");
  s_.resize(max_sessions);
  scratch_.resize(max_sessions);
}

// ---- idle list

inline void eviction_policy::idle_unlink(std::uint32_t r) noexcept {
  session_state& s = s_[r];
  if (s.i_prev != no_record)
    s_[s.i_prev].i_next = s.i_next;
  else
    i_head_ = s.i_next;
  if (s.i_next != no_record)
    s_[s.i_next].i_prev = s.i_prev;
  else
    i_tail_ = s.i_prev;
  s.i_prev = s.i_next = no_record;
}

inline void eviction_policy::idle_push_front(std::uint32_t r) noexcept {
  session_state& s = s_[r];
  s.i_prev = no_record;
  s.i_next = i_head_;
  if (i_head_ != no_record)
    s_[i_head_].i_prev = r;
  else
    i_tail_ = r;
  i_head_ = r;
}

// ---- session events

inline void eviction_policy::on_insert(std::uint32_t r, std::uint64_t now, std::uint64_t identity) noexcept {
  if (r >= s_.size()) return;
  if (s_[r].live) on_erase(r);  // a reused id: start afresh
  session_state& s = s_[r];
  s = session_state{};
  s.live = true;
  s.access = ++clock_;
  s.time = now;
  idle_push_front(r);
  ++live_;
  inserted(r, now, identity);
  reposition(r);
}

inline void eviction_policy::on_erase(std::uint32_t r) noexcept {
  if (!live(r)) return;
  if (s_[r].queued) {
    queue_unlink(r);
    fix_window();
  }
  idle_unlink(r);
  session_state& s = s_[r];
  std::uint32_t total = 0;
  for (std::uint32_t l = 0; l < level_count; ++l) {
    level_blocks_[l] -= s.blocks[l];
    total += s.blocks[l];
  }
  if (total) --stored_;
  --live_;
  forget(r);
  s = session_state{};
}

inline void eviction_policy::on_access(std::uint32_t r, std::uint64_t now) noexcept {
  if (!live(r)) return;
  session_state& s = s_[r];
  const std::uint64_t previous = s.time;
  s.access = ++clock_;
  refresh_idle(r, now);
  accessed(r, previous, now);
  reposition(r);
}

inline void eviction_policy::refresh_idle(std::uint32_t r, std::uint64_t now) noexcept {
  if (!live(r)) return;
  s_[r].time = now;
  idle_unlink(r);
  idle_push_front(r);
}

inline void eviction_policy::on_blocks(std::uint32_t r, level l, std::uint32_t blocks) noexcept {
  if (!live(r)) return;
  session_state& s = s_[r];
  const std::uint32_t old = s.blocks[std::size_t(l)];
  if (old == blocks) return;
  const bool was = s.blocks[0] + s.blocks[1] + s.blocks[2] > 0;
  s.blocks[std::size_t(l)] = blocks;
  level_blocks_[std::size_t(l)] += blocks;
  level_blocks_[std::size_t(l)] -= old;
  const bool is = s.blocks[0] + s.blocks[1] + s.blocks[2] > 0;
  if (is && !was) ++stored_;
  if (was && !is) --stored_;
  reposition(r);
}

// ---- queue and window

inline void eviction_policy::protect(std::uint32_t r, bool on) noexcept {
  s_[r].in_window = on;
  if (on)
    ++protected_;
  else
    --protected_;
  reposition(r);
}

inline void eviction_policy::fix_window() noexcept {
  while (protected_ > window_) {
    const std::uint32_t b = boundary_;
    boundary_ = s_[b].q_prev;
    protect(b, false);
  }
  while (protected_ < window_) {
    const std::uint32_t next = boundary_ == no_record ? q_head_ : s_[boundary_].q_next;
    if (next == no_record) break;
    boundary_ = next;
    protect(next, true);
  }
}

inline void eviction_policy::queue_unlink(std::uint32_t r) noexcept {
  session_state& s = s_[r];
  if (s.in_window) {
    if (boundary_ == r) boundary_ = s.q_prev;
    protect(r, false);
  }
  if (s.q_prev != no_record)
    s_[s.q_prev].q_next = s.q_next;
  else
    q_head_ = s.q_next;
  if (s.q_next != no_record)
    s_[s.q_next].q_prev = s.q_prev;
  else
    q_tail_ = s.q_prev;
  s.q_prev = s.q_next = no_record;
  s.queued = false;
  --queued_;
}

inline void eviction_policy::enqueue(std::uint32_t r, std::uint64_t position, std::uint64_t now) noexcept {
  if (!live(r)) return;
  session_state& s = s_[r];
  s.time = now;
  idle_unlink(r);
  idle_push_front(r);
  if (s.queued) {
    if (position >= s.position) return;
    queue_unlink(r);
  }
  // Find the place from the back: appending (the common case) is O(1).
  std::uint32_t after = q_tail_;
  while (after != no_record && s_[after].position > position) after = s_[after].q_prev;
  s.position = position;
  s.queued = true;
  ++queued_;
  s.q_prev = after;
  s.q_next = after == no_record ? q_head_ : s_[after].q_next;
  if (s.q_prev != no_record)
    s_[s.q_prev].q_next = r;
  else
    q_head_ = r;
  if (s.q_next != no_record)
    s_[s.q_next].q_prev = r;
  else
    q_tail_ = r;
  // Inside the protected prefix when the boundary comes after it.
  if (boundary_ != no_record && s_[boundary_].position > position) protect(r, true);
  fix_window();
  enqueued(r, now);
}

inline void eviction_policy::dequeue(std::uint32_t r) noexcept {
  if (!live(r) || !s_[r].queued) return;
  queue_unlink(r);
  fix_window();
  dequeued(r);
}

inline void eviction_policy::set_queue(std::span<const std::uint32_t> records, std::uint64_t now) noexcept {
  // Remember the old protected sessions, then unlink the old queue but keep the
  // in_window flags, so that only sessions whose protection changes are repositioned.
  std::uint32_t old_protected = 0;
  for (std::uint32_t r = q_head_; r != no_record;) {
    const std::uint32_t next = s_[r].q_next;
    if (s_[r].in_window) scratch_[old_protected++] = r;
    s_[r].queued = false;
    s_[r].q_prev = s_[r].q_next = no_record;
    dequeued(r);
    r = next;
  }
  q_head_ = q_tail_ = boundary_ = no_record;
  queued_ = protected_ = 0;
  std::uint64_t position = 0;
  for (const std::uint32_t r : records) {
    ++position;
    if (r == no_record || !live(r) || s_[r].queued) continue;
    session_state& s = s_[r];
    s.queued = true;
    s.position = position;
    s.time = now;
    idle_unlink(r);
    idle_push_front(r);
    enqueued(r, now);
    s.q_prev = q_tail_;
    if (q_tail_ != no_record)
      s_[q_tail_].q_next = r;
    else
      q_head_ = r;
    q_tail_ = r;
    ++queued_;
  }
  std::uint32_t k = 0;
  for (std::uint32_t r = q_head_; r != no_record; r = s_[r].q_next, ++k) {
    const bool want = k < window_;
    if (want) {
      ++protected_;
      boundary_ = r;
    }
    if (s_[r].in_window != want) {
      s_[r].in_window = want;
      reposition(r);
    }
  }
  for (std::uint32_t i = 0; i < old_protected; ++i) {
    const std::uint32_t r = scratch_[i];
    if (!s_[r].queued && s_[r].in_window) {
      s_[r].in_window = false;
      reposition(r);
    }
  }
}

inline void eviction_policy::set_window(std::uint32_t sessions) noexcept {
  window_ = sessions;
  fix_window();
}

inline std::uint32_t eviction_policy::next_expired(std::uint64_t now, std::uint64_t ttl) const noexcept {
  for (std::uint32_t r = i_tail_; r != no_record; r = s_[r].i_prev) {
    if (s_[r].time + ttl > now) return no_record;
    if (!s_[r].queued) return r;
  }
  return no_record;
}

inline bool eviction_policy::check() const noexcept {
  std::uint32_t n = 0, prot = 0;
  std::uint32_t prev = no_record;
  bool seen_unprotected = false;
  std::uint32_t last_protected = no_record;
  for (std::uint32_t r = q_head_; r != no_record; r = s_[r].q_next) {
    if (!s_[r].live || !s_[r].queued || s_[r].q_prev != prev) return false;
    if (prev != no_record && s_[prev].position > s_[r].position) return false;
    if (s_[r].in_window) {
      if (seen_unprotected) return false;
      ++prot;
      last_protected = r;
    } else {
      seen_unprotected = true;
    }
    prev = r;
    ++n;
  }
  if (prev != q_tail_ || n != queued_ || prot != protected_ || last_protected != boundary_) return false;
  if (prot != std::min(window_, queued_)) return false;
  std::uint32_t live = 0, stored = 0;
  std::uint64_t lb[level_count] = {0, 0, 0};
  for (std::uint32_t r = 0; r < s_.size(); ++r) {
    if (!s_[r].live) continue;
    ++live;
    if (!s_[r].queued && s_[r].in_window) return false;
    std::uint32_t t = 0;
    for (std::uint32_t l = 0; l < level_count; ++l) {
      lb[l] += s_[r].blocks[l];
      t += s_[r].blocks[l];
    }
    if (t) ++stored;
  }
  std::uint32_t idle = 0;
  for (std::uint32_t r = i_head_; r != no_record; r = s_[r].i_next) ++idle;
  if (live != live_ || stored != stored_ || idle != live_) return false;
  for (std::uint32_t l = 0; l < level_count; ++l)
    if (lb[l] != level_blocks_[l]) return false;
  return true;
}

}  // namespace attnstore::policy
