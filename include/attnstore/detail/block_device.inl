// The completion loop shared by every block_device backend.
#pragma once

#include <cerrno>

namespace attnstore {

inline std::unique_ptr<io_channel> block_device::lease_channel() noexcept {
  {
    std::lock_guard lock(pool_.mutex);
    if (!pool_.idle.empty()) {
      auto ch = std::move(pool_.idle.back());
      pool_.idle.pop_back();
      return ch;
    }
  }
  try {
    return open_channel();  // cold: first use by this level of concurrency
  } catch (...) {
    return nullptr;
  }
}

inline void block_device::return_channel(std::unique_ptr<io_channel> channel) noexcept {
  std::lock_guard lock(pool_.mutex);
  // push_back may allocate only while the pool grows to its peak concurrency.
  try {
    pool_.idle.push_back(std::move(channel));
  } catch (...) {
  }
}

inline errc block_device::execute(std::span<io_request> requests, unsigned queue_depth,
                                  void (*on_complete)(void*, std::size_t), void* context) noexcept {
  if (requests.empty()) return errc::ok;
  std::unique_ptr<io_channel> channel = lease_channel();
  if (!channel) {
    for (auto& r : requests) r.result = -EIO;
    return errc::device_error;
  }
  const unsigned depth = queue_depth == 0 || queue_depth > channel->depth() ? channel->depth() : queue_depth;
  constexpr int max_retries = 16;
  constexpr int batch = 64;
  io_completion done[batch];

  // result accumulates the bytes done until the request finishes; retries live in a
  // small side count kept in the high bits of the tag (requests are < 2^24 per call).
  for (auto& r : requests) r.result = 0;
  const std::size_t n = requests.size();
  std::size_t next = 0, finished = 0;
  unsigned in_flight = 0;
  errc first_error = errc::ok;

  auto submit_piece = [&](std::uint32_t index, std::uint32_t retries) {
    io_request& r = requests[index];
    const std::uint32_t done_bytes = static_cast<std::uint32_t>(r.result);
    channel->submit(io_piece{index | (retries << 24), r.op, r.file, r.offset + done_bytes,
                             static_cast<char*>(r.buffer) + done_bytes, r.bytes - done_bytes, r.buffer_index});
    ++in_flight;
  };

  // Completed requests whose callback is still to run: the device is refilled first,
  // so a slow callback (verifying a block) never leaves the queue short.
  std::uint32_t ready[batch];
  int nready = 0;
  auto top_up = [&] {
    while (in_flight < depth && next < n) {
      if (requests[next].bytes == 0) {
        ++finished;
        if (on_complete) on_complete(context, next);
        ++next;
        continue;
      }
      submit_piece(static_cast<std::uint32_t>(next++), 0);
    }
  };
  while (finished < n) {
    top_up();
    if (in_flight == 0) continue;
    int got = channel->reap(done, batch, 1);
    if (got < 0) {
      // The channel broke. Pieces in flight may still land (a ring torn down with
      // requests outstanding completes them later), so their requests are in doubt:
      // the caller must not reuse those buffers. Requests never started are cancelled.
      for (std::size_t i = 0; i < n; ++i) {
        io_request& r = requests[i];
        if (r.result < 0 || std::uint32_t(r.result) >= r.bytes) continue;  // finished
        r.result = i < next ? io_in_doubt : -ECANCELED;
      }
      channel.reset();  // not returned to the pool
      return errc::device_error;
    }
    nready = 0;
    for (int c = 0; c < got; ++c) {
      --in_flight;
      const std::uint32_t index = done[c].tag & 0xFFFFFFu;
      const std::uint32_t retries = done[c].tag >> 24;
      io_request& r = requests[index];
      const int res = done[c].result;
      if (res < 0) {
        if ((res == -EAGAIN || res == -EINTR) && retries < max_retries) {
          submit_piece(index, retries + 1);
        } else {
          r.result = res;
          ++finished;
          if (first_error == errc::ok) first_error = errc_from_errno(-res);
          ready[nready++] = index;
        }
      } else if (res == 0) {
        const int err = r.op == io_op::read ? ENODATA : EIO;  // EOF, or a device that wrote nothing
        r.result = -err;
        ++finished;
        if (first_error == errc::ok) first_error = errc_from_errno(err);
        ready[nready++] = index;
      } else {
        r.result += res;
        if (std::uint32_t(r.result) >= r.bytes) {
          ++finished;
          ready[nready++] = index;
        } else {
          submit_piece(index, retries);  // short transfer: continue where it stopped
        }
      }
    }
    top_up();
    channel->flush();
    if (on_complete)
      for (int k = 0; k < nready; ++k) on_complete(context, ready[k]);
  }
  return_channel(std::move(channel));
  return first_error;
}

}  // namespace attnstore
