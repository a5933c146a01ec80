// predictive: keeps the sessions most likely to come back soon, per byte, and tells the
// prefetcher which ones to bring up from SSD before they return.
//
// The paper's policy protects the sessions the engine's waiting queue names. In chat, a
// user reads the reply and types for seconds to minutes, so when the store must evict,
// a session's next turn is usually not queued yet. predictive ranks every session that
// is not queued by the benefit per byte it is expected to bring for the space it takes:
//
//   score = max over H of  P(returns within H | idle for a, class)
//                          / E[seconds of H it stays idle | idle for a, class]
//           x (prefill work a hit saves / bytes held)
//
// The class is (turns so far, history size, tokens the last turn added: a long reply
// takes long to read); P and the idle time come from a return_model learned online from
// the turns the policy sees; the work of a hit on h history tokens is linear + quadratic
// (attention) in h: W(h) = a h + b h^2, so per byte a + b h. The first factor is hits per
// second of space (LHD's hit density) at the best horizon H for that class and age, a
// Gittins-style index: a session whose user is still reading is worth less now than it
// will be in half a minute, one idle past the time nearly everyone returns by is worth
// little, and a fixed horizon would favour one of the two. The choice of H per cell
// needs no tuning; `horizon_s` > 0 fixes it instead (the score is then P(return within
// H) x work / bytes, divided by the idle share of H unless `density` is off).
// Sessions in the eviction window over the queue have probability 1: they are evicted
// last, the one farthest back in the queue first (as scheduler_aware). Sessions queued
// beyond the window (when the caller shows more of its queue) will run before any idle
// session could: they go after every idle session and before the window, also farthest
// back first.
//
// What is learned (return_model): an idle period starts at a turn end (an access after
// which the session holds more blocks than at its previous access: a save) and ends at
// its return (the next enqueue, or the next access without new blocks: a lookup); a
// session erased while idle is censored (when this policy named it as a victim) or over
// (anything else: closed by the engine, expired). Sessions idle now count as censored at
// their age. A victim the caller named (on_insert's identity) is remembered as a ghost
// (its identity, turn end, class and turns; `ghosts` of them, in a ring with an
// open-addressing index): when it is asked for again (on_miss) its return is counted at
// its true idle age, and when it is stored again it keeps its turn count. Without
// ghosts a small cache learns only from the sessions it kept: every idle period longer
// than its residence time is censored early, and the tail of the think time and the
// share of sessions that return stay the prior's. A ghost that is not asked for counts
// as censored at its age when it leaves the ring (full, or older than the last age bin);
// ghosts still waiting count as censored at their age at each refit.
//
// Hints (on_hint): an engine whose front end sees the user typing, or leaving, says so.
// The hint ends the idle period of the session's phase (composing: as a return; left: as
// an end) and starts one in the hint's phase, with its own classes and age origin: the
// policy learns what a hint is worth (how soon a typing user sends, how often a user who
// left comes back) the way it learns think times, and ranks by that. Without hints the
// phase is always 0 and nothing changes. Until `min_samples` idle periods have ended, the
// scores are LRU's (older is worse in every class, up to the age bins; scheduler_aware with the window); after that the
// model's prior (a generic think time) fills in what the data does not show yet.
//
// Keeping the order valid while scores change with time, in O(1) per event and decision
// (O(log n) for queued sessions): a score depends on a session only through its cell
// (class, age bin, level), with 28 log-spaced age bins. Each session sits in one FIFO per
// age bin, ordered by the time of its last access or enqueue; advancing the clock moves
// the FIFO heads whose age crossed the next edge (each session crosses each edge at most
// once per idle period: amortized O(1) per event), and with them their cell memberships
// (an intrusive list per level and cell). The cells are ranked by score when the model
// is refitted (every `refit_every` idle periods: O(cells x bins), amortized O(1)), and a
// bitset over that ranking marks the non-empty cells of each level: a victim is the
// first set bit's cell, taken from its oldest end where the score falls with age and
// from its youngest end where it rises. Lists are ordered within a cell except for
// sessions that enter a level late (a demotion), which join at the young end. Queued
// sessions sit in two indexed heaps per level (the window, and beyond it). No event or
// decision allocates: every table is sized at construction.
//
// Clock: `now` is the caller's, in ticks of 1 / ticks_per_second seconds (the store
// passes steady_clock nanoseconds: 1e9, the default; the simulator microseconds: 1e6).
// It must not go back; ages advance on events that carry `now`, and on advance().
//
// Threading: not thread-safe (the same rules as eviction_policy).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/detail/policy_heap.hpp"
#include "attnstore/policy/eviction_policy.hpp"
#include "attnstore/policy/return_model.hpp"

