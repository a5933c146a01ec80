// predictive bodies: age bins and cells, the learning hooks, refits and decisions.
#pragma once

namespace attnstore::policy {

inline predictive::predictive(const predictive_options& o)
    : eviction_policy(o.max_sessions),
      o_(o),
      model_(o.half_life_s, o.prior_weight, o.class_weight),
      r_(o.max_sessions),
      lv_(level_count) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("predictive_options: " + m); };
  if (o.eviction_window == 0 && o.capacity_blocks == 0)
    fail("capacity_blocks is 0 with eviction_window 0 (automatic); set one of them");
  if (!(o.ticks_per_second > 0)) fail("ticks_per_second must be > 0 (1e9 for nanoseconds)");
  if (o.tokens_per_block == 0) fail("tokens_per_block is 0, must be at least 1");
  if (!(o.prefill_linear >= 0) || !(o.prefill_quadratic >= 0) || o.prefill_linear + o.prefill_quadratic <= 0)
    fail("prefill_linear and prefill_quadratic must be >= 0 and not both 0");
  if (!(o.horizon_s >= 0)) fail("horizon_s must be >= 0 (0: automatic)");
  if (o.refit_every == 0) fail("refit_every is 0, must be at least 1");
  if (!(o.half_life_s >= 1)) fail("half_life_s must be >= 1 (seconds)");
  if (!(o.prefetch_min_probability >= 0 && o.prefetch_min_probability <= 1))
    fail("prefetch_min_probability must be in [0, 1]");
  if (!(o.share_horizon_s > 0)) fail("share_horizon_s must be > 0 (seconds the shared tier keeps a block)");
  if (!(o.share_min_probability >= 0 && o.share_min_probability <= 1)) fail("share_min_probability must be in [0, 1]");
  for (auto& c : lv_) {
    std::fill(std::begin(c.head), std::end(c.head), none);
    std::fill(std::begin(c.tail), std::end(c.tail), none);
    std::fill(std::begin(c.count), std::end(c.count), 0u);
    std::fill(std::begin(c.nonempty), std::end(c.nonempty), 0ull);
    for (std::uint32_t i = 0; i < cells; ++i) c.rank[i] = c.at[i] = std::uint16_t(i);
  }
  idle_count_.assign(return_model::classes * bins, 0);
  refit_idle_.assign(return_model::classes * bins, 0);
  if (o.ghosts > 0) {
    if (o.ghosts > (1u << 30)) fail("ghosts must be at most 2^30");
    ghost_.resize(o.ghosts);
    std::uint32_t slots = 2;
    while (slots < 2 * o.ghosts) slots *= 2;  // at most half full: short probes
    ghost_index_.assign(slots, 0);
  }
  for (std::uint32_t j = 0; j <= bins; ++j) {
    const double t = return_model::edge(j) * o.ticks_per_second;
    edge_ticks_[j] = t >= 1.8e19 ? std::numeric_limits<std::uint64_t>::max() : std::uint64_t(t);
  }
  std::fill(std::begin(bin_head_), std::end(bin_head_), none);
  std::fill(std::begin(bin_tail_), std::end(bin_tail_), none);
  for (auto& h : protected_) h.reset(o.max_sessions);
  for (auto& h : queued_) h.reset(o.max_sessions);
  scratch_.resize(o.max_sessions);
  for (std::uint32_t z = 0; z < return_model::size_classes; ++z)
    value_[z] = o.prefill_linear + o.prefill_quadratic * return_model::size_tokens(z);
  for (auto& h : horizon_) h = o.horizon_s > 0 ? o.horizon_s : 60;
  refit();  // the prior's tables
  set_window(o.eviction_window ? o.eviction_window : 1);
  refresh_window();
}

// ---- age bins (FIFOs by last access) and cells (per level)

inline std::uint32_t predictive::class_now(std::uint32_t r) const noexcept {
  return return_model::class_of(r_[r].turns, std::uint64_t(total_blocks(r)) * o_.tokens_per_block, r_[r].added,
                                r_[r].phase);
}

