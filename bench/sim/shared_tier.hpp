// shared_tier: the simulator's model of a KV tier shared by every node of a cluster (a
// Redis Cluster with `maxmemory-policy allkeys-lru`, issue 15; docs/sim.md, "Several
// nodes"). Values are KV blocks, content-addressed by their chain hash (which covers every
// token from the start of the history, so a key names the content of the whole prefix up
// to the end of its block): a block one node writes is found by every node, and two nodes
// that write the same content write the same key. Immutable: a put of a key that exists
// writes nothing and only refreshes it (as SET NX does).
//
// Eviction is exact LRU over the stored bytes (Redis samples; exact LRU is its limit):
// every get() hit and every put() refreshes a key, and a put that makes the stored bytes
// exceed the capacity evicts the least recently used keys until they fit. A value larger
// than the whole capacity is not stored.
//
// Only bytes and keys are modelled; the engine (engine_sim) charges the time to move
// them over each node's link. Cold-path container (the simulator is single-threaded).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "attnstore/types.hpp"

namespace attnstore::sim {

/// Called for every key the shared tier evicts (inspection: tests keep their own model).
struct shared_tier_observer {
  void* context = nullptr;
  void (*evicted)(void* context, const hash128& key) = nullptr;
};

class shared_tier {
 public:
  static constexpr std::uint32_t none = ~0u;
  using observer = shared_tier_observer;

  explicit shared_tier(double capacity_bytes = 0, observer obs = {})
      : capacity_(capacity_bytes > 0 ? std::uint64_t(capacity_bytes) : 0), obs_(obs) {}

  /// Whether the tier stores anything at all (capacity > 0).
  bool enabled() const noexcept { return capacity_ > 0; }

  /// A hit refreshes the key (it becomes the most recently used). Returns whether the
  /// key is stored.
  bool get(const hash128& key) {
    const auto it = map_.find(key);
    if (it == map_.end()) return false;
    touch_id(it->second);
    ++hits_;
    return true;
  }
  /// Refreshes the key if it is stored (a write of a key that exists: SET NX, TOUCH);
  /// returns whether it is.
  bool touch(const hash128& key) {
    const auto it = map_.find(key);
    if (it == map_.end()) return false;
    touch_id(it->second);
    return true;
  }
  /// Whether the key is stored, without refreshing it.
  bool contains(const hash128& key) const { return map_.count(key) != 0; }

  /// Stores a value of `bytes` under `key` written by node `writer`, or refreshes it
  /// when it is stored already. Evicts the least recently used keys to make room.
  /// Returns whether the key is stored afterwards (false: larger than the capacity).
  bool put(const hash128& key, std::uint64_t bytes, std::uint32_t writer) {
    if (const auto it = map_.find(key); it != map_.end()) {
      touch_id(it->second);
      ++dedup_puts_;
      return true;
    }
    if (bytes > capacity_) {
      ++rejected_puts_;
      return false;
    }
    while (stored_ + bytes > capacity_) evict_one();
    std::uint32_t id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = std::uint32_t(entries_.size());
      entries_.emplace_back();
    }
    entry& e = entries_[id];
    e = entry{};
    e.key = key;
    e.bytes = bytes;
    e.writer = writer;
    link_front(id);
    map_.emplace(key, id);
    stored_ += bytes;
    stored_bytes_written_ += bytes;
    return true;
  }

  std::uint64_t capacity() const noexcept { return capacity_; }
  std::uint64_t stored_bytes() const noexcept { return stored_; }
  std::uint64_t entries() const noexcept { return map_.size(); }
  std::uint64_t evicted_bytes() const noexcept { return evicted_bytes_; }
  std::uint64_t evicted_keys() const noexcept { return evicted_keys_; }
  std::uint64_t written_bytes() const noexcept { return stored_bytes_written_; }
  std::uint64_t hits() const noexcept { return hits_; }
  std::uint64_t dedup_puts() const noexcept { return dedup_puts_; }
  std::uint64_t rejected_puts() const noexcept { return rejected_puts_; }
  /// The node that wrote a stored key, or none.
  std::uint32_t writer_of(const hash128& key) const {
    const auto it = map_.find(key);
    return it == map_.end() ? none : entries_[it->second].writer;
  }
  /// The least recently used key: the next to be evicted (nullptr when empty).
  const hash128* oldest() const noexcept { return tail_ == none ? nullptr : &entries_[tail_].key; }

  /// The LRU list and the map hold the same keys, the bytes add up and fit.
  bool check() const {
    std::uint64_t n = 0, bytes = 0;
    std::uint32_t prev = none;
    for (std::uint32_t i = head_; i != none; prev = i, i = entries_[i].next) {
      const entry& e = entries_[i];
      if (e.prev != prev) return false;
      const auto it = map_.find(e.key);
      if (it == map_.end() || it->second != i) return false;
      bytes += e.bytes;
      if (++n > map_.size()) return false;
    }
    return prev == tail_ && n == map_.size() && bytes == stored_ && stored_ <= capacity_;
  }

 private:
  struct entry {
    hash128 key{};
    std::uint64_t bytes = 0;
    std::uint32_t prev = none, next = none;  // LRU list, most recent first
    std::uint32_t writer = none;
  };
  struct key_hash {
    std::size_t operator()(const hash128& k) const noexcept {
      return std::size_t(k.lo ^ (k.hi * 0x9e3779b97f4a7c15ull));
    }
  };

  void unlink(std::uint32_t id) noexcept {
    entry& e = entries_[id];
    if (e.prev != none)
      entries_[e.prev].next = e.next;
    else
      head_ = e.next;
    if (e.next != none)
      entries_[e.next].prev = e.prev;
    else
      tail_ = e.prev;
    e.prev = e.next = none;
  }
  void link_front(std::uint32_t id) noexcept {
    entry& e = entries_[id];
    e.prev = none;
    e.next = head_;
    if (head_ != none) entries_[head_].prev = id;
    head_ = id;
    if (tail_ == none) tail_ = id;
  }
  void touch_id(std::uint32_t id) noexcept {
    if (head_ == id) return;
    unlink(id);
    link_front(id);
  }
  void evict_one() {
    const std::uint32_t id = tail_;
    entry& e = entries_[id];
    unlink(id);
    map_.erase(e.key);
    stored_ -= e.bytes;
    evicted_bytes_ += e.bytes;
    ++evicted_keys_;
    if (obs_.evicted) obs_.evicted(obs_.context, e.key);
    e = entry{};
    free_.push_back(id);
  }

  std::uint64_t capacity_ = 0, stored_ = 0;
  observer obs_;
  std::unordered_map<hash128, std::uint32_t, key_hash> map_;
  std::vector<entry> entries_;
  std::vector<std::uint32_t> free_;
  std::uint32_t head_ = none, tail_ = none;
  std::uint64_t evicted_bytes_ = 0, evicted_keys_ = 0, stored_bytes_written_ = 0;
  std::uint64_t hits_ = 0, dedup_puts_ = 0, rejected_puts_ = 0;
};

}  // namespace attnstore::sim
