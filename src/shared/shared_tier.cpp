// shared_tier: configuration, construction, identities and counters. Reads are in
// shared_tier_read.cpp, publish and the writer thread in shared_tier_write.cpp.
#include <stdexcept>
#include <string>

#include "attnstore/hash.hpp"
#include "shared_tier_impl.hpp"

namespace attnstore::shared {

namespace {

[[noreturn]] void bad_config(const std::string& field, const std::string& what) {
  throw std::invalid_argument("shared_tier_config." + field + ": " + what);
}

/// Checks the fields of the tier itself; the cluster part is checked by redis_cluster.
const shared_tier_config& validated(const shared_tier_config& c) {
  using std::chrono::milliseconds;
  if (c.model.value.is_zero()) bad_config("model", "is zero; give the store's model_id (make_model_id)");
  if (c.fleet_secret.is_zero())
    bad_config("fleet_secret", "is zero; give a random 128-bit secret shared by the fleet's stores");
  if (c.tokens_per_block < 1 || c.tokens_per_block > 65536)
    bad_config("tokens_per_block", std::to_string(c.tokens_per_block) + " is outside [1, 65536]");
  if (c.block_bytes < 1 || c.block_bytes > (std::size_t(1) << 30))
    bad_config("block_bytes", std::to_string(c.block_bytes) + " is outside [1, 1073741824]");
  const record_shape shape{c.tokens_per_block, c.block_bytes};
  if (shape.record_bytes() > c.cluster.max_value_bytes)
    bad_config("cluster.max_value_bytes", std::to_string(c.cluster.max_value_bytes) +
                                              " is smaller than a block record (" +
                                              std::to_string(shape.record_bytes()) + " bytes)");
  constexpr milliseconds year{365ll * 24 * 3600 * 1000};
  if (c.block_ttl < milliseconds{0} || c.block_ttl > year)
    bad_config("block_ttl", std::to_string(c.block_ttl.count()) + " ms is outside [0, 1 year]");
  if (c.manifest_ttl < milliseconds{0} || c.manifest_ttl > year)
    bad_config("manifest_ttl", std::to_string(c.manifest_ttl.count()) + " ms is outside [0, 1 year]");
  if (c.max_bytes_in_flight < shape.record_bytes() || c.max_bytes_in_flight > (std::size_t(64) << 30))
    bad_config("max_bytes_in_flight", std::to_string(c.max_bytes_in_flight) + " is outside [one block record (" +
                                          std::to_string(shape.record_bytes()) + "), 64 GiB]");
  if (c.max_batch_bytes < (std::size_t(1) << 20) || c.max_batch_bytes > (std::size_t(1) << 30))
    bad_config("max_batch_bytes", std::to_string(c.max_batch_bytes) + " is outside [1 MiB, 1 GiB]");
  if (c.manifest_retries > 16)
    bad_config("manifest_retries", std::to_string(c.manifest_retries) + " is outside [0, 16]");
  if (c.limits.max_tokens < 1 || c.limits.max_tokens > (std::size_t(1) << 28))
    bad_config("limits.max_tokens", std::to_string(c.limits.max_tokens) + " is outside [1, 268435456]");
  const std::size_t largest_manifest =
      manifest_fixed_bytes +
      (c.limits.max_tokens + c.tokens_per_block - 1) / c.tokens_per_block * manifest_block_bytes +
      c.limits.max_tokens * sizeof(token_id) + manifest_trailer_bytes;
  if (largest_manifest > c.cluster.max_value_bytes)
    bad_config("limits", "allow manifests of " + std::to_string(largest_manifest) +
                             " bytes, more than cluster.max_value_bytes (" + std::to_string(c.cluster.max_value_bytes) +
                             ")");
  return c;
}

}  // namespace

shared_tier::impl::impl(shared_tier_config c)
    : cfg(validated(c)),
      shape{cfg.tokens_per_block, cfg.block_bytes},
      blocks_per_batch(std::max<std::size_t>(1, cfg.max_batch_bytes / shape.record_bytes())),
      reader(cfg.cluster),
      writer(cfg.cluster) {}

shared_tier::shared_tier(shared_tier_config config) : impl_(std::make_unique<impl>(std::move(config))) {
  impl_->thread = std::thread([p = impl_.get()] { p->run_writer(); });
}

shared_tier::~shared_tier() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->stopping = true;
    for (const auto& job : impl_->queue) {
      impl_->release(job->bytes);
      detail::bump(impl_->st.publishes_dropped);
    }
    impl_->queue.clear();
  }
  impl_->work_cv.notify_all();
  impl_->idle_cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

shared_session shared_tier::identify(const session_key& key) const noexcept {
  return shared_session{hash_session(key, impl_->cfg.fleet_secret), hash_tenant(key.tenant, impl_->cfg.fleet_secret)};
}

bool shared_tier::incomplete(const shared_session& session) const noexcept {
  return impl_->incomplete.test(session.session);
}

shared_tier_stats shared_tier::stats() const noexcept {
  const auto& c = impl_->st;
  auto v = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  shared_tier_stats s;
  s.manifest_hits = v(c.manifest_hits);
  s.manifest_misses = c.manifest_misses.snapshot();
  s.block_hits = v(c.block_hits);
  s.block_misses = c.block_misses.snapshot();
  s.blocks_skipped = v(c.blocks_skipped);
  s.publishes = v(c.publishes);
  s.publishes_refused = v(c.publishes_refused);
  s.publishes_dropped = v(c.publishes_dropped);
  s.blocks_written = v(c.blocks_written);
  s.blocks_present = v(c.blocks_present);
  s.write_failures = c.write_failures.snapshot();
  s.manifests_written = v(c.manifests_written);
  s.manifests_truncated = v(c.manifests_truncated);
  s.manifests_superseded = v(c.manifests_superseded);
  s.bytes_read = v(c.bytes_read);
  s.bytes_written = v(c.bytes_written);
  s.bytes_in_flight = impl_->in_flight.load(std::memory_order_relaxed);
  return s;
}

const shared_tier_config& shared_tier::config() const noexcept { return impl_->cfg; }

record_shape shared_tier::shape() const noexcept { return impl_->shape; }

}  // namespace attnstore::shared
