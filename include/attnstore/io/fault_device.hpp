// Fault-injecting wrapper around any block_device: EIO, EAGAIN, short transfers,
// ENOSPC after a write budget, and latency, at configurable rates; and, for tests that
// enumerate every I/O site of a scenario, one chosen piece failed (or cut short, or
// torn), a channel that breaks, and channels that cannot be opened. The faults go
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

/// No piece: the piece-indexed faults below are off.
inline constexpr std::uint64_t no_piece = ~std::uint64_t(0);

/// What happens to the piece chosen by fault_config::fail_piece.
enum class piece_fault : std::uint8_t {
  error,           ///< fails with fail_piece_errno; nothing is transferred
  short_transfer,  ///< transfers the first half (aligned) and reports that count: the loop resubmits the rest
                   ///< (a piece of one alignment unit goes through whole)
  torn,            ///< transfers the first half (aligned) but reports fail_piece_errno: a torn write (or read);
                   ///< a piece of one alignment unit transfers nothing and fails
};

struct fault_config {
  double error_rate = 0;                           ///< fraction of pieces that fail with EIO
  double again_rate = 0;                           ///< fraction that fail with EAGAIN (retried by the loop)
  double short_rate = 0;                           ///< fraction that transfer only part of their bytes
  bool fail_reads = true;                          ///< the rates above (and fail_piece) apply to reads
  bool fail_writes = true;                         ///< ... and to writes
  std::uint64_t write_budget = ~std::uint64_t(0);  ///< writes past this many bytes (since construction) get ENOSPC
  unsigned latency_us = 0;                         ///< added before each submitted piece
  std::uint64_t seed = 1;

  // Deterministic faults. Pieces are numbered from 0 in submission order, counting
  // every piece (reads, writes, resubmissions) since the configuration was set
  // (construction or set_faults): with one thread doing I/O, a scenario that is run
  // again submits the same pieces in the same order, so each one can be failed in turn.

  /// The piece that fails (when it is a read and fail_reads is set, or a write and
  /// fail_writes is set), in the way fail_piece_kind says.
  std::uint64_t fail_piece = no_piece;
  piece_fault fail_piece_kind = piece_fault::error;
  int fail_piece_errno = EIO;  ///< EIO, ENOSPC, ...
  /// The channel that receives this piece breaks: that piece and every later one
  /// submitted to it are not forwarded, and its next reap() returns -break_errno (after
  /// draining what the inner channel already had): every outstanding piece of that
  /// channel is lost, as when an io_uring ring fails. The device's other channels and
  /// new ones work, unless fail_open_after_break is set.
  std::uint64_t break_channel_at = no_piece;
  int break_errno = EIO;
  /// open_channel() returns no channel (a device whose queues cannot be set up).
  bool fail_open_channel = false;
  /// ... from the moment a channel broke on (the device is gone).
  bool fail_open_after_break = false;
};

/// One submitted piece, as fault_device::set_trace records it.
struct piece_trace {
  io_op op;
  std::uint32_t file;
  std::uint64_t offset;
  std::uint32_t bytes;
};

class fault_device final : public forwarding_device {
 public:
  explicit fault_device(std::unique_ptr<block_device> inner, fault_config config = {})
      : forwarding_device(std::move(inner)), config_(config) {}

  /// Changes the faults from now on (thread-safe). Restarts the piece numbering.
  void set_faults(const fault_config& c) noexcept {
    std::lock_guard lock(mutex_);
    config_ = c;
    pieces_ = 0;
    broke_ = false;
  }
  /// Faults injected so far (rates, budget, the chosen piece, a broken channel, a
  /// refused open_channel).
  std::uint64_t injected() const noexcept { return injected_.load(); }
  /// Pieces submitted since the configuration was set.
  std::uint64_t pieces() const noexcept {
    std::lock_guard lock(mutex_);
    return pieces_;
  }
  /// Bytes of write pieces submitted since construction (what write_budget counts).
  std::uint64_t written() const noexcept { return written_.load(); }
  /// Records every submitted piece into `trace` (nullptr: stop). Test support: it
  /// allocates as the vector grows.
  void set_trace(std::vector<piece_trace>* trace) noexcept {
    std::lock_guard lock(mutex_);
    trace_ = trace;
  }
  std::string_view name() const noexcept override { return "faulty"; }

  std::unique_ptr<io_channel> open_channel() override {
    {
      std::lock_guard lock(mutex_);
      if (config_.fail_open_channel || (config_.fail_open_after_break && broke_)) {
        ++injected_;
        return nullptr;
      }
    }
    return forwarding_device::open_channel();
  }

