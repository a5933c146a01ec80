// Power loss for tests: a forwarding_device that keeps, for every write since the last
// successful sync(), the bytes it overwrote (read back from the file before the write
// is forwarded) and the bytes it wrote. crash() then makes the files look as a disk
// would after the power failed: every write not followed by a successful sync() is
// undone (newest first), or, on request, a random subset of them survives and one of
// them is torn (only a prefix of its sectors lands). From the moment of the power loss
// on, every piece fails with EIO and sync() with device_error: the dead process can
// change nothing more.
//
// The moment can be a call (crash() between two store operations) or the n-th write
// piece after arm(n): that piece and everything after it fail, so the operation that
// submitted it is the one in flight at the crash; call crash() once it returned.
//
// Files the store writes outside the device (MANIFEST, TOMBSTONES, markers: every file
// of the directory but the block files and LOCK) are snapshotted at the moment of the
// power loss and put back as they were by crash() and again when the device is
// destroyed (with its store, after the store's own close): whatever the dying process
// wrote to them after the moment never reached the disk. (Files created since the
// directory was last fsync'd could also vanish on a real disk; that is not modelled.)
//
// Usage: the store owns the device (store_config::wrap_device); the test keeps a raw
// pointer, calls crash() before it destroys the store (whose destructor may still try
// I/O, which fails), then opens a new store on the directory with a fresh device.
// Single-threaded use of the store is assumed for the bookkeeping of which writes were
// synced (a sync clears only writes that completed before it was called).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "attnstore/io/forwarding_device.hpp"
#include "attnstore/tier/ssd_space.hpp"

namespace attnstore::testing {

/// How much of what was not synced survives crash().
struct crash_options {
  /// Each unsynced write survives whole with this probability; 0: all are lost.
  double keep_probability = 0;
  /// One unsynced write of more than one sector, chosen at random, is torn: only its
  /// first k sectors land (1 <= k < its sectors), whether it would have survived or not.
  bool torn = false;
  std::uint64_t seed = 1;
};

/// What crash() did.
struct crash_report {
  std::size_t unsynced_writes = 0;  ///< writes in the undo log
  std::size_t kept = 0;             ///< of which survived whole
  std::size_t torn_sectors = 0;     ///< sectors of the torn write that landed (0: none torn)
  std::size_t io_failures = 0;      ///< pread/pwrite/fdatasync failures while applying the loss (must be 0)
};

class power_loss_device final : public forwarding_device {
 public:
  static constexpr std::size_t sector = 4096;

  power_loss_device(std::unique_ptr<block_device> inner, const ssd_space& space)
      : forwarding_device(std::move(inner)), fds_(space.fds().begin(), space.fds().end()), dir_(space.directory()) {}
  ~power_loss_device() override {
    std::lock_guard lock(mutex_);
    if (dead_) restore_side_files_locked();
  }

  std::string_view name() const noexcept override { return "power_loss"; }

  /// Forwards the sync; once it succeeded, the writes that had completed before it
  /// are durable and leave the undo log. After the power loss: device_error.
  errc sync() noexcept override {
    std::size_t durable_upto;
    {
      std::lock_guard lock(mutex_);
      if (dead_) return errc::device_error;
      durable_upto = log_.size();
    }
    const errc e = forwarding_device::sync();
    if (e != errc::ok) return e;
    std::lock_guard lock(mutex_);
    if (dead_) return errc::device_error;
    std::vector<entry> kept;
    for (std::size_t i = 0; i < log_.size(); ++i)
      if (i >= durable_upto || log_[i].landed == pending) kept.push_back(std::move(log_[i]));
    log_.swap(kept);
    ++syncs_;
    return e;
  }

  /// The power fails when the n-th write piece from now (1: the next one) is submitted.
  void arm(std::uint64_t nth_write) noexcept {
    std::lock_guard lock(mutex_);
    arm_at_ = writes_ + nth_write;
  }
  /// The moment has passed: every piece fails from now on.
  bool power_failed() const noexcept {
    std::lock_guard lock(mutex_);
    return dead_;
  }
  /// Write pieces seen (forwarded or failed) since construction.
  std::uint64_t writes() const noexcept {
    std::lock_guard lock(mutex_);
    return writes_;
  }
  std::uint64_t syncs() const noexcept {
    std::lock_guard lock(mutex_);
    return syncs_;
  }
  /// Writes not yet made durable by a sync.
  std::size_t unsynced_writes() const noexcept {
    std::lock_guard lock(mutex_);
    return log_.size();
  }

