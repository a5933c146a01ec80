// The public store: each member forwards to store::impl (src/store/store_impl.hpp),
// plus the read lease and save reservation handles.
#include "store_impl.hpp"

namespace attnstore {

store::store(store_config config) : impl_(std::make_unique<impl>(*this, std::move(config))) {}
store::~store() = default;

session_hash store::session_of(const session_key& key) const noexcept { return impl_->session_of(key); }
lookup_result store::lookup(const session_key& key, std::span<const token_id> prompt,
                            std::span<block_location> out) noexcept {
  const std::uint64_t t0 = detail::ticks();
  lookup_result r = impl_->lookup(key, prompt, out);
  impl_->latencies_->lookup.observe_ticks(detail::ticks() - t0);
  return r;
}
errc store::put(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                std::span<const std::byte> blocks) noexcept {
  const std::uint64_t t0 = detail::ticks();
  const errc e = impl_->put(key, tokens, first_block, blocks);
  impl_->latencies_->save.observe_ticks(detail::ticks() - t0);
  return e;
}
get_result store::get(const session_key& key, std::span<const token_id> prompt, std::uint32_t first_block,
                      std::uint32_t block_count, std::span<std::byte> out) noexcept {
  return impl_->timed_load([&] { return impl_->get(key, prompt, first_block, block_count, out); });
}
get_result store::acquire(const session_key& key, std::span<const token_id> prompt, std::span<block_view> views,
                          read_lease& lease) noexcept {
  return impl_->timed_load([&] { return impl_->acquire(key, prompt, views, lease); });
}
void store::end_lease(read_lease& lease) noexcept { impl_->end_lease(lease); }
errc store::reserve(const session_key& key, std::span<const token_id> tokens, std::uint32_t first_block,
                    std::span<std::byte*> payloads, save_reservation& reservation) noexcept {
  return impl_->reserve(key, tokens, first_block, payloads, reservation);
}
errc store::commit(save_reservation& reservation) noexcept {
  const std::uint64_t t0 = detail::ticks();
  const errc e = impl_->commit(reservation, {}, false);
  impl_->latencies_->save.observe_ticks(detail::ticks() - t0);
  return e;
}
errc store::commit(save_reservation& reservation, std::span<const std::uint64_t> payload_checksums) noexcept {
  const std::uint64_t t0 = detail::ticks();
  const errc e = impl_->commit(reservation, payload_checksums, true);
  impl_->latencies_->save.observe_ticks(detail::ticks() - t0);
  return e;
}
void store::abort(save_reservation& reservation) noexcept { impl_->abort(reservation); }
hash128 store::tenant_of(std::string_view tenant) const noexcept { return impl_->tenant_of(tenant); }
tenant_stats store::tenant_usage(std::string_view tenant) const noexcept { return impl_->tenant_usage(tenant); }
errc store::set_tenant_quota(std::string_view tenant, std::uint64_t dram_bytes, std::uint64_t ssd_bytes) noexcept {
  return impl_->set_tenant_quota(tenant, dram_bytes, ssd_bytes);
}
errc store::purge(std::string_view tenant, std::uint32_t* dropped) noexcept { return impl_->purge(tenant, dropped); }
errc store::drop(const session_key& key) noexcept { return impl_->drop(key); }
errc store::pin(const session_key& key) noexcept { return impl_->pin(key); }
errc store::unpin(const session_key& key) noexcept { return impl_->unpin(key); }
errc store::truncate(const session_key& key, std::span<const token_id> history, const truncation_plan& plan) noexcept {
  return impl_->truncate(key, history, plan);
}
void store::set_queue(std::span<const session_key> waiting) noexcept { impl_->set_queue(waiting); }
errc store::hint(const session_key& key, policy::session_hint hint) noexcept { return impl_->hint(key, hint); }
errc store::keep_in_hbm(const session_hash& key, std::uint32_t blocks) noexcept {
  return impl_->keep_in_hbm(key, blocks);
}
bool store::hbm_victim(session_hash& out) noexcept { return impl_->hbm_victim(out); }
std::uint32_t store::run_background() noexcept { return impl_->run_background(); }
void store::drain() noexcept { impl_->drain(); }
std::uint32_t store::expire_idle() noexcept { return impl_->expire_idle(); }
std::string_view store::policy_name() const noexcept { return impl_->policy_->name(); }
errc store::demote(const session_key& key) noexcept { return impl_->demote(key); }
errc store::flush() noexcept { return impl_->flush(); }
errc store::close() noexcept { return impl_->close(); }
store_stats store::stats() const noexcept { return impl_->stats(); }
void store::metrics(std::string& out) const { impl_->write_metrics(out); }
const kv_geometry& store::geometry() const noexcept { return impl_->geometry_; }
const model_id& store::model() const noexcept { return impl_->model_; }
std::string_view store::io_backend_name() const noexcept { return impl_->device_ ? impl_->device_->name() : "none"; }
std::string_view store::dram_pinning() const noexcept { return impl_->dram_->pinning(); }
bool store::has_ssd() const noexcept { return impl_->ssd_ != nullptr; }

// ---------------------------------------------------------------- handles

read_lease& read_lease::operator=(read_lease&& o) noexcept {
  if (this != &o) {
    release();
    owner_ = o.owner_;
    record_ = o.record_;
    generation_ = o.generation_;
    slots_ = std::move(o.slots_);
    count_ = o.count_;
    o.owner_ = nullptr;
    o.count_ = 0;
  }
  return *this;
}

void read_lease::release() noexcept {
  if (owner_) owner_->end_lease(*this);
}

save_reservation& save_reservation::operator=(save_reservation&& o) noexcept {
  if (this != &o) {
    if (*this && owner_) owner_->abort(*this);
    owner_ = o.owner_;
    record_ = o.record_;
    generation_ = o.generation_;
    first_block_ = o.first_block_;
    blocks_ = o.blocks_;
    head_ = o.head_;
    prev_chain_ = o.prev_chain_;
    from_entry_ = o.from_entry_;
    o.head_ = no_slot;
    o.owner_ = nullptr;
  }
  return *this;
}

save_reservation::~save_reservation() {
  if (*this && owner_) owner_->abort(*this);
}

}  // namespace attnstore
