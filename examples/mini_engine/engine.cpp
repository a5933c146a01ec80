#include "engine.hpp"

#include <chrono>
#include <stdexcept>

#include "attnstore/truncate.hpp"

namespace mini {
namespace {
double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Bridges the model's per-layer callbacks to the attnstore hooks.
struct layer_bridge {
  attnstore::hooks* hooks;
  attnstore::load_handle load;
  attnstore::save_handle save;
  attnstore::errc first_error = attnstore::errc::ok;
  static void before(void* ctx, int layer) {
    auto& b = *static_cast<layer_bridge*>(ctx);
    if (!b.load) return;
    auto e = b.hooks->wait_layer(b.load, std::uint32_t(layer));
    if (e != attnstore::errc::ok && b.first_error == attnstore::errc::ok) b.first_error = e;
  }
  static void after(void* ctx, int layer) {
    auto& b = *static_cast<layer_bridge*>(ctx);
    if (!b.save) return;
    auto e = b.hooks->save_layer(b.save, std::uint32_t(layer));
    if (e != attnstore::errc::ok && b.first_error == attnstore::errc::ok) b.first_error = e;
  }
};
}  // namespace

attnstore::kv_geometry kv_geometry_of(const llama_config& c, std::uint32_t tokens_per_block) {
  using attnstore::layer_kind;
  if (c.attention == attention_kind::full)
    return attnstore::kv_geometry{std::uint32_t(c.n_layers), std::uint32_t(c.n_kv_heads), std::uint32_t(c.head_dim),
                                  attnstore::dtype::f32, tokens_per_block};
  attnstore::kv_geometry g;
  g.tokens_per_block = tokens_per_block;
  g.dtype = attnstore::dtype::f32;
  if (c.attention == attention_kind::latent) {
    g.groups.push_back(attnstore::kv_group{.kind = layer_kind::latent,
                                           .num_layers = std::uint32_t(c.n_layers),
                                           .num_kv_heads = 1,
                                           .head_dim = std::uint32_t(c.kv_lora_rank + c.rope_dims),
                                           .dtype = attnstore::dtype::f32,
                                           .rope_dims = std::uint32_t(c.rope_dims)});
    return g;
  }
  // window: layers 0, 2, 4... in group 0, the others in group 1.
  const std::uint32_t windowed = std::uint32_t(c.n_layers + 1) / 2;
  g.groups.push_back(attnstore::kv_group{.kind = layer_kind::sliding_window,
                                         .num_layers = windowed,
                                         .num_kv_heads = std::uint32_t(c.n_kv_heads),
                                         .head_dim = std::uint32_t(c.head_dim),
                                         .dtype = attnstore::dtype::f32,
                                         .window = std::uint32_t(c.window)});
  g.groups.push_back(attnstore::kv_group{.kind = layer_kind::full,
                                         .num_layers = std::uint32_t(c.n_layers) - windowed,
                                         .num_kv_heads = std::uint32_t(c.n_kv_heads),
                                         .head_dim = std::uint32_t(c.head_dim),
                                         .dtype = attnstore::dtype::f32});
  for (int l = 0; l < c.n_layers; ++l) g.layer_group.push_back(c.windowed(l) ? 0 : 1);
  return g;
}

attnstore::rope_spec rope_spec_of(const llama_config& c) {
  return attnstore::rope_spec{attnstore::rope_style::neox, std::uint32_t(c.rotary_dims()), 0, c.rope_theta};
}

cache_view::cache_view(paged_kv_cache& cache, const llama_config& c) {
  const attnstore::kv_geometry g = kv_geometry_of(c, 16).validated();
  k_.resize(g.groups.size());
  v_.resize(g.groups.size());
  for (int l = 0; l < c.n_layers; ++l) {
    const std::uint32_t gi = g.layers[std::size_t(l)].group;
    k_[gi].push_back(reinterpret_cast<std::byte*>(cache.k(l)));
    if (cache.tensors() == 2) v_[gi].push_back(reinterpret_cast<std::byte*>(cache.v(l)));
  }
  for (std::size_t gi = 0; gi < g.groups.size(); ++gi)
    layouts_.push_back(attnstore::kv_layout{g.groups[gi].num_layers, std::uint32_t(cache.n_kv_heads()),
                                            std::uint32_t(cache.head_dim()), attnstore::dtype::f32, cache.page_size(),
                                            cache.page_stride_bytes(), cache.token_stride_bytes(),
                                            cache.head_stride_bytes(), k_[gi], v_[gi], attnstore::memory_space::host});
}

attnstore::kv_target cache_view::target(std::span<const std::uint32_t> pages,
                                        std::vector<attnstore::kv_group_target>& groups) const {
  groups.clear();
  if (layouts_.size() == 1) return attnstore::kv_target{&layouts_[0], pages};
  for (const auto& l : layouts_) groups.push_back({&l, pages});
  return attnstore::kv_target{nullptr, {}, groups};
}

engine::engine(const llama_model& model, const engine_options& options)
    : model_(model),
      options_(options),
      cache_(model.config(), options.num_pages, options.page_size),
      view_(cache_, model.config()) {
  if (options.mode == kv_mode::store && !options.hooks)
    throw std::invalid_argument("engine_options: store mode needs hooks");
}

void engine::release_pages(sequence& seq) {
  cache_.release(seq.pages);
  seq.pages.clear();
  seq.length = 0;
}

bool engine::fit_context(const request& r, session_state& s) {
  if (!options_.context_limit || s.history.size() + r.user_tokens.size() <= options_.context_limit) return false;
  if (s.history.empty()) throw std::runtime_error("a single message exceeds the context window");
  // The stored view holds every history token but the last reply token (never fed).
  const std::size_t view = s.history.size() - 1;
  const std::uint32_t block = options_.store ? options_.store->geometry().tokens_per_block : options_.truncation_block;
  attnstore::truncation_plan plan = attnstore::plan_truncation(view, r.user_tokens.size() + 1, options_.context_limit,
                                                               options_.sink_tokens, block, options_.truncation_ratio);
  if (!plan.needed) throw std::runtime_error("the context window is too small for this conversation's next turn");
  if (options_.mode == kv_mode::store)
    (void)options_.store->truncate({"mini", r.session}, std::span(s.history).first(view), plan);  // a miss if it fails
  std::vector<std::uint32_t> kept(s.history.begin(), s.history.begin() + std::ptrdiff_t(plan.sink));
  kept.insert(kept.end(), s.history.begin() + std::ptrdiff_t(plan.sink + plan.drop), s.history.end());
  s.history = std::move(kept);
  ++s.truncations;
  return true;
}

void engine::prepare(const request& r, prepared& p) {
  session_state& s = sessions_[r.session];
  p = prepared{};
  p.req = &r;
  p.truncated = fit_context(r, s);
  p.prompt = s.history;
  p.prompt.insert(p.prompt.end(), r.user_tokens.begin(), r.user_tokens.end());
  if (options_.mode == kv_mode::resident) {
    p.seq = std::move(s.resident);
    if (p.truncated) release_pages(p.seq);  // resident KV sits at the old positions: recompute
    p.start = p.seq.length;
  } else if (options_.mode == kv_mode::store) {
    attnstore::session_key key{"mini", r.session};
    // Pages for the whole prompt; the load writes the history into them now, while
    // whatever runs before this request computes.
    // The page list must not reallocate while the load and save read it: reserve for
    // the reply too.
    const std::size_t pages = (p.prompt.size() + options_.page_size - 1) / options_.page_size;
    p.seq.pages.reserve((p.prompt.size() + r.reply_tokens) / options_.page_size + 2);
    auto got = cache_.allocate(std::uint32_t(pages));
    p.seq.pages.assign(got.begin(), got.end());
    p.found = options_.hooks->lookup(key, p.prompt);
    p.load = options_.hooks->start_load(key, p.prompt, view_.target(p.seq.pages, p.load_targets));
    // At least the last prompt token is computed: its logits give the first token.
    p.start = std::min<std::size_t>(p.load.tokens, p.prompt.size() - 1);
    p.seq.length = p.start;
  }
  p.valid = true;
}

attnstore::errc engine::save_range(const std::string& session, std::span<const std::uint32_t> tokens, std::size_t from,
                                   const sequence& seq) {
  attnstore::session_key key{"mini", session};
  attnstore::errc st;
  std::vector<attnstore::kv_group_target> targets;
  auto h = options_.hooks->start_save(key, tokens, from, view_.target(seq.pages, targets), std::nullopt, &st);
  if (!h) return st;
  for (int l = 0; l < model_.config().n_layers; ++l)
    if ((st = options_.hooks->save_layer(h, std::uint32_t(l))) != attnstore::errc::ok) {
      options_.hooks->abort_save(h);
      return st;
    }
  return options_.hooks->finish_save(h);
}

turn_result engine::execute(prepared& p, double prepare_ms, const std::function<void()>& after_first_token) {
  const request& r = *p.req;
  session_state& s = sessions_[r.session];
  const auto& cfg = model_.config();
  turn_result out;
  out.history_tokens = s.history.size();
  out.truncated = p.truncated;
  out.truncations = s.truncations;
  out.prompt_tokens = p.prompt.size();
  out.dram_blocks = p.found.dram_blocks;
  out.ssd_blocks = p.found.ssd_blocks;
  out.first_logits.resize(cfg.vocab_size);
  const auto t0 = std::chrono::steady_clock::now();

  layer_bridge bridge{options_.hooks, {}, {}};
  layer_hooks lh{&layer_bridge::before, &layer_bridge::after, &bridge};
  const layer_hooks* hooks = nullptr;
  if (options_.mode == kv_mode::store) {
    attnstore::session_key key{"mini", r.session};
    bridge.load = p.load.handle;
    attnstore::errc st;
    bridge.save = options_.hooks->start_save(key, p.prompt, p.start, view_.target(p.seq.pages, p.save_targets),
                                             std::nullopt, &st);
    hooks = &lh;
  }
  out.reused_tokens = p.start;
  out.prefill_tokens = p.prompt.size() - p.start;
  out.prefill_gflop = model_.forward_flops(out.prefill_tokens, p.start) / 1e9;
  model_.forward(cache_, p.seq, std::span(p.prompt).subspan(p.start), p.start, out.first_logits, hooks);
  out.ttft_ms = prepare_ms + ms_between(t0, std::chrono::steady_clock::now());
  if (options_.mode == kv_mode::store) {
    if (bridge.load) (void)options_.hooks->finish_load(bridge.load);
    out.save_status = bridge.save ? options_.hooks->finish_save(bridge.save) : attnstore::errc::bad_state;
    if (bridge.first_error != attnstore::errc::ok) out.save_status = bridge.first_error;
  }
  if (after_first_token) after_first_token();

  // The reply: greedy tokens, then (for long trace replies) a deterministic filler
  // appended in one forward call.
  std::vector<float> logits(cfg.vocab_size);
  std::uint32_t next = options_.forced_replies
                           ? std::uint32_t((p.prompt.size() * 2654435761u) % std::uint32_t(cfg.vocab_size))
                           : argmax(out.first_logits);
  std::vector<std::uint32_t> all = p.prompt;
  for (std::size_t i = 0; i < r.reply_tokens; ++i) {
    out.reply.push_back(next);
    all.push_back(next);
    if (i + 1 == r.reply_tokens) break;
    if (i + 1 < options_.max_decode_steps && !options_.forced_replies) {
      model_.forward(cache_, p.seq, std::span(&next, 1), p.seq.length, logits);
      next = argmax(logits);
    } else {  // fill the rest of the reply in one call
      std::vector<std::uint32_t> rest;
      for (std::size_t k = i + 1; k < r.reply_tokens; ++k)
        rest.push_back(std::uint32_t((next * 2654435761u + k * 40503u) % std::uint32_t(cfg.vocab_size)));
      std::vector<std::uint32_t> feed{next};
      feed.insert(feed.end(), rest.begin(), rest.end() - 1);
      model_.forward(cache_, p.seq, feed, p.seq.length, logits);
      out.reply.insert(out.reply.end(), rest.begin(), rest.end());
      all.insert(all.end(), rest.begin(), rest.end());
      break;
    }
  }
  s.history = all;
  // KV exists for every token but the last reply token (never fed to the model).
  if (options_.mode == kv_mode::store) {
    attnstore::session_key key{"mini", r.session};
    const std::span<const std::uint32_t> with_kv(all.data(), p.seq.length);
    if (p.seq.length > p.prompt.size()) {
      attnstore::errc e = save_range(r.session, with_kv, p.prompt.size(), p.seq);
      if (out.save_status == attnstore::errc::ok) out.save_status = e;
    }
    if (options_.demote_after_turn && options_.store) (void)options_.store->demote(key);
    release_pages(p.seq);
  } else if (options_.mode == kv_mode::resident) {
    s.resident = std::move(p.seq);
  } else {
    release_pages(p.seq);
  }
  return out;
}

turn_result engine::run_turn(const request& r) {
  prepared p;
  const auto t0 = std::chrono::steady_clock::now();
  if (options_.mode == kv_mode::recompute) {
    session_state& s = sessions_[r.session];
    p.req = &r;
    p.truncated = fit_context(r, s);
    p.prompt = s.history;
    p.prompt.insert(p.prompt.end(), r.user_tokens.begin(), r.user_tokens.end());
    p.valid = true;
  } else {
    prepare(r, p);
  }
  return execute(p, ms_between(t0, std::chrono::steady_clock::now()));
}

std::vector<turn_result> engine::run_queue(std::span<const request> queue) {
  std::vector<turn_result> results;
  if (options_.mode != kv_mode::store) {
    for (const auto& r : queue) results.push_back(run_turn(r));
    return results;
  }
  std::vector<attnstore::session_key> waiting;
  prepared cur, next;
  double cur_prepare_ms = 0;
  for (std::size_t i = 0; i < queue.size(); ++i) {
    waiting.clear();
    for (std::size_t k = i; k < queue.size(); ++k) waiting.push_back({"mini", queue[k].session});
    options_.hooks->set_queue(waiting);
    if (!next.valid) {
      const auto t0 = std::chrono::steady_clock::now();
      prepare(queue[i], cur);
      cur_prepare_ms = ms_between(t0, std::chrono::steady_clock::now());
    } else {
      cur = std::move(next);
      next = prepared{};
      cur_prepare_ms = 0;  // its load ran behind the previous request's compute
    }
    // Start the next request's load once this one has its first token, so the SSD
    // reads and the first layers' copies overlap this request's decode. Not for the
    // same session: its history is complete only when this turn ends.
    std::function<void()> start_next;
    if (options_.overlap_next && i + 1 < queue.size() && queue[i + 1].session != queue[i].session)
      start_next = [&, i] { prepare(queue[i + 1], next); };
    results.push_back(execute(cur, cur_prepare_ms, start_next));
  }
  return results;
}

void engine::edit_history(const std::string& session, std::vector<std::uint32_t> tokens) {
  session_state& s = sessions_[session];
  if (!s.resident.pages.empty()) release_pages(s.resident);
  s.history = std::move(tokens);
}

void engine::end_session(const std::string& session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return;
  if (!it->second.resident.pages.empty()) release_pages(it->second.resident);
  sessions_.erase(it);
  if (options_.mode == kv_mode::store) (void)options_.hooks->close_session({"mini", session});
}

}  // namespace mini
