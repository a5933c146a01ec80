// What the store-on-a-shared-tier tests share: the shared tier configuration a store of
// the test fleet gets on the fixture's cluster.
#pragma once

#include <chrono>

#include "attnstore/shared/store_remote.hpp"
#include "attnstore/store.hpp"
#include "redis_test_support.hpp"

namespace redis_test {

/// The tier for a store opened with `c`, in the fleet of `fleet_secret`.
inline attnstore::shared::shared_tier_config remote_config(const attnstore::store_config& c,
                                                           const attnstore::hash128& fleet_secret) {
  using std::chrono::milliseconds;
  attnstore::shared::shared_tier_config t;
  t.cluster = test_cluster_config();
  t.model = attnstore::store_model_id(c);
  t.fleet_secret = fleet_secret;
  t.tokens_per_block = c.geometry.validated().tokens_per_block;
  t.block_bytes = c.geometry.validated().block_bytes();
  t.block_ttl = milliseconds{600000};
  t.manifest_ttl = milliseconds{600000};
  return t;
}

}  // namespace redis_test
