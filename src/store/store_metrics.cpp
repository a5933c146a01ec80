// store::metrics: the counters, gauges and latency histograms in the Prometheus text
// exposition format (0.0.4). docs/operations.md lists them and what to alert on.
#include <cinttypes>
#include <cstdio>
#include <string_view>

#include "store_impl.hpp"

namespace attnstore {
namespace {

struct counter_help {
  std::string_view name, help;
};
// Help for each store_stats counter (ATTNSTORE_STORE_COUNTERS); recovery_ns is a gauge.
constexpr counter_help counter_helps[] = {
    {"lookups", "Prompt lookups."},
    {"lookup_hits", "Lookups that found a reusable prefix."},
    {"lookup_misses", "Lookups that found nothing reusable."},
    {"tokens_reusable", "Tokens lookups found reusable."},
    {"puts", "Saves (put, and commit of a reservation)."},
    {"put_blocks", "Blocks saved."},
    {"put_rejected", "Saves refused because the stored prefix is not the given tokens."},
    {"put_failed", "Saves that failed (no space, I/O error)."},
    {"gets", "Loads (get and acquire)."},
    {"blocks_served_dram", "Blocks served from DRAM."},
    {"blocks_served_ssd", "Blocks served from SSD."},
    {"miss_not_found", "Loads of sessions not stored."},
    {"miss_prefix_mismatch", "Loads whose prompt did not match the stored history."},
    {"miss_checksum", "Loads cut short by a block that failed verification."},
    {"miss_io_error", "Loads cut short by an I/O error."},
    {"checksum_failures", "Blocks that failed verification (dropped, never served)."},
    {"io_errors", "SSD reads and writes that failed."},
    {"no_space", "Requests that found no room in any tier."},
    {"demoted_blocks", "Blocks moved from DRAM to SSD."},
    {"promoted_blocks", "Blocks read from SSD into DRAM."},
    {"evicted_sessions", "Sessions evicted from the last tier."},
    {"evicted_blocks", "Blocks evicted from the last tier."},
    {"dropped_sessions", "Sessions dropped by the engine."},
    {"ssd_bytes_written", "Bytes written to the SSD tier."},
    {"ssd_bytes_read", "Bytes read from the SSD tier."},
    {"recovered_sessions", "Sessions recovered when the store opened."},
    {"recovered_blocks", "Blocks recovered when the store opened."},
    {"recovery_dropped_blocks", "Slots recovery found torn, stale or foreign."},
    {"quarantined_slots", "SSD slots not reused: unreadable, or not erasable."},
    {"quarantined_buffers", "DRAM or staging slots not reused after an I/O of unknown fate."},
    {"deferred_frees", "DRAM slot frees that waited for a read lease to end."},
    {"close_flushed_blocks", "DRAM-only blocks written to SSD by close()."},
    {"recovery_ns", ""},
    {"prefetch_started", "Scheduler-aware prefetches started."},
    {"prefetch_completed", "Prefetches completed."},
    {"prefetch_cancelled", "Prefetches cancelled (the session left the queue)."},
    {"prefetched_blocks", "Blocks promoted by prefetch."},
    {"watermark_demoted_blocks", "Blocks demoted in the background by the DRAM watermark."},
    {"expired_sessions", "Sessions dropped by the idle TTL."},
    {"adopted_blocks", "Blocks new sessions took from shared prefixes other sessions hold."},
    {"remote_fetches", "Sessions held nowhere here looked up in the remote tier."},
    {"remote_blocks_fetched", "Blocks the remote tier brought into DRAM (verified)."},
    {"remote_misses", "Remote fetches that brought nothing usable."},
    {"remote_publishes", "Write-behinds of a session to the remote tier queued after a save."},
    {"remote_publishes_skipped", "Write-behinds the remote tier refused (over its bound, or failing)."},
    {"remote_publishes_declined", "Saves the policy did not publish to the remote tier (a return unlikely)."},
    {"remote_resends", "Write-behinds that carried a session's DRAM blocks again: the remote tier had lost some."},
    {"remote_prefetches", "Queued sessions fetched from the remote tier ahead of their turn."},
    {"remote_jobs_dropped", "Remote prefetches and republishes not queued: the background had 64 waiting."},
};

std::string_view help_of(std::string_view name) {
  for (const counter_help& c : counter_helps)
    if (c.name == name) return c.help;
  return "A store counter.";
}

void line(std::string& out, const char* fmt, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  out += buf;
}

void header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  line(out, "# HELP %.*s %.*s\n# TYPE %.*s %.*s\n", int(name.size()), name.data(), int(help.size()), help.data(),
       int(name.size()), name.data(), int(type.size()), type.data());
}

}  // namespace

