// hooks bodies. Per-handle state (block views, payload pointers, events, a segment
// buffer) is allocated once at construction; start/wait/save/finish only index it.
#pragma once

#include <algorithm>

namespace attnstore {

struct hooks::rotate_job {
  hooks* self = nullptr;
  load_state* load = nullptr;
  std::uint32_t layer = 0;
  save_state* save = nullptr;
};

// Hashes layer `layer` of the save's blocks lane, lane + lanes, ...: each block always
// on the same lane, whose stream runs its layers in order.
struct hooks::hash_job {
  hooks* self = nullptr;
  save_state* save = nullptr;
  std::uint32_t layer = 0, lane = 0;
};

struct hooks::load_state {
  // Re-rotation: the angle rows of `shifts` (cos rows, then sin rows, max_shifts each)
  // and the run table, in this handle's host slot and (GPU copier) its device copy.
  float* angles = nullptr;
  float* device_angles = nullptr;
  rope_run* runs = nullptr;
  rope_run* device_runs = nullptr;
  std::uint32_t run_count = 0;  // runs of the view (may exceed the capacity)
  // Runs of layer group g: [run_first[g], run_first[g + 1]) (each group pages apart).
  std::uint32_t run_first[kv_max_groups + 1] = {};
  std::uint32_t max_run_tokens = 0;    // tokens of the longest run
  std::vector<rotate_job> rotations;   // one per layer
  std::vector<std::uint8_t> shift_of;  // per view: index into shifts
  std::vector<std::int64_t> shifts;
  bool rotate = false;
  read_lease lease;  // the DRAM blocks `views` point into, until finish_load
  std::vector<block_view> views;
  // State groups: the checkpoint's blocks, leased like the views.
  read_lease ckpt_lease;
  std::vector<block_view> ckpt_views;
  std::vector<std::byte*> ckpt_payloads;  // ckpt_views' payloads (only read from)
  std::vector<token_id> ckpt_tokens;
  checkpoint_name ckpt_name;
  std::uint64_t ckpt_end = 0;    // the position the checkpoint is at (the tokens loaded)
  std::vector<event_id> events;  // one per layer: layer copied into engine memory
  std::vector<copy_segment> segments;
  kv_target target{};
  std::optional<stream_ref> compute;
  std::uint32_t read_stream = 0;
  std::uint32_t blocks = 0;
  std::uint32_t queued_layers = 0;
  bool active = false;
};

struct hooks::save_state {
  std::vector<rotate_job> strips;  // one per layer (keys_pre_rope)
  save_reservation reservation;
  std::vector<std::byte*> payloads;
  // State groups: the checkpoint at the end of the saved tokens, in its own blocks.
  save_reservation ckpt_reservation;
  std::vector<std::byte*> ckpt_payloads;
  std::vector<token_id> ckpt_tokens;
  checkpoint_name ckpt_name;
  std::vector<event_id> written;   // one per layer: layer copied into DRAM
  std::vector<event_id> computed;  // one per layer: recorded on the compute stream
  std::vector<std::uint8_t> saved;
  std::vector<copy_segment> segments;
  kv_source source{};
  std::optional<stream_ref> compute;
  std::uint64_t tokens = 0;
  // Hashing while saving (hooks_config::hash_lanes).
  std::vector<checksum_stream> sums;   // per block of the save
  std::vector<std::uint64_t> digests;  // what commit is given
  std::vector<hash_job> hash_jobs;     // lanes x layers
  std::vector<event_id> hashed;        // per lane: its queued hashing done
  std::uint32_t next_hash_layer = 0;   // layers queued for hashing, in order
  bool hashing = false;                // the checksums come from the lanes
  bool lanes_used = false;             // some hashing job was queued
  bool active = false;
};

inline hooks::hooks(store& kv, copy_backend& copier, const hooks_config& config)
    : store_(kv),
      copier_(copier),
      config_(config),
      geometry_(kv.geometry()),
      load_pool_(config.max_loads),
      save_pool_(config.max_saves) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("hooks_config: " + m); };
  if (config.max_loads == 0 || config.max_saves == 0) fail("max_loads and max_saves must be at least 1");
  if (config.max_blocks_per_request == 0) fail("max_blocks_per_request is 0");
  if (config.read_streams == 0 || config.read_streams > 8)
    fail("read_streams is " + std::to_string(config.read_streams) + ", allowed 1..8");
  std::size_t per_block = 0;  // segments of one block's largest layer, heads apart
  for (const kv_group& k : geometry_.groups)
    per_block = std::max(per_block, std::size_t(k.tensors()) * geometry_.tokens_per_block * k.num_kv_heads);
  if (config.segment_buffer < per_block)
    fail("segment_buffer is " + std::to_string(config.segment_buffer) + ", must hold one block's layer (" +
         std::to_string(per_block) + " segments)");
  for (std::uint32_t i = 0; i < config.read_streams; ++i) read_streams_.push_back(copier.create_stream());
  write_stream_ = copier.create_stream();
  if (config.hash_lanes > 16) fail("hash_lanes is " + std::to_string(config.hash_lanes) + ", allowed 0..16");
  // Lanes are a speed-up, not a need: a backend out of streams gets fewer (none: the
  // store hashes at commit).
  for (std::uint32_t i = 0; i < config.hash_lanes; ++i) try {
      hash_lanes_.push_back(copier.create_stream());
    } catch (const std::exception&) {
      break;
    }
  auto take_events = [&](std::vector<event_id>& ev, std::size_t count) {
    ev.resize(count);
    for (auto& e : ev) {
      e = copier.acquire_event();
      if (e == no_event)
        throw std::invalid_argument(
            "hooks: the copy backend's event pool is too small for max_loads/max_saves x layers");
    }
  };
  if (config.rope) {
    config.rope->validate();
    if (!config.keys_pre_rope) {
      shift_rows_.emplace(*config.rope, 1);
    } else {
      position_angles_.emplace(*config.rope, config.max_positions);
      position_angles_->fill(0, 1, config.max_positions);
      strip_angles_.emplace(*config.rope, config.max_positions);
      strip_angles_->fill(0, -1, config.max_positions);
    }
  } else if (config.keys_pre_rope) {
    fail("keys_pre_rope needs the rope spec");
  }
  if (config.rope) {  // one spec rotates every group whose keys carry RoPE
    rope_fits_groups_ = true;
    for (const kv_group& k : geometry_.groups)
      if (k.rotated_dims() && (k.rope_variant != 0 || !rotatable(k.dtype) || config.rope->head_dim != k.rotated_dims()))
        rope_fits_groups_ = false;
    if (config.keys_pre_rope && !rope_fits_groups_)
      fail("keys_pre_rope: the rope spec (head_dim " + std::to_string(config.rope->head_dim) +
           ") must rotate every rotary layer group: f32/f16/bf16 keys whose rotated dims equal its head_dim, "
           "all of rope_variant 0");
  }
  const std::uint32_t pairs = config.rope ? config.rope->rotary() / 2 : 0;
  if (config.rope && copier.supports_device_memory()) {
    // GPU engines: the angle rows re-rotation needs, in device memory.
    if (config.keys_pre_rope) {
      const std::size_t bytes = std::size_t(config.max_positions) * pairs * sizeof(float);
      device_positions_ = static_cast<float*>(copier.allocate_device(2 * bytes));
      if (device_positions_) {
        stream_ref s = read_streams_[0];
        copy_segment up[2] = {{position_angles_->cos_row(0), device_positions_, bytes},
                              {position_angles_->sin_row(0), device_positions_ + bytes / sizeof(float), bytes}};
        event_id e = copier.acquire_event();
        if (copier.copy_async(up, s) != errc::ok || copier.record(e, s) != errc::ok ||
            copier.synchronize(e) != errc::ok) {
          copier.free_device(device_positions_);
          device_positions_ = nullptr;
        }
        copier.release_event(e);
      }
    }
  }
  if (config.rope) {  // the handles' angle rows and run tables, host and device
    angle_bytes_ = config.keys_pre_rope ? 0 : 2 * max_shifts * pairs * sizeof(float);  // a multiple of 16
    run_capacity_ = config.max_rotated_runs
                        ? config.max_rotated_runs
                        : std::uint32_t(std::min<std::uint64_t>(4ull * config.max_blocks_per_request, 0xFFFFFFFFu));
    slot_bytes_ = angle_bytes_ + std::size_t(run_capacity_) * sizeof(rope_run);
    const bool gpu = copier.supports_device_memory();
    tables_ = detail::allocate_host_region(
        {.bytes = config.max_loads * slot_bytes_, .try_cuda = gpu, .try_lock = false, .huge_pages = false}, nullptr);
    if (gpu) device_tables_ = static_cast<std::byte*>(copier.allocate_device(config.max_loads * slot_bytes_));
  }
  if (const std::uint64_t cb = geometry_.checkpoint_bytes()) {
    const std::uint64_t blocks = (cb + geometry_.block_bytes() - 1) / geometry_.block_bytes();
    if (blocks > config.max_blocks_per_request || blocks * geometry_.tokens_per_block > max_checkpoint_tokens)
      fail("a state checkpoint of " + std::to_string(cb) + " bytes takes " + std::to_string(blocks) +
           " blocks; allowed max_blocks_per_request and at most " + std::to_string(max_checkpoint_tokens) +
           " tokens of blocks");
    checkpoint_blocks_ = std::uint32_t(blocks);
    if (geometry_.window_tails && config.keys_pre_rope)
      fail("keys_pre_rope with window_tails: window tails are stored as computed, after RoPE");
    for (const kv_group& k : geometry_.groups)
      if (!geometry_.in_blocks(k) && k.kind == layer_kind::sliding_window &&
          config.segment_buffer < 2ull * k.window * k.num_kv_heads + blocks)
        fail("segment_buffer is " + std::to_string(config.segment_buffer) + ", must hold a window tail's copies (" +
             std::to_string(2ull * k.window * k.num_kv_heads + blocks) + ")");
  }
  const std::size_t ckpt_tokens = std::size_t(checkpoint_blocks_) * geometry_.tokens_per_block;
  loads_.resize(config.max_loads);
  for (std::size_t i = 0; i < loads_.size(); ++i) {
    load_state& L = loads_[i];
    if (tables_.base) {
      std::byte* slot = static_cast<std::byte*>(tables_.base) + i * slot_bytes_;
      L.angles = reinterpret_cast<float*>(slot);
      L.runs = reinterpret_cast<rope_run*>(slot + angle_bytes_);
    }
    if (device_tables_) {
      std::byte* slot = device_tables_ + i * slot_bytes_;
      L.device_angles = reinterpret_cast<float*>(slot);
      L.device_runs = reinterpret_cast<rope_run*>(slot + angle_bytes_);
    }
    L.views.resize(config.max_blocks_per_request);
    L.lease = read_lease(config.max_blocks_per_request);
    if (checkpoint_blocks_) {
      L.ckpt_lease = read_lease(checkpoint_blocks_);
      L.ckpt_views.resize(checkpoint_blocks_);
      L.ckpt_payloads.resize(checkpoint_blocks_);
      L.ckpt_tokens.resize(ckpt_tokens);
    }
    L.rotations.resize(geometry_.num_layers);
    for (std::uint32_t l = 0; l < geometry_.num_layers; ++l) L.rotations[l] = {this, &L, l};
    L.shift_of.resize(config.max_blocks_per_request);
    L.shifts.reserve(max_shifts);
    L.segments.resize(config.segment_buffer);
    take_events(L.events, geometry_.num_layers);
  }
  saves_.resize(config.max_saves);
  for (auto& S : saves_) {
    S.strips.resize(geometry_.num_layers);
    for (std::uint32_t l = 0; l < geometry_.num_layers; ++l) S.strips[l] = {this, nullptr, l, &S};
    S.payloads.resize(config.max_blocks_per_request);
    S.segments.resize(config.segment_buffer);
    S.ckpt_payloads.resize(checkpoint_blocks_);
    S.ckpt_tokens.resize(ckpt_tokens);
    S.saved.resize(geometry_.num_layers);
    take_events(S.written, geometry_.num_layers);
    take_events(S.computed, geometry_.num_layers);
    if (!hash_lanes_.empty()) {
      S.sums.resize(std::min(config.hash_blocks_per_save, config.max_blocks_per_request));
      S.digests.resize(S.sums.size());
      S.hash_jobs.resize(hash_lanes_.size() * geometry_.num_layers);
      for (std::uint32_t lane = 0; lane < hash_lanes_.size(); ++lane)
        for (std::uint32_t l = 0; l < geometry_.num_layers; ++l)
          S.hash_jobs[std::size_t(lane) * geometry_.num_layers + l] = {this, &S, l, lane};
      take_events(S.hashed, hash_lanes_.size());
    }
  }
}