  /// The power fails now (if it has not already), and the files become what the disk
  /// would hold: see crash_options. Call it when no operation of the store is running.
  crash_report crash(const crash_options& options = {}) {
    std::lock_guard lock(mutex_);
    crash_report rep;
    fail_power_locked();
    rep.io_failures += restore_side_files_locked();
    rep.unsynced_writes = log_.size();
    std::mt19937_64 rng(options.seed);
    std::vector<char> keep(log_.size(), 0);
    for (std::size_t i = 0; i < log_.size(); ++i)
      keep[i] = log_[i].landed > 0 && std::uniform_real_distribution<double>(0, 1)(rng) < options.keep_probability;
    std::optional<std::size_t> torn;
    std::size_t torn_sectors = 0;
    if (options.torn) {
      std::vector<std::size_t> multi;
      for (std::size_t i = 0; i < log_.size(); ++i)
        if (log_[i].landed > std::int64_t(sector)) multi.push_back(i);
      if (!multi.empty()) {
        torn = multi[std::uniform_int_distribution<std::size_t>(0, multi.size() - 1)(rng)];
        const std::size_t sectors = std::size_t(log_[*torn].landed) / sector;
        torn_sectors = std::uniform_int_distribution<std::size_t>(1, sectors - 1)(rng);
      }
    }
    // Undo every unsynced write, newest first: the files as of the last sync...
    for (std::size_t i = log_.size(); i-- > 0;) {
      const entry& e = log_[i];
      if (!e.old_known) {
        ++rep.io_failures;
        continue;
      }
      if (::pwrite(fds_[e.file], e.old_bytes.get(), e.bytes, off_t(e.offset)) != ssize_t(e.bytes)) ++rep.io_failures;
    }
    // ... then the survivors again, oldest first.
    for (std::size_t i = 0; i < log_.size(); ++i) {
      const entry& e = log_[i];
      std::size_t n = 0;
      if (torn && *torn == i)
        n = torn_sectors * sector;
      else if (keep[i])
        n = std::size_t(e.landed);
      if (n == 0) continue;
      if (keep[i]) ++rep.kept;
      if (::pwrite(fds_[e.file], e.new_bytes.get(), n, off_t(e.offset)) != ssize_t(n)) ++rep.io_failures;
    }
    rep.torn_sectors = torn_sectors;
    for (int fd : fds_)
      if (::fdatasync(fd) != 0) ++rep.io_failures;
    log_.clear();
    return rep;
  }

 protected:
  std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> in) override {
    return std::make_unique<channel>(*this, std::move(in));
  }

 private:
  static constexpr std::int64_t pending = -1;
  struct free_deleter {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  using buffer = std::unique_ptr<std::byte, free_deleter>;
  static buffer aligned(std::size_t bytes) {
    void* p = std::aligned_alloc(sector, (bytes + sector - 1) / sector * sector);
    if (!p) throw std::bad_alloc();
    return buffer(static_cast<std::byte*>(p));
  }
  struct entry {
    std::uint32_t file = 0;
    std::uint64_t offset = 0;
    std::uint32_t bytes = 0;
    buffer old_bytes, new_bytes;
    bool old_known = false;
    std::int64_t landed = pending;  // bytes the device reported written, or < 0
    std::uint64_t id = 0;           // stable across sync()'s compaction of the log
  };

