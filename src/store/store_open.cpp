// Opening a store: configuration checks, the MANIFEST, recovery from the SSD tier's
// block headers; and closing it: the DRAM tier flushed to SSD, everything durable.
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

#include "attnstore/format/manifest.hpp"
#include "attnstore/io/posix_device.hpp"
#include "attnstore/io/uring_device.hpp"
#include "attnstore/policy/lru.hpp"
#include "attnstore/policy/scheduler_aware.hpp"
#include "store_impl.hpp"

namespace attnstore {

std::string detail::hex128(const hash128& h) { return format::hex128(h); }

namespace {

using format::parse_hex128;

hash128 random_secret() {
  hash128 h;
  std::uint64_t words[2];
  std::size_t got = 0;
  while (got < sizeof(words)) {
    ssize_t n = ::getrandom(reinterpret_cast<char*>(words) + got, sizeof(words) - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("store: getrandom failed: ") + std::strerror(errno));
    }
    got += std::size_t(n);
  }
  h.lo = words[0];
  h.hi = words[1];
  return h;
}

// fsync of a directory: makes a file created or renamed in it durable.
bool sync_directory(const std::string& dir) noexcept {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

constexpr std::uint64_t max_file_bytes = std::uint64_t(16) << 30;

}  // namespace

model_id store_model_id(const store_config& config) {
  return make_model_id(model_descriptor{.name = config.model_name,
                                        .geometry = config.geometry.validated(),
                                        .rope = config.rope,
                                        .keys_pre_rope = config.keys_pre_rope,
                                        .tp_rank = config.tp_rank,
                                        .tp_size = config.tp_size,
                                        .weights_revision = config.weights_revision,
                                        .tokenizer = config.tokenizer,
                                        .pp_rank = config.pp_rank,
                                        .pp_size = config.pp_size,
                                        .layout_version = config.layout_version});
}

store::impl::impl(store& owner, store_config c) : owner_(owner), config_(std::move(c)) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("store_config: " + m); };
  geometry_ = config_.geometry.validated();
  if (config_.model_name.empty()) fail("model_name is empty; give the model name or its weights checksum");
  if (config_.tp_size == 0 || config_.tp_rank >= config_.tp_size)
    fail("tp_rank is " + std::to_string(config_.tp_rank) + " with tp_size " + std::to_string(config_.tp_size) +
         "; need tp_size >= 1 and tp_rank < tp_size");
  if (config_.pp_size == 0 || config_.pp_rank >= config_.pp_size)
    fail("pp_rank is " + std::to_string(config_.pp_rank) + " with pp_size " + std::to_string(config_.pp_size) +
         "; need pp_size >= 1 and pp_rank < pp_size");
  if (config_.queue_depth == 0 || config_.queue_depth > 1024)
    fail("queue_depth is " + std::to_string(config_.queue_depth) + ", allowed 1..1024");
  if (config_.max_sessions == 0) fail("max_sessions is 0, must be at least 1");
  model_ = store_model_id(config_);
  header_bytes_ = format::header_bytes(geometry_.tokens_per_block);
  slot_bytes_ = format::slot_bytes(geometry_);
  if (config_.dram_bytes < slot_bytes_)
    fail("dram_bytes is " + std::to_string(config_.dram_bytes) + ", must hold at least one block (" +
         std::to_string(slot_bytes_) + " bytes with its header)");
  if (config_.ssd_directory.empty() && config_.ssd_bytes > 0) fail("ssd_bytes is set but ssd_directory is empty");
  if (!config_.ssd_directory.empty() && config_.ssd_bytes < slot_bytes_)
    fail("ssd_bytes is " + std::to_string(config_.ssd_bytes) + ", must hold at least one block (" +
         std::to_string(slot_bytes_) + " bytes with its header)");
  if (config_.queue_window == 0 || config_.queue_window > (1u << 20))
    fail("queue_window is " + std::to_string(config_.queue_window) + ", allowed 1..1048576");
  if (!(config_.demote_low_watermark >= 0 && config_.demote_low_watermark <= config_.demote_high_watermark &&
        config_.demote_high_watermark < 1))
    fail("demote_low_watermark " + std::to_string(config_.demote_low_watermark) + " and demote_high_watermark " +
         std::to_string(config_.demote_high_watermark) + ": need 0 <= low <= high < 1");
  if (config_.prefetch_bytes_in_flight && config_.prefetch_bytes_in_flight < geometry_.block_bytes())
    fail("prefetch_bytes_in_flight is " + std::to_string(config_.prefetch_bytes_in_flight) +
         ", must be 0 (automatic) or at least one block (" + std::to_string(geometry_.block_bytes()) + " bytes)");

  const bool pin = config_.pin_host_memory;
  dram_ = std::make_unique<host_arena>(host_arena_options{slot_bytes_, config_.dram_bytes, format::sector,
                                                          std::size_t(1) << 30, pin, pin, false, config_.log});
  dram_leases_ = std::make_unique<std::atomic<std::uint32_t>[]>(dram_->capacity());
  for (std::uint32_t i = 0; i < dram_->capacity(); ++i) dram_leases_[i].store(0, std::memory_order_relaxed);
  zeros_.reset(std::aligned_alloc(format::sector, slot_bytes_));
  if (!zeros_) throw std::bad_alloc();
  std::memset(zeros_.get(), 0, slot_bytes_);
  counters_ = std::make_unique<counters>();
  prefetched_at_ = std::make_unique<std::atomic<std::uint64_t>[]>(config_.max_sessions);
  (void)detail::ns_per_tick();  // calibrated here (once per process), not on a request's path

  std::uint32_t ssd_slots = 0;
  if (!config_.ssd_directory.empty()) {
    // The MANIFEST is checked before the slot files are touched: a refused reopen
    // changes nothing in the directory.
    write_or_check_manifest();
    const unsigned staging = config_.staging_blocks ? config_.staging_blocks : 4 * config_.queue_depth;
    staging_ = std::make_unique<host_arena>(host_arena_options{slot_bytes_, std::size_t(staging) * slot_bytes_,
                                                               format::sector, std::size_t(1) << 30, pin, pin, false,
                                                               attnstore::logger{&logger::quiet, nullptr}});
    ssd_ = std::make_unique<ssd_space>(ssd_space_options{config_.ssd_directory, slot_bytes_, config_.ssd_bytes,
                                                         max_file_bytes, config_.direct_io, config_.require_direct_io,
                                                         true, 2000, config_.log});
    ssd_slots = ssd_->capacity();
    // The slot files' names (created or extended just now) are durable before any
    // block is acknowledged as written to them.
    if (!sync_directory(config_.ssd_directory))
      throw std::runtime_error("store: cannot sync directory " + config_.ssd_directory);
    std::string why;
    if (config_.backend != io_backend::posix) {
      device_ =
          make_uring_device(ssd_->fds(), uring_options{std::max(config_.queue_depth, 8u), true, true, 4096}, &why);
      if (!device_) {
        if (config_.backend == io_backend::io_uring)
          throw std::runtime_error("store: io_uring requested but unavailable: " + why);
        config_.log(log_level::warning, "store: io_uring unavailable (" + why + "); using pread/pwrite");
      }
    }
    if (!device_)
      device_ = make_posix_device(ssd_->fds(), posix_options{config_.posix_threads, config_.queue_depth, 4096});
    if (config_.wrap_device) device_ = config_.wrap_device(std::move(device_), *ssd_);
    std::vector<iovec> regions(dram_->regions().begin(), dram_->regions().end());
    staging_buffer_base_ = std::int32_t(regions.size());
    regions.insert(regions.end(), staging_->regions().begin(), staging_->regions().end());
    if (!device_->register_buffers(regions, &why)) config_.log(log_level::info, "store: " + why);
  } else {
    secret_ = random_secret();  // nothing outlives the process: any secret will do
  }
  if (config_.make_policy) {
    policy_ = config_.make_policy(config_.max_sessions);
    if (!policy_) fail("make_policy returned no policy");
    if (policy_->max_sessions() < config_.max_sessions)
      fail("make_policy made a policy for " + std::to_string(policy_->max_sessions()) + " sessions, need " +
           std::to_string(config_.max_sessions));
  } else {
    // The window is set at each set_queue(): fixed, or the paper's rule from the sizes
    // stored then.
    const std::uint64_t capacity_blocks = std::uint64_t(dram_->capacity()) + ssd_slots;
    if (config_.eviction_policy == "scheduler_aware") {
      policy_ = std::make_unique<policy::scheduler_aware>(
          policy::scheduler_aware_options{config_.max_sessions, config_.eviction_window, capacity_blocks});
    } else if (config_.eviction_policy == "lru") {
      policy_ = std::make_unique<policy::lru>(config_.max_sessions);
    } else if (config_.eviction_policy == "predictive") {
      policy::predictive_options po;
      po.max_sessions = config_.max_sessions;
      po.eviction_window = config_.eviction_window;
      po.capacity_blocks = capacity_blocks;
      po.ticks_per_second = 1e9;  // now() is in nanoseconds
      po.tokens_per_block = geometry_.tokens_per_block;
      if (config_.remote) po.share_horizon_s = std::max(1.0, config_.remote->retention_s());
      auto p = std::make_unique<policy::predictive>(po);
      predictive_ = p.get();
      policy_ = std::move(p);
    } else {
      fail("eviction_policy is \"" + config_.eviction_policy +
           "\"; known: scheduler_aware, lru, predictive (or set make_policy)");
    }
  }
  held_.assign(config_.max_sessions, 0);
  if (config_.remote) {
    remote_ids_.assign(config_.max_sessions, remote_session{});
    remote_state_ = std::make_unique<remote_record[]>(config_.max_sessions);
  }
  // A tenant entry lives while one of its sessions does, or while it has a quota of its
  // own: max_sessions plus the configured tenants can never run out.
  tenants_ = std::make_unique<detail::tenant_table>(config_.max_sessions +
                                                    std::uint32_t(config_.tenant_quotas.size() + spare_tenants));
  record_tenant_.assign(config_.max_sessions, no_slot);
  noted_dram_.assign(config_.max_sessions, 0);
  noted_ssd_.assign(config_.max_sessions, 0);
  for (const tenant_quota& q : config_.tenant_quotas)
    if (set_tenant_quota(q.tenant, q.dram_bytes, q.ssd_bytes) != errc::ok) fail("tenant_quotas: too many tenants");
  queue_records_.assign(config_.queue_window, policy::no_record);
  queue_hashes_.resize(config_.queue_window);
  // A block always holds a slot; the extra DRAM-sized share covers blocks being
  // replaced (old and new both exist until the new ones are published).
  // The table exists without sharing too: slots shared before (recovered from LINKS)
  // keep their holder counts until they are let go.
  const bool sharing = config_.share_prefixes != prefix_sharing::off;
  sharing_ = sharing;
  content_ = std::make_unique<detail::content_table>(dram_->capacity(), ssd_slots);
  if (ssd_) links_ = std::make_unique<detail::link_log>(config_.ssd_directory);
  header_claims_ = std::make_unique<std::atomic<bool>[]>(dram_->capacity());
  for (std::uint32_t i = 0; i < dram_->capacity(); ++i) header_claims_[i].store(false, std::memory_order_relaxed);
  const std::uint64_t max_blocks = config_.max_blocks
                                       ? config_.max_blocks
                                       : (std::uint64_t(dram_->capacity()) * 2 + ssd_slots) * (sharing ? 4 : 1) + 64;
  if (max_blocks >= no_slot) fail("dram_bytes and ssd_bytes hold too many blocks (max 2^31)");
  if (max_blocks < std::uint64_t(dram_->capacity()) + 1)
    fail("max_blocks is " + std::to_string(max_blocks) + ", must be 0 (automatic) or more than the DRAM slots (" +
         std::to_string(dram_->capacity()) + ")");
  index_ = std::make_unique<cache_index>(
      cache_index_options{config_.max_sessions, std::uint32_t(max_blocks), geometry_.tokens_per_block, 64});
  if (ssd_) {
    const auto t0 = std::chrono::steady_clock::now();
    recover();
    counters_->recovery_ns.store(std::uint64_t(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()));
    if (config_.prefetch) {
      const std::uint64_t bound =
          config_.prefetch_bytes_in_flight
              ? config_.prefetch_bytes_in_flight
              : std::max<std::uint64_t>(64ull << 20, 4 * std::uint64_t(geometry_.block_bytes()));
      const std::uint64_t for_prefetch =
          config_.dram_for_prefetch_bytes ? config_.dram_for_prefetch_bytes : config_.dram_bytes / 4;
      prefetcher_ = std::make_unique<policy::prefetcher>(
          policy::prefetcher_options{config_.max_sessions, geometry_.block_bytes(), bound, config_.prefetch_window,
                                     std::max<std::uint64_t>(1, for_prefetch)});
      jobs_.resize(config_.max_sessions);
    }
    watermark_ =
        policy::demotion_watermark::of(dram_->capacity(), config_.demote_low_watermark, config_.demote_high_watermark);
  }
  const bool work = prefetcher_ || watermark_.low > 0 || config_.session_ttl_ms > 0 || config_.remote;
  if (config_.background_thread && work) worker_ = std::thread([this] { background_loop(); });
}