namespace attnstore::policy {

struct predictive_options {
  std::uint32_t max_sessions = 0;  ///< record ids are < max_sessions; at least 1
  /// Eviction window in queued sessions; 0: the paper's rule from capacity_blocks, as
  /// scheduler_aware (refresh_window()).
  std::uint32_t eviction_window = 0;
  std::uint64_t capacity_blocks = 0;    ///< DRAM + SSD blocks, for the automatic window
  double ticks_per_second = 1e9;        ///< unit of the `now` the caller passes; > 0
  std::uint32_t tokens_per_block = 64;  ///< history tokens per block (size classes, work); >= 1
  /// Prefill work a hit on h history tokens saves: prefill_linear x h + prefill_quadratic
  /// x h^2 (any unit: only ratios matter). The default ratio is the simulated LLaMA-13B's
  /// (33 us per token, 1.3 ns per token pair / 2). Both >= 0, not both 0.
  double prefill_linear = 1.0;
  double prefill_quadratic = 2e-5;
  /// 0 (the default): rank by the index above (the best horizon per class and age).
  /// > 0: a fixed horizon in seconds for every level (see above).
  double horizon_s = 0;
  bool density = true;  ///< with a fixed horizon: divide by the expected idle share of it
  /// Idle periods ended (returns, evictions, closes) before the learned scores replace
  /// the LRU-like start. The model's own prior (a generic think time) fills what the data
  /// does not show yet: a cache that evicts every session within seconds sees no returns
  /// at all, only that nobody came back that soon.
  std::uint32_t min_samples = 200;
  double half_life_s = 3600;        ///< seconds after which a period's evidence weighs half
  double prior_weight = 8;          ///< pseudo-periods at risk per age bin for the model's prior
  double class_weight = 32;         ///< the same for a class's estimate toward its turn class
  std::uint32_t refit_every = 512;  ///< idle periods between refits of the score tables; >= 1
  /// Evicted sessions remembered by identity, so that their returns are seen (above);
  /// 0: none. Memory: 32 bytes and two 4-byte index slots per ghost.
  std::uint32_t ghosts = 16384;
  /// for_each_likely(): sessions whose P(return within the DRAM horizon) is at least
  /// this. The DRAM horizon is how long a block stays in DRAM: blocks held / blocks
  /// leaving per second (Little's law), measured between refits.
  double prefetch_min_probability = 0.5;
  /// worth_sharing(): a session is written to a shared tier when P(it returns within
  /// share_horizon_s | its class, idle age) is at least share_min_probability (queued
  /// sessions always are; so is every session until the scores are learned). The
  /// horizon is how long the shared tier keeps a block (shared_tier_config::block_ttl).
  double share_horizon_s = 86400;
  double share_min_probability = 0.1;
};

class predictive final : public eviction_policy {
 public:
  static constexpr std::uint32_t bins = return_model::bins;
  static constexpr std::uint32_t cells = return_model::classes * bins;

  /// Throws std::invalid_argument naming a bad field.
  explicit predictive(const predictive_options& o);
  std::string_view name() const noexcept override { return "predictive"; }

  /// Recomputes the automatic window (no-op with a fixed one), as scheduler_aware.
  void refresh_window() noexcept {
    if (!o_.eviction_window) fit_window(o_.capacity_blocks);
  }
  /// Moves the policy's clock to `now` (ticks) without an event; ages never go back.
  /// Amortized O(1) (sessions crossing an age edge move to the next bin).
  void advance(std::uint64_t now) noexcept;

  /// The session's score in level `l` (its cell's), or +infinity when queued. Only
  /// its order matters. O(1).
  double score(std::uint32_t r, level l) const noexcept;
  /// P(the session returns within level l's horizon), from its cell; 1 when queued.
  double return_probability(std::uint32_t r, level l) const noexcept;
  /// P(the session returns within share_horizon_s), from its cell; 1 when queued, and
  /// while the scores are not learned yet.
  double share_probability(std::uint32_t r) const noexcept;

