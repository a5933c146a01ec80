// tiered_cache: the simulator's stand-in for attnstore::store. It keeps sessions in the
// REAL attnstore::cache_index (records, block chains, chain hashes, token ids, lookups)
// and asks the REAL policy classes (policy::lru, policy::scheduler_aware,
// policy::belady, policy::predictive) and policy::prefetcher for every decision; only the payload bytes and
// the I/O are simulated (slot numbers come from a plain free list: the tiers' allocators
// are thread-safe and their locks would only slow the single-threaded simulation).
//
// Tiers are exclusive: a block is in DRAM or on SSD (a promotion frees the SSD slot).
// Saves go to DRAM; DRAM victims are demoted to SSD; SSD victims are dropped. What the
// store does and this model mirrors:
//   - a save needs DRAM room: demote DRAM victims (whole sessions), each needing SSD
//     room: drop SSD victims (whole sessions); without SSD room the DRAM victim is
//     dropped (store::demote_some_victim); with no victim at all, the session's own older
//     blocks are demoted (store::alloc_dram); if there is still no room, only a prefix
//     is stored (counted as rejected).
//   - after a save, background demotion keeps `watermark` of DRAM free.
//   - the prefetcher promotes SSD -> DRAM into free DRAM (making room only by demoting
//     less urgent sessions into free SSD space), bounded bytes in flight; any change to
//     a session (save, truncation, demotion, drop, close) cancels its promotion.
//   - a lookup (turn start) loads hits from wherever they are (SSD blocks stream
//     through staging, as store::get); it moves nothing.
// OPT (policy::belady) is given more freedom, as an upper bound must be: at a save it
// drops blocks of the sessions used farthest in the future, tail first, only as many as
// needed, and declines (bypasses) what would be used after all of those; demotion is
// partial (tail first) too, and never drops.
//
// Shared prefixes (docs/sim.md, "Shared prefixes"): when the engine says that the first
// `shared` blocks of a session's history are a system prompt other sessions may share
// (save's and admit's last argument; 0: none, every block the session's own), those
// blocks are content-addressed in shared_blocks by their chain hashes instead of being
// kept in the session's index record, whose chain then starts after them. A session
// holds (claims) each of its shared blocks in one tier, as it would a block of its own,
// and the policies see its claims in its block counts; physically a block has at most
// one copy per tier, reference-counted by the claims in that tier. So a save finds a
// shared block already in DRAM and writes nothing, a lookup finds it wherever any holder
// keeps it (also for a session that never stored it), demoting a holder writes an SSD
// copy only when none exists, and dropping a holder frees its private blocks and only
// the copies it was the last to claim. OPT's next use is per session; with shared blocks
// it is a heuristic, not a bound (a shared block's next use is its holders' and future
// sessions' earliest, which the oracle does not see).
//
// Single-threaded (the simulator is); the index's locks are taken but never contended.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attnstore/hash.hpp"
#include "attnstore/index/cache_index.hpp"
#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/predictive.hpp"
#include "attnstore/policy/prefetcher.hpp"
#include "attnstore/policy/scheduler_aware.hpp"
#include "attnstore/policy/watermark.hpp"

#include "belady.hpp"
#include "shared_blocks.hpp"

namespace attnstore::sim {

enum class policy_kind : std::uint8_t { none, lru, scheduler_aware, opt, predictive };

inline std::string_view to_string(policy_kind k) noexcept {
  switch (k) {
    case policy_kind::none:
      return "none";
    case policy_kind::lru:
      return "lru";
    case policy_kind::scheduler_aware:
      return "scheduler_aware";
    case policy_kind::opt:
      return "opt";
    case policy_kind::predictive:
      return "predictive";
  }
  return "?";
}

struct cache_options {
  policy_kind kind = policy_kind::lru;
  std::uint32_t tokens_per_block = 64;
  std::uint32_t dram_blocks = 0;
  std::uint32_t ssd_blocks = 0;
  std::uint32_t max_session_blocks = 0;        ///< longest session in blocks (context / tokens_per_block + 1)
  std::uint64_t block_bytes = 1;               ///< bytes of one block (for the prefetcher's bound)
  double watermark = 0.02;                     ///< fraction of DRAM that background demotion keeps free
  std::uint32_t eviction_window = 0;           ///< scheduler_aware: sessions; 0 = paper rule
  bool prefetch = true;                        ///< scheduler_aware and opt: run the prefetcher
  std::uint32_t prefetch_window = 0;           ///< sessions; 0 = paper rule
  double prefetch_dram_fraction = 0.75;        ///< C_mem = this x DRAM (paper rule)
  std::uint64_t prefetch_bytes_in_flight = 0;  ///< 0: 8 blocks
  /// predictive: its options beyond the sizes above (the simulator's clock is in
  /// microseconds; max_sessions, windows, capacity and block size are filled in here).
  policy::predictive_options predictive{};
  std::uint32_t prefetch_likely = 16;  ///< predictive: candidates beyond the queue per plan; 0: none
};

/// The simulator schedules the reads of a promotion and calls io_complete() later.
struct io_hook {
  void* context = nullptr;
  void (*read)(void* context, std::uint32_t record, std::uint32_t blocks, std::uint64_t ticket) = nullptr;
};

struct cache_counters {
  std::uint64_t lookups = 0, lookup_hits = 0;
  std::uint64_t hit_tokens = 0, dram_hit_tokens = 0, ssd_hit_tokens = 0;
  std::uint64_t saved_blocks = 0;       ///< HBM -> DRAM
  std::uint64_t prefetched_blocks = 0;  ///< SSD -> DRAM by the prefetcher
  std::uint64_t demoted_blocks = 0;     ///< DRAM -> SSD
  std::uint64_t dropped_blocks = 0, dropped_sessions = 0;
  std::uint64_t bypassed_blocks = 0;  ///< OPT declined to store
  std::uint64_t rejected_blocks = 0;  ///< no room at all for a save
  std::uint64_t truncated_blocks = 0, expired_sessions = 0, closed_sessions = 0;
  std::uint64_t prefetch_waits = 0;     ///< turns that started while their promotion was in flight
  std::uint64_t shared_hit_tokens = 0;  ///< hit_tokens found in shared prefix blocks
  std::uint64_t dedup_blocks = 0;       ///< shared blocks a save found in DRAM (not written)
};

struct hit {
  std::uint64_t tokens = 0;           ///< reusable prefix (all tiers)
  std::uint64_t dram_tokens = 0;      ///< of which in DRAM
  std::uint64_t ssd_tokens = 0;       ///< of which on SSD (including those being promoted)
  std::uint64_t inflight_tokens = 0;  ///< of the SSD ones, those whose promotion was in flight
  std::uint64_t shared_tokens = 0;    ///< of `tokens`, those in shared prefix blocks
  std::uint32_t record = no_slot;
  std::uint64_t waited_ticket = 0;  ///< that promotion (finished now; the engine charges the wait)
};

/// Slot numbers of a simulated tier: O(1) allocate/release, double frees refused.
class slot_list {
 public:
  explicit slot_list(std::uint32_t capacity) : free_(capacity), used_(capacity, 0) {
    for (std::uint32_t i = 0; i < capacity; ++i) free_[i] = capacity - 1 - i;
  }
  std::uint32_t allocate() noexcept {
    if (free_.empty()) return no_slot;
    const std::uint32_t s = free_.back();
    free_.pop_back();
    used_[s] = 1;
    return s;
  }
  bool release(std::uint32_t s) noexcept {
    if (s >= used_.size() || !used_[s]) return false;
    used_[s] = 0;
    free_.push_back(s);  // never grows past the capacity reserved at construction
    return true;
  }
  std::uint32_t capacity() const noexcept { return std::uint32_t(used_.size()); }
  std::uint32_t used() const noexcept { return capacity() - std::uint32_t(free_.size()); }
  bool is_used(std::uint32_t s) const noexcept { return s < used_.size() && used_[s]; }