inline hooks::~hooks() {
  for (std::uint32_t h = 0; h < loads_.size(); ++h)
    if (loads_[h].active) (void)finish_load(load_handle{h});
  for (std::uint32_t h = 0; h < saves_.size(); ++h)
    if (saves_[h].active) abort_save(save_handle{h});
  for (auto& L : loads_)
    for (auto e : L.events) copier_.release_event(e);
  for (auto& S : saves_) {
    for (auto e : S.written) copier_.release_event(e);
    for (auto e : S.computed) copier_.release_event(e);
    for (auto e : S.hashed) copier_.release_event(e);
  }
  for (auto s : read_streams_) copier_.destroy_stream(s);
  if (write_stream_) copier_.destroy_stream(*write_stream_);
  for (auto s : hash_lanes_) copier_.destroy_stream(s);
  copier_.free_device(device_tables_);
  detail::free_host_region(tables_);
  copier_.free_device(device_positions_);
}

inline void hooks::set_queue(std::span<const session_key> waiting) noexcept { store_.set_queue(waiting); }

inline errc hooks::flush_segments(std::span<copy_segment> buf, std::size_t& used, stream_ref s) noexcept {
  if (used == 0) return errc::ok;
  errc e = copier_.copy_async(buf.first(used), s);
  used = 0;
  return e;
}