inline void predictive::bin_unlink(std::uint32_t r) noexcept {
  rec& x = r_[r];
  if (x.b_prev != none)
    r_[x.b_prev].b_next = x.b_next;
  else
    bin_head_[x.bin] = x.b_next;
  if (x.b_next != none)
    r_[x.b_next].b_prev = x.b_prev;
  else
    bin_tail_[x.bin] = x.b_prev;
  x.b_prev = x.b_next = none;
  if (x.idle) --idle_count_[x.cls * bins + x.bin];
}

inline void predictive::bin_append(std::uint32_t r, std::uint32_t bin) noexcept {
  rec& x = r_[r];
  x.bin = std::uint8_t(bin);
  x.b_prev = bin_tail_[bin];
  x.b_next = none;
  if (bin_tail_[bin] != none)
    r_[bin_tail_[bin]].b_next = r;
  else
    bin_head_[bin] = r;
  bin_tail_[bin] = r;
  if (x.idle) ++idle_count_[x.cls * bins + bin];
}

inline void predictive::cell_unlink(std::uint32_t r, std::uint32_t l) noexcept {
  rec& x = r_[r];
  level_cells& c = lv_[l];
  const std::uint32_t cell = x.cell[l];
  if (x.c_prev[l] != none)
    r_[x.c_prev[l]].c_next[l] = x.c_next[l];
  else
    c.head[cell] = x.c_next[l];
  if (x.c_next[l] != none)
    r_[x.c_next[l]].c_prev[l] = x.c_prev[l];
  else
    c.tail[cell] = x.c_prev[l];
  x.c_prev[l] = x.c_next[l] = none;
  x.cell[l] = no_cell;
  if (--c.count[cell] == 0) c.nonempty[c.rank[cell] / 64] &= ~(1ull << (c.rank[cell] % 64));
  ++work_;
}

inline void predictive::cell_append(std::uint32_t r, std::uint32_t l, std::uint32_t cell) noexcept {
  rec& x = r_[r];
  level_cells& c = lv_[l];
  x.cell[l] = std::uint16_t(cell);
  x.c_prev[l] = c.tail[cell];
  x.c_next[l] = none;
  if (c.tail[cell] != none)
    r_[c.tail[cell]].c_next[l] = r;
  else
    c.head[cell] = r;
  c.tail[cell] = r;
  if (c.count[cell]++ == 0) c.nonempty[c.rank[cell] / 64] |= 1ull << (c.rank[cell] % 64);
  ++work_;
}

/// Puts the session, in every level where it holds blocks, in the window's heap, the
/// heap of the sessions queued beyond it, or the cell of its class and age bin.
inline void predictive::place(std::uint32_t r) noexcept {
  rec& x = r_[r];
  const session_state& s = state(r);
  const std::uint32_t target = std::uint32_t(x.cls) * bins + x.bin;
  const std::uint64_t key = ~s.position;  // min-heaps: the farthest back first
  for (std::uint32_t l = 0; l < level_count; ++l) {
    const bool has = x.tracked && s.blocks[l] > 0;
    const bool in_cell = has && !s.queued && !s.in_window;
    if (x.cell[l] != no_cell && (!in_cell || x.cell[l] != target)) cell_unlink(r, l);
    if (in_cell && x.cell[l] == no_cell) cell_append(r, l, target);
    for (auto* h : {&protected_[l], &queued_[l]}) {
      const bool want = has && (h == protected_ + l ? s.in_window : s.queued && !s.in_window);
      if (want && (!h->contains(r) || h->key(r) != key)) {
        h->set(r, key);
        ++work_;
      } else if (!want && h->contains(r)) {
        h->erase(r);
        ++work_;
      }
    }
  }
}

inline void predictive::restart_age(std::uint32_t r, std::uint64_t now) noexcept {
  bin_unlink(r);
  r_[r].t0 = now;
  bin_append(r, 0);
}

inline void predictive::set_idle(std::uint32_t r, bool on) noexcept {
  rec& x = r_[r];
  if (x.idle == on) return;
  x.idle = on;
  if (on)
    ++idle_count_[x.cls * bins + x.bin];
  else
    --idle_count_[x.cls * bins + x.bin];
}

