// In-memory block device: files are byte arrays. For tests and for engines that want
// the store's logic without a disk. Enforces the same alignment rules as O_DIRECT.
#pragma once

#include <cerrno>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "attnstore/io/block_device.hpp"

namespace attnstore {

class memory_device final : public block_device {
 public:
  /// One zero-filled file per entry of `file_bytes`.
  explicit memory_device(std::span<const std::uint64_t> file_bytes, std::size_t alignment = 512, unsigned depth = 64)
      : alignment_(alignment), depth_(depth) {
    for (auto b : file_bytes) files_.push_back(file{std::make_unique<std::byte[]>(b), b});
  }

  std::string_view name() const noexcept override { return "memory"; }
  std::size_t required_alignment() const noexcept override { return alignment_; }
  errc sync() noexcept override { return errc::ok; }
  std::unique_ptr<io_channel> open_channel() override { return std::make_unique<channel>(*this, depth_); }

  /// Direct access to a file's bytes (tests corrupt blocks through this).
  std::span<std::byte> file_bytes(std::uint32_t f) noexcept { return {files_[f].data.get(), files_[f].bytes}; }

 private:
  struct file {
    std::unique_ptr<std::byte[]> data;
    std::uint64_t bytes;
  };

  int transfer(const io_piece& p) noexcept {
    const auto a = alignment_;
    if (p.file >= files_.size()) return -EBADF;
    if (p.offset % a || p.bytes % a || reinterpret_cast<std::uintptr_t>(p.buffer) % a) return -EINVAL;
    file& f = files_[p.file];
    if (p.offset >= f.bytes) return p.op == io_op::read ? 0 : -ENOSPC;
    const std::uint64_t n = std::min<std::uint64_t>(p.bytes, f.bytes - p.offset);
    if (p.op == io_op::read)
      std::memcpy(p.buffer, f.data.get() + p.offset, n);
    else
      std::memcpy(f.data.get() + p.offset, p.buffer, n);
    return int(n);
  }

  class channel final : public io_channel {
   public:
    channel(memory_device& dev, unsigned depth) : dev_(dev), done_(depth) {}
    void submit(const io_piece& p) noexcept override { done_[count_++] = {p.tag, dev_.transfer(p)}; }
    int reap(io_completion* out, int max, int) noexcept override {
      int n = count_ < unsigned(max) ? int(count_) : max;
      std::memcpy(out, done_.data(), sizeof(io_completion) * unsigned(n));
      std::memmove(done_.data(), done_.data() + n, sizeof(io_completion) * (count_ - unsigned(n)));
      count_ -= unsigned(n);
      return n;
    }
    unsigned depth() const noexcept override { return unsigned(done_.size()); }

   private:
    memory_device& dev_;
    std::vector<io_completion> done_;
    unsigned count_ = 0;
  };

  std::vector<file> files_;
  std::size_t alignment_;
  unsigned depth_;
};

}  // namespace attnstore
