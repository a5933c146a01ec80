#include "attnstore/async_requests.hpp"

#include <stdexcept>

namespace attnstore {

async_requests::async_requests(store& kv, const async_options& options) : store_(kv) {
  if (options.threads == 0) throw std::invalid_argument("async_options: threads is 0, need at least 1");
  if (options.max_requests == 0) throw std::invalid_argument("async_options: max_requests is 0, need at least 1");
  // It moves whole blocks; a model that keeps part of its KV in a checkpoint (state
  // groups, window tails) would get its blocks back without it: wrong output. Refused.
  if (kv.geometry().checkpoint_bytes() > 0)
    throw std::invalid_argument(
        "async_requests: this store's model keeps state groups or window tails in a checkpoint that only the hooks "
        "save and restore; use attnstore::hooks for it");
  slots_.resize(options.max_requests);
  for (slot& s : slots_) {  // ids are copied into these, never reallocated
    s.tenant.reserve(max_key_bytes);
    s.session.reserve(max_key_bytes);
    s.lora.reserve(max_key_bytes);
    s.salt.reserve(max_key_bytes);
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
    if (s.state != slot_state::free && s.req.id == id) return &s;
  return nullptr;
}

errc async_requests::submit_load(std::uint64_t id, const session_key& key, std::span<const token_id> prompt,
                                 std::uint32_t first_block, std::uint32_t count, std::span<std::byte> out,
                                 const request_keys& keys) noexcept {
  if (out.size() != std::size_t(count) * store_.block_bytes() || count == 0) return errc::invalid_argument;
  return submit({id, request_kind::load, prompt, first_block, count, out, {}, keys.media}, key, keys);
}

errc async_requests::submit_save(std::uint64_t id, const session_key& key, std::span<const token_id> tokens,
                                 std::uint32_t first_block, std::span<const std::byte> blocks,
                                 const request_keys& keys) noexcept {
  return submit({id, request_kind::save, tokens, first_block, 0, {}, blocks, keys.media}, key, keys);
}

errc async_requests::submit(const request& r, const session_key& key, const request_keys& keys) noexcept {
  // A client-chosen id is copied into the slot: its length is bounded, so no request
  // can make the table hold (or allocate) without limit. So are the LoRA id and salt.
  if (key.tenant.size() > max_key_bytes || key.session.size() > max_key_bytes) return errc::invalid_argument;
  if (keys.lora.size() > max_key_bytes || keys.salt.size() > max_key_bytes) return errc::invalid_argument;
  // Refused now rather than on a worker: the caller learns it at once.
  if (validate_request_keys(keys, r.tokens.size()) != errc::ok) return errc::invalid_argument;
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
    s.tenant.assign(key.tenant);  // within the capacity reserved at construction
    s.session.assign(key.session);
    s.lora.assign(keys.lora);
    s.salt.assign(keys.salt);
    s.req = r;
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
  if (s->state == slot_state::queued) {  // never runs: out of the queue, done now
    const std::uint32_t index = std::uint32_t(s - slots_.data());
    std::size_t kept = 0;
    for (std::size_t i = 0; i < queue_size_; ++i) {
      const std::uint32_t q = queue_[(queue_head_ + i) % queue_.size()];
      if (q != index) queue_[(queue_head_ + kept++) % queue_.size()] = q;
    }
    queue_size_ = kept;
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
    s.state = slot_state::running;
    lock.unlock();
    const session_key key{s.tenant, s.session};
    finished_request r = s.result;
    const request& q = s.req;
    const request_keys keys{s.lora, s.salt, q.media};
    if (q.kind == request_kind::load) {
      const get_result g = store_.get(key, q.tokens, q.first_block, q.count, q.out, keys);
      r.status = g.status;
      r.blocks = g.blocks;
      r.tokens = g.tokens;
    } else {
      r.status = store_.put(key, q.tokens, q.first_block, q.in, keys);
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
  finished_.wait(lock, [&] { return s->state == slot_state::done || s->state == slot_state::free || s->req.id != id; });
  return true;
}

void async_requests::lookup_batch(std::span<const session_key> keys, std::span<const std::span<const token_id>> prompts,
                                  std::span<lookup_result> results,
                                  std::span<const request_keys> per_request) noexcept {
  const std::size_t n = std::min({keys.size(), prompts.size(), results.size()});
  for (std::size_t i = 0; i < n; ++i)
    results[i] = store_.lookup(keys[i], prompts[i], {}, i < per_request.size() ? per_request[i] : request_keys{});
}

std::uint32_t async_requests::outstanding() const noexcept {
  std::lock_guard lock(mutex_);
  return outstanding_;
}

}  // namespace attnstore
