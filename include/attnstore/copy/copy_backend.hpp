// copy_backend: asynchronous copies of segment lists on named streams, ordered by
// events. host_copy_backend (worker threads) serves every CPU test; the CUDA backend
// (cudaMemcpyAsync and a gather kernel) serves GPUs. The pipeline above is the same.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

#include "attnstore/status.hpp"

namespace attnstore {

/// A non-owning handle to a backend's stream (a cudaStream_t, or a host worker queue).
/// Never null: a default or null handle is refused at construction.
class stream_ref {
 public:
  explicit stream_ref(void* handle) : handle_(handle) {
    if (!handle) throw std::invalid_argument("stream_ref: null stream handle (use the backend's create_stream)");
  }
  void* get() const noexcept { return handle_; }
  friend bool operator==(stream_ref a, stream_ref b) noexcept { return a.handle_ == b.handle_; }

 private:
  void* handle_;
};

/// One contiguous copy.
struct copy_segment {
  const void* src;
  void* dst;
  std::size_t bytes;
};

/// An event from the backend's fixed pool, by index.
using event_id = std::uint32_t;
inline constexpr event_id no_event = ~0u;

class copy_backend {
 public:
  virtual ~copy_backend() = default;
  virtual std::string_view name() const noexcept = 0;
  /// True when segments may point into GPU memory.
  virtual bool supports_device_memory() const noexcept = 0;

  /// Makes a stream owned by the backend (cold path). Throws on failure.
  virtual stream_ref create_stream() = 0;
  /// Waits for a stream's queued work and frees it (cold path).
  virtual void destroy_stream(stream_ref stream) noexcept = 0;

  /// Queues the copies after everything already queued on `stream`. The segment list
  /// is consumed before the call returns (the caller may reuse it); the memory it
  /// points to must stay valid until an event recorded after it completes.
  /// Returns ok, invalid_argument (too many segments for one call), device_error.
  [[nodiscard]] virtual errc copy_async(std::span<const copy_segment> segments, stream_ref stream) noexcept = 0;

  /// Queues a host function after everything already queued on `stream` (it runs on
  /// a backend thread; for CUDA, cudaLaunchHostFunc). For work on host memory in
  /// stream order, e.g. re-rotating keys a copy just placed.
  [[nodiscard]] virtual errc launch_host_fn(void (*fn)(void*), void* context, stream_ref stream) noexcept = 0;

  /// GPU memory for the backend's own tables (cold path); nullptr where the backend
  /// has no device memory.
  virtual void* allocate_device(std::size_t bytes) noexcept {
    (void)bytes;
    return nullptr;
  }
  virtual void free_device(void* p) noexcept { (void)p; }

  /// Takes an event from the pool (no_event when all are in use). Cold-ish: callers
  /// keep events for the life of a request.
  [[nodiscard]] virtual event_id acquire_event() noexcept = 0;
  virtual void release_event(event_id e) noexcept = 0;
  /// Marks the point in `stream` after everything queued so far.
  [[nodiscard]] virtual errc record(event_id e, stream_ref stream) noexcept = 0;
  /// Makes work queued later on `waiter` wait for the event: no host block.
  [[nodiscard]] virtual errc wait(stream_ref waiter, event_id e) noexcept = 0;
  /// Blocks the calling thread until the event has completed.
  [[nodiscard]] virtual errc synchronize(event_id e) noexcept = 0;
  /// True once the event has completed (or was never recorded).
  virtual bool ready(event_id e) noexcept = 0;
};

struct host_copy_options {
  unsigned events = 16384;             ///< event pool size
  std::size_t max_segments = 1 << 16;  ///< segments one stream can hold queued
  unsigned max_streams = 16;
  /// Testing only: each queued item sleeps up to this long before it runs, and the
  /// segments of one copy_async run in a shuffled order, so any missing event makes
  /// outputs wrong. 0 disables.
  unsigned chaos_max_delay_us = 0;
  std::uint64_t chaos_seed = 1;
};

/// Streams are worker threads with fixed-size queues; events are fences. Nothing
/// allocates after construction except create_stream().
std::unique_ptr<copy_backend> make_host_copy_backend(const host_copy_options& options = {});

/// The CUDA backend when the CUDA part is built and a device is present, else nullptr
/// with the reason in `why`.
std::unique_ptr<copy_backend> make_cuda_copy_backend(std::string* why);

/// make_cuda_copy_backend() if it works, else the host backend (the reason is put in
/// `why` when not null).
std::unique_ptr<copy_backend> make_copy_backend(std::string* why = nullptr);

}  // namespace attnstore
