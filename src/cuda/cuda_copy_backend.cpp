// CUDA copy backend: cudaMemcpyAsync for a few segments, cudaMemcpyBatchAsync (one
// driver call) for many; events from a fixed pool; streams are non-blocking.
// The one place CUDA errors become errc for copies.
#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/detail/slot_pool.hpp"

namespace attnstore::detail {
bool cuda_probe_device(std::string* why);

namespace {

errc to_errc(cudaError_t e) noexcept {
  switch (e) {
    case cudaSuccess:
      return errc::ok;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidResourceHandle:
      return errc::invalid_argument;
    case cudaErrorNotReady:
      return errc::in_progress;
    case cudaErrorNotSupported:
      return errc::unsupported;
    default:
      return errc::device_error;
  }
}

class cuda_copy_backend final : public copy_backend {
 public:
  explicit cuda_copy_backend(unsigned events) : events_(events, nullptr), pool_(events) {
    for (auto& e : events_)
      if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess)
        throw std::runtime_error("cuda_copy_backend: cudaEventCreate failed");
  }
  ~cuda_copy_backend() override {
    for (auto& s : streams_)
      if (s.stream) {
        cudaStreamSynchronize(s.stream);
        cudaStreamDestroy(s.stream);
      }
    for (auto e : events_) cudaEventDestroy(e);
  }
  std::string_view name() const noexcept override { return "cuda"; }
  bool supports_device_memory() const noexcept override { return true; }
  stream_ref create_stream() override {
    std::lock_guard lock(mutex_);
    // Reuse the entry of a destroyed stream: hooks are made and destroyed many times
    // over one backend, and entries never move (find() hands out pointers to them).
    stream_state* st = nullptr;
    for (auto& e : streams_)
      if (!e.stream) {
        st = &e;
        break;
      }
    if (!st && streams_.size() == streams_.capacity())
      throw std::runtime_error("cuda_copy_backend: stream table full (" + std::to_string(streams_.size()) + ")");
    cudaStream_t s = nullptr;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess)
      throw std::runtime_error("cuda_copy_backend: cudaStreamCreate failed");
    if (!st) {
      st = &streams_.emplace_back();
      st->dsts.resize(batch_capacity);
      st->srcs.resize(batch_capacity);
      st->sizes.resize(batch_capacity);
    }
    st->stream = s;
    return stream_ref(s);
  }
  void destroy_stream(stream_ref s) noexcept override {
    auto stream = static_cast<cudaStream_t>(s.get());
    cudaStreamSynchronize(stream);
    std::lock_guard lock(mutex_);
    for (auto& st : streams_)
      if (st.stream == stream) {
        cudaStreamDestroy(stream);
        st.stream = nullptr;  // the entry stays: other streams' entries must not move
      }
  }
  errc copy_async(std::span<const copy_segment> segs, stream_ref s) noexcept override {
    auto stream = static_cast<cudaStream_t>(s.get());
    if (segs.size() <= few_segments) {
      for (const auto& g : segs)
        if (auto e = cudaMemcpyAsync(g.dst, g.src, g.bytes, cudaMemcpyDefault, stream); e != cudaSuccess)
          return to_errc(e);
      return errc::ok;
    }
    stream_state* st = find(stream);
    if (!st) return errc::invalid_argument;
    // The batch arrays are read during the call only, so one set per stream suffices.
    std::lock_guard batch_lock(*st->batch_mutex);
    for (std::size_t base = 0; base < segs.size(); base += batch_capacity) {
      const std::size_t n = std::min(batch_capacity, segs.size() - base);
      for (std::size_t i = 0; i < n; ++i) {
        st->dsts[i] = segs[base + i].dst;
        st->srcs[i] = segs[base + i].src;
        st->sizes[i] = segs[base + i].bytes;
      }
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      std::size_t attr_index = 0;
      cudaError_t e =
          cudaMemcpyBatchAsync(st->dsts.data(), st->srcs.data(), st->sizes.data(), n, &attr, &attr_index, 1, stream);
      if (e == cudaErrorNotSupported || e == cudaErrorInvalidValue) {
        cudaGetLastError();  // older drivers: fall back to one call per segment
        for (std::size_t i = 0; i < n; ++i)
          if (auto e2 = cudaMemcpyAsync(st->dsts[i], st->srcs[i], st->sizes[i], cudaMemcpyDefault, stream);
              e2 != cudaSuccess)
            return to_errc(e2);
      } else if (e != cudaSuccess) {
        return to_errc(e);
      }
    }
    return errc::ok;
  }
  errc launch_host_fn(void (*fn)(void*), void* ctx, stream_ref s) noexcept override {
    return to_errc(cudaLaunchHostFunc(static_cast<cudaStream_t>(s.get()), fn, ctx));
  }
  void* allocate_device(std::size_t bytes) noexcept override {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }
  void free_device(void* p) noexcept override {
    if (p) cudaFree(p);
  }
  event_id acquire_event() noexcept override { return pool_.allocate(); }
  void release_event(event_id e) noexcept override {
    if (e != no_event) pool_.release(e);
  }
  errc record(event_id e, stream_ref s) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    return to_errc(cudaEventRecord(events_[e], static_cast<cudaStream_t>(s.get())));
  }
  errc wait(stream_ref waiter, event_id e) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    return to_errc(cudaStreamWaitEvent(static_cast<cudaStream_t>(waiter.get()), events_[e], 0));
  }
  errc synchronize(event_id e) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    return to_errc(cudaEventSynchronize(events_[e]));
  }
  bool ready(event_id e) noexcept override {
    return e >= events_.size() || cudaEventQuery(events_[e]) != cudaErrorNotReady;
  }

 private:
  static constexpr std::size_t few_segments = 8;
  static constexpr std::size_t batch_capacity = 4096;
  struct stream_state {
    cudaStream_t stream = nullptr;  // nullptr: destroyed, the entry is free
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<std::size_t> sizes;
    // Threads may share a stream (the hooks' write stream serves every save): the
    // batch arrays are filled and handed to the driver under this lock.
    std::unique_ptr<std::mutex> batch_mutex = std::make_unique<std::mutex>();
  };
  stream_state* find(cudaStream_t s) noexcept {
    std::lock_guard lock(mutex_);
    for (auto& st : streams_)
      if (st.stream == s) return &st;
    return nullptr;
  }
  std::vector<cudaEvent_t> events_;
  detail::slot_pool pool_;
  std::mutex mutex_;
  std::vector<stream_state> streams_;  // reserved: pointers stay valid
 public:
  void reserve_streams(std::size_t n) { streams_.reserve(n); }
};

}  // namespace

std::unique_ptr<copy_backend> make_cuda_copy_backend_impl(std::string* why) {
  if (!cuda_probe_device(why)) return nullptr;
  auto b = std::make_unique<cuda_copy_backend>(4096);
  b->reserve_streams(64);
  return b;
}

}  // namespace attnstore::detail