inline void predictive::end_idle(std::uint32_t r, std::uint64_t now) noexcept {
  rec& x = r_[r];
  model_.add_return(x.cls, seconds(now - std::min(now, x.t_end)));
  set_idle(r, false);
  x.phase = 0;  // in use: hints were about the idle period that ended
  x.cls = std::uint8_t(class_now(r));
}

inline void predictive::prompted(std::uint32_t r, std::uint64_t tokens) noexcept {
  if (r_[r].tracked)
    r_[r].prompt = std::uint32_t(std::min<std::uint64_t>(std::max<std::uint64_t>(tokens, 1), 0xffffffffu));
}

inline void predictive::hinted(std::uint32_t r, session_hint hint, std::uint64_t now) noexcept {
  advance(now);
  rec& x = r_[r];
  const std::uint8_t phase = hint == session_hint::composing ? 1 : hint == session_hint::left ? 2 : 0;
  // Only an idle session's user can be typing its next turn or gone; a repeat says nothing new.
  if (!x.tracked || !x.idle || phase == 0 || phase == x.phase || queued(r)) return;
  const double gap = seconds(now_ - std::min(now_, x.t_end));
  if (phase == 1)
    model_.add_return(x.cls, gap);  // the old phase's period ends toward a return
  else
    model_.add_ended(x.cls, gap);  // ... or away from one
  set_idle(r, false);
  x.phase = phase;
  x.cls = std::uint8_t(class_now(r));
  x.t_end = now_;  // the new phase's period starts at the hint
  restart_age(r, now_);
  set_idle(r, true);
  place(r);
  maybe_refit();
}

inline void predictive::advance(std::uint64_t now) noexcept {
  if (now > now_) now_ = now;
  // Ghosts past the last age edge are censored there (the ring is in eviction order, so
  // this is close to, not exactly, age order: a ghost may leave a little late).
  while (ghost_size_ > 0) {
    const ghost& g = ghost_[ghost_head_];
    if (g.id != 0 && now_ - std::min(now_, g.t_end) < edge_ticks_[bins - 1]) break;
    ghost_pop();
  }
  // Low bins first, so that a session can cross several edges in one call; each FIFO
  // stays ordered by t0 (sessions enter a bin in the order they cross into it).
  for (std::uint32_t j = 0; j + 1 < bins; ++j) {
    for (std::uint32_t h; (h = bin_head_[j]) != none;) {
      const rec& x = r_[h];
      if (now_ < x.t0 || now_ - x.t0 < edge_ticks_[j + 1]) break;
      bin_unlink(h);
      bin_append(h, j + 1);
      place(h);
      ++work_;
    }
  }
}

// ---- events

inline void predictive::inserted(std::uint32_t r, std::uint64_t now, std::uint64_t identity) noexcept {
  advance(now);
  rec& x = r_[r];
  x = rec{};
  x.tracked = true;
  x.id = identity;
  if (const std::uint32_t at = identity ? ghost_find(identity) : none; at != none) {
    // A session this policy evicted is stored again: it came back (if no miss said so
    // first), and it keeps its turns and what it held.
    ghost& g = ghost_[ghost_index_[at] - 1];
    if (!g.returned) {
      model_.add_return(g.cls, seconds(now_ - std::min(now_, g.t_end)));
      ++ghost_returns_;
    }
    x.turns = g.turns;
    x.last_total = g.blocks;
    ghost_remove(at);
  }
  x.cls = std::uint8_t(class_now(r));
  x.t0 = x.t_end = now_;
  bin_append(r, 0);
}

inline void predictive::accessed(std::uint32_t r, std::uint64_t previous, std::uint64_t now) noexcept {
  (void)previous;  // the age origin is kept here: enqueue moves last_access_time() too
  advance(now);
  rec& x = r_[r];
  if (!x.tracked) return;
  const std::uint32_t total = total_blocks(r);
  if (x.idle) end_idle(r, now_);  // a lookup, or a save without a lookup seen: it came back
  restart_age(r, now_);
  if (total > x.last_total) {  // a save: a turn ended
    ++x.turns;
    x.phase = 0;
    // What the turn added: its reply when the turn's prompt was told (the reply's length
    // sets the reading time), else the new blocks (prompt and reply).
    const std::uint64_t held = std::uint64_t(total) * o_.tokens_per_block;
    const std::uint64_t added =
        x.prompt ? (held > x.prompt ? held - x.prompt : 0) : std::uint64_t(total - x.last_total) * o_.tokens_per_block;
    x.added = std::uint32_t(std::min<std::uint64_t>(added, 0xffffffffu));
    x.prompt = 0;
    x.cls = std::uint8_t(class_now(r));
    x.t_end = now_;
    set_idle(r, true);
  }
  x.last_total = total;
  x.victim = false;
  maybe_refit();
}