inline errc hooks::queue_load_layer(load_state& L, std::uint32_t layer) noexcept {
  const stream_ref stream = read_streams_[L.read_stream];
  const std::size_t need = max_layer_segments(geometry_, L.target);
  std::size_t used = 0;
  const layer_shape& shape = geometry_.layers[layer];
  const kv_group& group = geometry_.groups[shape.group];
  const bool in_blocks = geometry_.in_blocks(group);
  if (!in_blocks) {  // the layer's state or window tail, from the checkpoint
    used = checkpoint_segments(L.ckpt_payloads, layer, L.target, L.ckpt_end, copy_direction::to_engine, L.segments);
    if (used == 0) return errc::invalid_argument;
  }
  for (std::uint32_t b = 0; b < L.blocks && in_blocks; ++b) {
    if (L.segments.size() - used < need)
      if (errc e = flush_segments(L.segments, used, stream); e != errc::ok) return e;
    used += layer_segments(geometry_, L.views[b].payload, layer, L.views[b].first, L.views[b].position,
                           L.views[b].tokens, L.target, copy_direction::to_engine, std::span(L.segments).subspan(used));
  }
  if (errc e = flush_segments(L.segments, used, stream); e != errc::ok) return e;
  if (L.rotate && geometry_.group_of(layer).rotated_dims() &&
      in_blocks) {  // keys moved: re-rotate them after their copy
    errc e = L.target.where() == memory_space::host
                 ? copier_.launch_host_fn(&hooks::rotate_layer, &L.rotations[layer], stream)
                 : rotate_layer_device(L, layer, stream);
    if (e != errc::ok) return e;
  }
  L.queued_layers = layer + 1;
  return copier_.record(L.events[layer], stream);
}

inline bool hooks::uses_table(const load_state& L) const noexcept { return L.run_count <= run_capacity_; }

inline errc hooks::check_layout(const kv_target& target) const noexcept {
  try {
    target.check_against(geometry_);
  } catch (const std::exception&) {
    return errc::invalid_argument;
  }
  // One memory space per target; a host copier would dereference GPU pointers on a CPU thread.
  const memory_space where = target.where();
  for (std::uint32_t i = 0; i < geometry_.groups.size(); ++i)
    if (target.group(i).layout->where != where) return errc::invalid_argument;
  if (where == memory_space::device && !copier_.supports_device_memory()) return errc::unsupported;
  return errc::ok;
}

