// link_log: the store's writer of its directory's LINKS file (format/links.hpp). Appends
// go to the file at once and become durable at the next sync(), which the store calls
// wherever it makes SSD writes durable (a write-through save, flush, close, drop).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <span>
#include <string>

#include "attnstore/format/links.hpp"
#include "attnstore/status.hpp"

namespace attnstore::detail {

class link_log {
 public:
  /// The file of `directory` (created on the first append).
  explicit link_log(std::string directory) : directory_(std::move(directory)), path_(directory_ + "/LINKS") {
    struct stat st;
    if (::stat(path_.c_str(), &st) == 0) bytes_.store(std::uint64_t(st.st_size), std::memory_order_relaxed);
  }
  link_log(const link_log&) = delete;
  link_log& operator=(const link_log&) = delete;
  ~link_log() {
    if (fd_ >= 0) ::close(fd_);
  }

  static std::string path_in(const std::string& directory) { return directory + "/LINKS"; }

  /// Past this size no new link is taken (blocks write SSD copies of their own): links
  /// come from what clients do (sessions adopting and dropping prompts), and the file is
  /// compacted only at an open. Retirements are still written (each follows a link or a
  /// slot some link holds), so the file stays within a small multiple of it.
  static constexpr std::uint64_t max_link_bytes = std::uint64_t(64) << 20;
  bool full() const noexcept { return bytes_.load(std::memory_order_relaxed) >= max_link_bytes; }

  errc append(format::link_record r, std::uint32_t magic = format::link_magic) noexcept {
    format::seal(r, magic);
    std::lock_guard lock(mutex_);
    if (!open_locked()) return errc::device_error;
    if (::write(fd_, &r, sizeof(r)) != ssize_t(sizeof(r))) return errc::device_error;
    bytes_.fetch_add(sizeof(r), std::memory_order_relaxed);
    dirty_ = true;
    return errc::ok;
  }

  /// Makes every append so far durable (the file's name too, the first time).
  errc sync() noexcept {
    std::lock_guard lock(mutex_);
    if (!dirty_) return errc::ok;
    if (::fdatasync(fd_) != 0) return errc::device_error;
    if (created_ && !sync_dir()) return errc::device_error;
    created_ = false;
    dirty_ = false;
    return errc::ok;
  }

  /// Replaces the file by `records` (recovery keeps only the links it used), durably:
  /// a new file, synced, renamed over the old one. None: the file goes.
  errc rewrite(std::span<const format::link_record> records) noexcept {
    std::lock_guard lock(mutex_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (records.empty()) {
      if (::unlink(path_.c_str()) != 0 && errno != ENOENT) return errc::device_error;
      bytes_.store(0, std::memory_order_relaxed);
      return sync_dir() ? errc::ok : errc::device_error;
    }
    const std::string tmp = path_ + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return errc::device_error;
    bool ok = true;
    for (format::link_record r : records) {
      format::seal(r, r.magic == format::retire_magic ? format::retire_magic : format::link_magic);
      ok = ok && ::write(fd, &r, sizeof(r)) == ssize_t(sizeof(r));
    }
    ok = ok && ::fsync(fd) == 0;
    ::close(fd);
    ok = ok && ::rename(tmp.c_str(), path_.c_str()) == 0 && sync_dir();
    if (ok) bytes_.store(records.size() * sizeof(format::link_record), std::memory_order_relaxed);
    return ok ? errc::ok : errc::device_error;
  }

 private:
  bool open_locked() noexcept {
    if (fd_ >= 0) return true;
    fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd_ < 0 && errno == ENOENT) {
      fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
      created_ = fd_ >= 0;
    }
    return fd_ >= 0;
  }
  bool sync_dir() const noexcept {
    const int d = ::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) return false;
    const bool ok = ::fsync(d) == 0;
    ::close(d);
    return ok;
  }

  std::string directory_, path_;
  std::mutex mutex_;
  int fd_ = -1;
  bool dirty_ = false, created_ = false;
  std::atomic<std::uint64_t> bytes_{0};  // appended since the last rewrite (and what that kept)
};

}  // namespace attnstore::detail
