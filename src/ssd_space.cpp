#include "attnstore/tier/ssd_space.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace attnstore {
namespace {
std::string sys_error(const std::string& what, int err) {
  return what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}
// flock(LOCK_EX) with a bounded wait (a dead writer's in-flight I/O takes a few tens
// of milliseconds to drain).
bool lock_within(int fd, unsigned wait_ms) {
  for (unsigned waited = 0;; waited += 10) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return true;
    if (errno != EWOULDBLOCK || waited >= wait_ms) return false;
    ::usleep(10000);
  }
}
}  // namespace

std::uint32_t ssd_space::check(const ssd_space_options& o) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("ssd_space_options: " + m); };
  if (o.directory.empty()) fail("directory is empty; give a directory on the SSD");
  if (o.slot_bytes == 0 || o.slot_bytes % 4096)
    fail("slot_bytes is " + std::to_string(o.slot_bytes) + ", must be a positive multiple of 4096");
  if (o.max_file_bytes < o.slot_bytes)
    fail("max_file_bytes is " + std::to_string(o.max_file_bytes) + ", must hold at least one slot");
  if (o.capacity_bytes < o.slot_bytes)
    fail("capacity_bytes is " + std::to_string(o.capacity_bytes) + ", must hold at least one block slot of " +
         std::to_string(o.slot_bytes) + " bytes");
  std::uint64_t n = o.capacity_bytes / o.slot_bytes;
  if (n >= tier_allocator::no_slot) fail("capacity_bytes holds too many slots (max 2^32-2)");
  if (o.preallocate) {
    // Before any table is sized: is there room? Files already there count as room.
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path probe = o.directory;
    while (!probe.empty() && !fs::exists(probe, ec)) probe = probe.parent_path();
    std::uint64_t have = 0;
    if (fs::is_directory(o.directory, ec))
      for (const auto& e : fs::directory_iterator(o.directory, ec))
        if (e.path().filename().string().rfind("blocks-", 0) == 0) have += e.file_size(ec);
    struct statvfs vfs {};
    if (!probe.empty() && ::statvfs(probe.c_str(), &vfs) == 0 && vfs.f_blocks > 0) {
      const std::uint64_t free_bytes = std::uint64_t(vfs.f_bavail) * vfs.f_frsize;
      if (n * o.slot_bytes > free_bytes + have)
        throw std::runtime_error("ssd_space: cannot reserve " + std::to_string(n * o.slot_bytes) + " bytes in " +
                                 o.directory + "; " + std::to_string(free_bytes) +
                                 " bytes free (capacity_bytes too large for this disk?)");
    }
  }
  return std::uint32_t(n);
}

ssd_space::ssd_space(const ssd_space_options& o)
    : slots_(check(o)), directory_(o.directory), slot_bytes_(o.slot_bytes), direct_io_(o.direct_io) {
  // Parents are created as mkdir -p would; the store's own directory is 0700.
  {
    std::error_code ec;
    auto parent = std::filesystem::path(directory_).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  }
  if (::mkdir(directory_.c_str(), 0700) != 0 && errno != EEXIST)
    throw std::runtime_error(sys_error("ssd_space: cannot create directory " + directory_, errno));
  if (::access(directory_.c_str(), W_OK | X_OK) != 0)
    throw std::runtime_error(sys_error("ssd_space: directory " + directory_ + " is not writable", errno));

  lock_fd_ = ::open((directory_ + "/LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) throw std::runtime_error(sys_error("ssd_space: cannot create " + directory_ + "/LOCK", errno));
  if (!lock_within(lock_fd_, o.lock_wait_ms)) {
    int err = errno;
    ::close(lock_fd_);
    throw std::runtime_error(sys_error("ssd_space: " + directory_ + " is in use by another store", err));
  }

  slots_per_file_ = std::uint32_t(std::min<std::uint64_t>(o.max_file_bytes / slot_bytes_, slots_.capacity()));
  const std::uint32_t files = (slots_.capacity() + slots_per_file_ - 1) / slots_per_file_;
  auto cleanup = [&] {
    for (int fd : fds_) ::close(fd);
    fds_.clear();
    ::close(lock_fd_);
  };
  for (std::uint32_t f = 0; f < files; ++f) {
    char name[32];
    std::snprintf(name, sizeof(name), "/blocks-%04u.dat", f);
    const std::string path = directory_ + name;
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (direct_io_ ? O_DIRECT : 0);
    int fd = ::open(path.c_str(), flags, 0600);
    if (fd < 0 && errno == EINVAL && direct_io_) {
      if (o.require_direct_io) {
        cleanup();
        throw std::runtime_error("ssd_space: the file system of " + directory_ +
                                 " does not support O_DIRECT; choose another directory or set "
                                 "direct_io=false (page-cache I/O)");
      }
      o.log(log_level::warning, "ssd_space: O_DIRECT unsupported on " + directory_ + "; using page-cache I/O");
      direct_io_ = false;
      fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
      int err = errno;
      cleanup();
      throw std::runtime_error(sys_error("ssd_space: cannot open " + path, err));
    }
    // The data files are locked too: a killed writer's io_uring keeps its files (and
    // their locks) until its last in-flight write lands, so taking these locks means
    // no write of a dead writer can arrive after recovery has read the files.
    if (!lock_within(fd, o.lock_wait_ms)) {
      int err = errno;
      ::close(fd);
      cleanup();
      throw std::runtime_error(sys_error("ssd_space: " + path + " is still in use (a previous writer's I/O?)", err));
    }
    fds_.push_back(fd);
    const std::uint32_t in_file = std::min(slots_per_file_, slots_.capacity() - f * slots_per_file_);
    const std::uint64_t bytes = std::uint64_t(in_file) * slot_bytes_;
    struct stat st {};
    ::fstat(fd, &st);
    if (std::uint64_t(st.st_size) < bytes) {
      // Refuse up front rather than let fallocate fill the disk and then fail.
      struct statvfs vfs {};
      int err = 0;
      if (o.preallocate && ::statvfs(directory_.c_str(), &vfs) == 0 &&
          std::uint64_t(vfs.f_bavail) * vfs.f_frsize < bytes - std::uint64_t(st.st_size))
        err = ENOSPC;
      if (err == 0) err = o.preallocate ? ::posix_fallocate(fd, 0, off_t(bytes)) : EOPNOTSUPP;
      if (err == EOPNOTSUPP || err == ENOSYS || (err == EINVAL && !o.preallocate)) {
        if (::ftruncate(fd, off_t(bytes)) != 0)
          err = errno;
        else
          err = 0;
      }
      if (err != 0) {
        std::string free_note;
        if (::statvfs(directory_.c_str(), &vfs) == 0)
          free_note = "; " + std::to_string(std::uint64_t(vfs.f_bavail) * vfs.f_frsize) + " bytes free";
        cleanup();
        throw std::runtime_error(sys_error("ssd_space: cannot reserve " + std::to_string(bytes) + " bytes in " + path +
                                               free_note + " (capacity_bytes too large for this disk?)",
                                           err));
      }
    }
    file_sizes_.push_back(bytes);
  }
}

ssd_space::~ssd_space() {
  for (int fd : fds_) ::close(fd);
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

}  // namespace attnstore