inline load_info hooks::start_load(const session_key& session, std::span<const token_id> prompt,
                                   const kv_target& target, std::optional<stream_ref> compute,
                                   const request_keys& keys) noexcept {
  if (errc e = check_layout(target); e != errc::ok) return {e};
  const load_handle h{load_pool_.allocate()};
  if (!h) return {errc::retry};
  load_state& L = loads_[h.index];
  // Nothing is leased on failure; on a partial success (a verified prefix before a bad
  // block) the prefix is loaded and leased.
  get_result got = store_.acquire(session, prompt, L.views, L.lease, keys);
  auto give_up = [&](errc e) {
    L.lease.release();
    L.ckpt_lease.release();
    load_pool_.release(h.index);
    return load_info{e};
  };
  if (got.blocks == 0) return give_up(got.status == errc::not_found ? errc::ok : got.status);
  if (checkpoint_blocks_) {
    // Every group must restore at the same position: the state only at its checkpoint,
    // which must be for exactly the verified prefix (and these keys), else nothing loads.
    const std::span<const token_id> prefix = prompt.first(std::size_t(got.tokens));
    get_result ck{errc::invalid_argument};
    if (detail::checkpoint_key(session, L.ckpt_name)) {
      checkpoint_tokens(prefix, keys, L.ckpt_tokens);
      ck = store_.acquire(L.ckpt_name.key, L.ckpt_tokens, L.ckpt_views, L.ckpt_lease);
    }
    if (ck.tokens != L.ckpt_tokens.size() || ck.blocks != checkpoint_blocks_) {
      L.ckpt_lease.release();
      const errc why = ck.status == errc::checksum_error || ck.status == errc::device_error ? ck.status : errc::ok;
      return give_up(why);  // no checkpoint here: recompute
    }
    for (std::uint32_t b = 0; b < checkpoint_blocks_; ++b)
      L.ckpt_payloads[b] = const_cast<std::byte*>(L.ckpt_views[b].payload);
    L.ckpt_end = got.tokens;
  }
  if (!target.holds(geometry_, got.tokens)) return give_up(errc::invalid_argument);
  // Keys that move (a truncated view) or lack RoPE are rotated on load.
  L.rotate = config_.keys_pre_rope;
  L.shifts.clear();
  bool shifts_fit = true;
  for (std::uint32_t b = 0; b < got.blocks && !config_.keys_pre_rope; ++b) {
    const std::int64_t sh = L.views[b].shift;
    if (sh == 0) continue;
    L.rotate = true;
    auto it = std::find(L.shifts.begin(), L.shifts.end(), sh);
    if (it == L.shifts.end()) {
      if (L.shifts.size() == max_shifts) {
        shifts_fit = false;
        break;
      }
      L.shifts.push_back(sh);
      it = L.shifts.end() - 1;
    }
    L.shift_of[b] = std::uint8_t(it - L.shifts.begin());
  }
  const bool on_device = target.where() == memory_space::device;
  const bool can_rotate =
      config_.rope && rope_fits_groups_ && shifts_fit &&
      (!config_.keys_pre_rope || got.tokens <= config_.max_positions) && tables_.base != nullptr &&
      (!on_device || (device_tables_ != nullptr && (!config_.keys_pre_rope || device_positions_ != nullptr)));
  if (L.rotate && !can_rotate) return give_up(errc::unsupported);
  L.read_stream = next_read_stream_.fetch_add(1, std::memory_order_relaxed) % std::uint32_t(read_streams_.size());
  L.target = target;
  L.blocks = got.blocks;
  if (L.rotate)
    if (errc e = prepare_rotation(L, on_device, read_streams_[L.read_stream]); e != errc::ok) return give_up(e);
  L.compute = compute;
  L.queued_layers = 0;
  L.active = true;
  const std::uint32_t first = std::min(config_.preload_layers, geometry_.num_layers);
  for (std::uint32_t l = 0; l < first; ++l)
    if (errc e = queue_load_layer(L, l); e != errc::ok) {
      (void)finish_load(h);
      return {e};
    }
  return {got.status, h, got.tokens, got.blocks};
}

// The runs of L's keys to rotate: tokens of one page and one block view, merged with
// the run before when they continue it in engine memory and in angle rows. Offsets are
// from a layer's K base (the same for every layer); rows are positions (keys stored
// before RoPE) or indices into L.shifts.
template <class Emit>
void hooks::walk_runs(const load_state& L, std::uint32_t group, Emit&& emit) const noexcept {
  const kv_group_target gt = L.target.group(group);
  const kv_layout& lay = *gt.layout;
  const bool per_position = config_.keys_pre_rope;
  rope_run run{};  // pending
  for (std::uint32_t b = 0; b < L.blocks; ++b) {
    const block_view& v = L.views[b];
    if (!per_position && v.shift == 0) continue;
    for (std::uint32_t done = 0; done < v.tokens;) {
      const std::uint64_t pos = v.position + done;
      const std::uint32_t in_page = std::uint32_t(pos % lay.page_size);
      const std::uint32_t n = std::min<std::uint32_t>(v.tokens - done, lay.page_size - in_page);
      const rope_run piece{
          std::uint64_t(gt.pages[pos / lay.page_size]) * lay.page_stride + std::uint64_t(in_page) * lay.token_stride, n,
          per_position ? std::uint32_t(pos) : std::uint32_t(L.shift_of[b])};
      if (run.tokens != 0 && run.tokens <= 0x7FFFFFFFu - n &&
          piece.offset == run.offset + std::uint64_t(run.tokens) * lay.token_stride &&
          piece.row == run.row + (per_position ? run.tokens : 0)) {
        run.tokens += n;
      } else {
        if (run.tokens != 0) emit(run);
        run = piece;
      }
      done += n;
    }
  }
  if (run.tokens != 0) emit(run);
}