inline void predictive::enqueued(std::uint32_t r, std::uint64_t now) noexcept {
  advance(now);
  if (!r_[r].tracked) return;
  if (r_[r].idle) end_idle(r, now_);
  restart_age(r, now_);
  place(r);
  maybe_refit();
}

inline void predictive::reposition(std::uint32_t r) noexcept {
  rec& x = r_[r];
  if (!x.tracked) return;
  const session_state& s = state(r);
  for (std::uint32_t l = 0; l < level_count; ++l) {
    if (s.blocks[l] < x.blocks[l]) outflow_[l] += x.blocks[l] - s.blocks[l];
    x.blocks[l] = s.blocks[l];
  }
  const std::uint32_t cls = class_now(r);
  if (cls != x.cls) {
    const bool idle = x.idle;
    set_idle(r, false);
    x.cls = std::uint8_t(cls);
    set_idle(r, idle);
  }
  place(r);
}

inline void predictive::forget(std::uint32_t r) noexcept {
  rec& x = r_[r];
  if (!x.tracked) return;
  for (std::uint32_t l = 0; l < level_count; ++l) {
    outflow_[l] += x.blocks[l];
    if (x.cell[l] != no_cell) cell_unlink(r, l);
    protected_[l].erase(r);
    queued_[l].erase(r);
  }
  if (x.idle) {
    // Named as a victim: the cache cut the idle period short (censored). Otherwise its
    // owner removed it (closed, expired): it would not have come back.
    if (x.victim && x.id != 0 && !ghost_.empty())
      ghost_push(x);  // its idle period goes on without it: counted when it returns or leaves the ring
    else if (x.victim)
      model_.add_censored(x.cls, seconds(now_ - std::min(now_, x.t_end)));
    else
      model_.add_ended(x.cls, seconds(now_ - std::min(now_, x.t_end)));
    set_idle(r, false);
  }
  bin_unlink(r);
  x = rec{};
  maybe_refit();
}

// ---- scores

inline void predictive::maybe_refit() noexcept {
  if (model_.pending() >= o_.refit_every) refit();
}

