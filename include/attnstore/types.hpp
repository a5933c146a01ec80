// Core value types: KV geometry, model and session identities, 128-bit hashes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace attnstore {

/// "None" for every index the library hands around: a slot, a block, a record. Every
/// other name for it (tier_allocator::no_slot, policy::no_record...) is this value.
inline constexpr std::uint32_t no_slot = ~0u;

/// One token id as the engine's tokenizer produced it.
using token_id = std::uint32_t;

/// How many leading token ids `a` and `b` share.
constexpr std::size_t common_prefix(std::span<const token_id> a, std::span<const token_id> b) noexcept {
  const std::size_t n = a.size() < b.size() ? a.size() : b.size();
  std::size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

/// Element type of the stored K and V tensors. `bytes`: rows the engine lays out itself
/// (quantized KV such as llama.cpp's q8_0 blocks); stored and served as they are, never
/// re-rotated (a truncated view of them cannot move its keys).
enum class dtype : std::uint8_t { f32 = 0, f16 = 1, bf16 = 2, fp8_e4m3 = 3, bytes = 4 };

/// Whether keys of this type can be re-rotated (RoPE applied or removed) by attnstore.
constexpr bool rotatable(dtype d) noexcept { return d == dtype::f32 || d == dtype::f16 || d == dtype::bf16; }

constexpr std::size_t dtype_size(dtype d) noexcept {
  switch (d) {
    case dtype::f32:
      return 4;
    case dtype::f16:
    case dtype::bf16:
      return 2;
    case dtype::fp8_e4m3:
    case dtype::bytes:
      return 1;
  }
  return 0;
}

constexpr std::string_view to_string(dtype d) noexcept {
  switch (d) {
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::bf16:
      return "bf16";
    case dtype::fp8_e4m3:
      return "fp8_e4m3";
    case dtype::bytes:
      return "bytes";
  }
  return "unknown";
}

/// A 128-bit hash (XXH3-128). Used for chain hashes, model ids and session keys.
struct hash128 {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  friend constexpr bool operator==(const hash128&, const hash128&) = default;
  constexpr bool is_zero() const noexcept { return lo == 0 && hi == 0; }
};

/// What one layer keeps per token (or per sequence).
enum class layer_kind : std::uint8_t {
  full = 0,            ///< attention over every earlier token: K and V per token
  latent = 1,          ///< multi-head latent attention (MLA): one row per token, RoPE part last
  sliding_window = 2,  ///< attention over the last `window` tokens: K and V per token
  chunked = 3,         ///< attention within fixed chunks of `chunk` tokens: K and V per token
  state = 4,           ///< linear attention / SSM: a fixed-size state per sequence
};

constexpr std::string_view to_string(layer_kind k) noexcept {
  switch (k) {
    case layer_kind::full:
      return "full";
    case layer_kind::latent:
      return "latent";
    case layer_kind::sliding_window:
      return "sliding_window";
    case layer_kind::chunked:
      return "chunked";
    case layer_kind::state:
      return "state";
  }
  return "unknown";
}

/// Layers of one kind and shape. A model's KV is a list of these (kv_geometry::groups).
struct kv_group {
  layer_kind kind = layer_kind::full;
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;  ///< latent: 1 (one row per token)
  std::uint32_t head_dim = 0;      ///< latent: kv_lora_rank + rope_dims (DeepSeek-V3: 512 + 64)
  attnstore::dtype dtype = attnstore::dtype::f16;
  /// Dimensions of each key head that carry RoPE, counted from rope_first; 0 with
  /// rotary: the whole head (full, window, chunked); latent: the trailing rope part.
  std::uint32_t rope_dims = 0;
  bool rotary = true;  ///< keys carry RoPE (false: NoPE layers)
  /// Which of the model's RoPE specs the group's keys use: 0 the one given to the store
  /// and hooks; another value a spec of its own (Gemma 3's global layers: theta 1e6 and
  /// scaling, against 1e4 for its local ones). Loads that must re-rotate keys of a group
  /// other than 0 are refused (unsupported), never rotated with the wrong spec.
  std::uint8_t rope_variant = 0;
  std::uint32_t window = 0;       ///< sliding_window: tokens attended (gpt-oss 128, Gemma 3 1024)
  std::uint32_t chunk = 0;        ///< chunked: chunk length (Llama 4: 8192)
  std::uint64_t state_bytes = 0;  ///< state: bytes per sequence per layer
  /// How the group's values are quantized and scaled, as the engine names it (e.g.
  /// "fp8_e4m3 per-tensor k_scale=0.021 v_scale=0.018"): part of the model id, so
  /// caches written under other scales are never served. Inline per-token scales are
  /// part of the row: describe such rows with dtype::bytes.
  std::string_view quantization = {};

  /// Tensors per token: K and V, one latent row, or none (a state group keeps its
  /// bytes per sequence, in the session's checkpoint).
  constexpr std::uint32_t tensors() const noexcept {
    return kind == layer_kind::state ? 0 : kind == layer_kind::latent ? 1 : 2;
  }
  constexpr std::size_t row_bytes() const noexcept { return std::size_t(num_kv_heads) * head_dim * dtype_size(dtype); }
  /// Bytes one layer of the group keeps per token (0 for a state group).
  constexpr std::size_t token_layer_bytes() const noexcept {
    return kind == layer_kind::state ? 0 : tensors() * row_bytes();
  }
  /// First rotated dimension of a key head.
  constexpr std::uint32_t rope_first() const noexcept { return kind == layer_kind::latent ? head_dim - rope_dims : 0; }
  /// Rotated dimensions of a key head (0: keys are not rotated).
  constexpr std::uint32_t rotated_dims() const noexcept {
    if (!rotary || kind == layer_kind::state) return 0;
    return rope_dims ? rope_dims : head_dim;
  }
  friend bool operator==(const kv_group&, const kv_group&) = default;
};

/// Layer groups a geometry may have.
inline constexpr std::uint32_t kv_max_groups = 16;

/// One layer as a block holds it (derived by kv_geometry::validated()).
struct layer_shape {
  std::uint32_t group = 0;       ///< index into kv_geometry::groups
  std::uint32_t in_group = 0;    ///< this layer's index among its group's layers
  std::size_t offset = 0;        ///< of the layer's slice in a block's payload
  std::size_t tensor_bytes = 0;  ///< one tensor (K, V or the latent) of one block
  std::size_t bytes = 0;         ///< the whole slice: tensors x tensor_bytes (0 for a state layer)
  /// A layer kept in the checkpoint (state; a sliding window with window_tails): where
  /// its part starts in the checkpoint.
  std::size_t checkpoint_offset = 0;
  friend bool operator==(const layer_shape&, const layer_shape&) = default;
};

/// Shape of the KV cache of one model (one tensor-parallel rank).
///
/// A model is a list of layer groups (`groups`), each layer of a group the same shape;
/// `layer_group[l]` names layer l's group. A model whose every layer is full attention
/// of one shape may leave `groups` empty and set num_layers/num_kv_heads/head_dim/dtype:
/// validated() turns that into one group.
///
/// Block layout is layer-major: layer l's slice starts at layers[l].offset and holds
/// [K|V][token][kv_head][head_dim] (a latent layer: [token][row]), so one layer of one
/// block is one contiguous slice. Sizes are derived, never stored twice.
struct kv_geometry {
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;  ///< one-group form only (0 with groups)
  std::uint32_t head_dim = 0;      ///< one-group form only (0 with groups)
  attnstore::dtype dtype = attnstore::dtype::f16;
  std::uint32_t tokens_per_block = 0;       ///< 0: choose so a block is 1-4 MiB (see validate)
  std::vector<kv_group> groups{};           ///< empty: one full-attention group of the fields above
  std::vector<std::uint8_t> layer_group{};  ///< per layer; empty: groups' layers in order
  std::vector<layer_shape> layers{};        ///< derived by validated(); one per layer
  /// Sliding-window groups are kept only as the last `window` tokens before the
  /// checkpoint (the end of the last saved turn), not in every block: far fewer bytes
  /// for long conversations, but a session then resumes only at its checkpoint (an
  /// edit recomputes), as a model with state groups does. Part of the model id.
  bool window_tails = false;

  /// Whether layers of group `g` have a slice in every block (else: in the checkpoint).
  constexpr bool in_blocks(const kv_group& g) const noexcept {
    return g.kind != layer_kind::state && !(window_tails && g.kind == layer_kind::sliding_window);
  }

  /// Layer l's group (validated geometry).
  const kv_group& group_of(std::uint32_t l) const noexcept { return groups[layers[l].group]; }
  /// Whether every layer is full attention of one shape (what a v1 geometry was).
  bool uniform() const noexcept { return groups.size() <= 1 && (groups.empty() || groups[0].kind == layer_kind::full); }

  constexpr std::size_t element_bytes() const noexcept { return dtype_size(dtype); }
  /// One layer's part of the checkpoint: a state, or a window tail (K then V rows).
  static constexpr std::uint64_t checkpoint_layer_bytes(const kv_group& g) noexcept {
    return g.kind == layer_kind::state ? g.state_bytes : std::uint64_t(g.tensors()) * g.window * g.row_bytes();
  }
  /// A sequence's checkpoint: every checkpointed layer's part, in layer order.
  constexpr std::uint64_t checkpoint_bytes() const noexcept {
    std::uint64_t t = 0;
    for (const kv_group& g : groups)
      if (!in_blocks(g)) t += checkpoint_layer_bytes(g) * g.num_layers;
    return t;
  }
  /// Everything one token adds to the blocks across all layers (layers kept in the
  /// checkpoint excluded).
  constexpr std::size_t token_bytes() const noexcept {
    if (groups.empty()) return 2ull * num_kv_heads * head_dim * element_bytes() * num_layers;
    std::size_t t = 0;
    for (const kv_group& g : groups)
      if (in_blocks(g)) t += g.token_layer_bytes() * g.num_layers;
    return t;
  }
  /// K and V of one token in one layer (one-group form).
  constexpr std::size_t token_layer_bytes() const noexcept { return 2ull * num_kv_heads * head_dim * element_bytes(); }
  /// Bytes of K (or V) of one layer of one block (one-group form).
  constexpr std::size_t half_layer_bytes() const noexcept {
    return std::size_t(tokens_per_block) * num_kv_heads * head_dim * element_bytes();
  }
  /// One layer of one block (K then V): one contiguous slice (one-group form).
  constexpr std::size_t layer_bytes() const noexcept { return 2 * half_layer_bytes(); }
  /// A whole block, all layers.
  constexpr std::size_t block_bytes() const noexcept { return std::size_t(tokens_per_block) * token_bytes(); }
  /// Blocks needed for `tokens` tokens (the last one may be partial).
  constexpr std::uint32_t blocks_for(std::size_t tokens) const noexcept {
    return tokens_per_block ? std::uint32_t((tokens + tokens_per_block - 1) / tokens_per_block) : 0;
  }
  /// A stable text form of every group (kind, layers, shape, dtype, rope, window,
  /// quantization) and the layer order: what the model id and MANIFEST record.
  std::string describe() const {
    std::string s;
    for (const kv_group& g : groups) {
      s += std::string(to_string(g.kind)) + ":" + std::to_string(g.num_layers) + "x" + std::to_string(g.num_kv_heads) +
           "x" + std::to_string(g.head_dim) + ":" + std::string(to_string(g.dtype)) + ":rope" +
           std::to_string(g.rotated_dims()) + "@" + std::to_string(g.rope_first()) + "v" +
           std::to_string(g.rope_variant) + ":w" + std::to_string(g.window) + ":c" + std::to_string(g.chunk) + ":s" +
           std::to_string(g.state_bytes) + ":q=" + std::string(g.quantization) + ";";
    }
    s += "order=";
    for (const layer_shape& l : layers) s += char('a' + (l.group % 26));
    if (window_tails) s += ";window_tails";
    return s;
  }

  friend bool operator==(const kv_geometry&, const kv_geometry&) = default;

  /// Checks every field, fills tokens_per_block when it is 0, turns the one-group form
  /// into groups and derives `layers`. Throws std::invalid_argument naming the field
  /// and the allowed range.
  kv_geometry validated() const {
    auto fail = [](const std::string& what) { throw std::invalid_argument("kv_geometry: " + what); };
    kv_geometry g = *this;
    if (g.groups.empty()) {
      if (num_layers == 0 || num_layers > 1024)
        fail("num_layers is " + std::to_string(num_layers) + ", allowed 1..1024");
      g.groups.push_back(kv_group{.kind = layer_kind::full,
                                  .num_layers = num_layers,
                                  .num_kv_heads = num_kv_heads,
                                  .head_dim = head_dim,
                                  .dtype = dtype});
      g.layer_group.clear();
    } else {
      // The one-group form, once validated, keeps both (validated() is idempotent).
      const bool one_group_form = g.groups.size() == 1 && g.groups[0].kind == layer_kind::full &&
                                  g.groups[0].num_kv_heads == num_kv_heads && g.groups[0].head_dim == head_dim &&
                                  g.groups[0].dtype == dtype;
      if ((num_kv_heads != 0 || head_dim != 0) && !one_group_form)
        fail("num_kv_heads/head_dim are set together with groups; give each group its shape instead");
      if (g.groups.size() > kv_max_groups)
        fail("groups has " + std::to_string(g.groups.size()) + " entries, allowed 1.." + std::to_string(kv_max_groups));
      std::uint64_t total = 0;
      for (const kv_group& k : g.groups) total += k.num_layers;
      if (num_layers != 0 && num_layers != total)
        fail("num_layers is " + std::to_string(num_layers) + " but the groups hold " + std::to_string(total) +
             " layers (set 0 or the sum)");
      if (total == 0 || total > 1024) fail("the groups hold " + std::to_string(total) + " layers, allowed 1..1024");
      g.num_layers = std::uint32_t(total);
      g.dtype = g.groups[0].dtype;
    }
    for (std::size_t i = 0; i < g.groups.size(); ++i) {
      const kv_group& k = g.groups[i];
      const std::string name = "group " + std::to_string(i) + " (" + std::string(to_string(k.kind)) + "): ";
      if (std::uint8_t(k.kind) > std::uint8_t(layer_kind::state)) fail(name + "kind is not one of the five kinds");
      if (k.num_layers == 0) fail(name + "num_layers is 0");
      if (k.kind == layer_kind::state) {
        // Kept per sequence, in the checkpoint the hooks save at each turn's end.
        if (k.state_bytes == 0 || k.state_bytes > (std::uint64_t(1) << 30))
          fail(name + "state_bytes is " + std::to_string(k.state_bytes) + ", allowed 1..1073741824");
        if (k.window || k.chunk || k.rope_dims)
          fail(name + "window, chunk and rope_dims do not apply to a state group");
        continue;
      }
      if (k.state_bytes != 0) fail(name + "state_bytes is set on a group that keeps KV per token");
      if (k.num_kv_heads == 0 || k.num_kv_heads > 4096)
        fail(name + "num_kv_heads is " + std::to_string(k.num_kv_heads) + ", allowed 1..4096");
      if (k.kind == layer_kind::latent && k.num_kv_heads != 1)
        fail(name + "num_kv_heads is " + std::to_string(k.num_kv_heads) +
             "; a latent group keeps one row per token (1)");
      if (k.head_dim == 0 || k.head_dim > 4096)
        fail(name + "head_dim is " + std::to_string(k.head_dim) + ", allowed 1..4096");
      if (dtype_size(k.dtype) == 0)
        fail(name + "dtype is " + std::to_string(int(k.dtype)) + ", allowed f32, f16, bf16, fp8_e4m3, bytes");
      if (k.rope_dims > k.head_dim || k.rope_dims % 2)
        fail(name + "rope_dims is " + std::to_string(k.rope_dims) + ", must be even and at most head_dim");
      if (k.kind == layer_kind::latent && k.rotary && k.rope_dims == 0)
        fail(name + "a rotary latent group needs rope_dims (the trailing RoPE part of its row)");
      if (k.kind == layer_kind::sliding_window && (k.window == 0 || k.window > (1u << 24)))
        fail(name + "window is " + std::to_string(k.window) + ", allowed 1..16777216");
      if (k.kind != layer_kind::sliding_window && k.window != 0) fail(name + "window is set on a group without one");
      if (k.kind == layer_kind::chunked && (k.chunk == 0 || k.chunk > (1u << 24)))
        fail(name + "chunk is " + std::to_string(k.chunk) + ", allowed 1..16777216");
      if (k.kind != layer_kind::chunked && k.chunk != 0) fail(name + "chunk is set on a group without one");
    }
    if (!g.layer_group.empty()) {
      if (g.layer_group.size() != g.num_layers)
        fail("layer_group has " + std::to_string(g.layer_group.size()) + " entries for " +
             std::to_string(g.num_layers) + " layers");
      std::vector<std::uint32_t> count(g.groups.size(), 0);
      for (std::uint8_t gi : g.layer_group) {
        if (gi >= g.groups.size())
          fail("layer_group names group " + std::to_string(gi) + " of " + std::to_string(g.groups.size()));
        ++count[gi];
      }
      for (std::size_t i = 0; i < g.groups.size(); ++i)
        if (count[i] != g.groups[i].num_layers)
          fail("layer_group gives group " + std::to_string(i) + " " + std::to_string(count[i]) +
               " layers, the group says " + std::to_string(g.groups[i].num_layers));
    } else {
      for (std::size_t i = 0; i < g.groups.size(); ++i)
        g.layer_group.insert(g.layer_group.end(), g.groups[i].num_layers, std::uint8_t(i));
    }
    if (g.tokens_per_block == 0) g.tokens_per_block = g.default_tokens_per_block();
    if (g.tokens_per_block > 65536)
      fail("tokens_per_block is " + std::to_string(g.tokens_per_block) + ", allowed 1..65536 (0 = auto)");
    g.layers.assign(g.num_layers, layer_shape{});
    std::vector<std::uint32_t> seen(g.groups.size(), 0);
    std::size_t offset = 0, checkpoint_offset = 0;
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      const std::uint32_t gi = g.layer_group[l];
      const kv_group& k = g.groups[gi];
      layer_shape& s = g.layers[l];
      s.group = gi;
      s.in_group = seen[gi]++;
      s.offset = offset;
      if (g.in_blocks(k)) {
        s.tensor_bytes = std::size_t(g.tokens_per_block) * k.row_bytes();
        s.bytes = s.tensor_bytes * k.tensors();
        offset += s.bytes;
      } else {
        s.checkpoint_offset = checkpoint_offset;
        checkpoint_offset += checkpoint_layer_bytes(k);
      }
    }
    if (g.block_bytes() == 0)
      fail("no group keeps KV in blocks (state groups, or windows with window_tails): at least one must");
    if (g.block_bytes() > (std::size_t(1) << 30))
      fail("one block is " + std::to_string(g.block_bytes()) +
           " bytes; a block must be at most 1 GiB (lower tokens_per_block)");
    return g;
  }

  /// Smallest power-of-two token count that makes a block at least 1 MiB (so at most
  /// 2 MiB unless one token alone is larger), capped at 4096 tokens.
  constexpr std::uint32_t default_tokens_per_block() const noexcept {
    std::size_t per_token = token_bytes();
    if (per_token == 0) return 16;
    std::uint32_t t = 1;
    while (t < 4096 && per_token * t < (std::size_t(1) << 20)) t *= 2;
    return t;
  }
};