void store::impl::write_metrics(std::string& out) const {
  const store_stats st = stats();
#define ATTNSTORE_X(name)                                                         \
  if (std::string_view(#name) != "recovery_ns") {                                 \
    header(out, "attnstore_" #name "_total", "counter", help_of(#name));          \
    line(out, "attnstore_" #name "_total %" PRIu64 "\n", std::uint64_t(st.name)); \
  }
  ATTNSTORE_STORE_COUNTERS(ATTNSTORE_X)
#undef ATTNSTORE_X

  auto gauge = [&](const char* name, const char* help, double v) {
    header(out, name, "gauge", help);
    line(out, "%s %.17g\n", name, v);
  };
  gauge("attnstore_dram_used_bytes", "DRAM tier bytes holding blocks.", double(st.dram_used_bytes));
  gauge("attnstore_dram_capacity_bytes", "DRAM tier capacity.", double(st.dram_capacity_bytes));
  gauge("attnstore_ssd_used_bytes", "SSD tier bytes holding blocks.", double(st.ssd_used_bytes));
  gauge("attnstore_ssd_capacity_bytes", "SSD tier capacity.", double(st.ssd_capacity_bytes));
  gauge("attnstore_sessions", "Sessions stored.", double(st.sessions));
  gauge("attnstore_shared_dram_slots", "DRAM slots held by more than one session block (shared prefixes).",
        double(st.shared_dram_slots));
  gauge("attnstore_shared_ssd_slots", "SSD slots held by more than one session block (shared prefixes).",
        double(st.shared_ssd_slots));
  gauge("attnstore_dedup_blocks", "Session blocks held in a shared slot beyond its first holder: copies not stored.",
        double(st.dedup_dram_blocks + st.dedup_ssd_blocks));
  gauge("attnstore_ssd_reads_waited_on", "SSD reads requests are waiting on now.",
        double(demand_reads_.load(std::memory_order_relaxed)));
  gauge("attnstore_recovery_seconds", "Time the opening recovery took.", double(st.recovery_ns) / 1e9);
  gauge("attnstore_pinned_sessions", "Sessions pinned now (a load or save in progress, or pinned by the engine).",
        double(index_->pinned_sessions()));
  gauge("attnstore_read_leases", "Read leases held now (layer-wise loads copying out of DRAM).",
        double(open_leases_.load(std::memory_order_relaxed)));
  gauge("attnstore_saves_in_flight", "Saves reserved and not yet committed or aborted.",
        double(open_saves_.load(std::memory_order_relaxed)));
  write_tenant_metrics(out);

  struct hist {
    const char* name;
    const char* help;
    const detail::latency_histogram* h;
    const char* labels;
  };
  const latencies& l = *latencies_;
  const hist hists[] = {
      {"attnstore_lookup_seconds", "Latency of lookup().", &l.lookup, ""},
      {"attnstore_load_seconds", "Latency of get() and acquire(), by the tier the blocks came from.", &l.load_dram,
       "source=\"dram\""},
      {"attnstore_load_seconds", nullptr, &l.load_ssd, "source=\"ssd\""},
      {"attnstore_save_seconds", "Latency of put() and commit() (checksums and write-through included).", &l.save, ""},
      {"attnstore_ssd_read_seconds", "Latency of one batch of SSD reads (verification included).", &l.ssd_read, ""},
      {"attnstore_ssd_write_seconds", "Latency of one batch of SSD writes.", &l.ssd_write, ""},
      {"attnstore_prefetch_lead_seconds", "How long before its load a prefetched session became resident in DRAM.",
       &l.prefetch_lead, ""},
  };
  for (const hist& h : hists) {
    if (h.help) header(out, h.name, "histogram", h.help);
    h.h->write(out, h.name, h.labels);
  }
}

void store::impl::write_tenant_metrics(std::string& out) const {
  std::lock_guard lock(policy_mutex_);  // usage is charged under it
  std::uint64_t in_dram = 0, in_ssd = 0;
  for (std::size_t rec = 0; rec < noted_dram_.size(); ++rec) {
    in_dram += noted_dram_[rec] > 0;
    in_ssd += noted_ssd_[rec] > 0;
  }
  header(out, "attnstore_tier_sessions", "gauge", "Sessions with at least one block in the tier.");
  line(out, "attnstore_tier_sessions{tier=\"dram\"} %" PRIu64 "\n", in_dram);
  line(out, "attnstore_tier_sessions{tier=\"ssd\"} %" PRIu64 "\n", in_ssd);
  // Tenants by their keyed hash (store::tenant_of), never the id in clear.
  struct family {
    const char* name;
    const char* type;
    const char* help;
  };
  const family families[] = {
      {"attnstore_tenant_sessions", "gauge", "Sessions a tenant holds."},
      {"attnstore_tenant_bytes", "gauge", "Bytes a tenant holds per tier."},
      {"attnstore_tenant_quota_bytes", "gauge", "A tenant's cap per tier (only tiers with a cap)."},
      {"attnstore_tenant_quota_demoted_blocks_total", "counter",
       "DRAM blocks of a tenant's own demoted because it was at its cap."},
      {"attnstore_tenant_quota_evicted_sessions_total", "counter",
       "Sessions of a tenant's own dropped because it was at a cap."},
  };
  for (std::size_t f = 0; f < std::size(families); ++f) {
    header(out, families[f].name, families[f].type, families[f].help);
    for (std::uint32_t t = 0; t < tenants_->capacity(); ++t) {
      if (!tenants_->live(t)) continue;
      const detail::tenant_entry& e = (*tenants_)[t];
      const std::string id = detail::hex128(e.tenant);
      const char* n = families[f].name;
      switch (f) {
        case 0:
          line(out, "%s{tenant=\"%s\"} %u\n", n, id.c_str(), e.sessions);
          break;
        case 1:
          line(out, "%s{tenant=\"%s\",tier=\"dram\"} %" PRIu64 "\n", n, id.c_str(), e.dram_blocks * slot_bytes_);
          line(out, "%s{tenant=\"%s\",tier=\"ssd\"} %" PRIu64 "\n", n, id.c_str(), e.ssd_blocks * slot_bytes_);
          break;
        case 2:
          if (e.dram_cap)
            line(out, "%s{tenant=\"%s\",tier=\"dram\"} %" PRIu64 "\n", n, id.c_str(), e.dram_cap * slot_bytes_);
          if (e.ssd_cap)
            line(out, "%s{tenant=\"%s\",tier=\"ssd\"} %" PRIu64 "\n", n, id.c_str(), e.ssd_cap * slot_bytes_);
          break;
        case 3:
          line(out, "%s{tenant=\"%s\"} %" PRIu64 "\n", n, id.c_str(), e.quota_demoted_blocks);
          break;
        default:
          line(out, "%s{tenant=\"%s\"} %" PRIu64 "\n", n, id.c_str(), e.quota_evicted_sessions);
      }
    }
  }
}

}  // namespace attnstore
