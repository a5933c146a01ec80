// hooks: the small API an inference engine calls, split the way serving engines split
// their work. The scheduler side asks what a prompt can reuse and closes sessions; the
// worker side loads a session's history into engine KV memory layer by layer while
// earlier layers compute, and saves the new tokens' KV layer by layer while later
// layers compute.
//
// A prefill with attnstore, per request:
//   h = start_load(session, prompt, target)          // queues the first layers now
//   for l in layers: wait_layer(h, l); compute(l); save_layer(s, l)
//   finish_load(h); finish_save(s)                    // s from start_save(...)
//
// Every call is noexcept and returns errc; nothing allocates per layer.
//
// Threading: every member may be called from any thread. A handle is used by one
// thread at a time (its wait_layer/save_layer/finish calls are not concurrent with
// each other); different handles run in parallel. A load leases the DRAM blocks it
// copies from (store::acquire), so saves, demotions and drops of the same or other
// sessions never change what it reads.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/detail/checkpoint_name.hpp"
#include "attnstore/detail/host_memory.hpp"
#include "attnstore/hash.hpp"
#include "attnstore/kv_layout.hpp"
#include "attnstore/rope.hpp"
#include "attnstore/store.hpp"

namespace attnstore {

struct hooks_config {
  /// Layers whose copies are queued ahead of compute: start_load queues layers
  /// [0, P), wait_layer(l) queues layer l + P. Use num_layers to load everything at
  /// once (e.g. when start_load is called while the previous batch computes).
  std::uint32_t preload_layers = 2;
  std::uint32_t max_loads = 32;                 ///< load handles open at once
  std::uint32_t max_saves = 32;                 ///< save handles open at once
  std::uint32_t max_blocks_per_request = 1024;  ///< blocks one load or save may span
  std::uint32_t read_streams = 2;               ///< loads of different requests overlap across these
  std::size_t segment_buffer = 8192;            ///< copy segments built per copy_async call
  /// The model's RoPE. Needed to load a truncated view (its keys move to new
  /// positions) and for keys stored before RoPE; without it such loads are refused.
  std::optional<rope_spec> rope{};
  /// Store keys without RoPE: saves strip it (R(-position), on the DRAM copy) and loads
  /// apply R(position). Truncation then never needs a delta; f16/bf16 keys see one more
  /// rounding than with keys stored after RoPE (the default, exact when nothing moves).
  bool keys_pre_rope = false;
  std::uint32_t max_positions = 16384;  ///< angle table size for keys_pre_rope
  /// Page runs (tokens of one page and one stored block, merged where they are
  /// contiguous in engine memory) that one load's re-rotation can hold in its run
  /// table; 0: 4 x max_blocks_per_request. A GPU load rotates a layer's runs with one
  /// kernel launch; a load with more runs falls back to one launch per run. Costs 16
  /// bytes per run per load handle, in pinned host memory and in device memory.
  std::uint32_t max_rotated_runs = 0;
  /// Saves hash each layer of their blocks as it lands in DRAM, on this many backend
  /// streams (host worker threads; CUDA host functions), overlapped with the copies of
  /// later layers, so finish_save does not read the blocks again: a save costs its
  /// copies. 0: the store hashes the blocks at commit. A save whose layers are not
  /// saved in order 0, 1, 2, ..., or that spans more than hash_blocks_per_save
  /// blocks, is hashed at commit too. A backend that runs out of streams gives fewer
  /// lanes (hash_lanes_in_use()).
  std::uint32_t hash_lanes = 2;
  std::uint32_t hash_blocks_per_save = 256;  ///< per save handle: 640 bytes of hash state per block
};

/// A load in progress (start_load). Not interchangeable with a save_handle; false when
/// nothing is being loaded.
struct load_handle {
  std::uint32_t index = ~0u;
  explicit operator bool() const noexcept { return index != ~0u; }
  friend constexpr bool operator==(const load_handle&, const load_handle&) = default;
};
/// A save in progress (start_save); false when none was started.
struct save_handle {
  std::uint32_t index = ~0u;
  explicit operator bool() const noexcept { return index != ~0u; }
  friend constexpr bool operator==(const save_handle&, const save_handle&) = default;
};

/// What start_load found and began loading.
struct load_info {
  errc status = errc::ok;
  load_handle handle{};      ///< false when nothing is loaded
  std::uint64_t tokens = 0;  ///< history tokens being loaded (positions [0, tokens))
  std::uint32_t blocks = 0;
};

class hooks {
 public:
  /// The store and backend must outlive the hooks. Throws std::invalid_argument for a
  /// bad configuration.
  hooks(store& kv, copy_backend& copier, const hooks_config& config = {});
  ~hooks();
  hooks(const hooks&) = delete;
  hooks& operator=(const hooks&) = delete;