 private:
  std::vector<std::uint32_t> free_;
  std::vector<std::uint8_t> used_;
};

inline session_hash sim_session_hash(std::uint64_t session) noexcept {
  auto mix = [](std::uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  return session_hash{hash128{mix(session), mix(session ^ 0x5a5a5a5a5a5a5a5aull) | 1}};
}

class tiered_cache {
 public:
  explicit tiered_cache(const cache_options& o, io_hook io = {})
      : o_(o),
        io_(io),
        index_(index_options(o)),
        dram_(o.dram_blocks),
        ssd_(o.ssd_blocks),
        reserved_(max_records(o)),
        locations_(o.max_session_blocks + 2) {
    scratch_.reserve(o.max_session_blocks + 2);
    keys_.resize(o.max_session_blocks + 2);
    ids_.resize(o.max_session_blocks + 2);
    if (o.kind == policy_kind::none) throw std::invalid_argument("tiered_cache: kind none has no cache");
    if (o.max_session_blocks == 0) throw std::invalid_argument("tiered_cache: max_session_blocks is 0");
    if (o.dram_blocks < o.max_session_blocks + 1)
      throw std::invalid_argument("tiered_cache: dram_blocks (" + std::to_string(o.dram_blocks) +
                                  ") must hold the longest session (" + std::to_string(o.max_session_blocks) +
                                  " blocks) plus one");
    model_ = make_model_id({"attnstore-sim", kv_geometry{1, 1, 1, dtype::f16, o.tokens_per_block}.validated()});
    const std::uint32_t records = max_records(o);
    switch (o.kind) {
      case policy_kind::lru:
        policy_ = std::make_unique<policy::lru>(records);
        break;
      case policy_kind::scheduler_aware: {
        policy::scheduler_aware_options so;
        so.max_sessions = records;
        so.eviction_window = o.eviction_window;
        so.capacity_blocks = std::uint64_t(o.dram_blocks) + o.ssd_blocks;
        auto p = std::make_unique<policy::scheduler_aware>(so);
        sa_ = p.get();
        policy_ = std::move(p);
        break;
      }
      case policy_kind::opt: {
        auto p = std::make_unique<policy::belady>(records);
        opt_ = p.get();
        policy_ = std::move(p);
        break;
      }
      case policy_kind::predictive: {
        policy::predictive_options po = o.predictive;
        po.max_sessions = records;
        po.eviction_window = o.eviction_window;
        po.capacity_blocks = std::uint64_t(o.dram_blocks) + o.ssd_blocks;
        po.ticks_per_second = 1e6;
        po.tokens_per_block = o.tokens_per_block;
        auto p = std::make_unique<policy::predictive>(po);
        pred_ = p.get();
        policy_ = std::move(p);
        break;
      }
      default:
        break;
    }
    if (o.prefetch && o.kind != policy_kind::lru) {
      policy::prefetcher_options po;
      po.max_sessions = records;
      po.block_bytes = o.block_bytes;
      po.max_bytes_in_flight = o.prefetch_bytes_in_flight ? o.prefetch_bytes_in_flight : 8 * o.block_bytes;
      po.window = o.prefetch_window;
      po.dram_for_prefetch_bytes = std::uint64_t(o.prefetch_dram_fraction * double(o.dram_blocks)) * o.block_bytes;
      if (po.window == 0 && po.dram_for_prefetch_bytes == 0) po.dram_for_prefetch_bytes = o.block_bytes;
      pf_ = std::make_unique<policy::prefetcher>(po);
    }
    watermark_ = policy::demotion_watermark::of(o.dram_blocks, o.watermark, o.watermark);
    watermark_blocks_ = watermark_.low;
  }

  // ------------------------------------------------------------------ engine side

  /// Turn start: the session leaves the queue; the reusable prefix of `history` and
  /// where it is. A promotion in flight for the session is finished (the engine charges
  /// the wait). `prompt_tokens`: the turn's prompt (history and new message), told to
  /// the policy as the store does (0: not told). `shared`: the first this many blocks of
  /// `history` are a shared prefix (a session that holds shared blocks uses its own
  /// count); they hit wherever any session keeps them, even when this one is not stored.
  hit admit(const session_hash& key, std::span<const token_id> history, std::uint64_t now,
            std::uint64_t prompt_tokens = 0, std::uint32_t shared = 0) {
    hit h;
    ++c_.lookups;
    locked_session s = index_.open(key, false);
    const std::uint32_t tpb = o_.tokens_per_block;
    const std::uint32_t hp = shared_prefix_of(s ? s.record_id() : no_slot, shared, history.size());
    // The shared part: content-addressed, wherever a holder keeps it (DRAM when any does).
    std::uint32_t k = 0;
    if (hp > 0 && shared_.reserved()) {
      prefix_keys(history, hp);
      for (; k < hp; ++k) {
        const std::uint32_t id = shared_.find(keys_[k]);
        if (id == shared_blocks::none) break;
        ids_[k] = id;
      }
    }
    h.shared_tokens = std::uint64_t(k) * tpb;
    if (!s) {
      for (std::uint32_t i = 0; i < k; ++i) (shared_[ids_[i]].dram_refs ? h.dram_tokens : h.ssd_tokens) += tpb;
      h.tokens = h.shared_tokens;
      count_hit(h);
      return h;
    }
    const std::uint32_t r = s.record_id();
    h.record = r;
    policy_->dequeue(r);
    std::uint32_t flying = 0;
    if (pf_ && pf_->in_flight(r)) {
      h.waited_ticket = pf_->ticket(r);
      flying = pf_->blocks_in_flight(r);
      ++c_.prefetch_waits;
    }
    const holder* ho = holder_of(r);
    for (std::uint32_t i = 0; i < k; ++i) {
      const bool in_dram = shared_[ids_[i]].dram_refs > 0;
      (in_dram ? h.dram_tokens : h.ssd_tokens) += tpb;
      // Promotions take the session's SSD blocks in prefix order, its SSD claims first.
      if (ho && i < ho->ids.size() && !ho->in_dram[i] && flying) {
        --flying;
        if (!in_dram) h.inflight_tokens += tpb;
      }
    }
    lookup_result lr{};
    if (k == hp) {  // the session's own blocks follow the shared ones
      const auto rest = history.subspan(std::size_t(hp) * tpb);
      lr = index_.lookup(s, model_, rest, locations_);
      if (lr.blocks > locations_.size()) {  // longer than max_session_blocks: look again
        locations_.resize(lr.blocks);
        lr = index_.lookup(s, model_, rest, locations_);
      }
    }
    const std::uint32_t n = std::min<std::uint32_t>(lr.blocks, std::uint32_t(locations_.size()));
    for (std::uint32_t i = 0; i < n; ++i) {
      if (locations_[i].where == tier::dram) {
        h.dram_tokens += locations_[i].tokens;
      } else {
        h.ssd_tokens += locations_[i].tokens;
        if (flying) {  // promotions take SSD-only blocks in prefix order
          --flying;
          h.inflight_tokens += locations_[i].tokens;
        }
      }
    }
    if (h.waited_ticket) finish_promotion(s, pf_->complete(r, h.waited_ticket));
    h.tokens = h.shared_tokens + lr.tokens;
    count_hit(h);
    policy_->on_access(r, now);
    if (prompt_tokens > 0) policy_->on_prompt(r, prompt_tokens);
    return h;
  }

  /// Turn end: stores the session whose history is now `tokens` (its earlier blocks
  /// stay; the partial last block and the new ones are written to DRAM). `next_use` is
  /// for OPT only: when the session is used next (belady::never when never). `shared`:
  /// the first this many blocks are a shared prefix (taken when the session is first
  /// stored; the session then holds them as claims on shared_blocks entries).
  void save(const session_hash& key, std::span<const token_id> tokens, std::uint64_t now,
            std::uint64_t next_use = policy::belady::never, std::uint32_t shared = 0) {
    const std::uint32_t tpb = o_.tokens_per_block;
    const std::uint32_t total = std::uint32_t((tokens.size() + tpb - 1) / tpb);
    if (total == 0) return;
    std::uint32_t r;
    {
      locked_session s = index_.open(key, true);
      if (!s) return;  // cannot happen: records outnumber blocks
      r = s.record_id();
      if (!policy_->live(r)) {
        policy_->on_insert(r, now, identity_of(key));
        if (shared > 0) start_holding(r, shared_prefix_of(no_slot, shared, tokens.size()));
      }
      if (opt_) opt_->set_next_use(r, next_use);
      if (pf_) pf_->cancel(r, *this);
      holder* ho = holder_of(r);
      const std::uint32_t hp = ho ? std::min(ho->prefix, std::uint32_t(tokens.size() / tpb)) : 0;
      const std::uint32_t held = ho ? std::min(hp, std::uint32_t(ho->ids.size())) : 0;
      if (hp > 0) {
        prefix_keys(tokens, hp);
        upgrade_claims(r);
      }
      // Stored full blocks stay (token ids never change in the simulator, so they match).
      // A session holding only part of its shared prefix has no blocks of its own.
      std::uint32_t first = held;
      if (held == hp)
        for (std::uint32_t b = s.first_block(); b != no_slot && s.meta(b).tokens == tpb && first < total;
             b = s.meta(b).next)
          ++first;
      std::uint32_t want = total - first;
      bool wrote = false;
      if (want > 0) {
        // DRAM slots needed for the first m blocks from `first`, and how many blocks
        // `slots` slots store: a shared block already in DRAM needs none.
        auto need = [&](std::uint32_t m) { return dram_need(first, m, hp); };
        auto fit = [&](std::uint32_t slots, std::uint32_t m) { return blocks_within(first, m, hp, slots); };
        std::uint32_t allowed = need(want);
        if (opt_) allowed = opt_total_room(r, allowed);
        const std::uint32_t m = hp > 0 ? fit(allowed, want) : allowed;
        c_.bypassed_blocks += want - m;
        const std::uint32_t m_slots = hp > 0 ? need(m) : m;
        if (opt_)
          opt_dram_room(s, r, m_slots, first);
        else
          dram_room_for_save(s, r, m_slots, first);
        const std::uint32_t n = hp > 0 ? fit(dram_free(), m) : std::min(m, dram_free());
        c_.rejected_blocks += m - n;
        // Shared blocks first (claims), then the session's own.
        const std::uint32_t own = std::max(first, hp);  // the session's own blocks start here
        std::uint32_t i = first;
        for (; i < std::min(first + n, own); ++i)
          if (!claim_for_save(r, keys_[i])) break;
        if (i == std::min(first + n, own) && first + n > own) {
          write_blocks(s, tokens.subspan(std::size_t(hp) * tpb), own - hp, first + n - own);
          wrote = true;
        }
      }
      if (s.block_count() == 0 && holding(r) == 0) {
        stop_holding(r);
        s.erase();
        policy_->on_erase(r);
        return;
      }
      sync(s, !wrote);
      policy_->on_access(r, now);
    }
    background_demotion();
    refresh_window();
    plan_prefetch();
  }

  /// The history lost its first `blocks` blocks (context overflow, truncation by a
  /// slice: decoupled positional encoding keeps the rest valid). `kept` is the new
  /// history; the retained blocks are re-keyed (chain hashes from the new start).
  void truncate_front(const session_hash& key, std::uint32_t blocks, std::span<const token_id> kept) {
    truncate(key, 0, blocks, kept);
  }

  /// The history lost blocks [from, from + blocks) (a truncation that keeps the system
  /// prompt's blocks at the front drops the oldest blocks after them). `kept` is the new
  /// history; the blocks after the cut are re-keyed. A session holding a shared prefix
  /// keeps the shared blocks before `from` and lets go of the others (its history no
  /// longer starts with the whole prompt); a cut inside the shared prefix must reach
  /// past it.
  void truncate(const session_hash& key, std::uint32_t from, std::uint32_t blocks, std::span<const token_id> kept) {
    locked_session s = index_.open(key, false);
    if (!s || blocks == 0) return;
    const std::uint32_t r = s.record_id();
    if (pf_) pf_->cancel(r, *this);
    holder* ho = holder_of(r);
    const std::uint32_t hp = ho ? ho->prefix : 0;
    const std::uint32_t tpb = o_.tokens_per_block;
    if (hp > 0 && from < hp) {
      if (from + blocks < hp && s.block_count() > 0) {
        // Shared blocks after the cut would become the session's own: not modelled (the
        // engine never cuts inside the prompt); drop the session instead.
        c_.truncated_blocks += view_count(s);
        drop_locked(s, false);
        return;
      }
      // The shared prefix shrinks to the blocks before the cut.
      while (ho->ids.size() > from) {
        unclaim(*ho, std::uint32_t(ho->ids.size() - 1));
        ++c_.truncated_blocks;
      }
      const std::uint32_t own_cut = from + blocks > hp ? from + blocks - hp : 0;
      ho->prefix = from;
      cut_own(s, 0, own_cut, kept.subspan(std::min(kept.size(), std::size_t(from) * tpb)));
    } else {
      cut_own(s, from - hp, blocks, kept.subspan(std::min(kept.size(), std::size_t(hp) * tpb)));
    }
    if (s.block_count() == 0 && holding(r) == 0) {
      stop_holding(r);
      s.erase();
      policy_->on_erase(r);
      return;
    }
    sync(s, false);
  }

  /// Removes a session (the engine closed it). Returns whether it was stored.
  bool close(const session_hash& key) {
    locked_session s = index_.open(key, false);
    if (!s) return false;
    ++c_.closed_sessions;
    drop_locked(s, false);
    return true;
  }

  std::uint32_t record_of(const session_hash& key) {
    locked_session s = index_.open(key, false);
    return s ? s.record_id() : no_slot;
  }

  /// Whether the policy finds the session worth publishing to a shared tier (store's
  /// publish_remote_locked asks the same); false when not stored.
  bool worth_sharing(const session_hash& key) {
    const std::uint32_t r = record_of(key);
    return r != no_slot && policy_->worth_sharing(r);
  }

  /// A hint about the user of a stored session (store::hint); nothing when not stored.
  void hint(const session_hash& key, policy::session_hint h, std::uint64_t now) {
    const std::uint32_t r = record_of(key);
    if (r == no_slot) return;
    policy_->on_hint(r, h, now);
  }

  /// The session's next turn entered the engine queue at `position`. The engine calls
  /// plan_prefetch() once it has scheduled what it can (only what still waits is worth
  /// fetching).
  void enqueue(const session_hash& key, std::uint64_t position, std::uint64_t now) {
    std::uint32_t r;
    {
      locked_session s = index_.open(key, false);
      r = s ? s.record_id() : no_slot;
      // Its shared blocks that another holder keeps in DRAM are its in DRAM too (no I/O):
      // not for the prefetcher to read again.
      if (s && !(pf_ && pf_->in_flight(r)) && upgrade_claims(r)) sync(s, false);
    }
    if (r == no_slot) {  // not stored: a policy that evicted it learns when it came back
      policy_->on_miss(identity_of(key), now);
      return;
    }
    policy_->enqueue(r, position, now);
    refresh_window();
  }
  void dequeue(std::uint32_t r) {
    if (r == no_slot) return;
    policy_->dequeue(r);
  }
  /// OPT: when the session is used next (any clock; belady::never when never).
  void set_next_use(std::uint32_t r, std::uint64_t when) {
    if (opt_ && r != no_slot) opt_->set_next_use(r, when);
  }

  /// The reads of a promotion finished.
  void io_complete(std::uint32_t r, std::uint64_t ticket) {
    if (!pf_) return;
    const std::uint32_t n = pf_->complete(r, ticket);
    if (n == 0) return;  // cancelled meanwhile
    {
      locked_session s = index_.try_open_record(r);
      if (s) finish_promotion(s, n);
    }
    background_demotion();
    plan_prefetch();
  }

  void plan_prefetch() {
    if (!pf_) return;
    if (pred_ && o_.prefetch_likely)
      (void)pf_->plan(*policy_, *this, [&](auto&& visit) { pred_->for_each_likely(o_.prefetch_likely, visit); });
    else
      (void)pf_->plan(*policy_, *this);
  }

  /// TTL: drops sessions idle for `ttl` or longer. Returns how many.
  std::uint32_t expire(std::uint64_t now, std::uint64_t ttl) {
    std::uint32_t n = 0;
    for (std::uint32_t r; (r = policy_->next_expired(now, ttl)) != policy::no_record;) {
      locked_session s = index_.try_open_record(r);
      if (!s) break;
      drop_locked(s, false);
      ++c_.expired_sessions;
      ++n;
    }
    return n;
  }

  // ------------------------------------------------------------------ prefetcher target

  std::uint32_t ssd_only_blocks(std::uint32_t r) noexcept { return policy_->blocks(r, policy::level::ssd); }

  std::uint32_t start_promotion(std::uint32_t r, std::uint32_t max_blocks, std::uint64_t ticket) noexcept {
    const std::uint32_t keep = watermark_blocks_ / 2;
    // Room: free DRAM above half the watermark, plus what less urgent sessions give by
    // demotion into free SSD space (never a drop: prefetching must not cost hits). Only
    // the first candidate in victim order is considered each time: when it is more
    // urgent than r, so is every later one (the orders agree), which keeps this O(log n).
    while (dram_free() < keep + max_blocks && ssd_free() > 0) {
      const std::uint32_t v =
          policy_->pick_victim(policy::level::dram, [&](std::uint32_t x) noexcept { return x != r; });
      if (v == policy::no_record || !less_urgent(v, r)) break;
      if (!opt_ && policy_->blocks(v, policy::level::dram) > ssd_free()) break;
      locked_session vs = index_.try_open_record(v);
      if (!vs) break;
      if (pf_) pf_->cancel(v, *this);
      const std::uint32_t m =
          opt_ ? std::min({keep + max_blocks - dram_free(), view_dram(vs), ssd_free()}) : view_dram(vs);
      move_dram_to_ssd(vs, m);
    }
    const std::uint32_t free = dram_free();
    const std::uint32_t n = free > keep ? std::min(max_blocks, free - keep) : 0;
    if (n == 0) return 0;
    auto& res = reserved_[r];
    for (std::uint32_t i = 0; i < n; ++i) res.push_back(dram_.allocate());
    reserved_blocks_ += n;
    if (io_.read) io_.read(io_.context, r, n, ticket);
    return n;
  }

  void abort_promotion(std::uint32_t r, std::uint64_t) noexcept {
    for (std::uint32_t slot : reserved_[r]) dram_.release(slot);
    reserved_blocks_ -= std::uint32_t(reserved_[r].size());
    reserved_[r].clear();
  }

  // ------------------------------------------------------------------ inspection

  /// Every block is accounted for exactly once: pools vs index vs shared entries vs
  /// policy vs reservations; every shared copy's count is its holders' claims.
  bool check(std::string* why = nullptr) {
    auto fail = [&](const std::string& m) {
      if (why) *why = m;
      return false;
    };
    std::uint64_t dram = 0, ssd = 0, blocks = 0, reserved = 0, claims = 0;
    std::vector<std::uint32_t> dram_refs(shared_.capacity(), 0), ssd_refs(shared_.capacity(), 0);
    for (std::uint32_t r = 0; r < reserved_.size(); ++r) {
      reserved += reserved_[r].size();
      const bool flying = pf_ && pf_->in_flight(r);
      if (flying != !reserved_[r].empty() || (flying && pf_->blocks_in_flight(r) != reserved_[r].size()))
        return fail("record " + std::to_string(r) + ": reservation does not match the prefetcher");
      for (std::uint32_t slot : reserved_[r])
        if (!dram_.is_used(slot)) return fail("reserved DRAM slot not in use");
      if (!policy_->live(r)) {
        if (!reserved_[r].empty()) return fail("reservation for a dead record");
        continue;
      }
      locked_session s = index_.try_open_record(r);
      if (!s) return fail("policy has record " + std::to_string(r) + " that the index does not");
      std::uint32_t d = 0, sd = 0, n = 0;
      for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next, ++n) {
        const block_meta& m = s.meta(b);
        if ((m.dram_slot == no_slot) == (m.ssd_slot == no_slot)) return fail("block in both tiers or none");
        if (m.dram_slot != no_slot && !dram_.is_used(m.dram_slot)) return fail("DRAM slot not in use");
        if (m.ssd_slot != no_slot && !ssd_.is_used(m.ssd_slot)) return fail("SSD slot not in use");
        d += m.dram_slot != no_slot;
        sd += m.ssd_slot != no_slot;
      }
      dram += d;
      ssd += sd;
      blocks += n;
      if (const holder* ho = holder_of(r)) {
        const std::uint32_t held = std::uint32_t(ho->ids.size());
        if (held > ho->prefix || (held < ho->prefix && n > 0))
          return fail("record " + std::to_string(r) + " holds part of its shared prefix and blocks of its own");
        std::uint32_t in = 0;
        for (std::uint32_t i = 0; i < held; ++i) {
          const std::uint32_t id = ho->ids[i];
          if (id >= shared_.capacity()) return fail("claim on no shared entry");
          ++(ho->in_dram[i] ? dram_refs : ssd_refs)[id];
          in += ho->in_dram[i];
        }
        if (in != ho->dram) return fail("record " + std::to_string(r) + ": DRAM claim count drifted");
        d += in;
        sd += held - in;
        n += held;
        claims += held;
      }
      if (n == 0) return fail("live record without blocks");
      if (d != policy_->blocks(r, policy::level::dram) || sd != policy_->blocks(r, policy::level::ssd))
        return fail("policy block counts differ from the index for record " + std::to_string(r));
    }
    for (std::uint32_t r = 0; r < holders_.size(); ++r)
      if (!policy_->live(r) && (holders_[r].prefix || !holders_[r].ids.empty()))
        return fail("a dead record holds shared blocks");
    if (claims != claims_total_) return fail("claim count drifted");
    std::uint64_t copies = 0;
    bool shared_ok = true;
    std::string shared_why;
    shared_.for_each([&](std::uint32_t id, const shared_blocks::entry& e) {
      if (!shared_ok) return;
      auto bad = [&](const char* m) {
        shared_ok = false;
        shared_why = "shared entry " + std::to_string(id) + ": " + m;
      };
      if (e.dram_refs != dram_refs[id] || e.ssd_refs != ssd_refs[id]) return bad("references differ from the claims");
      if (e.dram_refs + e.ssd_refs == 0) return bad("no holder left");
      if ((e.dram_refs > 0) != (e.dram_slot != no_slot) || (e.ssd_refs > 0) != (e.ssd_slot != no_slot))
        return bad("a copy without holders, or holders without a copy");
      if (e.dram_refs && !dram_.is_used(e.dram_slot)) return bad("DRAM slot not in use");
      if (e.ssd_refs && !ssd_.is_used(e.ssd_slot)) return bad("SSD slot not in use");
      dram += e.dram_refs > 0;
      ssd += e.ssd_refs > 0;
      copies += (e.dram_refs > 0) + (e.ssd_refs > 0);
    });
    if (!shared_ok) return fail(shared_why);
    for (std::uint32_t id = 0; id < shared_.capacity(); ++id)
      if ((dram_refs[id] || ssd_refs[id]) && shared_[id].dram_refs + shared_[id].ssd_refs == 0)
        return fail("claim on an erased shared entry");
    if (copies != shared_copies_) return fail("shared copy count drifted");
    if (!shared_.check()) return fail("shared table probe runs broken");
    if (dram + reserved != dram_.used())
      return fail("DRAM slots leaked: used " + std::to_string(dram_.used()) + ", accounted " +
                  std::to_string(dram + reserved));
    if (ssd != ssd_.used())
      return fail("SSD slots leaked: used " + std::to_string(ssd_.used()) + ", accounted " + std::to_string(ssd));
    if (index_.free_blocks() + blocks != max_blocks(o_)) return fail("index block entries leaked");
    if (index_.live_sessions() != policy_->live_sessions()) return fail("index and policy disagree on live sessions");
    if (pf_ && pf_->bytes_in_flight() != reserved * o_.block_bytes) return fail("bytes in flight do not match");
    if (reserved != reserved_blocks_) return fail("reserved block count drifted");
    if (pf_ && pf_->bytes_in_flight() > pf_->max_bytes_in_flight()) return fail("bytes in flight over the bound");
    if (!policy_->check()) return fail("policy invariants");
    return true;
  }

  const cache_counters& counters() const noexcept { return c_; }
  /// Blocks holding data in DRAM and on SSD (DRAM reserved for promotions in flight
  /// excluded): what the tiers store, each shared copy once.
  std::uint32_t stored_dram_blocks() const noexcept { return dram_.used() - reserved_blocks_; }
  std::uint32_t stored_ssd_blocks() const noexcept { return ssd_.used(); }
  /// Blocks the stored sessions hold, a shared block once per holder: what the tiers
  /// would store if every session kept its own copy.
  std::uint64_t referenced_blocks() const noexcept {
    return std::uint64_t(stored_dram_blocks()) + stored_ssd_blocks() - shared_copies_ + claims_total_;
  }
  /// Copies of shared blocks stored (DRAM and SSD).
  std::uint32_t shared_copies() const noexcept { return shared_copies_; }
  policy::eviction_policy& policy() noexcept { return *policy_; }
  policy::prefetcher* prefetcher() noexcept { return pf_.get(); }
  policy::predictive* predictive() noexcept { return pred_; }
  std::uint32_t dram_used() const noexcept { return dram_.used(); }
  std::uint32_t ssd_used() const noexcept { return ssd_.used(); }
  std::uint32_t dram_free() const noexcept { return dram_.capacity() - dram_.used(); }
  std::uint32_t ssd_free() const noexcept { return ssd_.capacity() - ssd_.used(); }
  const cache_options& options() const noexcept { return o_; }
  const cache_index& index() const noexcept { return index_; }

 private:
  /// The shared blocks a session holds (its claims): the first `prefix` blocks of its
  /// history are shared; ids[i] is the shared_blocks entry of block i, claimed in DRAM
  /// when in_dram[i], for i < ids.size() (<= prefix). Its index record holds the blocks
  /// after the prefix, chain hashes starting there, and only when it holds the whole
  /// prefix (a partial save or a tail drop leaves fewer claims and no blocks of its own).
  struct holder {
    std::uint32_t prefix = 0;
    std::vector<std::uint32_t> ids;
    std::vector<std::uint8_t> in_dram;
    std::uint32_t dram = 0;  ///< claims in DRAM
  };

  static std::uint32_t max_records(const cache_options& o) noexcept {
    return std::uint32_t(std::min<std::uint64_t>(std::uint64_t(o.dram_blocks) + o.ssd_blocks + 1024, 0x7fffffffu));
  }
  static std::uint32_t max_blocks(const cache_options& o) noexcept {
    return std::uint32_t(std::uint64_t(o.dram_blocks) + o.ssd_blocks + o.max_session_blocks + 8);
  }
  static cache_index_options index_options(const cache_options& o) {
    cache_index_options io;
    io.max_sessions = max_records(o);
    io.max_blocks = max_blocks(o);
    io.tokens_per_block = o.tokens_per_block;
    io.shards = 64;
    return io;
  }

  void count_hit(const hit& h) noexcept {
    c_.hit_tokens += h.tokens;
    c_.dram_hit_tokens += h.dram_tokens;
    c_.ssd_hit_tokens += h.ssd_tokens;
    c_.shared_hit_tokens += h.shared_tokens;
    if (h.tokens) ++c_.lookup_hits;
  }

  /// Tells the policy the session's block counts (recounting them unless publish() or
  /// truncate() just did: the count is O(blocks)); its shared blocks count in the tier
  /// it claims them in.
  void sync(locked_session& s, bool recount = true) noexcept {
    if (recount) s.count_tiers();
    policy_->on_blocks(s.record_id(), policy::level::dram, view_dram(s));
    policy_->on_blocks(s.record_id(), policy::level::ssd, view_ssd(s));
  }

  // ---- the session's view: its shared blocks (claims) first, then its own blocks

  /// The session's shared blocks, or nullptr while no session has held any.
  holder* holder_of(std::uint32_t r) noexcept { return holders_.empty() ? nullptr : &holders_[r]; }
  const holder* holder_of(std::uint32_t r) const noexcept { return holders_.empty() ? nullptr : &holders_[r]; }
  std::uint32_t holding(std::uint32_t r) const noexcept {
    const holder* ho = holder_of(r);
    return ho ? std::uint32_t(ho->ids.size()) : 0;
  }
  std::uint32_t view_dram(locked_session& s) const noexcept {
    const holder* ho = holder_of(s.record_id());
    return s.dram_blocks() + (ho ? ho->dram : 0);
  }
  std::uint32_t view_ssd(locked_session& s) const noexcept {
    const holder* ho = holder_of(s.record_id());
    return s.ssd_blocks() + (ho ? std::uint32_t(ho->ids.size()) - ho->dram : 0);
  }
  std::uint32_t view_count(locked_session& s) const noexcept { return s.block_count() + holding(s.record_id()); }

  /// Shared blocks at the start of a history of `tokens` tokens: the record's own count
  /// when it is stored, else `shared` (the engine's), at most the whole blocks there are.
  std::uint32_t shared_prefix_of(std::uint32_t r, std::uint32_t shared, std::size_t tokens) const noexcept {
    if (r != no_slot) shared = holder_of(r) ? holder_of(r)->prefix : 0;
    return std::uint32_t(std::min<std::size_t>({shared, tokens / o_.tokens_per_block, keys_.size(), ids_.size()}));
  }

  /// keys_[i] = chain hash of `tokens` through block i, for i < n (whole blocks).
  void prefix_keys(std::span<const token_id> tokens, std::uint32_t n) noexcept {
    const std::uint32_t tpb = o_.tokens_per_block;
    hash128 prev{};
    for (std::uint32_t i = 0; i < n; ++i)
      keys_[i] = prev = chain_hash(prev, model_, tokens.subspan(std::size_t(i) * tpb, tpb));
  }

  /// Record r starts holding a shared prefix of `prefix` blocks (none claimed yet). The
  /// table and the per-record state are made on first use.
  void start_holding(std::uint32_t r, std::uint32_t prefix) {
    if (prefix == 0) return;
    if (holders_.empty()) {
      holders_.resize(max_records(o_));
      shared_.reserve(
          std::uint32_t(std::min<std::uint64_t>(std::uint64_t(o_.dram_blocks) + o_.ssd_blocks, 0x7fffffffu)));
    }
    holder& ho = holders_[r];
    ho.prefix = prefix;
    ho.ids.reserve(keys_.size());
    ho.in_dram.reserve(keys_.size());
  }
  /// Record r is erased: it must have let go of its claims.
  void stop_holding(std::uint32_t r) noexcept {
    if (holder* ho = holder_of(r)) ho->prefix = 0;
  }

  /// The DRAM slots to store blocks [first, first + m) of a session whose first `prefix`
  /// blocks are shared (keys_ filled): one each, except a shared block already in DRAM.
  std::uint32_t dram_need(std::uint32_t first, std::uint32_t m, std::uint32_t prefix) const noexcept {
    std::uint32_t need = 0;
    for (std::uint32_t i = first; i < first + m; ++i) need += i >= prefix || !in_dram_copy(keys_[i]);
    return need;
  }
  /// How many of blocks [first, first + m) fit in `slots` DRAM slots, in order.
  std::uint32_t blocks_within(std::uint32_t first, std::uint32_t m, std::uint32_t prefix,
                              std::uint32_t slots) const noexcept {
    std::uint32_t i = first;
    for (; i < first + m; ++i) {
      const std::uint32_t cost = i >= prefix || !in_dram_copy(keys_[i]);
      if (cost > slots) break;
      slots -= cost;
    }
    return i - first;
  }
  bool in_dram_copy(const hash128& key) const noexcept {
    const std::uint32_t id = shared_.find(key);
    return id != shared_blocks::none && shared_[id].dram_refs > 0;
  }

  /// A save claims the shared block `key` in DRAM: the DRAM copy when there is one (no
  /// write), else a new copy written from HBM. False when there is no room (the caller
  /// made it, so only on a bug) or no table entry left.
  bool claim_for_save(std::uint32_t r, const hash128& key) noexcept {
    std::uint32_t id = shared_.find(key);
    if (id == shared_blocks::none) {
      if (dram_free() == 0) return false;
      id = shared_.insert(key);
      if (id == shared_blocks::none) return false;
    }
    shared_blocks::entry& e = shared_[id];
    if (e.dram_refs == 0) {
      const std::uint32_t slot = dram_.allocate();
      if (slot == no_slot) {
        if (e.ssd_refs == 0) shared_.erase(id);
        return false;
      }
      e.dram_slot = slot;
      ++shared_copies_;
      ++c_.saved_blocks;
    } else {
      ++c_.dedup_blocks;
    }
    ++e.dram_refs;
    holder& ho = holders_[r];
    ho.ids.push_back(id);
    ho.in_dram.push_back(1);
    ++ho.dram;
    ++claims_total_;
    return true;
  }

  /// Lets go of claim i (the last one: claims stay a prefix). Returns the copies freed
  /// (0 or 1); erases the entry when nobody holds it.
  std::uint32_t unclaim(holder& ho, std::uint32_t i) noexcept {
    const std::uint32_t id = ho.ids[i];
    shared_blocks::entry& e = shared_[id];
    std::uint32_t freed = 0;
    if (ho.in_dram[i]) {
      --ho.dram;
      if (--e.dram_refs == 0) {
        dram_.release(e.dram_slot);
        e.dram_slot = no_slot;
        ++freed;
      }
    } else if (--e.ssd_refs == 0) {
      ssd_.release(e.ssd_slot);
      e.ssd_slot = no_slot;
      ++freed;
    }
    shared_copies_ -= freed;
    if (e.dram_refs + e.ssd_refs == 0) shared_.erase(id);
    ho.ids.pop_back();
    ho.in_dram.pop_back();
    --claims_total_;
    return freed;
  }
  /// Lets go of every claim of record r; returns the copies freed.
  std::uint32_t unclaim_all(std::uint32_t r) noexcept {
    holder* ho = holder_of(r);
    std::uint32_t freed = 0;
    while (ho && !ho->ids.empty()) freed += unclaim(*ho, std::uint32_t(ho->ids.size() - 1));
    return freed;
  }

  /// Claim i of `ho` moves from DRAM to SSD: onto the SSD copy when there is one (no
  /// write), else a new copy. False when there is no SSD slot.
  bool demote_claim(holder& ho, std::uint32_t i) noexcept {
    shared_blocks::entry& e = shared_[ho.ids[i]];
    if (e.ssd_refs == 0) {
      const std::uint32_t slot = ssd_.allocate();
      if (slot == no_slot) return false;
      e.ssd_slot = slot;
      ++shared_copies_;
      ++c_.demoted_blocks;
    }
    ++e.ssd_refs;
    if (--e.dram_refs == 0) {
      dram_.release(e.dram_slot);
      e.dram_slot = no_slot;
      --shared_copies_;
    }
    ho.in_dram[i] = 0;
    --ho.dram;
    return true;
  }
  /// Claim i of `ho` moves from SSD to DRAM onto `slot` (a reserved DRAM slot, returned
  /// when the DRAM copy already exists; no_slot: only onto an existing DRAM copy).
  void promote_claim(holder& ho, std::uint32_t i, std::uint32_t slot) noexcept {
    shared_blocks::entry& e = shared_[ho.ids[i]];
    if (e.dram_refs == 0) {
      e.dram_slot = slot;
      ++shared_copies_;
    } else if (slot != no_slot) {
      dram_.release(slot);
    }
    ++e.dram_refs;
    if (--e.ssd_refs == 0) {
      ssd_.release(e.ssd_slot);
      e.ssd_slot = no_slot;
      --shared_copies_;
    }
    ho.in_dram[i] = 1;
    ++ho.dram;
  }
  /// Record r's SSD claims on blocks with a DRAM copy move onto it (no I/O). Returns
  /// whether any did.
  bool upgrade_claims(std::uint32_t r) noexcept {
    holder* ho = holder_of(r);
    if (!ho || ho->dram == ho->ids.size()) return false;
    bool any = false;
    for (std::uint32_t i = 0; i < ho->ids.size(); ++i) {
      if (ho->in_dram[i] || shared_[ho->ids[i]].dram_refs == 0) continue;
      promote_claim(*ho, i, no_slot);
      any = true;
    }
    return any;
  }
  /// SSD slots a whole demotion of the session needs: its own DRAM blocks, and its DRAM
  /// claims on blocks without an SSD copy.
  std::uint32_t ssd_need_to_demote(locked_session& s) const noexcept {
    std::uint32_t need = s.dram_blocks();
    if (const holder* ho = holder_of(s.record_id()))
      for (std::uint32_t i = 0; i < ho->ids.size(); ++i) need += ho->in_dram[i] && shared_[ho->ids[i]].ssd_refs == 0;
    return need;
  }

  void release_chain(std::uint32_t b) noexcept {
    while (b != no_slot) {
      block_meta& m = index_.block(b);
      const std::uint32_t next = m.next;
      if (m.dram_slot != no_slot) dram_.release(m.dram_slot);
      if (m.ssd_slot != no_slot) ssd_.release(m.ssd_slot);
      index_.release_block(b);
      b = next;
    }
  }

  /// Drops the session's own blocks [a, a + d) and re-keys the rest: own block i then
  /// starts at kept[i * tpb]. A block whose tokens are not there (the caller's bug) is
  /// dropped with everything after it rather than served.
  void cut_own(locked_session& s, std::uint32_t a, std::uint32_t d, std::span<const token_id> kept) noexcept {
    std::uint32_t head = s.truncate(0);
    std::uint32_t before = no_slot, x = head;
    for (std::uint32_t i = 0; i < a && x != no_slot; ++i) {
      before = x;
      x = index_.block(x).next;
    }
    for (std::uint32_t i = 0; i < d && x != no_slot; ++i) {
      const std::uint32_t next = index_.block(x).next;
      index_.block(x).next = no_slot;
      release_chain(x);
      ++c_.truncated_blocks;
      x = next;
    }
    if (before == no_slot)
      head = x;
    else
      index_.block(before).next = x;
    const std::uint32_t tpb = o_.tokens_per_block;
    hash128 prev{};
    std::uint32_t n = 0;
    for (std::uint32_t y = head; y != no_slot; y = index_.block(y).next, ++n) {
      auto t = s.tokens_of(y);
      const std::size_t at = std::size_t(n) * tpb;
      if (at + t.size() > kept.size() || !std::equal(t.begin(), t.end(), kept.begin() + std::ptrdiff_t(at))) {
        release_chain(y);
        if (n == 0)
          head = no_slot;
        else {
          std::uint32_t z = head;
          for (std::uint32_t i = 1; i < n; ++i) z = index_.block(z).next;
          index_.block(z).next = no_slot;
        }
        break;
      }
      prev = index_.block(y).chain = chain_hash(prev, model_, t);
    }
    if (head != no_slot && n > 0) (void)s.publish(0, head, n);
  }

  void drop_locked(locked_session& s, bool count_as_eviction = true) noexcept {
    const std::uint32_t r = s.record_id();
    if (pf_) pf_->cancel(r, *this);
    const std::uint32_t own = s.block_count();
    release_chain(s.truncate(0));
    const std::uint32_t freed = unclaim_all(r);
    if (count_as_eviction) {
      ++c_.dropped_sessions;
      c_.dropped_blocks += own + freed;
    }
    stop_holding(r);
    s.erase();
    policy_->on_erase(r);
  }

  /// Drops the last `n` blocks of a session (all of it when n >= its blocks): its own
  /// first, then its claims from the last.
  void drop_tail(locked_session& s, std::uint32_t n) noexcept {
    const std::uint32_t count = view_count(s);
    if (n >= count) {
      drop_locked(s);
      return;
    }
    if (pf_) pf_->cancel(s.record_id(), *this);
    const std::uint32_t own = s.block_count();
    const std::uint32_t k = std::min(n, own);
    c_.dropped_blocks += k;
    release_chain(s.truncate(own - k));
    if (n > k) {
      holder& ho = holders_[s.record_id()];
      for (std::uint32_t i = 0; i < n - k; ++i) c_.dropped_blocks += unclaim(ho, std::uint32_t(ho.ids.size() - 1));
    }
    sync(s, false);
  }

  /// Moves the session's last `n` DRAM blocks (its claims first in order, then its own)
  /// to SSD (all when n >= its DRAM blocks). The caller made SSD room.
  void move_dram_to_ssd(locked_session& s, std::uint32_t n) noexcept {
    scratch_.clear();  // capacity reserved for the longest session: no allocation
    for (std::uint32_t b = s.first_block(); b != no_slot; b = s.meta(b).next)
      if (s.meta(b).dram_slot != no_slot) scratch_.push_back(b);
    const std::uint32_t k = std::uint32_t(scratch_.size());
    const std::uint32_t from = n >= k ? 0 : k - n;
    bool room = true;
    for (std::uint32_t i = from; i < k; ++i) {
      const std::uint32_t slot = ssd_.allocate();
      if (slot == no_slot) {
        room = false;
        break;
      }
      block_meta& m = s.meta(scratch_[i]);
      m.ssd_slot = slot;
      dram_.release(m.dram_slot);
      m.dram_slot = no_slot;
      ++c_.demoted_blocks;
    }
    holder* ho = holder_of(s.record_id());
    if (room && ho && ho->dram > 0 && n > k) {  // DRAM claims too: the last n - k of them
      std::uint32_t skip = n - k >= ho->dram ? 0 : ho->dram - (n - k);
      for (std::uint32_t i = 0; i < ho->ids.size(); ++i) {
        if (!ho->in_dram[i]) continue;
        if (skip > 0) {
          --skip;
          continue;
        }
        if (!demote_claim(*ho, i)) break;
      }
    }
    sync(s);
  }

  /// SSD room for `m` blocks by dropping SSD victims (never the two excluded).
  bool ssd_room(std::uint32_t m, std::uint32_t ex_a, std::uint32_t ex_b) noexcept {
    while (ssd_free() < m) {
      const std::uint32_t v =
          policy_->pick_victim(policy::level::ssd, [&](std::uint32_t x) noexcept { return x != ex_a && x != ex_b; });
      if (v == policy::no_record) return false;
      locked_session vs = index_.try_open_record(v);
      if (!vs) return false;
      drop_locked(vs);
    }
    return true;
  }

  /// store::demote_some_victim: demote a whole session; without SSD room, drop it.
  void demote_whole(std::uint32_t v, std::uint32_t exclude) noexcept {
    locked_session vs = index_.try_open_record(v);
    if (!vs) return;
    if (pf_) pf_->cancel(v, *this);
    if (!ssd_room(ssd_need_to_demote(vs), v, exclude)) {
      drop_locked(vs);
      return;
    }
    move_dram_to_ssd(vs, view_dram(vs));
  }

  /// lru / scheduler_aware: DRAM room for a save of `n` blocks by `self`, whose blocks
  /// before `keep` stay.
  void dram_room_for_save(locked_session& self, std::uint32_t r, std::uint32_t n, std::uint32_t keep) noexcept {
    while (dram_free() < n) {
      const std::uint32_t v =
          policy_->pick_victim(policy::level::dram, [&](std::uint32_t x) noexcept { return x != r; });
      if (v == policy::no_record) break;
      demote_whole(v, r);
    }
    if (dram_free() < n) demote_own_prefix(self, r, n, keep);
  }

  /// store::alloc_dram's last resort: the session's own older blocks go to SSD (its
  /// DRAM claims among them first: they come first in its history).
  void demote_own_prefix(locked_session& self, std::uint32_t r, std::uint32_t n, std::uint32_t keep) noexcept {
    if (holder* ho = holder_of(r)) {
      for (std::uint32_t i = 0; i < ho->ids.size() && i < keep && dram_free() < n; ++i) {
        if (!ho->in_dram[i]) continue;
        if (shared_[ho->ids[i]].ssd_refs == 0 && ssd_free() == 0 && (opt_ || !ssd_room(1, r, no_slot))) return;
        if (!demote_claim(*ho, i)) return;
      }
      keep = keep > ho->ids.size() ? keep - std::uint32_t(ho->ids.size()) : 0;
    }
    std::uint32_t pos = 0;
    scratch_.clear();
    for (std::uint32_t b = self.first_block(); b != no_slot && pos < keep; b = self.meta(b).next, ++pos)
      if (self.meta(b).dram_slot != no_slot) scratch_.push_back(b);
    const std::uint32_t k = std::uint32_t(scratch_.size());
    for (std::uint32_t i = 0; i < k && dram_free() < n; ++i) {
      if (ssd_free() == 0 && (opt_ || !ssd_room(1, r, no_slot))) break;
      block_meta& m = self.meta(scratch_[i]);
      m.ssd_slot = ssd_.allocate();
      dram_.release(m.dram_slot);
      m.dram_slot = no_slot;
      ++c_.demoted_blocks;
    }
  }

  /// OPT: room in DRAM + SSD for `want` blocks of session r by dropping the tails of
  /// sessions used later than r; returns how many of them to store (the rest bypass).
  std::uint32_t opt_total_room(std::uint32_t r, std::uint32_t want) noexcept {
    const std::uint64_t mine = opt_->next_use(r);
    while (dram_free() + ssd_free() < want) {
      // The farthest first: when it is not used after r, nothing is (bypass the rest).
      const std::uint32_t v = opt_->pick_farthest([&](std::uint32_t x) { return x != r; });
      if (v == policy::no_record || opt_->next_use(v) <= mine) break;
      locked_session vs = index_.try_open_record(v);
      if (!vs) break;
      drop_tail(vs, want - dram_free() - ssd_free());
    }
    return std::min(want, dram_free() + ssd_free());
  }

  /// OPT: DRAM room for n blocks, demoting the farthest-used DRAM blocks (tail first)
  /// into free SSD space.
  void opt_dram_room(locked_session& self, std::uint32_t r, std::uint32_t n, std::uint32_t keep) noexcept {
    while (dram_free() < n && ssd_free() > 0) {
      const std::uint32_t v =
          policy_->pick_victim(policy::level::dram, [&](std::uint32_t x) noexcept { return x != r; });
      if (v == policy::no_record) break;
      locked_session vs = index_.try_open_record(v);
      if (!vs) break;
      if (pf_) pf_->cancel(v, *this);
      move_dram_to_ssd(vs, std::min({n - dram_free(), view_dram(vs), ssd_free()}));
    }
    if (dram_free() < n) demote_own_prefix(self, r, n, keep);
  }

  /// Writes blocks [first, first + n) of `tokens` to DRAM and publishes them.
  void write_blocks(locked_session& s, std::span<const token_id> tokens, std::uint32_t first,
                    std::uint32_t n) noexcept {
    const std::uint32_t tpb = o_.tokens_per_block;
    hash128 prev{};
    if (first > 0) prev = s.meta(s.block_at(first - 1)).chain;
    std::uint32_t head = no_slot, tail = no_slot, made = 0;
    for (std::uint32_t i = first; i < first + n; ++i) {
      const std::size_t at = std::size_t(i) * tpb;
      auto t = tokens.subspan(at, std::min<std::size_t>(tpb, tokens.size() - at));
      const std::uint32_t b = s.new_block(t);
      if (b == no_slot) break;
      block_meta& m = s.meta(b);
      m.chain = prev = chain_hash(prev, model_, t);
      m.dram_slot = dram_.allocate();
      if (tail == no_slot)
        head = b;
      else
        s.meta(tail).next = b;
      tail = b;
      ++made;
    }
    c_.saved_blocks += made;
    release_chain(s.publish(first, head, made));
  }

  /// Moves up to n SSD-only blocks (prefix order: SSD claims first) into the session's
  /// reserved DRAM.
  void finish_promotion(locked_session& s, std::uint32_t n) noexcept {
    auto& res = reserved_[s.record_id()];
    reserved_blocks_ -= std::uint32_t(res.size());
    std::uint32_t moved = 0;
    if (holder* ho = holder_of(s.record_id()))
      for (std::uint32_t i = 0; i < ho->ids.size() && moved < n && !res.empty(); ++i) {
        if (ho->in_dram[i]) continue;
        promote_claim(*ho, i, res.back());
        res.pop_back();
        ++moved;
      }
    for (std::uint32_t b = s.first_block(); b != no_slot && moved < n && !res.empty(); b = s.meta(b).next) {
      block_meta& m = s.meta(b);
      if (m.ssd_slot == no_slot) continue;
      m.dram_slot = res.back();
      res.pop_back();
      ssd_.release(m.ssd_slot);
      m.ssd_slot = no_slot;
      ++moved;
    }
    for (std::uint32_t slot : res) dram_.release(slot);
    res.clear();
    c_.prefetched_blocks += moved;
    sync(s);
  }

  /// Keeps `watermark` of DRAM free by demoting DRAM victims (so saves find room). DRAM
  /// reserved by promotions in flight counts as free here: each such block frees an SSD
  /// slot when it lands, and demoting for it now would only push data off the SSD.
  void background_demotion() noexcept {
    if (!watermark_.should_start(dram_free(), reserved_blocks_)) return;
    while (dram_free() + reserved_blocks_ < watermark_.high) {
      if (opt_) {
        if (ssd_free() == 0) return;
        const std::uint32_t v = policy_->pick_victim(policy::level::dram, [](std::uint32_t) noexcept { return true; });
        if (v == policy::no_record) return;
        locked_session vs = index_.try_open_record(v);
        if (!vs) return;
        if (pf_) pf_->cancel(v, *this);
        move_dram_to_ssd(vs, std::min({watermark_.high - dram_free() - reserved_blocks_, view_dram(vs), ssd_free()}));
        continue;
      }
      const std::uint32_t v = policy_->pick_victim(policy::level::dram, [](std::uint32_t) noexcept { return true; });
      if (v == policy::no_record) return;
      demote_whole(v, no_slot);
    }
  }

  void refresh_window() noexcept {
    if (sa_) sa_->refresh_window();
    if (pred_) pred_->refresh_window();
  }

  /// Victim x may make room for prefetching r: x runs later than r (or not at all); for
  /// predictive, of two sessions not queued, x is less likely to return soon.
  bool less_urgent(std::uint32_t x, std::uint32_t r) const noexcept {
    if (opt_) return opt_->next_use(x) > opt_->next_use(r);
    if (pred_ && !policy_->queued(r))
      return !policy_->queued(x) && pred_->score(x, policy::level::dram) < pred_->score(r, policy::level::dram);
    if (!policy_->queued(x)) return true;
    return policy_->queued(r) && policy_->queue_position(x) > policy_->queue_position(r);
  }

  cache_options o_;
  io_hook io_;
  cache_index index_;
  slot_list dram_, ssd_;
  std::unique_ptr<policy::eviction_policy> policy_;
  policy::scheduler_aware* sa_ = nullptr;
  policy::belady* opt_ = nullptr;
  policy::predictive* pred_ = nullptr;
  std::unique_ptr<policy::prefetcher> pf_;
  std::vector<std::vector<std::uint32_t>> reserved_;  // DRAM slots reserved per record
  std::vector<std::uint32_t> scratch_;
  std::vector<block_location> locations_;
  shared_blocks shared_;             // shared prefix blocks, content-addressed (reserved on first use)
  std::vector<holder> holders_;      // by record; empty until a session holds shared blocks
  std::vector<hash128> keys_;        // chain hashes of a history's shared blocks
  std::vector<std::uint32_t> ids_;   // their shared_ entries (admit)
  std::uint64_t claims_total_ = 0;   // claims of all records
  std::uint32_t shared_copies_ = 0;  // shared copies stored, DRAM and SSD
  model_id model_{};
  policy::demotion_watermark watermark_{};
  std::uint32_t watermark_blocks_ = 0;
  std::uint32_t reserved_blocks_ = 0;  // DRAM reserved by promotions in flight
  cache_counters c_;
};

}  // namespace attnstore::sim