// start_load: the shifts' angle rows and the run table into L's host slot and, for GPU
// memory, both up to the device on the stream that will rotate with them.
inline errc hooks::prepare_rotation(load_state& L, bool on_device, stream_ref stream) noexcept {
  const std::size_t pairs = config_.rope->rotary() / 2;
  for (std::size_t i = 0; i < L.shifts.size(); ++i)
    shift_rows_->row(L.shifts[i], L.angles + i * pairs, L.angles + (max_shifts + i) * pairs);
  L.run_count = 0;
  L.max_run_tokens = 0;
  for (std::uint32_t g = 0; g < geometry_.groups.size(); ++g) {
    L.run_first[g] = std::min(L.run_count, run_capacity_);
    // NoPE layers keep their keys; checkpointed ones are never moved (a view that moves
    // keys cannot match a checkpoint).
    if (!geometry_.groups[g].rotated_dims() || !geometry_.in_blocks(geometry_.groups[g])) continue;
    walk_runs(L, g, [&](const rope_run& r) {
      if (L.run_count < run_capacity_) L.runs[L.run_count] = r;
      L.run_count += L.run_count <= run_capacity_;  // stops one past: enough to know it overflowed
      L.max_run_tokens = std::max(L.max_run_tokens, r.tokens);
    });
  }
  L.run_first[geometry_.groups.size()] = std::min(L.run_count, run_capacity_);
  if (!on_device) return errc::ok;
  // One copy: the slot starts with the angle rows (none for keys stored before RoPE).
  const std::size_t bytes = angle_bytes_ + (uses_table(L) ? L.run_count * sizeof(rope_run) : 0);
  const copy_segment up[1] = {{L.angles, L.device_angles, bytes}};
  return bytes ? copier_.copy_async(up, stream) : errc::ok;
}

// Layer `layer`'s keys of L as a batch of runs: host tables, or their device copies.
inline rope_runs_view hooks::runs_view(const load_state& L, std::uint32_t layer, bool device) const noexcept {
  const layer_shape& shape = geometry_.layers[layer];
  const kv_group& k = geometry_.groups[shape.group];
  const kv_layout& lay = *L.target.group(shape.group).layout;
  const std::size_t pairs = config_.rope->rotary() / 2;
  rope_runs_view b;
  // A latent row's RoPE part is its last rope_dims: the spec rotates from there.
  b.base = lay.k_base[shape.in_group] + std::size_t(k.rope_first()) * dtype_size(k.dtype);
  b.runs = (device ? L.device_runs : L.runs) + L.run_first[shape.group];
  b.count = L.run_first[shape.group + 1] - L.run_first[shape.group];
  b.max_tokens = L.max_run_tokens;
  if (config_.keys_pre_rope) {  // row p = R(p)
    b.row_step = 1;
    b.cos = device ? device_positions_ : position_angles_->cos_row(0);
    b.sin = device ? device_positions_ + std::size_t(config_.max_positions) * pairs : position_angles_->sin_row(0);
  } else {  // row i = R(shifts[i])
    b.row_step = 0;
    b.cos = device ? L.device_angles : L.angles;
    b.sin = b.cos + max_shifts * pairs;
  }
  b.dt = k.dtype;
  b.heads = k.num_kv_heads;
  b.token_stride = lay.token_stride;
  b.head_stride = lay.head_stride;
  return b;
}

inline void hooks::rotate_layer(void* job) noexcept {
  const rotate_job& j = *static_cast<const rotate_job*>(job);
  const hooks& H = *j.self;
  const load_state& L = *j.load;
  const rope_spec& spec = *H.config_.rope;
  const rope_runs_view all = H.runs_view(L, j.layer, false);
  if (H.uses_table(L)) {
    (void)rerotate_runs(all, spec);
    return;
  }
  H.walk_runs(L, H.geometry_.layers[j.layer].group, [&](const rope_run& r) {  // more runs than the table holds
    rope_runs_view one = all;
    one.runs = &r;
    one.count = 1;
    (void)rerotate_runs(one, spec);
  });
}

inline void hooks::strip_layer(void* job) noexcept {
  const rotate_job& j = *static_cast<const rotate_job*>(job);
  const hooks& H = *j.self;
  const save_state& S = *j.save;
  const kv_geometry& g = H.geometry_;
  const layer_shape& shape = g.layers[j.layer];
  const kv_group& k = g.groups[shape.group];
  if (!k.rotated_dims() || shape.bytes == 0) return;  // NoPE layers; layers kept in the checkpoint
  const std::uint32_t pairs = H.config_.rope->rotary() / 2;
  const std::size_t head_bytes = std::size_t(k.head_dim) * dtype_size(k.dtype);
  for (std::uint32_t i = 0; i < S.reservation.blocks(); ++i) {
    const std::uint64_t first = std::uint64_t(S.reservation.first_block() + i) * g.tokens_per_block;
    const std::uint32_t n = std::uint32_t(std::min<std::uint64_t>(g.tokens_per_block, S.tokens - first));
    // K (or the latent row) comes first in a layer; RoPE starts at rope_first.
    std::byte* keys = S.payloads[i] + shape.offset + std::size_t(k.rope_first()) * dtype_size(k.dtype);
    (void)rerotate(keys, k.dtype, n, k.num_kv_heads, head_bytes * k.num_kv_heads, head_bytes, *H.config_.rope,
                   H.strip_angles_->cos_row(0) + first * pairs, H.strip_angles_->sin_row(0) + first * pairs, false);
  }
}

inline void hooks::hash_layer(void* job) noexcept {
  const hash_job& j = *static_cast<const hash_job*>(job);
  save_state& S = *j.save;
  const layer_shape& shape = j.self->geometry_.layers[j.layer];
  const std::uint32_t lanes = std::uint32_t(j.self->hash_lanes_.size());
  for (std::uint32_t i = j.lane; i < S.reservation.blocks(); i += lanes)
    S.sums[i].update(S.payloads[i] + shape.offset, shape.bytes);
}

inline errc hooks::drain_hashing(save_state& S) noexcept {
  if (!S.lanes_used) return errc::ok;
  errc status = errc::ok;
  for (std::uint32_t lane = 0; lane < hash_lanes_.size(); ++lane) {
    errc e = copier_.record(S.hashed[lane], hash_lanes_[lane]);
    if (e == errc::ok) e = copier_.synchronize(S.hashed[lane]);
    if (e != errc::ok && status == errc::ok) status = e;
  }
  S.lanes_used = false;
  return status;
}