  // The directory's files other than the block files and LOCK, with their contents.
  std::map<std::string, std::string> side_files() const {
    std::map<std::string, std::string> files;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir_, ec)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file(ec) || name == "LOCK" || name.rfind("blocks-", 0) == 0) continue;
      std::ifstream in(e.path(), std::ios::binary);
      files[name] = std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    return files;
  }
  void fail_power_locked() {
    if (dead_) return;
    dead_ = true;
    try {
      side_snapshot_ = side_files();
    } catch (...) {
    }
  }
  // Puts the side files back as they were at the moment; returns the failures.
  std::size_t restore_side_files_locked() noexcept {
    std::size_t failures = 0;
    try {
      const auto now = side_files();
      for (const auto& [name, bytes] : now)
        if (!side_snapshot_.count(name)) ::unlink((dir_ + "/" + name).c_str());
      for (const auto& [name, bytes] : side_snapshot_) {
        auto it = now.find(name);
        if (it != now.end() && it->second == bytes) continue;
        const std::string path = dir_ + "/" + name;
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(bytes.data(), std::streamsize(bytes.size()));
        out.close();
        if (!out) ++failures;
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0 || ::fsync(fd) != 0) ++failures;
        if (fd >= 0) ::close(fd);
      }
    } catch (...) {
      ++failures;
    }
    return failures;
  }

  // Before a write is forwarded: its undo entry. Returns false when the power is off
  // (the piece must fail); `id` names the undo entry of a forwarded write.
  bool admit(const io_piece& p, std::uint64_t* id) noexcept {
    std::lock_guard lock(mutex_);
    if (dead_) return false;
    if (p.op != io_op::write) return true;
    if (++writes_ == arm_at_) {
      try {
        fail_power_locked();
      } catch (...) {
        dead_ = true;
      }
      return false;
    }
    try {
      entry e;
      e.file = p.file;
      e.offset = p.offset;
      e.bytes = p.bytes;
      e.old_bytes = aligned(p.bytes);
      e.new_bytes = aligned(p.bytes);
      std::memcpy(e.new_bytes.get(), p.buffer, p.bytes);
      e.old_known = p.file < fds_.size() &&
                    ::pread(fds_[p.file], e.old_bytes.get(), p.bytes, off_t(p.offset)) == ssize_t(p.bytes);
      e.id = *id = next_id_++;
      log_.push_back(std::move(e));
    } catch (...) {
      return false;
    }
    return true;
  }
  void landed(std::uint64_t id, std::int64_t result) noexcept {
    std::lock_guard lock(mutex_);
    for (std::size_t i = log_.size(); i-- > 0;)
      if (log_[i].id == id) {
        log_[i].landed = result;
        return;
      }
  }

  class channel final : public io_channel {
   public:
    channel(power_loss_device& dev, std::unique_ptr<io_channel> inner) : dev_(dev), inner_(std::move(inner)) {
      local_.reserve(inner_->depth());
      writes_.reserve(inner_->depth());
    }
    void submit(const io_piece& p) noexcept override {
      std::uint64_t id = 0;
      if (!dev_.admit(p, &id)) {
        local_.push_back({p.tag, -EIO});
        return;
      }
      if (p.op == io_op::write) writes_.push_back({p.tag, id});
      inner_->submit(p);
      ++outstanding_;
    }
    int reap(io_completion* out, int max, int min_wait) noexcept override {
      int n = 0;
      while (!local_.empty() && n < max) {
        out[n++] = local_.back();
        local_.pop_back();
      }
      if (n == max || outstanding_ == 0) return n;
      int need = min_wait - n;
      if (need < 0) need = 0;
      if (need > int(outstanding_)) need = int(outstanding_);
      const int got = inner_->reap(out + n, max - n, need);
      if (got < 0) return got;
      outstanding_ -= unsigned(got);
      for (int i = n; i < n + got; ++i)
        for (std::size_t w = 0; w < writes_.size(); ++w)
          if (writes_[w].tag == out[i].tag) {
            dev_.landed(writes_[w].id, out[i].result);
            writes_[w] = writes_.back();
            writes_.pop_back();
            break;
          }
      return n + got;
    }
    void flush() noexcept override { inner_->flush(); }
    unsigned depth() const noexcept override { return inner_->depth(); }

   private:
    struct write_in_flight {
      std::uint32_t tag;
      std::uint64_t id;
    };
    power_loss_device& dev_;
    std::unique_ptr<io_channel> inner_;
    std::vector<io_completion> local_;
    std::vector<write_in_flight> writes_;
    unsigned outstanding_ = 0;
  };

  mutable std::mutex mutex_;
  std::vector<int> fds_;
  std::string dir_;
  std::vector<entry> log_;
  std::uint64_t writes_ = 0, arm_at_ = 0, syncs_ = 0, next_id_ = 1;
  bool dead_ = false;
  std::map<std::string, std::string> side_snapshot_;
};

}  // namespace attnstore::testing