/// Fingerprint of everything that makes a KV cache valid for a model: the weights
/// (name and revision or checksum), the tokenizer, every layer group's kind, shape,
/// dtype and quantization, the positional-encoding spec, whether keys are stored before
/// RoPE, the parallel layout (tensor and pipeline ranks) and the engine's layout
/// version. A cache written under one model_id is never served under another.
struct model_id {
  hash128 value;
  friend constexpr bool operator==(const model_id&, const model_id&) = default;
};

/// What a model_id is computed from.
struct model_descriptor {
  std::string_view name;           ///< model name or weights checksum
  kv_geometry geometry;            ///< validated geometry
  std::string_view rope = "none";  ///< positional-encoding spec, serialized
  bool keys_pre_rope = false;      ///< keys stored before positional encoding
  std::uint32_t tp_rank = 0;
  std::uint32_t tp_size = 1;
  std::string_view weights_revision = {};  ///< a revision, commit or checksum of the weights
  std::string_view tokenizer = {};         ///< tokenizer name and revision (or a hash of its files)
  std::uint32_t pp_rank = 0;               ///< pipeline-parallel stage
  std::uint32_t pp_size = 1;
  std::uint32_t layout_version = 0;  ///< the engine's own KV layout version
};

/// A multimodal input's content hash at its placeholder tokens: the block(s) holding
/// [first_token, first_token + tokens) are keyed by it, so another image at the same
/// placeholders (same token ids) ends reuse there.
struct media_span {
  std::uint64_t first_token = 0;
  std::uint32_t tokens = 0;
  hash128 content{};
  friend constexpr bool operator==(const media_span&, const media_span&) = default;
};

