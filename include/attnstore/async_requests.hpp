// async_requests: per-request loads and saves that run on the library's threads, in
// the shape asynchronous engine connectors use (vLLM's KV connector polls
// get_finished(); SGLang's HiCache batches a scheduler step's lookups). The engine's
// thread submits and polls; it never waits on SSD I/O unless it calls wait().
//
//   async_requests io(kv);
//   io.submit_load(req_id, key, prompt, 0, hit.blocks, buffer);   // returns at once
//   ... schedule other work ...
//   n = io.get_finished(done);                                     // what completed since
//
// Requests run on a fixed set of worker threads, on a fixed table of request slots
// (allocated once): submit, cancel and get_finished take one mutex for a few
// instructions and never allocate.
// Completion order is the order requests finish, not the order they were submitted.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "attnstore/store.hpp"

namespace attnstore {

struct async_options {
  unsigned threads = 2;              ///< workers running loads and saves
  std::uint32_t max_requests = 256;  ///< requests submitted and not yet reported finished
};

enum class request_kind : std::uint8_t { load, save };

/// A request that finished (get_finished).
struct finished_request {
  std::uint64_t id = 0;
  request_kind kind = request_kind::load;
  /// The store's status (get's or put's codes); for a cancelled request, rejected when
  /// it never ran, or what it returned when it was already running.
  errc status = errc::ok;
  bool cancelled = false;
  std::uint32_t blocks = 0;  ///< load: blocks delivered
  std::uint64_t tokens = 0;  ///< load: tokens they hold that match the prompt
};

class async_requests {
 public:
  /// Longest tenant or session id a request may carry (submit refuses longer ones).
  static constexpr std::size_t max_key_bytes = 1024;
  /// The store must outlive this object. Throws std::invalid_argument for 0 threads or
  /// 0 max_requests, and for a model that keeps part of its KV in a checkpoint (state
  /// groups, window tails): requests move whole blocks, and only the hooks restore a
  /// checkpoint.
  explicit async_requests(store& kv, const async_options& options = {});
  /// Requests not started are dropped (their buffers are not touched again); running
  /// ones finish first.
  ~async_requests();
  async_requests(const async_requests&) = delete;
  async_requests& operator=(const async_requests&) = delete;

  /// Queues store::get(key, prompt, first_block, count, out, keys). `prompt`, `out` and
  /// keys.media must stay valid (and `out` unused by others) until the request is
  /// reported finished; keys.lora and keys.salt are copied. Returns ok (queued), retry
  /// (max_requests outstanding), invalid_argument (the id is outstanding already, out
  /// is not count blocks, a key part, lora or salt is longer than max_key_bytes, or
  /// `keys` fail validate_request_keys against the prompt).
  errc submit_load(std::uint64_t id, const session_key& key, std::span<const token_id> prompt,
                   std::uint32_t first_block, std::uint32_t count, std::span<std::byte> out,
                   const request_keys& keys = {}) noexcept;
  /// Queues store::put(key, tokens, first_block, blocks, keys). The spans (and
  /// keys.media) must stay valid until the request is reported finished. Returns as
  /// submit_load.
  errc submit_save(std::uint64_t id, const session_key& key, std::span<const token_id> tokens,
                   std::uint32_t first_block, std::span<const std::byte> blocks,
                   const request_keys& keys = {}) noexcept;
  /// A queued request will not run; a running one is reported cancelled when it ends
  /// (its buffers are free only then). False when the id is not outstanding.
  bool cancel(std::uint64_t id) noexcept;
  /// Moves up to out.size() finished requests (oldest completion first) into `out`;
  /// returns how many. Never blocks on I/O.
  std::size_t get_finished(std::span<finished_request> out) noexcept;
  /// Blocks until request `id` has finished (it is still reported by get_finished).
  /// False when the id is not outstanding.
  bool wait(std::uint64_t id) noexcept;
  /// One scheduler step's lookups: results[i] = store::lookup(keys[i], prompts[i], {},
  /// per_request[i]); with per_request empty, no request has keys (one shorter than
  /// the batch leaves the rest unkeyed).
  void lookup_batch(std::span<const session_key> keys, std::span<const std::span<const token_id>> prompts,
                    std::span<lookup_result> results, std::span<const request_keys> per_request = {}) noexcept;

  /// Requests submitted and not yet reported finished.
  std::uint32_t outstanding() const noexcept;

 private:
  enum class slot_state : std::uint8_t { free, queued, running, done };
  struct request {
    std::uint64_t id = 0;
    request_kind kind = request_kind::load;
    std::span<const token_id> tokens;
    std::uint32_t first_block = 0, count = 0;
    std::span<std::byte> out;           // load
    std::span<const std::byte> in;      // save
    std::span<const media_span> media;  // the request's media keys (the caller keeps them)
  };
  struct slot {
    slot_state state = slot_state::free;
    request req;
    std::string tenant, session;  // copies: the caller's key may not outlive submit
    std::string lora, salt;       // copies of the request's keys, likewise
    bool cancelled = false;
    finished_request result;
    std::uint64_t order = 0;  // completion order, for get_finished
  };
  errc submit(const request& r, const session_key& key, const request_keys& keys) noexcept;
  slot* find(std::uint64_t id) noexcept;
  void worker() noexcept;

  store& store_;
  mutable std::mutex mutex_;
  std::condition_variable work_, finished_;
  std::vector<slot> slots_;
  std::vector<std::uint32_t> queue_;  // ring of the queued slots' indices, in submission order
  std::size_t queue_head_ = 0, queue_size_ = 0;
  std::uint64_t completions_ = 0;
  std::uint32_t outstanding_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace attnstore