  /// Prefetch candidates: sessions holding SSD blocks, outside the window, most likely
  /// to return within the DRAM horizon first (at least prefetch_min_probability), at most
  /// `max` (<= 64). `visit(record)` returns true to stop. The candidates are collected
  /// before the first visit, so a visit may change the policy (a promotion that demotes
  /// another session). O(max + cells).
  template <class Visit>
  void for_each_likely(std::uint32_t max, Visit&& visit) noexcept {
    const std::uint32_t n = collect_likely(std::min<std::uint32_t>(max, likely_capacity));
    for (std::uint32_t i = 0; i < n; ++i)
      if (live(likely_[i]) && visit(likely_[i])) return;
  }

  const return_model& model() const noexcept { return model_; }
  /// Whether the learned scores are in use (min_samples idle periods seen).
  bool learned() const noexcept { return learned_; }
  /// The level's residence time in seconds: blocks held / blocks leaving per second, as
  /// of the last refit (or horizon_s when set). The prefetcher's horizon for DRAM.
  double horizon(level l) const noexcept { return horizon_[std::size_t(l)]; }
  std::uint64_t refits() const noexcept { return refits_; }
  /// Returns counted through ghosts (sessions asked for after their eviction).
  std::uint64_t ghost_returns() const noexcept { return ghost_returns_; }
  /// Ghosts remembered now (not yet asked for, or asked for and not stored again).
  std::uint32_t ghosts() const noexcept { return ghost_live_; }
  /// Elementary steps taken (list moves, age-edge crossings, bitset words and cell
  /// members scanned, heap updates): the tests' measure of cost per operation.
  std::uint64_t work() const noexcept { return work_; }
  const predictive_options& options() const noexcept { return o_; }
  /// Checks this class's invariants on top of eviction_policy::check(): every session in
  /// the age bin of its age and in the cell of its class and bin in each level where it
  /// holds blocks outside the window, counts, bitsets and idle counts. For tests. O(n).
  bool check_cells() const noexcept;

 protected:
  void reposition(std::uint32_t r) noexcept override;
  void forget(std::uint32_t r) noexcept override;
  std::uint32_t victim(level l, victim_filter accept, void* context) noexcept override;
  void inserted(std::uint32_t r, std::uint64_t now, std::uint64_t identity) noexcept override;
  void accessed(std::uint32_t r, std::uint64_t previous, std::uint64_t now) noexcept override;
  void enqueued(std::uint32_t r, std::uint64_t now) noexcept override;
  void dequeued(std::uint32_t r) noexcept override { place(r); }
  bool sharing_worth(std::uint32_t r) const noexcept override {
    return share_probability(r) >= o_.share_min_probability;
  }

 private:
  static constexpr std::uint32_t none = no_record;
  static constexpr std::uint16_t no_cell = 0xffff;
  static constexpr std::uint32_t words = (cells + 63) / 64;
  static constexpr std::uint32_t likely_capacity = 64;

  struct rec {
    std::uint64_t t0 = 0;                        // age origin: last access or enqueue (ticks)
    std::uint64_t t_end = 0;                     // the last turn end (ticks)
    std::uint32_t b_prev = none, b_next = none;  // age-bin FIFO
    std::uint32_t c_prev[level_count] = {none, none, none}, c_next[level_count] = {none, none, none};
    std::uint32_t blocks[level_count] = {0, 0, 0};  // as last seen (outflow per level)
    std::uint32_t last_total = 0;                   // total blocks at the last access
    std::uint32_t turns = 0;                        // turn ends seen
    std::uint32_t added = 0;                        // tokens the last turn added (its reply, when the prompt was told)
    std::uint32_t prompt = 0;                       // prompt tokens of the turn in progress (0: not told)
    std::uint64_t id = 0;                           // identity (0: none)
    std::uint8_t phase = 0;                         // hint since the turn end: 0 none, 1 composing, 2 left
    std::uint16_t cell[level_count] = {no_cell, no_cell, no_cell};
    std::uint8_t bin = 0, cls = 0;
    bool tracked = false;  // in an age-bin FIFO (live)
    bool idle = false;     // between a turn end and its return
    bool victim = false;   // named by victim() since its last access
  };
  struct level_cells {
    std::uint32_t head[cells], tail[cells], count[cells];
    double score[cells], p[cells];
    std::uint16_t rank[cells], at[cells];  // rank of a cell; cell at a rank (ascending score)
    bool young_first[cells];               // the score rises with age in this bin
    std::uint64_t nonempty[words];         // by rank
  };

