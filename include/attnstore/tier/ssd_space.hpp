// ssd_space: the SSD tier's extent allocator. Preallocated files in one directory,
// divided into fixed-size slots (one stored block each, header included).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "attnstore/detail/slot_pool.hpp"
#include "attnstore/log.hpp"
#include "attnstore/tier/tier_allocator.hpp"

namespace attnstore {

struct ssd_space_options {
  std::string directory;                                   ///< created (0700) if missing
  std::size_t slot_bytes = 0;                              ///< multiple of 4096
  std::uint64_t capacity_bytes = 0;                        ///< total; at least one slot
  std::uint64_t max_file_bytes = std::uint64_t(16) << 30;  ///< files are split at this size
  bool direct_io = true;                                   ///< open with O_DIRECT
  bool require_direct_io = true;                           ///< fail (rather than fall back to buffered I/O) without it
  bool preallocate = true;                                 ///< fallocate the files now (ENOSPC at open, not later)
  unsigned lock_wait_ms = 2000;                            ///< wait this long for another user of the files to go
  attnstore::logger log{};
};

/// Slot allocator over files. Files are created 0600 and locked (flock) so two
/// processes cannot open one directory. Throws std::invalid_argument or
/// std::runtime_error from the constructor, naming the field or path and the cause.
class ssd_space final : public tier_allocator {
 public:
  explicit ssd_space(const ssd_space_options& options);
  ssd_space(const ssd_space&) = delete;
  ssd_space& operator=(const ssd_space&) = delete;
  ~ssd_space() override;

  std::uint32_t allocate() noexcept override { return slots_.allocate(); }
  bool release(std::uint32_t slot) noexcept override { return slots_.release(slot); }
  std::uint32_t capacity() const noexcept override { return slots_.capacity(); }
  std::uint32_t used() const noexcept override { return slots_.used(); }
  std::size_t slot_bytes() const noexcept override { return slot_bytes_; }
  memory_kind kind() const noexcept override { return memory_kind::file; }

  /// Marks exactly these slots in use (after recovery).
  void rebuild(std::span<const std::uint8_t> used) noexcept { slots_.rebuild(used); }

  std::uint32_t file_of(std::uint32_t slot) const noexcept { return slot / slots_per_file_; }
  std::uint64_t offset_of(std::uint32_t slot) const noexcept {
    return std::uint64_t(slot % slots_per_file_) * slot_bytes_;
  }
  std::span<const int> fds() const noexcept { return fds_; }
  std::span<const std::uint64_t> file_sizes() const noexcept { return file_sizes_; }
  bool direct_io() const noexcept { return direct_io_; }
  const std::string& directory() const noexcept { return directory_; }

 private:
  static std::uint32_t check(const ssd_space_options& o);
  detail::slot_pool slots_;
  std::string directory_;
  std::size_t slot_bytes_ = 0;
  std::uint32_t slots_per_file_ = 0;
  std::vector<int> fds_;
  std::vector<std::uint64_t> file_sizes_;
  int lock_fd_ = -1;
  bool direct_io_ = true;
};

}  // namespace attnstore
