#include "attnstore/async_requests.hpp"

#include <stdexcept>

namespace attnstore {

async_requests::async_requests(store& kv, const async_options& options) : store_(kv) {
  if (options.threads == 0) throw std::invalid_argument("async_options: threads is 0, need at least 1");
  if (options.max_requests == 0) throw std::invalid_argument("async_options: max_requests is 0, need at least 1");
  slots_.resize(options.max_requests);
  for (slot& s : slots_) {  // ids of ordinary length are copied without allocating
    s.tenant.reserve(256);
    s.session.reserve(256);
  }
  queue_.resize(options.max_requests);
  for (unsigned t = 0; t < options.threads; ++t) threads_.emplace_back([this] { worker(); });
}

async_requests::~async_requests() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_.notify_all();
  for (auto& t : threads_) t.join();
}

async_requests::slot* async_requests::find(std::uint64_t id) noexcept {
  for (slot& s : slots_)
    if (s.state != slot_state::free && s.id == id) return &s;
  return nullptr;
}

errc async_requests::submit_load(std::uint64_t id, const session_key& key, std::span<const token_id> prompt,
                                 std::uint32_t first_block, std::uint32_t count, std::span<std::byte> out) noexcept {
  if (out.size() != std::size_t(count) * store_.block_bytes() || count == 0) return errc::invalid_argument;
  slot r;
  r.id = id;
  r.kind = request_kind::load;
  r.tokens = prompt;
  r.first_block = first_block;
  r.count = count;
  r.out = out;
  return submit_keyed(std::move(r), key);
}

errc async_requests::submit_save(std::uint64_t id, const session_key& key, std::span<const token_id> tokens,
                                 std::uint32_t first_block, std::span<const std::byte> blocks) noexcept {
  slot r;
  r.id = id;
  r.kind = request_kind::save;
  r.tokens = tokens;
  r.first_block = first_block;
  r.in = blocks;
  return submit_keyed(std::move(r), key);
}

errc async_requests::submit_keyed(slot&& r, const session_key& key) noexcept {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return errc::bad_state;
    if (find(r.id)) return errc::invalid_argument;
    slot* free_slot = nullptr;
    for (slot& s : slots_)
      if (s.state == slot_state::free) {
        free_slot = &s;
        break;
      }
    if (!free_slot) return errc::retry;
    slot& s = *free_slot;
    s.id = r.id;
    s.kind = r.kind;
    try {
      s.tenant.assign(key.tenant);
      s.session.assign(key.session);
    } catch (...) {
      return errc::no_space;
    }
    s.tokens = r.tokens;
    s.first_block = r.first_block;
    s.count = r.count;
    s.out = r.out;
    s.in = r.in;
    s.cancelled = false;
    s.result = finished_request{r.id, r.kind, errc::ok, false, 0, 0};
    s.state = slot_state::queued;
    queue_[(queue_head_ + queue_size_) % queue_.size()] = std::uint32_t(&s - slots_.data());
    ++queue_size_;
    ++outstanding_;
  }
  work_.notify_one();
  return errc::ok;
}

bool async_requests::cancel(std::uint64_t id) noexcept {
  std::lock_guard lock(mutex_);
  slot* s = find(id);
  if (!s || s->state == slot_state::done) return false;
  s->cancelled = true;
  s->result.cancelled = true;
  if (s->state == slot_state::queued) {  // never runs: done now (the worker skips it)
    s->result.status = errc::rejected;
    s->state = slot_state::done;
    s->order = ++completions_;
    finished_.notify_all();
  }
  return true;
}

void async_requests::worker() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stopping_ || queue_size_ > 0; });
    if (stopping_) return;  // requests not started are dropped
    slot& s = slots_[queue_[queue_head_]];
    queue_head_ = (queue_head_ + 1) % queue_.size();
    --queue_size_;
    if (s.state != slot_state::queued) continue;  // cancelled while queued
    s.state = slot_state::running;
    lock.unlock();
    const session_key key{s.tenant, s.session};
    finished_request r = s.result;
    if (s.kind == request_kind::load) {
      const get_result g = store_.get(key, s.tokens, s.first_block, s.count, s.out);
      r.status = g.status;
      r.blocks = g.blocks;
      r.tokens = g.tokens;
    } else {
      r.status = store_.put(key, s.tokens, s.first_block, s.in);
    }
    lock.lock();
    r.cancelled = s.cancelled;
    s.result = r;
    s.state = slot_state::done;
    s.order = ++completions_;
    finished_.notify_all();
  }
}

std::size_t async_requests::get_finished(std::span<finished_request> out) noexcept {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  while (n < out.size()) {
    slot* oldest = nullptr;
    for (slot& s : slots_)
      if (s.state == slot_state::done && (!oldest || s.order < oldest->order)) oldest = &s;
    if (!oldest) break;
    out[n++] = oldest->result;
    oldest->state = slot_state::free;
    --outstanding_;
  }
  return n;
}

bool async_requests::wait(std::uint64_t id) noexcept {
  std::unique_lock lock(mutex_);
  slot* s = find(id);
  if (!s) return false;
  finished_.wait(lock, [&] { return s->state == slot_state::done || s->state == slot_state::free || s->id != id; });
  return true;
}

void async_requests::lookup_batch(std::span<const session_key> keys, std::span<const std::span<const token_id>> prompts,
                                  std::span<lookup_result> results) noexcept {
  const std::size_t n = std::min({keys.size(), prompts.size(), results.size()});
  for (std::size_t i = 0; i < n; ++i) results[i] = store_.lookup(keys[i], prompts[i]);
}

std::uint32_t async_requests::outstanding() const noexcept {
  std::lock_guard lock(mutex_);
  return outstanding_;
}

}  // namespace attnstore