inline void predictive::refit() noexcept {
  ++refits_;
  // Horizons: blocks held / blocks leaving per second, smoothed over refits.
  const double dt = seconds(now_ - std::min(now_, last_refit_));
  last_refit_ = now_;
  time_sum_ = time_sum_ * 0.75 + dt;
  for (std::uint32_t l = 0; l < level_count; ++l) {
    outflow_sum_[l] = outflow_sum_[l] * 0.75 + outflow_[l];
    outflow_[l] = 0;
    double h = o_.horizon_s;
    if (h <= 0) {
      const double rate = time_sum_ > 0 ? outflow_sum_[l] / time_sum_ : 0;  // blocks per second
      h = rate > 0 ? double(level_blocks(level(l))) / rate : return_model::edge(bins - 1);
      h = std::clamp(h, return_model::edge(1), return_model::edge(bins - 1));
    }
    horizon_[l] = h;
  }
  // Censored at their age now: sessions idle in the cache, and ghosts not asked for yet.
  std::copy(idle_count_.begin(), idle_count_.end(), refit_idle_.begin());
  for (std::uint32_t i = 0, cap = std::uint32_t(ghost_.size()); i < ghost_size_; ++i) {
    const ghost& g = ghost_[(ghost_head_ + i) % cap];
    if (g.id != 0 && !g.returned)
      ++refit_idle_[std::uint32_t(g.cls) * bins + return_model::bin_of(seconds(now_ - std::min(now_, g.t_end)))];
  }
  work_ += ghost_size_;
  model_.refit(refit_idle_, dt);
  learned_ = model_.periods_seen() >= o_.min_samples;
  if (learned_) {
    for (std::uint32_t cls = 0; cls < return_model::classes; ++cls)
      for (std::uint32_t b = 0; b < bins; ++b)
        share_p_[cls * bins + b] = model_.p_return_within(cls, return_model::middle(b), o_.share_horizon_s);
  }
  if (learned_ && o_.horizon_s <= 0) {  // the index does not depend on the level
    for (std::uint32_t cls = 0; cls < return_model::classes; ++cls)
      for (std::uint32_t b = 0; b < bins; ++b)
        index_[cls * bins + b] = model_.index(cls, return_model::middle(b)) * value_[return_model::size_of_class(cls)];
  }
  for (std::uint32_t l = 0; l < level_count; ++l) {
    level_cells& c = lv_[l];
    const double h = horizon_[l];
    for (std::uint32_t cls = 0; cls < return_model::classes; ++cls) {
      for (std::uint32_t b = 0; b < bins; ++b) {
        const std::uint32_t cell = cls * bins + b;
        if (!learned_) {  // the start: older is worse, whatever the class (LRU by bins)
          c.score[cell] = -double(b);
          c.p[cell] = 0;
          continue;
        }
        const double a = return_model::middle(b);
        const double p = model_.p_return_within(cls, a, h);
        double s = index_[cell];
        if (o_.horizon_s > 0) {
          s = p * value_[return_model::size_of_class(cls)];
          if (o_.density) s *= h / model_.expected_idle_within(cls, a, h);
        }
        c.score[cell] = s;
        c.p[cell] = p;
      }
      for (std::uint32_t b = 0; b < bins; ++b) {
        const std::uint32_t cell = cls * bins + b;
        c.young_first[cell] = b + 1 < bins && c.score[cell + 1] > c.score[cell];
      }
    }
    rank_cells(l);
  }
  // Prefetch candidates: cells by falling DRAM score whose return is likely enough.
  const level_cells& d = lv_[std::size_t(level::dram)];
  likely_cell_count_ = 0;
  if (learned_) {
    for (std::uint32_t k = cells; k-- > 0;) {
      const std::uint16_t cell = d.at[k];
      if (d.p[cell] >= o_.prefetch_min_probability) likely_cells_[likely_cell_count_++] = cell;
    }
  }
  work_ += cells;
}

inline void predictive::rank_cells(std::uint32_t l) noexcept {
  level_cells& c = lv_[l];
  std::sort(std::begin(c.at), std::end(c.at), [&](std::uint16_t a, std::uint16_t b) {
    return c.score[a] < c.score[b] || (c.score[a] == c.score[b] && a < b);
  });
  std::fill(std::begin(c.nonempty), std::end(c.nonempty), 0ull);
  for (std::uint32_t k = 0; k < cells; ++k) {
    const std::uint16_t cell = c.at[k];
    c.rank[cell] = std::uint16_t(k);
    if (c.count[cell]) c.nonempty[k / 64] |= 1ull << (k % 64);
  }
}

inline double predictive::score(std::uint32_t r, level l) const noexcept {
  if (!live(r)) return 0;
  if (queued(r)) return std::numeric_limits<double>::infinity();
  return lv_[std::size_t(l)].score[std::uint32_t(r_[r].cls) * bins + r_[r].bin];
}

inline double predictive::return_probability(std::uint32_t r, level l) const noexcept {
  if (!live(r)) return 0;
  if (queued(r)) return 1;
  return lv_[std::size_t(l)].p[std::uint32_t(r_[r].cls) * bins + r_[r].bin];
}

inline double predictive::share_probability(std::uint32_t r) const noexcept {
  if (!live(r)) return 0;
  if (queued(r) || !learned_) return 1;
  return share_p_[std::uint32_t(r_[r].cls) * bins + r_[r].bin];
}

// ---- decisions

