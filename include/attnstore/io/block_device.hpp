// Block I/O: the interface every SSD backend implements (io_uring, pread/pwrite,
// in-memory, fault-injecting), and the one completion loop they all share.
#pragma once

#include <sys/uio.h>

#include <cerrno>

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnstore/status.hpp"

namespace attnstore {

enum class io_op : std::uint8_t { read, write };

/// execute() result of a request whose transfer may still be under way after execute()
/// returned (its channel broke with the piece in flight): its buffer must not be reused
/// and the target range's content is unknown.
inline constexpr std::int32_t io_in_doubt = -EINPROGRESS;

/// One whole transfer the caller wants done. `result` is filled by execute(): the bytes
/// transferred (== bytes), a negative errno, or io_in_doubt.
struct io_request {
  io_op op = io_op::read;
  std::uint32_t file = 0;          ///< index into the device's files
  std::uint64_t offset = 0;        ///< aligned to required_alignment()
  void* buffer = nullptr;          ///< aligned to required_alignment()
  std::uint32_t bytes = 0;         ///< multiple of required_alignment()
  std::int32_t buffer_index = -1;  ///< registered buffer region holding `buffer`, or -1
  std::int32_t result = 0;
};

/// One piece of a transfer as a backend sees it (a resubmitted short transfer is a
/// smaller piece of the same request). `tag` comes back in the completion.
struct io_piece {
  std::uint32_t tag;
  io_op op;
  std::uint32_t file;
  std::uint64_t offset;
  void* buffer;
  std::uint32_t bytes;
  std::int32_t buffer_index;
};

struct io_completion {
  std::uint32_t tag;
  std::int32_t result;  ///< bytes, or -errno
};

/// A submission/completion queue used by one thread at a time (an io_uring, a share of
/// a thread pool...). Made on the cold path, reused for every batch.
class io_channel {
 public:
  virtual ~io_channel() = default;
  /// Queues a piece. The caller never has more than depth() pieces outstanding.
  virtual void submit(const io_piece& piece) noexcept = 0;
  /// Sends what was queued and waits until at least `min_wait` completions are ready;
  /// writes up to `max` of them. Returns the count, or a negative errno if the
  /// channel itself failed.
  virtual int reap(io_completion* out, int max, int min_wait) noexcept = 0;
  /// Sends what was queued without waiting (backends that start each piece at
  /// submit() need not do anything).
  virtual void flush() noexcept {}
  virtual unsigned depth() const noexcept = 0;
};

/// A set of files (or a device) with block I/O. Thread-safe: each execute() leases
/// its own channel.
class block_device {
 public:
  virtual ~block_device() = default;

  /// Backend name for logs ("io_uring", "posix", "memory", "faulty(...)").
  virtual std::string_view name() const noexcept = 0;
  /// Offsets, lengths and buffer addresses must be multiples of this.
  virtual std::size_t required_alignment() const noexcept = 0;
  /// Registers memory regions for zero-copy fixed-buffer I/O where the backend has
  /// it. Call before the first execute(). Returns false (and says why in `why`) when
  /// registration is unavailable; I/O then works without it.
  virtual bool register_buffers(std::span<const iovec> regions, std::string* why) {
    (void)regions;
    if (why) *why = "backend has no registered buffers";
    return false;
  }
  /// Makes written data durable (fdatasync of every file).
  /// Returns ok, device_error, no_space, unsupported.
  [[nodiscard]] virtual errc sync() noexcept = 0;
  /// Makes a new channel (cold path: may allocate). Channels are pooled by execute().
  virtual std::unique_ptr<io_channel> open_channel() = 0;

  /// Runs every request to completion keeping up to `queue_depth` pieces in flight
  /// (0: the channel's depth). Short transfers are resubmitted from where they
  /// stopped; EAGAIN/EINTR are retried a bounded number of times.
  /// Returns ok when all succeeded, else the code of the first failure (each request's
  /// `result` says which): device_error, no_space, unsupported, retry, bad_state.
  /// Every request's `result` is set, whatever happens: when no channel can be had, all
  /// are -EIO; when the channel breaks, requests with a piece in flight are io_in_doubt
  /// and those never started -ECANCELED. on_complete runs only for finished requests.
  ///
  /// `on_complete(context, index)` (optional) runs as soon as request `index` has
  /// finished (successfully or not), while later requests are still in flight: the
  /// caller can verify or copy a block while the device works on the next ones.
  [[nodiscard]] errc execute(std::span<io_request> requests, unsigned queue_depth = 0,
                             void (*on_complete)(void* context, std::size_t index) = nullptr,
                             void* context = nullptr) noexcept;

 private:
  struct channel_pool {
    std::mutex mutex;
    std::vector<std::unique_ptr<io_channel>> idle;
  };
  std::unique_ptr<io_channel> lease_channel() noexcept;
  void return_channel(std::unique_ptr<io_channel> channel) noexcept;
  channel_pool pool_;
};

}  // namespace attnstore

#include "attnstore/detail/block_device.inl"
