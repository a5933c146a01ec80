// Tenants: usage per tier, caps, trimming a tenant back under its caps, purge.
// Usage is charged where the policy is told a session's tier counts (note, note_load,
// erase_record), under the same mutex, so what a tenant is charged and what the
// policy ranks are the same numbers.
#include <thread>

#include "store_impl.hpp"

namespace attnstore {

errc store::impl::assign_tenant(locked_session& s, const hash128& tenant) noexcept {
  std::lock_guard lock(policy_mutex_);
  const std::uint32_t rec = s.record_id();
  if (record_tenant_[rec] != no_slot) return errc::ok;  // the session hash includes the tenant
  const std::uint32_t t =
      tenants_->find_or_add(tenant, cap_blocks(config_.tenant_dram_bytes), cap_blocks(config_.tenant_ssd_bytes));
  if (t == no_slot) return errc::no_space;
  ++(*tenants_)[t].sessions;
  record_tenant_[rec] = t;
  noted_dram_[rec] = noted_ssd_[rec] = 0;
  return errc::ok;
}

void store::impl::account_locked(std::uint32_t record, std::uint32_t dram_blocks, std::uint32_t ssd_blocks) noexcept {
  const std::uint32_t t = record_tenant_[record];
  if (t == no_slot) return;
  detail::tenant_entry& e = (*tenants_)[t];
  const bool was_dram = e.over_dram(), was_ssd = e.over_ssd();
  e.dram_blocks = e.dram_blocks - noted_dram_[record] + dram_blocks;
  e.ssd_blocks = e.ssd_blocks - noted_ssd_[record] + ssd_blocks;
  noted_dram_[record] = dram_blocks;
  noted_ssd_[record] = ssd_blocks;
  over_dram_tenants_ = over_dram_tenants_ - was_dram + e.over_dram();
  over_ssd_tenants_ = over_ssd_tenants_ - was_ssd + e.over_ssd();
}

hash128 store::impl::tenant_hash_of(std::uint32_t record) noexcept {
  std::lock_guard lock(policy_mutex_);
  const std::uint32_t t = record_tenant_[record];
  return t == no_slot ? hash128{} : (*tenants_)[t].tenant;
}

bool store::impl::over_cap_locked(std::uint32_t record, policy::level where) const noexcept {
  const std::uint32_t t = record_tenant_[record];
  if (t == no_slot) return false;
  const detail::tenant_entry& e = (*tenants_)[t];
  return where == policy::level::dram ? e.over_dram() : where == policy::level::ssd && e.over_ssd();
}

void store::impl::trim_tenant(locked_session& s, std::uint32_t other, bool dram, bool self_too) noexcept {
  const std::uint32_t rec = s.record_id();
  std::uint32_t t;
  auto over = [&](policy::level where) {
    std::lock_guard lock(policy_mutex_);
    return over_cap_locked(rec, where);
  };
  {
    std::lock_guard lock(policy_mutex_);
    t = record_tenant_[rec];  // stays: s is one of its sessions
    if (t == no_slot || (!over_cap_locked(rec, policy::level::dram) && !over_cap_locked(rec, policy::level::ssd)))
      return;
  }
  if (dram) {
    const hash128 tenant = (*tenants_)[t].tenant;
    // Bounded: each round frees a session's DRAM blocks or ends the loop.
    for (std::uint32_t round = 0; round < index_->max_sessions() && over(policy::level::dram); ++round)
      if (demote_some_victim(rec, false, &tenant) == 0) {
        if (self_too && ssd_ && s.dram_blocks() > 0) {
          const std::uint32_t before = s.dram_blocks();
          (void)demote_locked(s, no_slot, other);
          std::lock_guard lock(policy_mutex_);
          (*tenants_)[t].quota_demoted_blocks += before - s.dram_blocks();
        }
        break;
      }
  }
  for (std::uint32_t round = 0; round < index_->max_sessions() && over(policy::level::ssd); ++round) {
    locked_session victim = pick_victim(
        policy::level::ssd, [&](locked_session& h) { return record_tenant_[h.record_id()] == t && h.ssd_blocks() > 0; },
        rec, other);
    if (!victim) break;
    detail::bump(counters_->evicted_sessions);
    detail::bump(counters_->evicted_blocks, victim.block_count());
    {
      std::lock_guard lock(policy_mutex_);
      ++(*tenants_)[t].quota_evicted_sessions;
    }
    drop_locked(victim);
  }
}

tenant_stats store::impl::tenant_usage(std::string_view tenant) const noexcept {
  tenant_stats out;
  out.tenant = tenant_of(tenant);
  std::lock_guard lock(policy_mutex_);
  const std::uint32_t t = tenants_->find(out.tenant);
  const std::uint64_t default_dram = cap_blocks(config_.tenant_dram_bytes),
                      default_ssd = cap_blocks(config_.tenant_ssd_bytes);
  if (t == no_slot) {
    out.dram_quota_bytes = default_dram * slot_bytes_;
    out.ssd_quota_bytes = default_ssd * slot_bytes_;
    return out;
  }
  const detail::tenant_entry& e = (*tenants_)[t];
  out.sessions = e.sessions;
  out.dram_bytes = e.dram_blocks * slot_bytes_;
  out.ssd_bytes = e.ssd_blocks * slot_bytes_;
  out.dram_quota_bytes = e.dram_cap * slot_bytes_;
  out.ssd_quota_bytes = e.ssd_cap * slot_bytes_;
  out.quota_demoted_blocks = e.quota_demoted_blocks;
  out.quota_evicted_sessions = e.quota_evicted_sessions;
  return out;
}

errc store::impl::set_tenant_quota(std::string_view tenant, std::uint64_t dram_bytes,
                                   std::uint64_t ssd_bytes) noexcept {
  std::lock_guard lock(policy_mutex_);
  const hash128 key = tenant_of(tenant);
  // Entries with a cap of their own outlive their sessions: past the table's spare
  // room they could crowd out the tenants of live sessions, so there is a limit.
  const bool known = tenants_->find(key) != no_slot && (*tenants_)[tenants_->find(key)].configured;
  if (!known && configured_tenants_ >= config_.tenant_quotas.size() + spare_tenants) return errc::no_space;
  const std::uint32_t t = tenants_->find_or_add(key, 0, 0);
  if (t == no_slot) return errc::no_space;
  detail::tenant_entry& e = (*tenants_)[t];
  if (!e.configured) ++configured_tenants_;
  const bool was_dram = e.over_dram(), was_ssd = e.over_ssd();
  e.dram_cap = cap_blocks(dram_bytes);
  e.ssd_cap = cap_blocks(ssd_bytes);
  e.configured = true;
  over_dram_tenants_ = over_dram_tenants_ - was_dram + e.over_dram();
  over_ssd_tenants_ = over_ssd_tenants_ - was_ssd + e.over_ssd();
  return errc::ok;
}

errc store::impl::purge(std::string_view tenant, std::uint32_t* dropped) noexcept {
  if (dropped) *dropped = 0;
  const hash128 key = tenant_of(tenant);
  // The tenant's records now; each is then locked and checked again (it may have been
  // dropped and its record reused by another tenant meanwhile).
  std::vector<std::uint32_t> records;
  {
    std::lock_guard lock(policy_mutex_);
    const std::uint32_t t = tenants_->find(key);
    if (t == no_slot || (*tenants_)[t].sessions == 0) return errc::not_found;
    try {
      records.reserve((*tenants_)[t].sessions);
    } catch (...) {
      return errc::no_space;
    }
    for (std::uint32_t rec = 0; rec < record_tenant_.size(); ++rec)
      if (record_tenant_[rec] == t) records.push_back(rec);
  }
  errc status = errc::ok;
  std::uint32_t count = 0;
  for (std::uint32_t rec : records) {
    // A record is locked only while a request works on its session: wait that out.
    locked_session s;
    while (!(s = index_->try_open_record(rec))) {
      if (!index_->record_live(rec)) break;
      std::this_thread::yield();
    }
    if (!s) continue;
    bool ours;
    {
      std::lock_guard lock(policy_mutex_);
      const std::uint32_t t = record_tenant_[rec];
      ours = t != no_slot && (*tenants_)[t].tenant == key;
    }
    if (!ours) continue;
    if (drop_session_locked(s) != errc::ok) status = errc::device_error;
    ++count;
  }
  if (dropped) *dropped = count;
  if (status != errc::ok)
    config_.log(log_level::error, "store::purge: some sessions' SSD copies could not be erased nor tombstoned");
  return status;
}

}  // namespace attnstore