  double seconds(std::uint64_t ticks) const noexcept { return double(ticks) / o_.ticks_per_second; }
  std::uint32_t class_now(std::uint32_t r) const noexcept;
  void bin_unlink(std::uint32_t r) noexcept;
  void bin_append(std::uint32_t r, std::uint32_t bin) noexcept;
  void restart_age(std::uint32_t r, std::uint64_t now) noexcept;
  void cell_unlink(std::uint32_t r, std::uint32_t l) noexcept;
  void cell_append(std::uint32_t r, std::uint32_t l, std::uint32_t cell) noexcept;
  void place(std::uint32_t r) noexcept;
  void set_idle(std::uint32_t r, bool on) noexcept;
  void end_idle(std::uint32_t r, std::uint64_t now) noexcept;
  void maybe_refit() noexcept;
  void refit() noexcept;
  void rank_cells(std::uint32_t l) noexcept;
  std::uint32_t collect_likely(std::uint32_t max) noexcept;
  // ghosts (evicted sessions remembered by identity)
  struct ghost {
    std::uint64_t id = 0;     // 0: removed (the slot waits to leave the ring)
    std::uint64_t t_end = 0;  // the turn end its idle period started at (ticks)
    std::uint32_t turns = 0, blocks = 0;
    std::uint8_t cls = 0;
    bool returned = false;  // asked for since (on_miss): its return is counted
  };
  std::uint32_t ghost_find(std::uint64_t id) const noexcept;  // index position, or none
  void ghost_push(const rec& x) noexcept;
  void ghost_remove(std::uint32_t position) noexcept;  // by index position
  void ghost_pop() noexcept;                           // the oldest
  void missed(std::uint64_t identity, std::uint64_t now) noexcept override;
  void hinted(std::uint32_t r, session_hint hint, std::uint64_t now) noexcept override;
  void prompted(std::uint32_t r, std::uint64_t tokens) noexcept override;

  predictive_options o_;
  return_model model_;
  std::vector<rec> r_;
  std::vector<level_cells> lv_;            // level_count entries (a vector: too large for the object)
  std::vector<std::uint32_t> idle_count_;  // classes x bins: sessions idle now
  std::uint64_t edge_ticks_[bins + 1] = {};
  std::uint32_t bin_head_[bins], bin_tail_[bins];
  detail::indexed_heap protected_[level_count];  // in the window; key: ~queue position
  detail::indexed_heap queued_[level_count];     // queued beyond it; key: ~queue position
  std::vector<std::uint32_t> scratch_;
  std::uint32_t likely_[likely_capacity] = {};
  std::uint16_t likely_cells_[cells] = {};  // cells by falling DRAM score, P >= the threshold
  std::uint32_t likely_cell_count_ = 0;
  std::uint64_t now_ = 0, last_refit_ = 0;
  bool learned_ = false;
  double horizon_[level_count] = {};
  double outflow_[level_count] = {}, outflow_sum_[level_count] = {}, time_sum_ = 0;
  double value_[return_model::size_classes] = {};
  double index_[cells] = {};
  double share_p_[cells] = {};  // P(return within share_horizon_s) by cell, as of the last refit
  std::uint64_t refits_ = 0, work_ = 0;
  std::vector<ghost> ghost_;                // ring, oldest eviction at ghost_head_
  std::vector<std::uint32_t> ghost_index_;  // open addressing by id: ring slot + 1; 0 empty
  std::uint32_t ghost_head_ = 0, ghost_size_ = 0, ghost_live_ = 0;
  std::vector<std::uint32_t> refit_idle_;  // classes x bins: idle sessions and waiting ghosts
  std::uint64_t ghost_returns_ = 0;
};

}  // namespace attnstore::policy

#include "attnstore/detail/policy_predictive.inl"
