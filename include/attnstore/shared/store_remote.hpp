// store_remote: the store's remote tier (attnstore/remote_tier.hpp) on a shared tier in a
// Redis Cluster (shared_tier.hpp). Give it to store_config::remote; every store of a fleet
// uses the same fleet secret and model, so a session saved on one node is found on any.
//
// fetch: the session's manifest, the leading blocks of its view whose kept token ids the
// prompt starts with, each verified by shared_tier exactly as an SSD block (model, chain, token ids,
// payload checksum); the prefix ends at the first block that is missing or bad. publish:
// shared_tier's write-behind (blocks not sent before, then the manifest, versioned by the
// wall clock). drop: sends what is queued, then deletes the manifest (blocks are
// content: other sessions may list them; their TTL and the servers' LRU retire them).
#pragma once

#include <memory>

#include "attnstore/remote_tier.hpp"
#include "attnstore/shared/shared_tier.hpp"

namespace attnstore::shared {

class store_remote final : public remote_tier {
 public:
  /// Throws std::invalid_argument as shared_tier's constructor does.
  explicit store_remote(shared_tier_config config);
  ~store_remote() override;

  remote_session identify(const session_key& key) const noexcept override;
  remote_found fetch(const remote_session& session, std::span<const token_id> prompt, const remote_held& held,
                     const remote_fetch& out) noexcept override;
  errc publish(const remote_session& session, std::span<const token_id> tokens, std::span<const remote_block> blocks,
               std::span<const std::byte* const> payloads) noexcept override;
  void drop(const remote_session& session) noexcept override;
  /// The shorter of block_ttl and manifest_ttl (a day when neither expires).
  double retention_s() const noexcept override;
  bool incomplete(const remote_session& session) const noexcept override;

  /// The shared tier underneath: its stats, flush (tests).
  shared_tier& tier() noexcept { return *tier_; }

 private:
  std::unique_ptr<shared_tier> tier_;
  std::unique_ptr<redis_cluster> deleter_;  // DEL of manifests, on its own connections
};

}  // namespace attnstore::shared