// One kernel launch for the layer's whole run table (uploaded by start_load on this
// stream); one launch per run when the view has more runs than the table holds.
inline errc hooks::rotate_layer_device(const load_state& L, std::uint32_t layer, stream_ref stream) noexcept {
  const rope_spec& spec = *config_.rope;
  const rope_runs_view all = runs_view(L, layer, true);
  if (uses_table(L)) return rerotate_runs_cuda(all, spec, stream.get());
  const std::size_t pairs = spec.rotary() / 2;
  errc e = errc::ok;
  walk_runs(L, geometry_.layers[layer].group, [&](const rope_run& r) {
    if (e == errc::ok)
      e = rerotate_cuda(all.base + r.offset, all.dt, r.tokens, all.heads, all.token_stride, all.head_stride,
                        all.cos + std::size_t(r.row) * pairs, all.sin + std::size_t(r.row) * pairs, all.row_step == 0,
                        spec, stream.get());
  });
  return e;
}

inline hooks::load_state* hooks::load_of(load_handle h) noexcept {
  return h.index < loads_.size() && loads_[h.index].active ? &loads_[h.index] : nullptr;
}

inline hooks::save_state* hooks::save_of(save_handle h) noexcept {
  return h.index < saves_.size() && saves_[h.index].active ? &saves_[h.index] : nullptr;
}

inline errc hooks::wait_layer(load_handle h, std::uint32_t layer) noexcept {
  load_state* Lp = load_of(h);
  if (!Lp || layer >= geometry_.num_layers) return errc::invalid_argument;
  load_state& L = *Lp;
  // Keep `preload_layers` layers queued ahead of the one about to compute.
  const std::uint32_t upto = std::min(geometry_.num_layers, layer + 1 + config_.preload_layers);
  while (L.queued_layers < upto)
    if (errc e = queue_load_layer(L, L.queued_layers); e != errc::ok) return e;
  return L.compute ? copier_.wait(*L.compute, L.events[layer]) : copier_.synchronize(L.events[layer]);
}

inline errc hooks::finish_load(load_handle h) noexcept {
  load_state* Lp = load_of(h);
  if (!Lp) return errc::invalid_argument;
  load_state& L = *Lp;
  errc status = errc::ok;
  for (std::uint32_t l = 0; l < L.queued_layers; ++l)
    if (errc e = copier_.synchronize(L.events[l]); e != errc::ok && status == errc::ok) status = e;
  L.lease.release();  // every copy from the blocks is done: they may be freed and reused
  L.ckpt_lease.release();
  L.active = false;
  load_pool_.release(h.index);
  return status;
}

inline save_handle hooks::start_save(const session_key& session, std::span<const token_id> tokens,
                                     std::uint64_t from_token, const kv_source& source,
                                     std::optional<stream_ref> compute, errc* status,
                                     const request_keys& keys) noexcept {
  auto fail = [&](errc e) {
    if (status) *status = e;
    return save_handle{};
  };
  if (errc e = check_layout(source); e != errc::ok) return fail(e);
  if (from_token >= tokens.size()) return fail(errc::invalid_argument);
  if (!source.holds(geometry_, tokens.size())) return fail(errc::invalid_argument);
  const std::uint32_t first_block = std::uint32_t(from_token / geometry_.tokens_per_block);
  const std::uint32_t count = geometry_.blocks_for(tokens.size()) - first_block;
  if (count > config_.max_blocks_per_request) return fail(errc::invalid_argument);
  if (config_.keys_pre_rope && tokens.size() > config_.max_positions) return fail(errc::invalid_argument);
  const save_handle h{save_pool_.allocate()};
  if (!h) return fail(errc::retry);
  save_state& S = saves_[h.index];
  if (errc e = store_.reserve(session, tokens, first_block, S.payloads, S.reservation, keys); e != errc::ok) {
    save_pool_.release(h.index);
    return fail(e);
  }
  if (checkpoint_blocks_) {  // the state at the end of `tokens`, replacing the last checkpoint
    errc e = errc::invalid_argument;
    if (detail::checkpoint_key(session, S.ckpt_name)) {
      checkpoint_tokens(tokens, keys, S.ckpt_tokens);
      e = store_.reserve(S.ckpt_name.key, S.ckpt_tokens, 0, S.ckpt_payloads, S.ckpt_reservation);
    }
    if (e != errc::ok) {
      store_.abort(S.reservation);
      save_pool_.release(h.index);
      return fail(e);
    }
    // Past the last part, and in window tails past the tokens there are, nothing of the
    // slots' previous occupants may stay.
    const std::size_t bb = geometry_.block_bytes();
    const std::size_t used = std::size_t(geometry_.checkpoint_bytes() - std::uint64_t(checkpoint_blocks_ - 1) * bb);
    std::memset(S.ckpt_payloads[checkpoint_blocks_ - 1] + used, 0, bb - used);
    for (std::uint32_t l = 0; l < geometry_.num_layers; ++l) {
      const kv_group& k = geometry_.group_of(l);
      if (k.kind != layer_kind::sliding_window || geometry_.in_blocks(k) || tokens.size() >= k.window) continue;
      const std::size_t row = k.row_bytes(), w = tokens.size();
      for (std::uint32_t side = 0; side < 2; ++side)
        zero_checkpoint(S.ckpt_payloads, geometry_.layers[l].checkpoint_offset + (side * k.window + w) * row,
                        (k.window - w) * row);
    }
  }
  S.source = source;
  S.compute = compute;
  S.tokens = tokens.size();
  std::fill(S.saved.begin(), S.saved.end(), 0);
  S.hashing = !hash_lanes_.empty() && count <= S.sums.size();
  S.next_hash_layer = 0;
  S.lanes_used = false;
  if (S.hashing)
    for (std::uint32_t i = 0; i < count; ++i) S.sums[i].reset();
  S.active = true;
  if (status) *status = errc::ok;
  return h;
}

