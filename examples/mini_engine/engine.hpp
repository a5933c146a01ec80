// mini engine: a request loop around mini::llama_model with a paged KV cache, and the
// attnstore hooks wired in (the worked example of docs/integration.md).
//
// Three ways to run a turn, for comparison:
//  * recompute: every turn prefills the whole conversation (no reuse);
//  * resident:  a session keeps its KV pages in engine memory between turns (an
//               upper bound no real engine can afford for every session);
//  * store:     pages are freed after each turn; the next turn loads the history back
//               from attnstore layer by layer and prefills only the new tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "attnstore/hooks.hpp"
#include "llama.hpp"

namespace mini {

enum class kv_mode { recompute, resident, store };

struct engine_options {
  kv_mode mode = kv_mode::store;
  std::uint32_t page_size = 16;
  std::uint32_t num_pages = 2048;
  attnstore::hooks* hooks = nullptr;  ///< required in store mode
  attnstore::store* store = nullptr;  ///< the hooks' store (for demote_after_turn)
  /// Reply tokens decoded one by one; the rest of a reply (when the trace gives a
  /// longer one) is appended as one forward call, so long traces stay fast.
  std::size_t max_decode_steps = 8;
  /// Store mode: move the session's KV to SSD after each turn, so the next turn's
  /// reuse is measured from SSD.
  bool demote_after_turn = false;
  /// run_queue: start the next request's load during this one's decode. Off: every
  /// load runs inside its own request's TTFT.
  bool overlap_next = true;
  /// Context window: a prompt longer than this truncates the conversation first
  /// (keep sink_tokens, drop whole blocks of the oldest turns; attnstore keeps the
  /// saved KV of what stays). 0: no limit.
  std::size_t context_limit = 0;
  std::size_t sink_tokens = 64;
  double truncation_ratio = 0.5;
  std::uint32_t truncation_block = 256;  ///< block size of the drop when no store is used
  /// Replies come from the trace, not from the model: every mode then sees the same
  /// conversation, so their logits can be compared turn by turn.
  bool forced_replies = false;
};

struct turn_result {
  std::size_t history_tokens = 0;                 ///< conversation length before this turn's message
  std::size_t prompt_tokens = 0;                  ///< history + the new message
  std::size_t reused_tokens = 0;                  ///< not prefilled: loaded from attnstore or resident
  std::size_t prefill_tokens = 0;                 ///< prefilled by the model
  std::uint32_t dram_blocks = 0, ssd_blocks = 0;  ///< where the reused blocks came from
  double ttft_ms = 0;                             ///< turn start to the first token's logits
  double prefill_gflop = 0;
  bool truncated = false;       ///< this turn truncated the conversation first
  std::size_t truncations = 0;  ///< truncations so far in this session
  std::vector<float> first_logits;
  std::vector<std::uint32_t> reply;
  attnstore::errc save_status = attnstore::errc::ok;
};

/// The store's view of a paged_kv_cache: one kv_layout per layer group of
/// kv_geometry_of(config), over the same pages (full and latent models have one group;
/// window models two, the windowed layers' and the full ones', each layout listing only
/// its layers' bases in model order). Not copyable: the layouts point into it.
class cache_view {
 public:
  cache_view(paged_kv_cache& cache, const llama_config& c);
  cache_view(const cache_view&) = delete;
  cache_view& operator=(const cache_view&) = delete;

  /// The target (or source) for a sequence's pages. A several-group model's per-group
  /// targets go to `groups`; it and `pages` must outlive the load or save.
  attnstore::kv_target target(std::span<const std::uint32_t> pages,
                              std::vector<attnstore::kv_group_target>& groups) const;
  const attnstore::kv_layout& layout(std::size_t group = 0) const { return layouts_[group]; }
  std::size_t groups() const { return layouts_.size(); }

 private:
  std::vector<std::vector<std::byte*>> k_, v_;  // per group, per layer of the group
  std::vector<attnstore::kv_layout> layouts_;
};

struct request {
  std::string session;
  std::vector<std::uint32_t> user_tokens;
  std::size_t reply_tokens = 16;  ///< reply length (greedy tokens, then trace filler)
};

class engine {
 public:
  engine(const llama_model& model, const engine_options& options);

  /// Runs one turn of a session: prompt = its history + user_tokens.
  turn_result run_turn(const request& r);
  /// Runs requests in order, as a serving loop would: the store is told the waiting
  /// queue, and the next request's history starts loading while the current one
  /// computes. Returns one result per request.
  std::vector<turn_result> run_queue(std::span<const request> queue);
  /// Forgets a session (and drops its KV from the store).
  void end_session(const std::string& session);
  /// Replaces a session's history (a user edited an earlier message): its next turn
  /// reuses what the store still matches (resident mode: nothing, the kept pages hold
  /// the old tokens' KV).
  void edit_history(const std::string& session, std::vector<std::uint32_t> tokens);

  const std::vector<std::uint32_t>& history(const std::string& session) { return sessions_[session].history; }
  const attnstore::kv_layout& layout() const { return view_.layout(0); }
  const cache_view& view() const { return view_; }
  paged_kv_cache& cache() { return cache_; }

 private:
  struct session_state {
    std::vector<std::uint32_t> history;  ///< every token of the conversation so far
    sequence resident;                   ///< resident mode: pages kept between turns
    std::size_t truncations = 0;
  };
  struct prepared {  // a turn whose pages are allocated and whose load has started
    const request* req = nullptr;
    std::vector<std::uint32_t> prompt;
    sequence seq;
    // Per layer group, over seq.pages: what the load and the save read until they finish.
    std::vector<attnstore::kv_group_target> load_targets, save_targets;
    attnstore::load_info load;
    attnstore::lookup_result found;
    std::size_t start = 0;
    bool valid = false;
    bool truncated = false;
  };
  void prepare(const request& r, prepared& p);
  /// Truncates the session's history (and its stored view) when the prompt would
  /// overflow the context window. Returns true when it did.
  bool fit_context(const request& r, session_state& s);
  /// Runs a prepared turn; `after_first_token` runs once the first token's logits
  /// exist (the next request's load starts there, overlapping this one's decode).
  turn_result execute(prepared& p, double prepare_ms, const std::function<void()>& after_first_token = {});
  void release_pages(sequence& seq);
  attnstore::errc save_range(const std::string& session, std::span<const std::uint32_t> tokens, std::size_t from,
                             const sequence& seq);

  const llama_model& model_;
  engine_options options_;
  paged_kv_cache cache_;
  cache_view view_;
  std::unordered_map<std::string, session_state> sessions_;
};

/// A kv_geometry matching the model's KV cache (f32), for the store: one full group;
/// window models a sliding_window group (layers 0, 2, 4...) and a full one (1, 3...);
/// latent models one latent group (rows of kv_lora_rank + rope_dims, RoPE part last).
attnstore::kv_geometry kv_geometry_of(const llama_config& c, std::uint32_t tokens_per_block = 256);
/// The RoPE the model's cached keys carry, for hooks_config::rope and store_config::rope
/// (latent: the k_rope part only).
attnstore::rope_spec rope_spec_of(const llama_config& c);

}  // namespace mini