store::impl::~impl() {
  (void)close();
  stop_background();
}

store_stats store::impl::stats() const noexcept {
  store_stats s;
#define ATTNSTORE_X(name) s.name = counters_->name.load(std::memory_order_relaxed);
  ATTNSTORE_STORE_COUNTERS(ATTNSTORE_X)
#undef ATTNSTORE_X
  s.dram_used_bytes = std::uint64_t(dram_->used()) * slot_bytes_;
  s.dram_capacity_bytes = std::uint64_t(dram_->capacity()) * slot_bytes_;
  if (ssd_) {
    s.ssd_used_bytes = std::uint64_t(ssd_->used()) * slot_bytes_;
    s.ssd_capacity_bytes = std::uint64_t(ssd_->capacity()) * slot_bytes_;
  }
  s.sessions = index_->live_sessions();
  if (content_) {
    const detail::content_table::usage u = content_->count();
    s.shared_dram_slots = u.shared_slots[0];
    s.shared_ssd_slots = u.shared_slots[1];
    s.dedup_dram_blocks = u.extra_holders[0];
    s.dedup_ssd_blocks = u.extra_holders[1];
  }
  return s;
}

errc store::impl::flush() noexcept {
  if (!device_) return errc::unsupported;
  const errc e = device_->sync();
  return e != errc::ok ? e : sync_links();
}