inline errc hooks::save_layer(save_handle h, std::uint32_t layer) noexcept {
  save_state* Sp = save_of(h);
  if (!Sp || layer >= geometry_.num_layers) return errc::invalid_argument;
  save_state& S = *Sp;
  const stream_ref stream = *write_stream_;
  if (S.compute) {  // the copy starts only after the compute that wrote this layer
    if (errc e = copier_.record(S.computed[layer], *S.compute); e != errc::ok) return e;
    if (errc e = copier_.wait(stream, S.computed[layer]); e != errc::ok) return e;
  }
  const std::uint32_t tpb = geometry_.tokens_per_block;
  const std::size_t need = max_layer_segments(geometry_, S.source);
  std::size_t used = 0;
  const layer_shape& shape = geometry_.layers[layer];
  const kv_group& group = geometry_.groups[shape.group];
  const bool in_blocks = geometry_.in_blocks(group);
  if (!in_blocks) {  // the layer's state or window tail, into the checkpoint
    used = checkpoint_segments(S.ckpt_payloads, layer, S.source, S.tokens, copy_direction::from_engine, S.segments);
    if (used == 0) return errc::invalid_argument;
  }
  for (std::uint32_t i = 0; i < S.reservation.blocks() && in_blocks; ++i) {
    const std::uint64_t first_token = std::uint64_t(S.reservation.first_block() + i) * tpb;
    const std::uint32_t n = std::uint32_t(std::min<std::uint64_t>(tpb, S.tokens - first_token));
    if (S.segments.size() - used < need)
      if (errc e = flush_segments(S.segments, used, stream); e != errc::ok) return e;
    used += layer_segments(geometry_, S.payloads[i], layer, 0, first_token, n, S.source, copy_direction::from_engine,
                           std::span(S.segments).subspan(used));
  }
  if (errc e = flush_segments(S.segments, used, stream); e != errc::ok) return e;
  if (config_.keys_pre_rope)  // store keys without RoPE
    if (errc e = copier_.launch_host_fn(&hooks::strip_layer, &S.strips[layer], stream); e != errc::ok) return e;
  S.saved[layer] = 1;
  if (errc e = copier_.record(S.written[layer], stream); e != errc::ok) return e;
  // The layer's hashing runs on the lanes once its copies (and strip) have landed,
  // while the write stream goes on with the next layers.
  if (S.hashing && layer != S.next_hash_layer) S.hashing = false;  // out of order: hashed at commit
  if (S.hashing) {
    for (std::uint32_t lane = 0; lane < hash_lanes_.size() && S.hashing; ++lane) {
      const stream_ref ls = hash_lanes_[lane];
      if (copier_.wait(ls, S.written[layer]) != errc::ok ||
          copier_.launch_host_fn(&hooks::hash_layer, &S.hash_jobs[std::size_t(lane) * geometry_.num_layers + layer],
                                 ls) != errc::ok)
        S.hashing = false;  // the store hashes at commit; what was queued is drained first
      else
        S.lanes_used = true;
    }
    ++S.next_hash_layer;
  }
  return errc::ok;
}

inline errc hooks::finish_save(save_handle h) noexcept {
  save_state* Sp = save_of(h);
  if (!Sp) return errc::invalid_argument;
  save_state& S = *Sp;
  for (std::uint32_t l = 0; l < geometry_.num_layers; ++l)
    if (!S.saved[l]) {
      abort_save(h);
      return errc::bad_state;
    }
  errc status = errc::ok;
  for (std::uint32_t l = 0; l < geometry_.num_layers; ++l)
    if (errc e = copier_.synchronize(S.written[l]); e != errc::ok && status == errc::ok) status = e;
  if (errc e = drain_hashing(S); e != errc::ok) {
    S.hashing = false;
    if (status == errc::ok) status = e;
  }
  if (status != errc::ok) {
    abort_save(h);
    return status;
  }
  // A load of this session may still read the blocks this save replaces: it holds a
  // lease on them, so they stay until it finishes.
  if (S.hashing) {
    const std::uint32_t n = S.reservation.blocks();
    for (std::uint32_t i = 0; i < n; ++i) S.digests[i] = S.sums[i].digest();
    status = store_.commit(S.reservation, std::span<const std::uint64_t>(S.digests.data(), n));
  } else {
    status = store_.commit(S.reservation);
  }
  // The checkpoint goes second: until it lands, lookups find the new history without a
  // state for it, and reuse nothing.
  if (checkpoint_blocks_) {
    if (status == errc::ok)
      status = store_.commit(S.ckpt_reservation);
    else
      store_.abort(S.ckpt_reservation);
  }
  S.active = false;
  save_pool_.release(h.index);
  return status;
}

inline void hooks::abort_save(save_handle h) noexcept {
  save_state* Sp = save_of(h);
  if (!Sp) return;
  save_state& S = *Sp;
  for (std::uint32_t l = 0; l < geometry_.num_layers; ++l)
    if (S.saved[l]) (void)copier_.synchronize(S.written[l]);
  (void)drain_hashing(S);  // no lane may read the blocks once they go back
  store_.abort(S.reservation);
  if (checkpoint_blocks_) store_.abort(S.ckpt_reservation);
  S.active = false;
  save_pool_.release(h.index);
}

