// pread/pwrite backend on a worker thread pool: the fallback when io_uring is missing.
#pragma once

#include <memory>
#include <span>

#include "attnstore/io/block_device.hpp"

namespace attnstore {

struct posix_options {
  unsigned threads = 8;          ///< worker threads doing pread/pwrite, 1..256
  unsigned queue_depth = 64;     ///< pieces one channel may have outstanding
  std::size_t alignment = 4096;  ///< O_DIRECT alignment
};

/// Creates a pread/pwrite device over open file descriptors (not owned).
std::unique_ptr<block_device> make_posix_device(std::span<const int> fds, const posix_options& options);

}  // namespace attnstore
