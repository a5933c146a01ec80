// eviction_policy: which session a storage level gives up next.
//
// A policy ranks the sessions that hold blocks in a storage level (HBM lent by the
// engine, DRAM, SSD) and names the victim when that level needs room: the store demotes
// a DRAM victim to SSD, drops an SSD victim, and returns a lent-HBM victim to DRAM.
// Sessions are named by their cache_index record id (dense, < max_sessions).
//
// The store tells the policy what happens (events) and asks it for victims (decisions):
//   events     on_insert, on_erase, on_access, on_blocks   (session life and tiers)
//              on_miss                                      (a session asked for, not stored)
//              on_hint                                      (the engine knows the user is typing, or left)
//              on_prompt                                    (a turn starts: its prompt's length)
//              enqueue, dequeue, set_queue, set_window      (the engine's waiting queue)
//   decisions  pick_victim(level, accept), next_expired(now, ttl), worth_sharing(record)
// Every event and every decision is O(1) or O(log n) (plus one step per candidate that
// `accept` rejects) and allocates nothing: all tables are sized at construction.
//
// The base class keeps what every policy needs (blocks per level, recency, the queue and
// its protection window, the idle list for the TTL); a derived class keeps its victim
// order (one indexed heap per level) and says which session goes first:
//   lru              the session with the oldest access.
//   scheduler_aware  the paper's rule: sessions in the look-ahead window over the queue
//                    are protected; the victim is the unprotected session with the oldest
//                    access, else the protected one farthest back in the queue.
//   belady           the session used farthest in the future (simulator only: it must be
//                    told the future, so it lives in bench/sim/belady.hpp, not here).
//   predictive       the session least likely to return soon per byte held, from the
//                    think-time and session-length distributions it learns online.
//
// Threading: not thread-safe. The store calls a policy under one mutex (the way
// cache_index guards its LRU list); `accept` runs under that mutex and must not call
// back into the policy or block (try_lock only).
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::policy {

/// Storage levels a policy ranks victims in.
enum class level : std::uint8_t {
  hbm = 0,   ///< engine HBM lent to keep sessions between turns
  dram = 1,  ///< host memory tier
  ssd = 2,   ///< SSD tier
};
inline constexpr std::uint32_t level_count = 3;

constexpr std::string_view to_string(level l) noexcept {
  switch (l) {
    case level::hbm:
      return "hbm";
    case level::dram:
      return "dram";
    case level::ssd:
      return "ssd";
  }
  return "unknown";
}

/// What an engine's front end knows about an idle session's user (on_hint, store::hint).
enum class session_hint : std::uint8_t {
  composing = 1,  ///< the user is typing the next turn (a typing indicator): a return is near
  left = 2,       ///< the user closed the conversation or went away: a return, if any, is far off
};

/// "No record" (the same value as attnstore::no_slot).
inline constexpr std::uint32_t no_record = attnstore::no_slot;

/// Asked for each candidate in victim order: return true to take `record` as the victim
/// (e.g. after try-locking it and checking that it is not pinned). A plain function
/// pointer and a context, so that a decision allocates nothing.
using victim_filter = bool (*)(void* context, std::uint32_t record) noexcept;

/// The paper's window rules (CachedAttention section 3.3). Each returns a session count,
/// at least 1 when `mean_session_bytes` > 0 (and 0 when it is 0: nothing to size yet).
/// Prefetch window: the first C_mem / S_kv queued sessions are fetched into DRAM.
constexpr std::uint32_t paper_prefetch_window(std::uint64_t dram_for_prefetch_bytes,
                                              std::uint64_t mean_session_bytes) noexcept {
  if (mean_session_bytes == 0) return 0;
  const std::uint64_t w = dram_for_prefetch_bytes / mean_session_bytes;
  return w == 0 ? 1u : w > 0xffffffffull ? 0xffffffffu : std::uint32_t(w);
}
/// Eviction window: KV of the first (C_mem + C_disk) / S_kv queued sessions is kept.
constexpr std::uint32_t paper_eviction_window(std::uint64_t dram_bytes, std::uint64_t ssd_bytes,
                                              std::uint64_t mean_session_bytes) noexcept {
  return paper_prefetch_window(dram_bytes + ssd_bytes, mean_session_bytes);
}

class eviction_policy {
 public:
  /// `max_sessions`: record ids are < max_sessions (cache_index_options::max_sessions).
  /// Throws std::invalid_argument when it is 0.
  explicit eviction_policy(std::uint32_t max_sessions);
  virtual ~eviction_policy() = default;
  eviction_policy(const eviction_policy&) = delete;
  eviction_policy& operator=(const eviction_policy&) = delete;

  /// "lru", "scheduler_aware", "belady", "predictive".
  virtual std::string_view name() const noexcept = 0;

  // ---- events: the store reports what happened. Unknown or dead records are ignored.

  /// `record` became live (a new session), holding no blocks yet. Counts as an access.
  /// `identity`: a stable 64-bit name of the session (the store passes its key hash; 0:
  /// none), by which a learning policy knows a session it evicted when it comes back.
  void on_insert(std::uint32_t record, std::uint64_t now, std::uint64_t identity = 0) noexcept;
  /// The engine asked for a session that is not stored (a lookup, or a queued request,
  /// that missed); `identity` as given to on_insert (0 is ignored). A learning policy
  /// counts the return of a session it evicted. O(1).
  void on_miss(std::uint64_t identity, std::uint64_t now) noexcept {
    if (identity != 0) missed(identity, now);
  }
  /// A hint about the user of an idle session. A learning policy (predictive) ranks the
  /// session by what such hints have been followed by, learned like think times; the
  /// others ignore hints. O(1).
  void on_hint(std::uint32_t record, session_hint hint, std::uint64_t now) noexcept {
    if (live(record)) hinted(record, hint, now);
  }
  /// A turn of the session starts with a prompt of `tokens` tokens (the history and the
  /// new message; the store reports it at lookup and load). A learning policy then tells
  /// the reply from the prompt in the save that ends the turn: the reply's length sets
  /// how long its user reads. O(1).
  void on_prompt(std::uint32_t record, std::uint64_t tokens) noexcept {
    if (live(record)) prompted(record, tokens);
  }
  /// `record` was removed from the index (its blocks are gone). Leaves the queue too.
  void on_erase(std::uint32_t record) noexcept;
  /// The session was used (lookup, save, load): it becomes the most recent. `now` is the
  /// caller's clock (any unit, non-decreasing), used only for the TTL.
  void on_access(std::uint32_t record, std::uint64_t now) noexcept;
  /// The session is in use but was not accessed (pinned, busy): only its idle clock (the
  /// TTL's) restarts; recency and what a learning policy sees are unchanged.
  void refresh_idle(std::uint32_t record, std::uint64_t now) noexcept;
  /// The session now holds `blocks` blocks in level `l` (after a save, demotion,
  /// promotion, drop or truncation).
  void on_blocks(std::uint32_t record, level l, std::uint32_t blocks) noexcept;

  // ---- the engine's waiting queue (first to run first)

  /// The session has a request in the engine's queue at `position` (any key that grows
  /// with queue order, e.g. the request's arrival number). A session queued already keeps
  /// the earlier position. O(1) when appended at the back; O(distance from the back)
  /// for an insertion in the middle (a record created while its next turn waits).
  /// Refreshes the session's idle clock (a queued session is not idle).
  void enqueue(std::uint32_t record, std::uint64_t position, std::uint64_t now) noexcept;
  /// The session's request left the queue (it was scheduled, or cancelled).
  void dequeue(std::uint32_t record) noexcept;
  /// Replaces the whole queue (front first; positions are the indices). O(old + new).
  /// Records may repeat (the first occurrence counts) and no_record entries are skipped.
  void set_queue(std::span<const std::uint32_t> records, std::uint64_t now) noexcept;
  /// Protects the first `sessions` queued sessions (the eviction window); 0 protects
  /// none. O(change in protected sessions).
  void set_window(std::uint32_t sessions) noexcept;

  // ---- decisions

  /// Candidates holding blocks in `l`, in this policy's victim order, are passed to
  /// `accept` until it takes one; returns it, or no_record when none was taken.
  std::uint32_t pick_victim(level l, victim_filter accept, void* context) noexcept {
    return victim(l, accept, context);
  }
  /// The same with any callable `bool(std::uint32_t)`; no allocation.
  template <class Accept>
  std::uint32_t pick_victim(level l, Accept&& accept) noexcept {
    using A = std::remove_reference_t<Accept>;
    return victim(
        l, [](void* c, std::uint32_t r) noexcept -> bool { return (*static_cast<A*>(c))(r); },
        const_cast<void*>(static_cast<const void*>(&accept)));
  }
  /// TTL: the session idle longest, when it has been idle (no access, not queued) for at
  /// least `ttl` at `now`; else no_record. The caller drops it and calls on_erase, then
  /// asks again. O(1) (plus queued sessions skipped, which a queue refresh makes rare).
  std::uint32_t next_expired(std::uint64_t now, std::uint64_t ttl) const noexcept;
  /// Whether the session's KV is worth writing to a tier other nodes share (the store
  /// asks after each turn's save, and again when its user is seen typing): a session
  /// unlikely to return is not worth the network and the tier's space. Every session
  /// is, unless the policy learns returns (predictive). O(1).
  bool worth_sharing(std::uint32_t record) const noexcept { return live(record) && sharing_worth(record); }

  // ---- queries

  bool live(std::uint32_t r) const noexcept { return r < s_.size() && s_[r].live; }
  std::uint32_t blocks(std::uint32_t r, level l) const noexcept { return s_[r].blocks[std::size_t(l)]; }
  std::uint32_t total_blocks(std::uint32_t r) const noexcept {
    return s_[r].blocks[0] + s_[r].blocks[1] + s_[r].blocks[2];
  }
  /// Recency stamp of the last access (larger = more recent).
  std::uint64_t last_access(std::uint32_t r) const noexcept { return s_[r].access; }
  std::uint64_t last_access_time(std::uint32_t r) const noexcept { return s_[r].time; }
  bool queued(std::uint32_t r) const noexcept { return s_[r].queued; }
  /// Queue position key given to enqueue (meaningful only when queued()).
  std::uint64_t queue_position(std::uint32_t r) const noexcept { return s_[r].position; }
  /// In the protection window (the first window() queued sessions).
  bool in_window(std::uint32_t r) const noexcept { return s_[r].in_window; }
  std::uint32_t window() const noexcept { return window_; }
  std::uint32_t queue_length() const noexcept { return queued_; }
  std::uint32_t live_sessions() const noexcept { return live_; }
  /// Sessions holding at least one block in any level.
  std::uint32_t stored_sessions() const noexcept { return stored_; }
  std::uint64_t level_blocks(level l) const noexcept { return level_blocks_[std::size_t(l)]; }
  /// Mean blocks per stored session (all levels); 0 when none is stored.
  double mean_session_blocks() const noexcept {
    return stored_ ? double(level_blocks_[0] + level_blocks_[1] + level_blocks_[2]) / stored_ : 0.0;
  }
  std::uint32_t max_sessions() const noexcept { return std::uint32_t(s_.size()); }

  /// Visits the first `n` queued sessions, front first; `visit(record)` returns true to
  /// stop. O(visited).
  template <class Visit>
  void for_each_queued(std::uint32_t n, Visit&& visit) const noexcept {
    for (std::uint32_t r = q_head_; r != no_record && n > 0; r = s_[r].q_next, --n)
      if (visit(r)) return;
  }

  /// Checks the internal invariants (list links, counters, window); for tests. O(n).
  bool check() const noexcept;

 protected:
  struct session_state {
    std::uint32_t blocks[level_count] = {0, 0, 0};
    std::uint64_t access = 0;    // recency stamp
    std::uint64_t time = 0;      // caller clock of the last access or enqueue (TTL)
    std::uint64_t position = 0;  // queue position key
    std::uint32_t q_prev = no_record, q_next = no_record;
    std::uint32_t i_prev = no_record, i_next = no_record;  // idle list, most recent at head
    bool live = false, queued = false, in_window = false;
  };
  const session_state& state(std::uint32_t r) const noexcept { return s_[r]; }

  /// The session's rank inputs changed (blocks, access, window): update the victim order.
  virtual void reposition(std::uint32_t record) noexcept = 0;
  /// The session is gone: drop it from the victim order.
  virtual void forget(std::uint32_t record) noexcept = 0;
  /// First candidate in `l` that `accept` takes, in victim order; no_record if none.
  virtual std::uint32_t victim(level l, victim_filter accept, void* context) noexcept = 0;

  // Hooks for policies that learn from the event stream (policy::predictive); the
  // defaults do nothing. Each is called once per event, after the base state is updated
  // and before reposition(); `now` is the caller's clock as given to the event.
  /// on_insert: `record` became live.
  virtual void inserted(std::uint32_t record, std::uint64_t now, std::uint64_t identity) noexcept {
    (void)record;
    (void)now;
    (void)identity;
  }
  /// on_hint: a hint about a live record's user.
  virtual void hinted(std::uint32_t record, session_hint hint, std::uint64_t now) noexcept {
    (void)record;
    (void)hint;
    (void)now;
  }
  /// on_prompt: a turn of a live record starts with `tokens` prompt tokens.
  virtual void prompted(std::uint32_t record, std::uint64_t tokens) noexcept {
    (void)record;
    (void)tokens;
  }
  /// on_miss: a session that is not stored was asked for.
  virtual void missed(std::uint64_t identity, std::uint64_t now) noexcept {
    (void)identity;
    (void)now;
  }
  /// on_access: `previous` is the caller time of the session's previous access or
  /// enqueue (last_access_time() before this event).
  virtual void accessed(std::uint32_t record, std::uint64_t previous, std::uint64_t now) noexcept {
    (void)record;
    (void)previous;
    (void)now;
  }
  /// enqueue (when it queues the record or moves it forward), and set_queue for each
  /// record it queues: the session has a request waiting. Called once the record is
  /// linked into the queue (set_queue: before the window flags are final).
  virtual void enqueued(std::uint32_t record, std::uint64_t now) noexcept {
    (void)record;
    (void)now;
  }
  /// dequeue, and set_queue for each record of the queue it replaces (before the new
  /// queue is built): the session's request left the queue.
  virtual void dequeued(std::uint32_t record) noexcept { (void)record; }
  /// worth_sharing() for a live record; the default shares every session.
  virtual bool sharing_worth(std::uint32_t record) const noexcept {
    (void)record;
    return true;
  }
  /// The paper's automatic eviction window: (DRAM + SSD) / mean stored session, at least
  /// 1; no change while nothing is stored. For derived classes' refresh_window().
  void fit_window(std::uint64_t capacity_blocks) noexcept {
    const double mean = mean_session_blocks();
    if (mean <= 0) return;  // nothing stored: nothing to protect yet
    const double w = double(capacity_blocks) / mean;
    const std::uint32_t target = w < 1 ? 1u : w > 4e9 ? 4000000000u : std::uint32_t(w);
    if (target != window()) set_window(target);
  }

 private:
  void idle_unlink(std::uint32_t r) noexcept;
  void idle_push_front(std::uint32_t r) noexcept;
  void queue_unlink(std::uint32_t r) noexcept;
  void protect(std::uint32_t r, bool on) noexcept;
  void fix_window() noexcept;

  std::vector<session_state> s_;
  std::vector<std::uint32_t> scratch_;  // set_queue: the old protected sessions
  std::uint64_t clock_ = 0;
  std::uint32_t live_ = 0, stored_ = 0;
  std::uint64_t level_blocks_[level_count] = {0, 0, 0};
  // queue: doubly linked in position order; the first window_ entries are protected and
  // boundary_ is the last protected one.
  std::uint32_t q_head_ = no_record, q_tail_ = no_record, boundary_ = no_record;
  std::uint32_t queued_ = 0, protected_ = 0, window_ = 0;
  // idle list (TTL): most recently refreshed at the head
  std::uint32_t i_head_ = no_record, i_tail_ = no_record;
};

}  // namespace attnstore::policy

#include "attnstore/detail/policy_base.inl"
