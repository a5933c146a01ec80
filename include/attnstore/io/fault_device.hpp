// Fault-injecting wrapper around any block_device: EIO, EAGAIN, short transfers,
// ENOSPC after a write budget, and latency, at configurable rates. The faults go
// through the same completion loop as real ones, so tests drive the real recovery code.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "attnstore/io/forwarding_device.hpp"

namespace attnstore {

struct fault_config {
  double error_rate = 0;                           ///< fraction of pieces that fail with EIO
  double again_rate = 0;                           ///< fraction that fail with EAGAIN (retried by the loop)
  double short_rate = 0;                           ///< fraction that transfer only part of their bytes
  bool fail_reads = true;                          ///< the rates above apply to reads
  bool fail_writes = true;                         ///< ... and to writes
  std::uint64_t write_budget = ~std::uint64_t(0);  ///< writes past this many bytes get ENOSPC
  unsigned latency_us = 0;                         ///< added before each submitted piece
  std::uint64_t seed = 1;
};

class fault_device final : public forwarding_device {
 public:
  explicit fault_device(std::unique_ptr<block_device> inner, fault_config config = {})
      : forwarding_device(std::move(inner)), config_(config) {}

  /// Changes the faults from now on (thread-safe).
  void set_faults(const fault_config& c) noexcept {
    std::lock_guard lock(mutex_);
    config_ = c;
  }
  /// Faults injected so far.
  std::uint64_t injected() const noexcept { return injected_.load(); }
  std::string_view name() const noexcept override { return "faulty"; }

 protected:
  std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> in) override {
    std::lock_guard lock(mutex_);
    return std::make_unique<channel>(*this, std::move(in), config_.seed + channels_++);
  }

 private:
  fault_config snapshot() noexcept {
    std::lock_guard lock(mutex_);
    return config_;
  }

  class channel final : public io_channel {
   public:
    channel(fault_device& dev, std::unique_ptr<io_channel> inner, std::uint64_t seed)
        : dev_(dev), inner_(std::move(inner)), rng_(seed) {
      local_.reserve(inner_->depth());
    }
    void submit(const io_piece& p0) noexcept override {
      io_piece p = p0;
      const fault_config c = dev_.snapshot();
      if (c.latency_us) std::this_thread::sleep_for(std::chrono::microseconds(c.latency_us));
      const bool eligible = p.op == io_op::read ? c.fail_reads : c.fail_writes;
      const double roll = std::uniform_real_distribution<double>(0, 1)(rng_);
      auto local = [&](int err) {
        ++dev_.injected_;
        local_.push_back({p.tag, -err});
      };
      if (p.op == io_op::write) {
        std::uint64_t before = dev_.written_.fetch_add(p.bytes);
        if (before + p.bytes > c.write_budget) return local(ENOSPC);
      }
      if (eligible && roll < c.error_rate) return local(EIO);
      if (eligible && roll < c.error_rate + c.again_rate) return local(EAGAIN);
      const std::uint32_t a = std::uint32_t(dev_.required_alignment());
      if (eligible && roll < c.error_rate + c.again_rate + c.short_rate && p.bytes > a) {
        ++dev_.injected_;
        p.bytes = std::max<std::uint32_t>(a, (p.bytes / 2) / a * a);
      }
      inner_->submit(p);
      ++inner_outstanding_;
    }
    int reap(io_completion* out, int max, int min_wait) noexcept override {
      int n = 0;
      while (!local_.empty() && n < max) {
        out[n++] = local_.back();
        local_.pop_back();
      }
      if (n == max || inner_outstanding_ == 0) return n;
      int need = min_wait - n;
      if (need < 0) need = 0;
      if (need > int(inner_outstanding_)) need = int(inner_outstanding_);
      int got = inner_->reap(out + n, max - n, need);
      if (got < 0) return got;
      inner_outstanding_ -= unsigned(got);
      return n + got;
    }
    void flush() noexcept override { inner_->flush(); }
    unsigned depth() const noexcept override { return inner_->depth(); }

   private:
    fault_device& dev_;
    std::unique_ptr<io_channel> inner_;
    std::mt19937_64 rng_;
    std::vector<io_completion> local_;  // reserved to depth: no growth per piece
    unsigned inner_outstanding_ = 0;
  };

  std::mutex mutex_;
  fault_config config_;
  std::uint64_t channels_ = 0;
  std::atomic<std::uint64_t> injected_{0};
  std::atomic<std::uint64_t> written_{0};
};

}  // namespace attnstore