inline std::uint32_t predictive::victim(level l, victim_filter accept, void* context) noexcept {
  const std::uint32_t li = std::uint32_t(l);
  const level_cells& c = lv_[li];
  for (std::uint32_t w = 0; w < words; ++w) {
    ++work_;
    for (std::uint64_t bits = c.nonempty[w]; bits; bits &= bits - 1) {
      const std::uint32_t cell = c.at[w * 64 + std::uint32_t(__builtin_ctzll(bits))];
      const bool young = c.young_first[cell];
      for (std::uint32_t r = young ? c.tail[cell] : c.head[cell]; r != none;
           r = young ? r_[r].c_prev[li] : r_[r].c_next[li]) {
        ++work_;
        if (accept(context, r)) {
          r_[r].victim = true;
          return r;
        }
      }
    }
  }
  for (auto* h : {&queued_[li], &protected_[li]}) {
    const std::uint32_t v =
        h->find_first([&](std::uint32_t r) { return ++work_, accept(context, r); }, scratch_.data());
    if (v != detail::indexed_heap::npos) {
      r_[v].victim = true;
      return v;
    }
  }
  return no_record;
}

inline std::uint32_t predictive::collect_likely(std::uint32_t max) noexcept {
  const level_cells& s = lv_[std::size_t(level::ssd)];
  const std::uint32_t li = std::uint32_t(level::ssd);
  std::uint32_t n = 0;
  for (std::uint32_t i = 0; i < likely_cell_count_ && n < max; ++i) {
    ++work_;
    for (std::uint32_t r = s.head[likely_cells_[i]]; r != none && n < max; r = r_[r].c_next[li]) {
      likely_[n++] = r;
      ++work_;
    }
  }
  return n;
}

// ---- ghosts

namespace detail_predictive {
inline std::uint32_t ghost_home(std::uint64_t id, std::size_t slots) noexcept {
  return std::uint32_t((id * 0x9E3779B97F4A7C15ull) >> 32) & std::uint32_t(slots - 1);
}
}  // namespace detail_predictive

inline std::uint32_t predictive::ghost_find(std::uint64_t id) const noexcept {
  if (ghost_index_.empty()) return none;
  const std::uint32_t mask = std::uint32_t(ghost_index_.size() - 1);
  for (std::uint32_t i = detail_predictive::ghost_home(id, ghost_index_.size());; i = (i + 1) & mask) {
    const std::uint32_t e = ghost_index_[i];
    if (e == 0) return none;
    if (ghost_[e - 1].id == id) return i;
  }
}

inline void predictive::ghost_push(const rec& x) noexcept {
  if (const std::uint32_t old = ghost_find(x.id); old != none) ghost_remove(old);  // cannot happen with distinct ids
  const std::uint32_t cap = std::uint32_t(ghost_.size());
  if (ghost_size_ == cap) ghost_pop();
  const std::uint32_t slot = (ghost_head_ + ghost_size_++) % cap;
  ghost_[slot] = ghost{x.id, x.t_end, x.turns, x.last_total, x.cls, false};
  const std::uint32_t mask = std::uint32_t(ghost_index_.size() - 1);
  std::uint32_t i = detail_predictive::ghost_home(x.id, ghost_index_.size());
  while (ghost_index_[i] != 0) i = (i + 1) & mask;
  ghost_index_[i] = slot + 1;
  ++ghost_live_;
}

inline void predictive::ghost_remove(std::uint32_t position) noexcept {
  ghost_[ghost_index_[position] - 1].id = 0;  // the ring slot leaves when it reaches the head
  --ghost_live_;
  // Backward-shift deletion: later entries of the probe run move up into the hole when
  // their home does not lie between the hole and them.
  const std::uint32_t mask = std::uint32_t(ghost_index_.size() - 1);
  std::uint32_t hole = position;
  for (std::uint32_t j = (hole + 1) & mask; ghost_index_[j] != 0; j = (j + 1) & mask) {
    const std::uint32_t home = detail_predictive::ghost_home(ghost_[ghost_index_[j] - 1].id, ghost_index_.size());
    if (((j - home) & mask) >= ((j - hole) & mask)) {
      ghost_index_[hole] = ghost_index_[j];
      hole = j;
    }
  }
  ghost_index_[hole] = 0;
}