  // ---------------------------------------------------------------- scheduler side

  /// How much of `prompt` the session can reuse, and where it is. `keys`: the request's
  /// LoRA adapter, cache salt and media hashes (types.hpp request_keys); only blocks
  /// saved with the same keys where they apply are reused.
  /// A model with state groups (linear attention, SSM) resumes only where a checkpoint
  /// of its state was saved: the end of the session's last saved turn. Its lookup is
  /// that position when the prompt extends the stored history there, else nothing.
  lookup_result lookup(const session_key& session, std::span<const token_id> prompt,
                       const request_keys& keys = {}) noexcept;
  /// The engine's waiting queue, first to run first. The store keeps these sessions'
  /// KV out of eviction's way while others can go (see store::set_queue).
  void set_queue(std::span<const session_key> waiting) noexcept;
  /// The user is typing the session's next turn, or has gone (store::hint).
  errc hint(const session_key& session, policy::session_hint h) noexcept { return store_.hint(session, h); }
  /// The conversation is over: its KV (and its state checkpoint) is dropped from every tier.
  errc close_session(const session_key& session) noexcept;

  // ---------------------------------------------------------------- worker side

  /// Begins loading the reusable prefix of `prompt` into engine memory `target`
  /// (token positions [0, info.tokens)). The session's blocks are made resident in
  /// DRAM first (SSD reads happen here, before any layer), then the copies of layers
  /// [0, preload_layers) are queued. `compute` is the stream the engine computes on,
  /// or nullopt for an engine that computes on the calling host thread.
  /// The target's pages must stay valid and unused by others until finish_load.
  /// A truncated view is placed at its new positions and its keys re-rotated there,
  /// in stream order, before the layer's event: a host function for host memory, one
  /// CUDA kernel launch per layer for GPU memory (see hooks_config::rope). The run
  /// table the kernels read goes up here, once per load.
  /// Returns status ok (tokens may be 0 and the handle empty: nothing to load),
  /// invalid_argument (layout does not match the store), retry (all handles busy),
  /// unsupported (keys must move but no rope spec is configured, or the copy backend
  /// has no device memory for a GPU target), no_space,
  /// checksum_error/device_error (the verified prefix is still loaded).
  /// `keys` as for lookup (invalid_argument when they do not fit the prompt).
  load_info start_load(const session_key& session, std::span<const token_id> prompt, const kv_target& target,
                       std::optional<stream_ref> compute = std::nullopt, const request_keys& keys = {}) noexcept;
  /// Layer `layer`'s history is in engine memory before compute uses it: on a GPU the
  /// compute stream waits for an event (no host block); on the host this blocks until
  /// the copy is done. Also queues layer layer + preload_layers.
  /// Returns ok, invalid_argument (bad handle or layer), device_error.
  errc wait_layer(load_handle h, std::uint32_t layer) noexcept;
  /// Waits for every queued layer and frees the handle (the blocks may move again).
  errc finish_load(load_handle h) noexcept;

  /// Begins saving the session's KV for `tokens` (its whole history after this
  /// prefill) from engine memory `source`, for positions from `from_token` on (the
  /// first block re-saved is the one holding from_token). DRAM blocks are reserved
  /// now; nothing is visible until finish_save.
  /// Returns the handle, or an empty one with `status` set (invalid_argument, rejected:
  /// positions before from_token are not stored, no_space, retry: handles busy,
  /// unsupported: a GPU source and a copy backend without device memory).
  /// `keys`: the request's keys, which the saved blocks' chain hashes carry (a later
  /// load must give the same ones).
  save_handle start_save(const session_key& session, std::span<const token_id> tokens, std::uint64_t from_token,
                         const kv_source& source, std::optional<stream_ref> compute = std::nullopt,
                         errc* status = nullptr, const request_keys& keys = {}) noexcept;
  /// Layer `layer` of the new KV is in engine memory: queue its copy to DRAM behind
  /// the compute that produced it. Returns ok, invalid_argument, device_error.
  errc save_layer(save_handle h, std::uint32_t layer) noexcept;
  /// Waits for every layer's copy, verifies and publishes the blocks (checksums; SSD
  /// write-through if configured), frees the handle. Every layer must have been saved
  /// (else bad_state and nothing is published). Returns the store's commit codes.
  errc finish_save(save_handle h) noexcept;
  /// Gives a save up unpublished.
  void abort_save(save_handle h) noexcept;

  copy_backend& copier() noexcept { return copier_; }
  const hooks_config& config() const noexcept { return config_; }
  /// Hash lanes the backend gave (hooks_config::hash_lanes or fewer).
  std::uint32_t hash_lanes_in_use() const noexcept { return std::uint32_t(hash_lanes_.size()); }

