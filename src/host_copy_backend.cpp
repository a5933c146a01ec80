// Host copy backend: a stream is a worker thread draining a fixed ring of items
// (copy, record, wait); an event is a pair of generation counters.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "attnstore/copy/copy_backend.hpp"
#include "attnstore/detail/slot_pool.hpp"

namespace attnstore {
namespace {

struct host_event {
  std::atomic<std::uint64_t> recorded{0};
  std::atomic<std::uint64_t> completed{0};
};

class host_copy_backend;

class host_stream {
 public:
  host_stream(host_copy_backend& owner, std::size_t max_segments, std::uint64_t seed);
  ~host_stream();
  errc push_copy(std::span<const copy_segment> segs) noexcept;
  errc push_record(event_id e, std::uint64_t gen) noexcept;
  errc push_wait(event_id e, std::uint64_t gen) noexcept;
  errc push_fn(void (*fn)(void*), void* ctx) noexcept;

 private:
  enum class kind : std::uint8_t { copy, record, wait, fn };
  struct item {
    kind what;
    event_id event;
    std::uint64_t gen;
    std::size_t seg_begin, seg_count;
    void (*fn)(void*) = nullptr;
    void* ctx = nullptr;
  };
  static constexpr std::size_t item_capacity = 8192;
  errc push(item it, std::span<const copy_segment> segs) noexcept;
  void run();

  host_copy_backend& owner_;
  std::vector<item> items_;
  std::vector<copy_segment> segs_;
  std::size_t item_head_ = 0, item_count_ = 0;  // ring of items
  std::size_t seg_head_ = 0, seg_count_ = 0;    // ring of segments
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::mt19937_64 rng_;
  std::thread worker_;
};

class host_copy_backend final : public copy_backend {
 public:
  explicit host_copy_backend(const host_copy_options& o) : options_(o), events_(o.events), event_pool_(o.events) {}
  ~host_copy_backend() override {
    streams_.clear();  // joins the workers before the events go
  }
  std::string_view name() const noexcept override { return options_.chaos_max_delay_us ? "host(chaos)" : "host"; }
  bool supports_device_memory() const noexcept override { return false; }
  stream_ref create_stream() override {
    std::lock_guard lock(streams_mutex_);
    if (streams_.size() >= options_.max_streams)
      throw std::runtime_error("host_copy_backend: more than max_streams (" + std::to_string(options_.max_streams) +
                               ") streams");
    streams_.push_back(
        std::make_unique<host_stream>(*this, options_.max_segments, options_.chaos_seed + streams_.size()));
    return stream_ref(streams_.back().get());
  }
  void destroy_stream(stream_ref s) noexcept override {
    std::unique_ptr<host_stream> victim;
    {
      std::lock_guard lock(streams_mutex_);
      for (auto& p : streams_)
        if (p.get() == s.get()) {
          victim = std::move(p);
          p = std::move(streams_.back());
          streams_.pop_back();
          break;
        }
    }
    // ~host_stream drains: its worker finishes the queued items, then joins.
  }
  errc copy_async(std::span<const copy_segment> segs, stream_ref s) noexcept override {
    return static_cast<host_stream*>(s.get())->push_copy(segs);
  }
  errc launch_host_fn(void (*fn)(void*), void* ctx, stream_ref s) noexcept override {
    return static_cast<host_stream*>(s.get())->push_fn(fn, ctx);
  }
  event_id acquire_event() noexcept override {
    event_id e = event_pool_.allocate();
    if (e != no_event) {
      events_[e].recorded.store(0);
      events_[e].completed.store(0);
    }
    return e;
  }
  void release_event(event_id e) noexcept override {
    if (e != no_event) event_pool_.release(e);
  }
  errc record(event_id e, stream_ref s) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    std::uint64_t gen = events_[e].recorded.fetch_add(1) + 1;
    return static_cast<host_stream*>(s.get())->push_record(e, gen);
  }
  errc wait(stream_ref waiter, event_id e) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    return static_cast<host_stream*>(waiter.get())->push_wait(e, events_[e].recorded.load());
  }
  errc synchronize(event_id e) noexcept override {
    if (e >= events_.size()) return errc::invalid_argument;
    wait_for(e, events_[e].recorded.load());
    return errc::ok;
  }
  bool ready(event_id e) noexcept override {
    return e >= events_.size() || events_[e].completed.load() >= events_[e].recorded.load();
  }