// ---------------------------------------------------------------- close

errc store::impl::close() noexcept {
  std::lock_guard lock(close_mutex_);
  if (closed_.exchange(true)) return errc::ok;
  stop_background();
  if (!ssd_) return errc::unsupported;
  errc status = errc::ok;
  const auto start = std::chrono::steady_clock::now();
  const auto bound = std::chrono::milliseconds(config_.close_flush_ms);
  std::uint64_t before = counters_->demoted_blocks.load();
  std::uint32_t left = 0;
  for (std::uint32_t rec = 0; config_.close_flush_ms > 0 && rec < index_->max_sessions(); ++rec) {
    locked_session s = index_->try_open_record(rec);
    if (!s || s.dram_blocks() == 0) continue;
    if (std::chrono::steady_clock::now() - start > bound) {
      left += s.dram_blocks();
      status = errc::retry;
      continue;
    }
    // Only free SSD slots: closing must not drop one session to keep another.
    if (errc e = demote_locked(s, no_slot, no_slot, false); e != errc::ok && status == errc::ok) status = e;
    left += s.dram_blocks();  // whatever could not go (no room, I/O error)
  }
  const std::uint64_t flushed = counters_->demoted_blocks.load() - before;
  detail::bump(counters_->close_flushed_blocks, flushed);
  if (device_->sync() != errc::ok || sync_links() != errc::ok) {
    status = errc::device_error;
  } else if (!mark_clean()) {
    config_.log(log_level::warning,
                "store: cannot write " + config_.ssd_directory + "/CLEAN; the next open verifies every block");
  }
  if (left > 0)
    config_.log(log_level::warning, "store: close left " + std::to_string(left) + " DRAM blocks unwritten (" +
                                        std::string(to_string(status)) + "); they are lost at this restart");
  return status;
}

