// io_uring backend: O_DIRECT files, batched SQEs, registered files and buffers.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "attnstore/io/block_device.hpp"

namespace attnstore {

struct uring_options {
  unsigned queue_depth = 64;     ///< ring entries per channel, 1..4096
  bool register_files = true;    ///< use IOSQE_FIXED_FILE where the kernel allows
  bool register_buffers = true;  ///< use READ/WRITE_FIXED on registered regions
  std::size_t alignment = 4096;  ///< O_DIRECT alignment
};

/// Creates an io_uring device over open file descriptors (not owned). Returns nullptr
/// and fills `why` when io_uring cannot be set up here (ENOSYS, EPERM in containers...).
std::unique_ptr<block_device> make_uring_device(std::span<const int> fds, const uring_options& options,
                                                std::string* why);

}  // namespace attnstore