inline void hooks::checkpoint_tokens(std::span<const token_id> prefix, const request_keys& keys,
                                     std::span<token_id> out) const noexcept {
  struct {
    std::uint64_t tag = 0x5453'504b'4345'4843ull;  // "CHECKPST": the domain of state checkpoints
    std::uint64_t tokens;
    hash128 ids, keys;
  } in{};
  in.tokens = prefix.size();
  in.ids = hash_bytes128(prefix.data(), prefix.size_bytes());
  in.keys = block_keys(keys, 0, std::uint32_t(prefix.size()));
  const hash128 d = hash_bytes128(&in, sizeof in);
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::uint64_t x = d.lo + (i + 1) * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 31) ^ d.hi) * 0xBF58476D1CE4E5B9ull;
    out[i] = token_id(x >> 32);
  }
}

inline std::size_t hooks::state_segments(std::span<std::byte* const> payloads, std::size_t offset, std::size_t bytes,
                                         std::byte* engine, copy_direction dir,
                                         std::span<copy_segment> out) const noexcept {
  const std::size_t bb = geometry_.block_bytes();
  std::size_t n = 0;
  for (std::size_t done = 0; done < bytes;) {
    const std::size_t at = offset + done, block = at / bb, in = at % bb;
    const std::size_t len = std::min(bytes - done, bb - in);
    if (n == out.size() || block >= payloads.size()) return 0;
    out[n++] = dir == copy_direction::to_engine ? copy_segment{payloads[block] + in, engine + done, len}
                                                : copy_segment{engine + done, payloads[block] + in, len};
    done += len;
  }
  return n;
}

inline std::size_t hooks::tail_segments(std::span<std::byte* const> payloads, std::uint32_t layer,
                                        const kv_target& target, std::uint64_t end, copy_direction dir,
                                        std::span<copy_segment> out) const noexcept {
  const layer_shape& shape = geometry_.layers[layer];
  const kv_group& k = geometry_.groups[shape.group];
  const kv_group_target gt = target.group(shape.group);
  const kv_layout& L = *gt.layout;
  const std::size_t bb = geometry_.block_bytes(), row = k.row_bytes();
  const std::size_t head_bytes = std::size_t(k.head_dim) * dtype_size(k.dtype);
  const bool dense = L.head_stride == head_bytes;
  const std::uint64_t w = std::min<std::uint64_t>(k.window, end);
  std::size_t n = 0;
  auto emit = [&](std::size_t offset, std::byte* engine, std::size_t len) {
    for (std::size_t done = 0; done < len;) {  // a row may straddle two checkpoint blocks
      const std::size_t at = offset + done, block = at / bb, in = at % bb, piece = std::min(len - done, bb - in);
      if (n == out.size() || block >= payloads.size()) return false;
      out[n++] = dir == copy_direction::to_engine ? copy_segment{payloads[block] + in, engine + done, piece}
                                                  : copy_segment{engine + done, payloads[block] + in, piece};
      done += piece;
    }
    return true;
  };
  for (std::uint32_t side = 0; side < 2; ++side) {  // K rows, then V rows, `window` each
    std::byte* const base = side == 0 ? L.k_base[shape.in_group] : L.v_base[shape.in_group];
    for (std::uint64_t t = 0; t < w; ++t) {
      const std::uint64_t pos = end - w + t;
      std::byte* engine = base + std::size_t(gt.pages[pos / L.page_size]) * L.page_stride +
                          std::size_t(pos % L.page_size) * L.token_stride;
      const std::size_t offset = shape.checkpoint_offset + (side * std::size_t(k.window) + t) * row;
      if (dense) {
        if (!emit(offset, engine, row)) return 0;
      } else {
        for (std::uint32_t h = 0; h < k.num_kv_heads; ++h)
          if (!emit(offset + h * head_bytes, engine + std::size_t(h) * L.head_stride, head_bytes)) return 0;
      }
    }
  }
  return n;
}

inline std::size_t hooks::checkpoint_segments(std::span<std::byte* const> payloads, std::uint32_t layer,
                                              const kv_target& target, std::uint64_t end, copy_direction dir,
                                              std::span<copy_segment> out) const noexcept {
  const layer_shape& shape = geometry_.layers[layer];
  const kv_group& k = geometry_.groups[shape.group];
  if (k.kind != layer_kind::state) return end ? tail_segments(payloads, layer, target, end, dir, out) : 0;
  std::byte* engine = target.group(shape.group).layout->k_base[shape.in_group];
  return state_segments(payloads, shape.checkpoint_offset, k.state_bytes, engine, dir, out);
}

inline void hooks::zero_checkpoint(std::span<std::byte* const> payloads, std::size_t offset,
                                   std::size_t bytes) const noexcept {
  const std::size_t bb = geometry_.block_bytes();
  for (std::size_t done = 0; done < bytes;) {
    const std::size_t at = offset + done, piece = std::min(bytes - done, bb - at % bb);
    std::memset(payloads[at / bb] + at % bb, 0, piece);
    done += piece;
  }
}

inline lookup_result hooks::lookup(const session_key& session, std::span<const token_id> prompt,
                                   const request_keys& keys) noexcept {
  lookup_result r = store_.lookup(session, prompt, {}, keys);
  if (!checkpoint_blocks_ || r.tokens == 0) return r;
  // The state restores only at its checkpoint: the verified prefix must end exactly there.
  checkpoint_name name;
  token_id ids[max_checkpoint_tokens];
  const std::span<token_id> ckpt(ids, std::size_t(checkpoint_blocks_) * geometry_.tokens_per_block);
  if (!detail::checkpoint_key(session, name)) return {};
  checkpoint_tokens(prompt.first(std::size_t(r.tokens)), keys, ckpt);
  if (store_.lookup(name.key, ckpt).tokens != ckpt.size()) return {};
  return r;
}

inline errc hooks::close_session(const session_key& session) noexcept {
  const errc e = store_.drop(session);
  checkpoint_name name;
  if (checkpoint_blocks_ && detail::checkpoint_key(session, name)) {
    const errc c = store_.drop(name.key);
    if (e == errc::not_found) return c;
  }
  return e;
}

}  // namespace attnstore