  // Called by stream workers.
  void complete(event_id e, std::uint64_t gen) noexcept {
    {
      std::lock_guard lock(done_mutex_);
      std::uint64_t cur = events_[e].completed.load();
      if (gen > cur) events_[e].completed.store(gen);
    }
    done_cv_.notify_all();
  }
  void wait_for(event_id e, std::uint64_t gen) noexcept {
    if (events_[e].completed.load() >= gen) return;
    std::unique_lock lock(done_mutex_);
    done_cv_.wait(lock, [&] { return events_[e].completed.load() >= gen; });
  }
  unsigned chaos_us() const noexcept { return options_.chaos_max_delay_us; }

 private:
  host_copy_options options_;
  std::vector<host_event> events_;
  detail::slot_pool event_pool_;
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
  std::mutex streams_mutex_;
  std::vector<std::unique_ptr<host_stream>> streams_;
};

host_stream::host_stream(host_copy_backend& owner, std::size_t max_segments, std::uint64_t seed)
    : owner_(owner), items_(item_capacity), segs_(max_segments), rng_(seed) {
  worker_ = std::thread([this] { run(); });
}

host_stream::~host_stream() {
  {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return item_count_ == 0; });  // queued work completes first
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

errc host_stream::push(item it, std::span<const copy_segment> segs) noexcept {
  if (segs.size() > segs_.size()) return errc::invalid_argument;
  std::unique_lock lock(mutex_);
  // A full queue makes the producer wait, as a full CUDA launch queue does.
  cv_.wait(lock, [&] { return item_count_ < items_.size() && seg_count_ + segs.size() <= segs_.size(); });
  it.seg_begin = (seg_head_ + seg_count_) % segs_.size();
  it.seg_count = segs.size();
  for (std::size_t i = 0; i < segs.size(); ++i) segs_[(it.seg_begin + i) % segs_.size()] = segs[i];
  seg_count_ += segs.size();
  items_[(item_head_ + item_count_) % items_.size()] = it;
  ++item_count_;
  lock.unlock();
  cv_.notify_all();
  return errc::ok;
}

errc host_stream::push_copy(std::span<const copy_segment> segs) noexcept {
  if (segs.empty()) return errc::ok;
  return push(item{kind::copy, no_event, 0, 0, 0}, segs);
}
errc host_stream::push_record(event_id e, std::uint64_t gen) noexcept {
  return push(item{kind::record, e, gen, 0, 0}, {});
}
errc host_stream::push_wait(event_id e, std::uint64_t gen) noexcept { return push(item{kind::wait, e, gen, 0, 0}, {}); }
errc host_stream::push_fn(void (*fn)(void*), void* ctx) noexcept {
  return push(item{kind::fn, no_event, 0, 0, 0, fn, ctx}, {});
}

void host_stream::run() {
  for (;;) {
    item it;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || item_count_ > 0; });
      if (item_count_ == 0) return;
      it = items_[item_head_];
    }
    if (unsigned us = owner_.chaos_us()) std::this_thread::sleep_for(std::chrono::microseconds(rng_() % (us + 1)));
    switch (it.what) {
      case kind::copy: {
        const std::size_t n = it.seg_count, cap = segs_.size();
        // Chaos: visit segments in a random order (a random start and a stride
        // coprime with n), so nothing may rely on segment order within a call.
        std::size_t start = 0, stride = 1;
        if (owner_.chaos_us() && n > 1) {
          start = rng_() % n;
          do stride = 1 + rng_() % n;
          while (std::gcd(stride, n) != 1);
        }
        for (std::size_t k = 0, i = start; k < n; ++k, i = (i + stride) % n) {
          const copy_segment& s = segs_[(it.seg_begin + i) % cap];
          std::memcpy(s.dst, s.src, s.bytes);
        }
        break;
      }
      case kind::record:
        owner_.complete(it.event, it.gen);
        break;
      case kind::wait:
        owner_.wait_for(it.event, it.gen);
        break;
      case kind::fn:
        it.fn(it.ctx);
        break;
    }
    {
      std::lock_guard lock(mutex_);
      item_head_ = (item_head_ + 1) % items_.size();
      --item_count_;
      seg_head_ = (seg_head_ + it.seg_count) % segs_.size();
      seg_count_ -= it.seg_count;
    }
    cv_.notify_all();
  }
}

}  // namespace

std::unique_ptr<copy_backend> make_host_copy_backend(const host_copy_options& options) {
  if (options.events == 0) throw std::invalid_argument("host_copy_options.events is 0, must be at least 1");
  if (options.max_segments == 0) throw std::invalid_argument("host_copy_options.max_segments is 0, must be at least 1");
  return std::make_unique<host_copy_backend>(options);
}

}  // namespace attnstore