// ---------------------------------------------------------------- clean shutdown marker

// CLEAN exists only between a close() that made every write durable and the next open:
// then no write can be torn and recovery reads headers only. Any other open (after a
// crash) also reads and checks every payload, since a write in flight at the crash
// may have left a valid header over a torn payload.
bool store::impl::mark_clean() noexcept {
  const std::string path = config_.ssd_directory + "/CLEAN";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok && sync_directory(config_.ssd_directory);
}

bool store::impl::take_clean_mark() {
  const std::string path = config_.ssd_directory + "/CLEAN";
  if (::access(path.c_str(), F_OK) != 0) return false;
  // Gone before anything is written: a crash from now on is seen as one.
  if (::unlink(path.c_str()) != 0 || !sync_directory(config_.ssd_directory))
    throw std::runtime_error("store: cannot remove " + path + ": " + std::strerror(errno));
  return true;
}

// ---------------------------------------------------------------- tombstones

bool store::impl::write_tombstone(const session_hash& key) noexcept {
  const std::string path = config_.ssd_directory + "/TOMBSTONES";
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  bool created = false;
  if (fd < 0 && errno == ENOENT) {
    fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    created = true;
  }
  if (fd < 0) return false;
  // The bound is above every sequence the session's blocks carry: recovery ignores
  // them, and a session re-created later numbers its blocks above it.
  const std::uint64_t rec[3] = {key.value.lo, key.value.hi, sequence_.load()};
  bool ok = ::write(fd, rec, sizeof(rec)) == ssize_t(sizeof(rec)) && ::fdatasync(fd) == 0;
  ::close(fd);
  if (ok && created) ok = sync_directory(config_.ssd_directory);  // the new file's name too
  return ok;
}

// ---------------------------------------------------------------- manifest

void store::impl::write_or_check_manifest() {
  const std::string path = config_.ssd_directory + "/MANIFEST";
  const std::uint64_t slots = config_.ssd_bytes / slot_bytes_;
  const std::uint64_t per_file = std::min<std::uint64_t>(max_file_bytes / slot_bytes_, slots);
  // Checked in this order: geometry first (the clearer message), then the capacity
  // (slot placement depends on it), the model id last.
  const std::vector<std::pair<std::string, std::string>> want{
      {"format_version", std::to_string(format::format_version)},
      {"num_layers", std::to_string(geometry_.num_layers)},
      {"layer_groups", geometry_.describe()},
      {"block_bytes", std::to_string(geometry_.block_bytes())},
      {"tokens_per_block", std::to_string(geometry_.tokens_per_block)},
      {"slot_bytes", std::to_string(slot_bytes_)},
      {"ssd_slots", std::to_string(slots)},
      {"slots_per_file", std::to_string(per_file)},
      {"model_id", detail::hex128(model_.value)},
  };
  if (const auto manifest = format::read_manifest(config_.ssd_directory)) {
    const auto& have = *manifest;
    for (const auto& [k, v] : want) {
      auto it = have.find(k);
      const std::string got = it == have.end() ? "(missing)" : it->second;
      if (got == v) continue;
      if (k == "model_id")
        throw std::runtime_error("store: " + config_.ssd_directory + " holds KV of another model (model_id " + got +
                                 ", this store's is " + v +
                                 "): model name, weights revision, tokenizer, layer groups, RoPE spec, keys_pre_rope, "
                                 "tensor- or pipeline-parallel rank or layout version differ. Use another directory or "
                                 "remove this one.");
      if (k == "ssd_slots")
        throw std::runtime_error("store: " + config_.ssd_directory + " was written with ssd_slots=" + got +
                                 " but this store is configured with ssd_slots=" + v + " (ssd_bytes " +
                                 std::to_string(config_.ssd_bytes) +
                                 "); blocks are placed by capacity, so it must not change. Set ssd_bytes to " + got +
                                 " x " + std::to_string(slot_bytes_) + " bytes, or use another directory.");
      throw std::runtime_error("store: " + config_.ssd_directory + " was written with " + k + "=" + got +
                               " but this store is configured with " + k + "=" + v +
                               ". Use another directory or remove this one.");
    }
    auto it = have.find("secret");
    if (it == have.end() || !parse_hex128(it->second, secret_))
      throw std::runtime_error("store: " + path + " has no valid secret line; the file is damaged");
    return;
  }
  secret_ = random_secret();
  // The directory may not exist yet: parents as mkdir -p would, the store's own 0700.
  {
    std::error_code ec;
    auto parent = std::filesystem::path(config_.ssd_directory).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    if (::mkdir(config_.ssd_directory.c_str(), 0700) != 0 && errno != EEXIST)
      throw std::runtime_error("store: cannot create directory " + config_.ssd_directory + ": " + std::strerror(errno));
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "# attnstore store manifest: do not edit\n";
    for (const auto& [k, v] : want) out << k << '=' << v << '\n';
    out << "secret=" << detail::hex128(secret_) << '\n';
    if (!out) throw std::runtime_error("store: cannot write " + tmp);
  }
  ::chmod(tmp.c_str(), 0600);  // the secret keys the session hashes
  int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("store: cannot sync " + tmp);
  }
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("store: cannot create " + path);
  if (!sync_directory(config_.ssd_directory))
    throw std::runtime_error("store: cannot sync directory " + config_.ssd_directory);
}

