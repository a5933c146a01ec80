// forwarding_device: a block_device that wraps another one and sees every piece of I/O
// through its own channels (fault injection, crash points, tracing). Subclasses
// implement wrap(), which turns one of the inner device's channels into theirs.
#pragma once

#include <memory>

#include "attnstore/io/block_device.hpp"

namespace attnstore {

class forwarding_device : public block_device {
 public:
  explicit forwarding_device(std::unique_ptr<block_device> inner) : inner_(std::move(inner)) {}

  block_device& inner() noexcept { return *inner_; }
  std::size_t required_alignment() const noexcept override { return inner_->required_alignment(); }
  bool register_buffers(std::span<const iovec> regions, std::string* why) override {
    return inner_->register_buffers(regions, why);
  }
  errc sync() noexcept override { return inner_->sync(); }
  std::unique_ptr<io_channel> open_channel() override {
    auto in = inner_->open_channel();
    return in ? wrap(std::move(in)) : nullptr;
  }

 protected:
  /// Wraps a channel of the inner device (cold path).
  virtual std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> inner_channel) = 0;

 private:
  std::unique_ptr<block_device> inner_;
};

}  // namespace attnstore
