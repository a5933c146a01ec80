// io_uring backend. One ring per channel; files and buffers registered per ring.
#include "attnstore/io/uring_device.hpp"

#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace attnstore {
namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

class uring_channel final : public io_channel {
 public:
  uring_channel(unsigned depth, const int* fds) : depth_(depth), fds_(fds) {}
  ~uring_channel() override {
    if (ready_) io_uring_queue_exit(&ring_);
  }
  // The ring is set up in place: struct io_uring points into its own mappings.
  bool init(std::span<const int> files, std::span<const iovec> buffers, bool register_files) noexcept {
    if (io_uring_queue_init(depth_, &ring_, 0) < 0) return false;
    ready_ = true;
    if (register_files && !files.empty())
      fixed_files_ = io_uring_register_files(&ring_, files.data(), unsigned(files.size())) == 0;
    if (!buffers.empty())
      fixed_buffers_ = io_uring_register_buffers(&ring_, buffers.data(), unsigned(buffers.size())) == 0;
    return true;
  }

  void submit(const io_piece& p) noexcept override {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {  // cannot happen: callers keep at most depth() outstanding
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    const int fd = fixed_files_ ? int(p.file) : fds_[p.file];
    const bool fixed_buf = fixed_buffers_ && p.buffer_index >= 0;
    if (p.op == io_op::read) {
      if (fixed_buf)
        io_uring_prep_read_fixed(sqe, fd, p.buffer, p.bytes, p.offset, p.buffer_index);
      else
        io_uring_prep_read(sqe, fd, p.buffer, p.bytes, p.offset);
    } else {
      if (fixed_buf)
        io_uring_prep_write_fixed(sqe, fd, p.buffer, p.bytes, p.offset, p.buffer_index);
      else
        io_uring_prep_write(sqe, fd, p.buffer, p.bytes, p.offset);
    }
    if (fixed_files_) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, p.tag);
  }

  int reap(io_completion* out, int max, int min_wait) noexcept override {
    int ret;
    do {
      ret = io_uring_submit_and_wait(&ring_, unsigned(min_wait));
    } while (ret == -EINTR);
    if (ret < 0 && ret != -EBUSY && ret != -EAGAIN) return ret;
    int n = 0;
    io_uring_cqe* cqe;
    unsigned head;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      if (n == max) break;
      out[n].tag = static_cast<std::uint32_t>(io_uring_cqe_get_data64(cqe));
      out[n].result = cqe->res;
      ++n;
    }
    io_uring_cq_advance(&ring_, unsigned(n));
    return n;
  }

  void flush() noexcept override { io_uring_submit(&ring_); }
  unsigned depth() const noexcept override { return depth_; }

 private:
  io_uring ring_{};
  unsigned depth_;
  const int* fds_;
  bool ready_ = false;
  bool fixed_files_ = false;
  bool fixed_buffers_ = false;
};

class uring_device final : public block_device {
 public:
  uring_device(std::span<const int> fds, const uring_options& o) : fds_(fds.begin(), fds.end()), options_(o) {}

  std::string_view name() const noexcept override { return "io_uring"; }
  std::size_t required_alignment() const noexcept override { return options_.alignment; }

  bool register_buffers(std::span<const iovec> regions, std::string* why) override {
    if (!options_.register_buffers) {
      if (why) *why = "buffer registration disabled by configuration";
      return false;
    }
    // Probe once on a scratch ring so the caller learns now whether it works.
    io_uring ring;
    int ret = io_uring_queue_init(4, &ring, 0);
    if (ret == 0) {
      ret = io_uring_register_buffers(&ring, regions.data(), unsigned(regions.size()));
      io_uring_queue_exit(&ring);
    }
    if (ret < 0) {
      if (why)
        *why = "io_uring buffer registration failed: " + errno_text(-ret) +
               (ret == -ENOMEM ? "; memlock limit too low (ulimit -l)" : "") + "; using unregistered buffers";
      return false;
    }
    buffers_.assign(regions.begin(), regions.end());
    return true;
  }

  errc sync() noexcept override {
    for (int fd : fds_)
      if (::fdatasync(fd) != 0) return errc_from_errno(errno);
    return errc::ok;
  }

  std::unique_ptr<io_channel> open_channel() override {
    auto channel = std::make_unique<uring_channel>(options_.queue_depth, fds_.data());
    if (!channel->init(fds_, buffers_, options_.register_files)) return nullptr;
    return channel;
  }

 private:
  std::vector<int> fds_;
  std::vector<iovec> buffers_;
  uring_options options_;
};

}  // namespace

std::unique_ptr<block_device> make_uring_device(std::span<const int> fds, const uring_options& options,
                                                std::string* why) {
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    throw std::invalid_argument("uring_options.queue_depth is " + std::to_string(options.queue_depth) +
                                ", allowed 1..4096");
  io_uring ring;
  int ret = io_uring_queue_init(options.queue_depth, &ring, 0);
  if (ret < 0) {
    if (why) *why = "io_uring_queue_init failed: " + errno_text(-ret);
    return nullptr;
  }
  io_uring_queue_exit(&ring);
  return std::make_unique<uring_device>(fds, options);
}

}  // namespace attnstore