// ---------------------------------------------------------------- recovery

// Recovery reads the header area of each slot (after a clean close; after a crash the
// whole slot, checking the payload too: see mark_clean), then decides per session which
// blocks form its latest committed history:
//  1. A put numbers its blocks put_id + (index - put_first_block). Puts are judged
//     newest first. A put replaces its session's blocks from its first block on, so a
//     block of an older put at or past the first block of a newer valid put is
//     superseded.
//  2. A put is valid when every block it wrote that is not superseded is present. The
//     session's newest put, if incomplete, is still valid when no older put has a block
//     at or past its first block: then nothing older could be its fallback (an append,
//     or the older blocks were already erased, which happens only after the put was
//     published), and its present prefix is the best history there is. Otherwise it is
//     a put that never completed, and the older history stands. An older put can only
//     be incomplete by design (a truncation erased blocks) or by a failed erase: valid.
//  3. From block 0 on, the newest block of a valid put whose chain hash continues the
//     chain (recomputed from its token ids and its stored request-key digest) is taken;
//     the walk ends at a gap or a partial block.
// Slots whose header could not be read are quarantined (kept, never reused, never
// erased: a transient error must not destroy them). Slots whose valid header was judged
// stale are erased (header area zeroed) before reuse; one that cannot be erased is
// quarantined. Junk headers (torn, foreign) are simply free.
void store::impl::recover() {
  struct candidate {
    hash128 session, tenant;
    std::uint32_t index;
    std::uint64_t sequence;
    std::uint32_t slot;
    hash128 chain, keys;
    std::uint64_t checksum;
    std::size_t token_offset;
    std::uint32_t token_count;
    std::uint32_t put_first_block, put_blocks;
    bool usable = false;
    bool borrowed = false;  // a link (LINKS): another candidate's slot, held by this session
    bool retired = false;   // its session let go of it (LINKS): content for links only
    std::uint64_t put_id() const noexcept { return sequence - (index - put_first_block); }
  };
  std::vector<candidate> cands;
  std::vector<token_id> token_store;
  const std::uint32_t slots = ssd_->capacity();
  std::vector<std::uint8_t> used(slots, 0);  // indexed or quarantined: not free
  std::vector<std::uint32_t> stale;          // valid headers not indexed: erased
  std::uint64_t max_sequence = 0;

  // ---- 1. header scan (whole slots after a crash)
  const bool clean = take_clean_mark();
  const std::uint32_t read_bytes = std::uint32_t(clean ? header_bytes_ : slot_bytes_);
  // A put can hold no more blocks than both tiers: a larger count is junk, not a
  // reason to allocate.
  const format::slot_expectation expect{header_bytes_, geometry_.tokens_per_block, model_.value,
                                        geometry_.block_bytes(), std::uint64_t(dram_->capacity()) + slots};
  std::vector<std::uint32_t> buffers;
  for (std::uint32_t b; (b = staging_->allocate()) != no_slot;) buffers.push_back(b);
  if (buffers.empty()) throw std::runtime_error("store: no staging buffer for recovery");
  for (std::uint32_t base = 0; base < slots;) {
    const std::uint32_t n = std::min<std::uint32_t>({std::uint32_t(buffers.size()), batch_max, slots - base});
    io_request reqs[batch_max];
    for (std::uint32_t i = 0; i < n; ++i)
      reqs[i] = io_request{io_op::read,
                           ssd_->file_of(base + i),
                           ssd_->offset_of(base + i),
                           staging_->data(buffers[i]),
                           read_bytes,
                           staging_buffer_base_ + staging_->region_of(buffers[i]),
                           0};
    (void)device_->execute(std::span(reqs, n), config_.queue_depth);  // each result checked below
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::uint32_t slot = base + i;
      if (reqs[i].result != std::int32_t(read_bytes)) {
        detail::bump(counters_->io_errors);
        detail::bump(counters_->quarantined_slots);
        used[slot] = 1;
        if (reqs[i].result == io_in_doubt) {  // never reuse a buffer a read may still fill
          quarantine_buffer();
          buffers[i] = no_slot;
        }
        continue;
      }
      const std::byte* area = staging_->data(buffers[i]);
      format::block_header h;
      const format::slot_verdict v = format::judge_slot(area, expect, !clean, &h);
      if (v == format::slot_verdict::empty) continue;
      if (v == format::slot_verdict::junk || v == format::slot_verdict::foreign) {
        detail::bump(counters_->recovery_dropped_blocks);  // torn or foreign: junk, the slot is free
        continue;
      }
      if (v == format::slot_verdict::bad_payload) {
        // A torn write under a valid header: erased, or a later clean open would take it.
        detail::bump(counters_->recovery_dropped_blocks);
        stale.push_back(slot);
        continue;
      }
      if (h.sequence >= format::max_start_sequence) {
        // A checksummed header numbered where no store gets: damaged, and taking it as
        // the counter's start would number every new block near the limit.
        detail::bump(counters_->recovery_dropped_blocks);
        stale.push_back(slot);
        continue;
      }
      max_sequence = std::max(max_sequence, h.sequence);
      const auto* toks = reinterpret_cast<const token_id*>(area + format::fixed_header_bytes);
      cands.push_back({h.session, h.tenant, h.block_index, h.sequence, slot, h.chain, h.keys, h.payload_checksum,
                       token_store.size(), h.token_count, h.put_first_block, h.put_blocks});
      token_store.insert(token_store.end(), toks, toks + h.token_count);
    }
    // A buffer lost to an in-doubt read is replaced by the next free one, if any.
    buffers.erase(std::remove(buffers.begin(), buffers.end(), no_slot), buffers.end());
    if (buffers.empty()) throw std::runtime_error("store: recovery lost every staging buffer to I/O errors");
    base += n;
  }
  for (auto b : buffers) staging_->release(b);

  // ---- 1b. links: blocks of one session held in a slot another's save wrote. Each is
  // a candidate of its holder, found as the slot with its chain, index and checksum
  // (any such slot: equal chains and checksums are equal bytes).
  std::uint64_t bad_links = 0;
  const std::vector<format::link_record> records =
      format::read_links(detail::link_log::path_in(config_.ssd_directory), &bad_links);
  // Retirements: blocks their sessions let go of while others still held the slot. A
  // slot's header (or a link) that matches one is not the session's block any more.
  auto retire_key = [](const hash128& session, const hash128& chain, std::uint32_t index, std::uint64_t sequence) {
    return std::make_tuple(session.lo, session.hi, chain.lo, chain.hi, index, sequence);
  };
  std::set<decltype(retire_key(hash128{}, hash128{}, 0, 0))> retired_blocks;
  for (const format::link_record& r : records)
    if (r.magic == format::retire_magic)
      retired_blocks.insert(retire_key(r.session, r.chain, r.block_index, r.sequence));
  for (candidate& c : cands) c.retired = retired_blocks.count(retire_key(c.session, c.chain, c.index, c.sequence)) > 0;
  std::uint64_t unresolved_links = 0;
  {
    std::unordered_multimap<std::uint64_t, std::size_t> by_chain;
    for (std::size_t i = 0; i < cands.size(); ++i) by_chain.emplace(cands[i].chain.lo, i);
    const std::size_t real = cands.size();
    for (const format::link_record& l : records) {
      if (l.magic != format::link_magic) continue;
      if (retired_blocks.count(retire_key(l.session, l.chain, l.block_index, l.sequence))) continue;  // let go of
      std::size_t found = real;
      for (auto [it, end] = by_chain.equal_range(l.chain.lo); it != end && found == real; ++it) {
        const candidate& c = cands[it->second];
        if (c.chain == l.chain && c.checksum == l.checksum && c.index == l.block_index &&
            c.token_count == geometry_.tokens_per_block)
          found = it->second;
      }
      if (found == real || l.block_index < l.put_first_block || l.block_index - l.put_first_block >= l.put_blocks ||
          l.sequence >= format::max_start_sequence) {
        ++unresolved_links;  // its slot is gone (or the record is nonsense): the put lacks the block
        continue;
      }
      candidate v = cands[found];
      v.session = l.session;
      v.tenant = l.tenant;
      v.sequence = l.sequence;
      v.put_first_block = l.put_first_block;
      v.put_blocks = l.put_blocks;
      v.borrowed = true;
      v.retired = false;
      cands.push_back(v);
      max_sequence = std::max(max_sequence, l.sequence);
    }
  }

  // ---- 2. tombstones: a dropped session's blocks (sequence below the bound) are gone
  const std::string tomb_path = config_.ssd_directory + "/TOMBSTONES";
  std::unordered_map<std::uint64_t, std::vector<std::pair<hash128, std::uint64_t>>> tombs;
  std::uint64_t max_bound = 0;
  if (std::FILE* f = std::fopen(tomb_path.c_str(), "rb")) {
    std::uint64_t rec[3];
    while (std::fread(rec, sizeof(rec), 1, f) == 1) {
      if (rec[2] >= format::max_start_sequence) continue;  // damaged: no bound can be that high
      const hash128 key{rec[0], rec[1]};
      tombs[key.lo].push_back({key, rec[2]});
      max_bound = std::max(max_bound, rec[2]);
    }
    std::fclose(f);
  }
  auto tomb_bound = [&](const hash128& s) -> std::uint64_t {
    auto it = tombs.find(s.lo);
    std::uint64_t b = 0;
    if (it != tombs.end())
      for (const auto& [k, v] : it->second)
        if (k == s) b = std::max(b, v);
    return b;
  };

  // ---- 3. per session: valid puts, then the chain walk
  std::sort(cands.begin(), cands.end(), [](const candidate& a, const candidate& b) {
    if (!(a.session == b.session))
      return a.session.hi != b.session.hi ? a.session.hi < b.session.hi : a.session.lo < b.session.lo;
    if (a.index != b.index) return a.index < b.index;
    return a.sequence > b.sequence;  // newest version of a block first
  });
  struct session_pick {
    std::size_t begin, end;           // its candidates
    std::vector<std::size_t> chosen;  // candidate indices, block 0 on
    std::uint64_t recency = 0;        // newest sequence chosen
  };
  std::vector<session_pick> picks;
  struct put_info {
    std::uint64_t id;
    std::uint32_t first, blocks;
    std::vector<std::uint8_t> present;
    std::uint32_t max_index = 0;  // highest block index present
    bool valid = false;
    std::uint32_t superseded_from = ~0u;  // positions >= this belong to newer valid puts
  };
  for (std::size_t g = 0; g < cands.size();) {
    std::size_t end = g;
    while (end < cands.size() && cands[end].session == cands[g].session) ++end;
    const std::uint64_t bound = tomb_bound(cands[g].session);
    // Puts of this session, oldest first.
    std::vector<put_info> puts;
    auto put_of = [&](const candidate& c) -> put_info* {
      for (auto& p : puts)
        if (p.id == c.put_id()) return p.first == c.put_first_block && p.blocks == c.put_blocks ? &p : nullptr;
      return nullptr;
    };
    for (std::size_t k = g; k < end; ++k) {
      const candidate& c = cands[k];
      if (c.sequence < bound || c.retired) continue;  // tombstoned, or let go of
      put_info* p = put_of(c);
      if (!p) {
        bool clash = false;  // same id, other shape: a damaged header; ignore the block
        for (auto& q : puts) clash |= q.id == c.put_id();
        if (clash) continue;
        puts.push_back(
            put_info{c.put_id(), c.put_first_block, c.put_blocks, std::vector<std::uint8_t>(c.put_blocks, 0)});
        p = &puts.back();
      }
      p->present[c.index - p->first] = 1;
      p->max_index = std::max(p->max_index, c.index);
    }
    std::sort(puts.begin(), puts.end(), [](const put_info& a, const put_info& b) { return a.id < b.id; });
    // older_max[i]: highest present index among puts older than puts[i] (+1; 0 = none).
    std::vector<std::uint64_t> older_max(puts.size(), 0);
    for (std::size_t i = 1; i < puts.size(); ++i)
      older_max[i] = std::max<std::uint64_t>(older_max[i - 1], std::uint64_t(puts[i - 1].max_index) + 1);
    std::uint32_t cover_from = ~0u;
    for (std::size_t i = puts.size(); i-- > 0;) {
      put_info& p = puts[i];
      p.superseded_from = cover_from;
      bool complete = true;
      for (std::uint32_t k = 0; k < p.blocks && complete; ++k)
        if (p.first + k < cover_from && !p.present[k]) complete = false;
      // Only a session's newest put can have been in flight at a crash (its saves are
      // serialized); an older put is incomplete because blocks were erased on purpose
      // (a truncation) or left behind by a failed erase, never because it did not finish.
      const bool newest = i + 1 == puts.size();
      const bool has_fallback = older_max[i] > p.first;  // an older block at or past p.first
      p.valid = complete || !newest || !has_fallback;
      if (p.valid) cover_from = std::min(cover_from, p.first);
    }
    for (std::size_t k = g; k < end; ++k) {
      candidate& c = cands[k];
      if (c.sequence < bound || c.retired) continue;
      const put_info* p = nullptr;
      for (const auto& q : puts)
        if (q.id == c.put_id() && q.first == c.put_first_block && q.blocks == c.put_blocks) p = &q;
      c.usable = p && p->valid && c.index < p->superseded_from;
    }
    session_pick pick{g, end, {}, 0};
    hash128 prev{};
    std::size_t k = g;
    for (std::uint32_t index = 0; k < end && cands[k].index == index; ++index) {
      std::size_t take = end;
      for (; k < end && cands[k].index == index; ++k) {
        const candidate& c = cands[k];
        if (take != end || !c.usable) continue;
        std::span<const token_id> toks(token_store.data() + c.token_offset, c.token_count);
        // The request's keys entered the chain through the digest the header keeps.
        if (c.chain == chain_hash(prev, model_, toks, c.keys)) take = k;
      }
      if (take == end) break;
      pick.chosen.push_back(take);
      pick.recency = std::max(pick.recency, cands[take].sequence);
      prev = cands[take].chain;
      if (cands[take].token_count < geometry_.tokens_per_block) break;  // a partial block ends the session
    }
    picks.push_back(std::move(pick));
    g = end;
  }
  // More sessions than records: the most recently saved ones are kept.
  std::vector<std::size_t> order(picks.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return picks[a].recency > picks[b].recency; });
  std::vector<std::uint8_t> kept(cands.size(), 0);
  std::vector<std::uint32_t> holders(slots, 0);  // per slot: recovered blocks that hold it
  std::uint32_t too_many = 0;
  for (std::size_t oi = 0; oi < order.size(); ++oi) {
    session_pick& pick = picks[order[oi]];
    if (pick.chosen.empty()) continue;
    errc why = errc::ok;
    locked_session s = index_->open(session_hash{cands[pick.begin].session}, true, &why);
    if (s && assign_tenant(s, cands[pick.chosen.front()].tenant) != errc::ok) {
      s.erase();
      s = {};
    }
    if (!s) {
      ++too_many;
      continue;
    }
    std::uint32_t head = no_slot, tail = no_slot, count = 0;
    hash128 previous{};
    for (std::size_t ci : pick.chosen) {
      const candidate& c = cands[ci];
      std::uint32_t b = s.new_block(std::span<const token_id>(token_store.data() + c.token_offset, c.token_count));
      if (b == no_slot) break;
      block_meta& m = s.meta(b);
      m.previous = previous;
      m.chain = previous = c.chain;
      m.keys = c.keys;
      m.checksum = c.checksum;
      m.sequence = c.sequence;
      m.put_first_block = c.put_first_block;
      m.put_blocks = c.put_blocks;
      m.ssd_slot = c.slot;
      m.borrowed = c.borrowed;
      m.saved_pos = std::uint64_t(c.index) * geometry_.tokens_per_block;
      used[c.slot] = 1;
      ++holders[c.slot];
      kept[ci] = 1;
      s.append(head, tail, b);
      ++count;
    }
    s.publish(0, head, count);
    note(s, false);
    detail::bump(counters_->recovered_sessions);
    detail::bump(counters_->recovered_blocks, count);
  }
  bool tombstoned_all_erased = true;
  std::vector<std::uint8_t> tombstoned(cands.size(), 0);
  // With a slot unreadable, any judgement above may be wrong (a put looks incomplete, a
  // chain looks cut where the unreadable block sits): nothing is erased this time. What
  // was not indexed is held (not reused) until an open that reads every slot decides.
  const bool degraded = counters_->quarantined_slots.load() > 0;
  std::uint64_t held = 0;
  for (std::size_t i = 0; i < cands.size(); ++i) {
    if (kept[i] || cands[i].borrowed) continue;  // a link has no slot of its own
    tombstoned[i] = cands[i].sequence < tomb_bound(cands[i].session);
    if (holders[cands[i].slot] > 0) {  // its slot is held by another session's block
      // Not judged (a slot could not be read): the block may still be its session's,
      // so the slot must outlive the other holders too, as held slots do.
      if (degraded && !cands[i].retired) {
        ++holders[cands[i].slot];
        tombstoned_all_erased = false;
      }
      continue;
    }
    if (degraded) {
      used[cands[i].slot] = 1;
      ++held;
      tombstoned_all_erased = false;
      continue;
    }
    stale.push_back(cands[i].slot);
    detail::bump(counters_->recovery_dropped_blocks);
  }
  if (held) {
    detail::bump(counters_->quarantined_slots, held);
    config_.log(log_level::warning,
                "store: " + std::to_string(held) + " blocks held back unjudged: some slots could not be read");
  }
  sequence_.store(std::max(max_sequence, max_bound) + 1);
  // Stale headers are erased before their slots are reused: a later restart must not
  // mistake them for live blocks. A slot that cannot be erased stays out of use.
  erase_slots(stale, false, [&](std::uint32_t slot, bool erased) {
    if (erased) return;
    used[slot] = 1;
    detail::bump(counters_->io_errors);
    detail::bump(counters_->quarantined_slots);
  });
  if (!stale.empty() && device_->sync() != errc::ok) tombstoned_all_erased = false;
  for (std::size_t i = 0; i < cands.size(); ++i)
    if (tombstoned[i] && used[cands[i].slot]) tombstoned_all_erased = false;
  ssd_->rebuild(used);
  // Shared slots get their holder counts back; whole blocks become their content's
  // SSD copy (the first slot found for a content), so new sessions can share them.
  // LINKS keeps only the links recovered.
  std::vector<format::link_record> live_links;
  // A retirement stays while the slot it is about stays (held by another block).
  for (std::size_t i = 0; i < cands.size(); ++i)
    if (cands[i].retired && !cands[i].borrowed && holders[cands[i].slot] > 0) {
      const candidate& c = cands[i];
      live_links.push_back(format::link_record{c.session, c.tenant, c.chain, c.checksum, c.sequence, c.index,
                                               c.put_first_block, c.put_blocks, format::retire_magic, 0});
    }
  for (std::size_t i = 0; i < cands.size(); ++i) {
    if (!kept[i]) continue;
    const candidate& c = cands[i];
    if (c.borrowed)
      live_links.push_back(format::link_record{c.session, c.tenant, c.chain, c.checksum, c.sequence, c.index,
                                               c.put_first_block, c.put_blocks, 0, 0});
    if (holders[c.slot] == 0) continue;  // done: one candidate per slot registers it
    const bool whole = c.token_count == geometry_.tokens_per_block;
    content_->recovered(sharing_ && whole, content_key(c.chain, c.index, c.tenant), c.slot, holders[c.slot],
                        c.checksum);
    holders[c.slot] = 0;
  }
  if (!degraded && (!records.empty() || bad_links > 0) && links_->rewrite(live_links) != errc::ok)
    config_.log(log_level::warning, "store: cannot rewrite " + detail::link_log::path_in(config_.ssd_directory) +
                                        "; it keeps links no longer used");
  if (unresolved_links)
    config_.log(log_level::info, "store: " + std::to_string(unresolved_links) +
                                     " shared-block links name slots that are gone; their blocks are not recovered");
  // Every block a tombstone covered is erased now; the tombstones can go.
  if (!tombs.empty() && tombstoned_all_erased) {
    std::remove(tomb_path.c_str());
    sync_directory(config_.ssd_directory);
  }
  if (too_many)
    config_.log(log_level::warning, "store: " + std::to_string(too_many) + " sessions in " + config_.ssd_directory +
                                        " did not fit max_sessions=" + std::to_string(config_.max_sessions) +
                                        "; the least recently saved were dropped");
  if (counters_->recovered_blocks.load() || counters_->recovery_dropped_blocks.load() ||
      counters_->quarantined_slots.load())
    config_.log(log_level::info, "store: recovered " + std::to_string(counters_->recovered_blocks.load()) +
                                     " blocks of " + std::to_string(counters_->recovered_sessions.load()) +
                                     " sessions from " + config_.ssd_directory + "; dropped " +
                                     std::to_string(counters_->recovery_dropped_blocks.load()) +
                                     " stale or torn; quarantined " +
                                     std::to_string(counters_->quarantined_slots.load()) + " unreadable");
}

}  // namespace attnstore