 private:
  struct load_state;
  struct save_state;
  static constexpr std::size_t max_shifts = 8;  // distinct position shifts in one loaded view
  errc queue_load_layer(load_state& L, std::uint32_t layer) noexcept;
  /// invalid_argument (missing, not this store's geometry, or groups in different
  /// memory), unsupported (GPU memory with a host copier), or ok.
  errc check_layout(const kv_target& target) const noexcept;
  /// All of the load's runs fit its run table (one rotation call per layer), else one
  /// call per run.
  bool uses_table(const load_state& L) const noexcept;
  struct rotate_job;
  static void rotate_layer(void* job) noexcept;
  static void strip_layer(void* job) noexcept;
  struct hash_job;
  static void hash_layer(void* job) noexcept;
  /// Waits until every hashing job queued for the save has run.
  errc drain_hashing(save_state& S) noexcept;
  errc rotate_layer_device(const load_state& L, std::uint32_t layer, stream_ref stream) noexcept;
  // State checkpoints (models with state groups): a companion session of the same
  // tenant holds, in ordinary blocks, every state layer's state at the end of the last
  // saved turn; its token ids are derived from the prefix (and keys) it belongs to, so
  // the store's chain hashes and checksums verify it like any block.
  static constexpr std::size_t max_checkpoint_tokens = 16384;  // a lookup hashes them on its stack
  using checkpoint_name = detail::checkpoint_name;             // the companion session (detail/checkpoint_name.hpp)
  /// The companion's token ids for a checkpoint at the end of `prefix`.
  void checkpoint_tokens(std::span<const token_id> prefix, const request_keys& keys,
                         std::span<token_id> out) const noexcept;
  /// Segments moving `bytes` at `offset` of a checkpoint (its blocks' payloads) to or
  /// from `engine`; returns how many were written to `out`.
  std::size_t state_segments(std::span<std::byte* const> payloads, std::size_t offset, std::size_t bytes,
                             std::byte* engine, copy_direction dir, std::span<copy_segment> out) const noexcept;
  /// Segments moving a window-tail layer's last `window` tokens before `end` (engine
  /// pages of `target`) to or from its part of the checkpoint.
  std::size_t tail_segments(std::span<std::byte* const> payloads, std::uint32_t layer, const kv_target& target,
                            std::uint64_t end, copy_direction dir, std::span<copy_segment> out) const noexcept;
  /// Zeroes `bytes` at `offset` of a checkpoint.
  void zero_checkpoint(std::span<std::byte* const> payloads, std::size_t offset, std::size_t bytes) const noexcept;
  /// The checkpoint's segments of layer `layer` (a state or a window tail).
  std::size_t checkpoint_segments(std::span<std::byte* const> payloads, std::uint32_t layer, const kv_target& target,
                                  std::uint64_t end, copy_direction dir, std::span<copy_segment> out) const noexcept;
  template <class Emit>
  void walk_runs(const load_state& L, std::uint32_t group, Emit&& emit) const noexcept;
  errc prepare_rotation(load_state& L, bool on_device, stream_ref stream) noexcept;
  rope_runs_view runs_view(const load_state& L, std::uint32_t layer, bool device) const noexcept;
  errc flush_segments(std::span<copy_segment> buf, std::size_t& used, stream_ref s) noexcept;
  load_state* load_of(load_handle h) noexcept;
  save_state* save_of(save_handle h) noexcept;

  store& store_;
  copy_backend& copier_;
  hooks_config config_;
  kv_geometry geometry_;
  bool rope_fits_groups_ = false;        // config_.rope rotates every rotary group (shape and dtype)
  std::uint32_t checkpoint_blocks_ = 0;  // blocks of one state checkpoint (0: no state groups)
  std::vector<stream_ref> read_streams_;
  std::optional<stream_ref> write_stream_;
  std::vector<stream_ref> hash_lanes_;
  std::vector<load_state> loads_;
  std::vector<save_state> saves_;
  detail::slot_pool load_pool_;
  detail::slot_pool save_pool_;
  std::atomic<std::uint32_t> next_read_stream_{0};
  std::optional<rope_angles> position_angles_;  // keys_pre_rope: row p = R(p)
  std::optional<rope_angles> strip_angles_;     // keys_pre_rope: row p = R(-p)
  float* device_positions_ = nullptr;           // GPU copy of position_angles_ (cos rows, then sin rows)
  std::optional<rope_angles> shift_rows_;       // keys after RoPE: computes a shift's row
  // Per load handle, a slot of [cos rows, sin rows of its shifts][run table]: in host
  // memory (pinned for a GPU copier) and, for a GPU copier, its device copy.
  std::size_t angle_bytes_ = 0, slot_bytes_ = 0;
  std::uint32_t run_capacity_ = 0;
  detail::host_region tables_{};
  std::byte* device_tables_ = nullptr;
};

}  // namespace attnstore

#include "attnstore/detail/hooks.inl"