 protected:
  std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> in) override {
    std::lock_guard lock(mutex_);
    return std::make_unique<channel>(*this, std::move(in), config_.seed + channels_++);
  }

 private:
  // The configuration and this piece's number (under the lock, so numbers follow
  // submission order).
  fault_config next_piece(const io_piece& p, std::uint64_t* index) noexcept {
    std::lock_guard lock(mutex_);
    *index = pieces_++;
    if (trace_) {
      try {
        trace_->push_back({p.op, p.file, p.offset, p.bytes});
      } catch (...) {
      }
    }
    return config_;
  }
  void note_break() noexcept {
    std::lock_guard lock(mutex_);
    broke_ = true;
  }

  class channel final : public io_channel {
   public:
    channel(fault_device& dev, std::unique_ptr<io_channel> inner, std::uint64_t seed)
        : dev_(dev), inner_(std::move(inner)), rng_(seed) {
      local_.reserve(inner_->depth());
      torn_.reserve(inner_->depth());
    }
    void submit(const io_piece& p0) noexcept override {
      io_piece p = p0;
      std::uint64_t index = 0;
      const fault_config c = dev_.next_piece(p, &index);
      if (broken_ || index == c.break_channel_at) {
        if (!broken_) {
          broken_ = true;
          ++dev_.injected_;
          dev_.note_break();
        }
        ++lost_;  // never forwarded: lost with the channel
        return;
      }
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
      const std::uint32_t a = std::uint32_t(dev_.required_alignment());
      const std::uint32_t half = std::max<std::uint32_t>(a, (p.bytes / 2) / a * a);
      if (eligible && index == c.fail_piece && !(c.fail_piece_kind == piece_fault::short_transfer && p.bytes <= a)) {
        // (One aligned unit cannot be cut short; torn, it lands not at all and fails.)
        if (c.fail_piece_kind == piece_fault::error || p.bytes <= a) return local(c.fail_piece_errno);
        ++dev_.injected_;
        p.bytes = half;
        if (c.fail_piece_kind == piece_fault::torn) torn_.push_back({p.tag, -c.fail_piece_errno});
        forward(p);
        return;
      }
      if (eligible && roll < c.error_rate) return local(EIO);
      if (eligible && roll < c.error_rate + c.again_rate) return local(EAGAIN);
      if (eligible && roll < c.error_rate + c.again_rate + c.short_rate && p.bytes > a) {
        ++dev_.injected_;
        p.bytes = half;
      }
      forward(p);
    }
    int reap(io_completion* out, int max, int min_wait) noexcept override {
      if (broken_ && (lost_ > 0 || inner_outstanding_ > 0 || !local_.empty())) {
        // Whatever the inner channel still has lands (or not) unseen; the caller
        // learns only that the channel failed.
        io_completion sink[64];
        while (inner_outstanding_ > 0) {
          const int need = int(std::min<unsigned>(inner_outstanding_, 64));
          const int got = inner_->reap(sink, need, need);
          if (got <= 0) break;
          inner_outstanding_ -= unsigned(got);
        }
        local_.clear();
        torn_.clear();
        lost_ = 0;
        return -dev_.snapshot_break_errno();
      }
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
      for (int i = n; i < n + got && !torn_.empty(); ++i)
        for (std::size_t t = 0; t < torn_.size(); ++t)
          if (torn_[t].tag == out[i].tag) {
            if (out[i].result > 0) out[i].result = torn_[t].result;  // part of it landed; the caller sees the error
            torn_[t] = torn_.back();
            torn_.pop_back();
            break;
          }
      return n + got;
    }
    void flush() noexcept override { inner_->flush(); }
    unsigned depth() const noexcept override { return inner_->depth(); }

   private:
    void forward(const io_piece& p) noexcept {
      inner_->submit(p);
      ++inner_outstanding_;
    }
    fault_device& dev_;
    std::unique_ptr<io_channel> inner_;
    std::mt19937_64 rng_;
    std::vector<io_completion> local_;  // reserved to depth: no growth per piece
    std::vector<io_completion> torn_;   // forwarded pieces whose completion becomes an error
    unsigned inner_outstanding_ = 0;
    unsigned lost_ = 0;  // pieces swallowed by a broken channel
    bool broken_ = false;
  };

  int snapshot_break_errno() noexcept {
    std::lock_guard lock(mutex_);
    return config_.break_errno;
  }

  mutable std::mutex mutex_;
  fault_config config_;
  std::uint64_t channels_ = 0;
  std::uint64_t pieces_ = 0;
  bool broke_ = false;
  std::vector<piece_trace>* trace_ = nullptr;
  std::atomic<std::uint64_t> injected_{0};
  std::atomic<std::uint64_t> written_{0};
};

}  // namespace attnstore