/// Per-request keys that enter the chain hash besides the token ids. A request without
/// any (the default) hashes as plain tokens. All views; nothing is kept past the call.
struct request_keys {
  std::string_view lora = {};              ///< LoRA adapter id ("" for the base weights): keys every block
  std::string_view salt = {};              ///< cache salt (tenant isolation): keys every block
  std::span<const media_span> media = {};  ///< sorted by first_token, non-overlapping
  bool empty() const noexcept { return lora.empty() && salt.empty() && media.empty(); }
};

/// Computes the model_id of a descriptor (defined in hash.hpp's implementation).
model_id make_model_id(const model_descriptor& d) noexcept;

/// Identity of a conversation: (tenant, session). A non-owning view; the store only
/// keeps its 128-bit hash, so ids never reach a file name or outlive the call.
struct session_key {
  std::string_view tenant;
  std::string_view session;
};

/// Hash of a session_key, tenant-separated. The index is keyed by this.
struct session_hash {
  hash128 value;
  friend constexpr bool operator==(const session_hash&, const session_hash&) = default;
};

/// A 64-bit name of a session, never 0: what an eviction policy remembers an evicted
/// session by (policy::eviction_policy::on_insert, on_miss).
constexpr std::uint64_t identity_of(const session_hash& h) noexcept {
  const std::uint64_t v = h.value.lo ^ h.value.hi;
  return v != 0 ? v : 1;
}

}  // namespace attnstore