inline void predictive::ghost_pop() noexcept {
  const ghost& g = ghost_[ghost_head_];
  if (g.id != 0) {
    if (!g.returned) model_.add_censored(g.cls, seconds(now_ - std::min(now_, g.t_end)));
    ghost_remove(ghost_find(g.id));
  }
  ghost_head_ = (ghost_head_ + 1) % std::uint32_t(ghost_.size());
  --ghost_size_;
  ++work_;
}

inline void predictive::missed(std::uint64_t identity, std::uint64_t now) noexcept {
  advance(now);
  const std::uint32_t at = ghost_find(identity);
  if (at == none) return;
  ghost& g = ghost_[ghost_index_[at] - 1];
  if (g.returned) return;  // asked for again before it was stored: one return
  g.returned = true;
  model_.add_return(g.cls, seconds(now_ - std::min(now_, g.t_end)));
  ++ghost_returns_;
  maybe_refit();
}

inline bool predictive::check_cells() const noexcept {
  if (!check()) return false;
  std::vector<std::uint32_t> idle(idle_count_.size(), 0);  // a test helper: may allocate
  std::uint32_t tracked = 0;
  for (std::uint32_t j = 0; j < bins; ++j) {
    std::uint32_t prev = none;
    for (std::uint32_t r = bin_head_[j]; r != none; prev = r, r = r_[r].b_next) {
      const rec& x = r_[r];
      if (!live(r) || !x.tracked || x.bin != j || x.b_prev != prev) return false;
      if (prev != none && r_[prev].t0 > x.t0) return false;  // ordered by the age origin
      const std::uint64_t age = now_ - std::min(now_, x.t0);
      if (age < edge_ticks_[j] || (j + 1 < bins && age >= edge_ticks_[j + 1])) return false;
      if (x.idle) ++idle[x.cls * bins + j];
      ++tracked;
    }
    if (prev != bin_tail_[j]) return false;
  }
  if (tracked != live_sessions() || idle != idle_count_) return false;
  // Ghosts: every live one found by its id at its slot, the index holding nothing else.
  std::uint32_t ghosts_live = 0, indexed = 0;
  for (std::uint32_t i = 0; i < ghost_size_; ++i) {
    const std::uint32_t slot = (ghost_head_ + i) % std::uint32_t(ghost_.size());
    if (ghost_[slot].id == 0) continue;
    ++ghosts_live;
    const std::uint32_t at = ghost_find(ghost_[slot].id);
    if (at == none || ghost_index_[at] != slot + 1) return false;
  }
  for (std::uint32_t e : ghost_index_) indexed += e != 0;
  if (ghosts_live != ghost_live_ || indexed != ghost_live_) return false;
  for (std::uint32_t l = 0; l < level_count; ++l) {
    const level_cells& c = lv_[l];
    std::uint32_t members = 0;
    for (std::uint32_t cell = 0; cell < cells; ++cell) {
      std::uint32_t n = 0, prev = none;
      for (std::uint32_t r = c.head[cell]; r != none; prev = r, r = r_[r].c_next[l], ++n)
        if (r_[r].cell[l] != cell || r_[r].c_prev[l] != prev) return false;
      if (prev != c.tail[cell] || n != c.count[cell]) return false;
      if (bool(c.nonempty[c.rank[cell] / 64] >> (c.rank[cell] % 64) & 1) != (n > 0)) return false;
      if (c.at[c.rank[cell]] != cell) return false;
      members += n;
    }
    std::uint32_t want = 0;
    for (std::uint32_t r = 0; r < max_sessions(); ++r) {
      if (!live(r)) continue;
      const bool in = blocks(r, level(l)) > 0 && !in_window(r) && !queued(r);
      want += in;
      if (in != (r_[r].cell[l] != no_cell)) return false;
      if (in && r_[r].cell[l] != std::uint32_t(r_[r].cls) * bins + r_[r].bin) return false;
      if ((blocks(r, level(l)) > 0 && in_window(r)) != protected_[l].contains(r)) return false;
      if ((blocks(r, level(l)) > 0 && queued(r) && !in_window(r)) != queued_[l].contains(r)) return false;
    }
    if (want != members) return false;
  }
  return true;
}

}  // namespace attnstore::policy
