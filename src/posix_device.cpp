// pread/pwrite backend: channels queue pieces to a shared worker pool without
// allocating (pieces live in a fixed per-channel array, linked intrusively).
#include "attnstore/io/posix_device.hpp"

#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace attnstore {
namespace {

class posix_device;

struct posix_job {
  io_piece piece{};
  int result = 0;
  posix_job* next = nullptr;
  class posix_channel* owner = nullptr;
};

class posix_channel final : public io_channel {
 public:
  posix_channel(posix_device& dev, unsigned depth);
  void submit(const io_piece& piece) noexcept override;
  int reap(io_completion* out, int max, int min_wait) noexcept override;
  unsigned depth() const noexcept override { return unsigned(jobs_.size()); }
  void complete(posix_job* job) noexcept;

 private:
  posix_device& dev_;
  std::vector<posix_job> jobs_;
  posix_job* free_ = nullptr;
  std::mutex mutex_;  // guards done_ list
  std::condition_variable cv_;
  posix_job* done_head_ = nullptr;
  posix_job* done_tail_ = nullptr;
};

class posix_device final : public block_device {
 public:
  posix_device(std::span<const int> fds, const posix_options& o) : fds_(fds.begin(), fds.end()), options_(o) {
    for (unsigned i = 0; i < o.threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~posix_device() override {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  std::string_view name() const noexcept override { return "posix"; }
  std::size_t required_alignment() const noexcept override { return options_.alignment; }
  errc sync() noexcept override {
    for (int fd : fds_)
      if (::fdatasync(fd) != 0) return errc_from_errno(errno);
    return errc::ok;
  }
  std::unique_ptr<io_channel> open_channel() override {
    return std::make_unique<posix_channel>(*this, options_.queue_depth);
  }
  void enqueue(posix_job* job) noexcept {
    {
      std::lock_guard lock(mutex_);
      job->next = nullptr;
      if (tail_)
        tail_->next = job;
      else
        head_ = job;
      tail_ = job;
    }
    cv_.notify_one();
  }

 private:
  void work() {
    for (;;) {
      posix_job* job;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || head_; });
        if (!head_) return;
        job = head_;
        head_ = job->next;
        if (!head_) tail_ = nullptr;
      }
      const io_piece& p = job->piece;
      ssize_t r = p.op == io_op::read ? ::pread(fds_[p.file], p.buffer, p.bytes, off_t(p.offset))
                                      : ::pwrite(fds_[p.file], p.buffer, p.bytes, off_t(p.offset));
      job->result = r < 0 ? -errno : int(r);
      job->owner->complete(job);
    }
  }

  std::vector<int> fds_;
  posix_options options_;
  std::mutex mutex_;
  std::condition_variable cv_;
  posix_job* head_ = nullptr;
  posix_job* tail_ = nullptr;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

posix_channel::posix_channel(posix_device& dev, unsigned depth) : dev_(dev), jobs_(depth) {
  for (auto& j : jobs_) {
    j.owner = this;
    j.next = free_;
    free_ = &j;
  }
}

void posix_channel::submit(const io_piece& piece) noexcept {
  posix_job* job = free_;  // only the owning thread touches free_
  free_ = job->next;
  job->piece = piece;
  dev_.enqueue(job);
}

void posix_channel::complete(posix_job* job) noexcept {
  {
    std::lock_guard lock(mutex_);
    job->next = nullptr;
    if (done_tail_)
      done_tail_->next = job;
    else
      done_head_ = job;
    done_tail_ = job;
  }
  cv_.notify_one();
}

int posix_channel::reap(io_completion* out, int max, int min_wait) noexcept {
  std::unique_lock lock(mutex_);
  auto ready = [&] {
    int n = 0;
    for (posix_job* j = done_head_; j && n < min_wait; j = j->next) ++n;
    return n >= min_wait;
  };
  cv_.wait(lock, ready);
  int n = 0;
  while (done_head_ && n < max) {
    posix_job* j = done_head_;
    done_head_ = j->next;
    if (!done_head_) done_tail_ = nullptr;
    out[n++] = io_completion{j->piece.tag, j->result};
    j->next = free_;
    free_ = j;
  }
  return n;
}

}  // namespace

std::unique_ptr<block_device> make_posix_device(std::span<const int> fds, const posix_options& options) {
  if (options.threads == 0 || options.threads > 256)
    throw std::invalid_argument("posix_options.threads is " + std::to_string(options.threads) + ", allowed 1..256");
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    throw std::invalid_argument("posix_options.queue_depth is " + std::to_string(options.queue_depth) +
                                ", allowed 1..4096");
  return std::make_unique<posix_device>(fds, options);
}

}  // namespace attnstore
