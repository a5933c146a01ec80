// The store never serves wrong KV and never loses committed KV: one test per defect an
// outside review found at 97eabc8 (issue 12). Each asserts the behaviour that was broken
// there; the comment says how it broke.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <vector>

#include "attnstore/detail/policy_heap.hpp"
#include "attnstore/hooks.hpp"
#include "attnstore/io/forwarding_device.hpp"
#include "support/kv_data.hpp"
#include "support/paged_memory.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;
using attnstore::testing::make_blocks;
using attnstore::testing::make_tokens;
using attnstore::testing::paged_memory;
using attnstore::testing::temp_dir;

namespace {

const kv_geometry geom16{4, 2, 32, dtype::f16, 16};  // 16 KiB blocks, 16 tokens each

std::size_t slot_of(const kv_geometry& g) { return format::slot_bytes(g.validated()); }

store_config config(const std::string& dir, std::size_t dram_blocks, std::size_t ssd_blocks,
                    const kv_geometry& g = geom16) {
  store_config c;
  c.geometry = g;
  c.model_name = "safety";
  c.dram_bytes = dram_blocks * slot_of(g);
  if (!dir.empty()) {
    c.ssd_directory = dir;
    c.ssd_bytes = ssd_blocks * slot_of(g);
  }
  c.queue_depth = 8;
  c.background_thread = false;
  c.log = logger{&logger::quiet, nullptr};
  return c;
}

// A device whose channels can be broken (reap fails with pieces in flight) and whose
// writes can be failed, switched at run time.
class switchable_device final : public forwarding_device {
 public:
  using forwarding_device::forwarding_device;
  std::atomic<bool> break_channels{false}, fail_writes{false}, fail_reads{false};
  std::string_view name() const noexcept override { return "switchable"; }

 protected:
  std::unique_ptr<io_channel> wrap(std::unique_ptr<io_channel> in) override {
    return std::make_unique<channel>(*this, std::move(in));
  }

 private:
  class channel final : public io_channel {
   public:
    channel(switchable_device& d, std::unique_ptr<io_channel> in) : dev_(d), in_(std::move(in)) {}
    void submit(const io_piece& p) noexcept override {
      if ((p.op == io_op::write && dev_.fail_writes) || (p.op == io_op::read && dev_.fail_reads)) {
        failed_.push_back({p.tag, -EIO});
        return;
      }
      in_->submit(p);
      ++outstanding_;
    }
    int reap(io_completion* out, int max, int min_wait) noexcept override {
      if (dev_.break_channels && outstanding_ > 0) return -EIO;  // every piece in flight is lost
      int n = 0;
      while (!failed_.empty() && n < max) {
        out[n++] = failed_.back();
        failed_.pop_back();
      }
      if (n == max || outstanding_ == 0) return n;
      int got = in_->reap(out + n, max - n, std::max(0, std::min(min_wait - n, int(outstanding_))));
      if (got < 0) return got;
      outstanding_ -= unsigned(got);
      return n + got;
    }
    void flush() noexcept override { in_->flush(); }
    unsigned depth() const noexcept override { return in_->depth(); }

   private:
    switchable_device& dev_;
    std::unique_ptr<io_channel> in_;
    std::vector<io_completion> failed_;
    unsigned outstanding_ = 0;
  };
};

// Runs `fn` in a child process that then exits without destructors: a crash as far as
// the store directory can tell (every acknowledged write-through put is durable).
template <class Fn>
void run_and_crash(Fn&& fn) {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    fn();
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
}

// The slots on disk holding block `index` of any session, newest sequence first.
std::vector<std::size_t> slots_of_block(const std::string& dir, const kv_geometry& g, std::uint32_t index) {
  const kv_geometry v = g.validated();
  const std::size_t slot = slot_of(g), hb = format::header_bytes(v.tokens_per_block);
  std::vector<std::pair<std::uint64_t, std::size_t>> found;
  int fd = ::open((dir + "/blocks-0000.dat").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  std::vector<std::byte> area(hb);
  for (std::size_t s = 0; ::pread(fd, area.data(), hb, off_t(s * slot)) == ssize_t(hb); ++s) {
    format::block_header h;
    if (format::read_header(area.data(), hb, v.tokens_per_block, &h) == format::header_status::ok &&
        h.block_index == index)
      found.push_back({h.sequence, s});
  }
  ::close(fd);
  std::sort(found.rbegin(), found.rend());
  std::vector<std::size_t> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

void flip_payload_byte(const std::string& dir, const kv_geometry& g, std::size_t slot_index) {
  const std::size_t slot = slot_of(g), hb = format::header_bytes(g.validated().tokens_per_block);
  int fd = ::open((dir + "/blocks-0000.dat").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  char byte = 0;
  const off_t at = off_t(slot_index * slot + hb + 100);
  REQUIRE(::pread(fd, &byte, 1, at) == 1);
  byte ^= 0x10;
  REQUIRE(::pwrite(fd, &byte, 1, at) == 1);
  ::close(fd);
}

std::uint64_t served_tokens(store& s, const session_key& k, std::span<const token_id> toks,
                            std::span<const std::byte> want, std::uint32_t* blocks = nullptr) {
  const std::uint32_t n = geom16.blocks_for(toks.size());
  std::vector<std::byte> out(std::size_t(n) * s.block_bytes());
  get_result g = s.get(k, toks, 0, n, out);
  // Whatever was delivered must be exactly what was put.
  REQUIRE(std::memcmp(out.data(), want.data(), std::size_t(g.blocks) * s.block_bytes()) == 0);
  if (blocks) *blocks = g.blocks;
  return g.tokens;
}

}  // namespace

// 97eabc8: acquire pinned the session but nothing that frees a DRAM slot looked at
// pins. The documented turn (start_load, then start_save from li.tokens with a partial
// last block, write-through) freed the partial block's slot while layers >= 1 were
// still to be copied from it; the next put reused it, and the load copied another
// session's KV into the engine.
TEST_CASE("safety: a hook load never copies KV of another session (read leases)") {
  temp_dir dir("lease");
  store_config c = config(dir.str(), 6, 64);
  c.write_through = true;
  store kv(c);
  auto copier = make_host_copy_backend();
  hooks_config hc;
  hc.preload_layers = 1;  // layers >= 1 are copied only at wait_layer
  hooks hk(kv, *copier, hc);
  paged_memory mem(geom16, 16, 16, 0);
  std::vector<std::uint32_t> table{0, 1, 2, 3};
  // Session A: 40 tokens (blocks 0, 1 and a partial 2), saved through the hooks.
  std::vector<token_id> history = make_tokens(1, 40);
  for (std::size_t p = 0; p < history.size(); ++p) mem.fill_token(1, table, p);
  errc st;
  save_handle sh = hk.start_save({"t", "A"}, history, 0, kv_source{&mem.layout, table}, std::nullopt, &st);
  REQUIRE(st == errc::ok);
  for (std::uint32_t l = 0; l < geom16.num_layers; ++l) REQUIRE(hk.save_layer(sh, l) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);
  // The next turn: scrub engine memory, load the history...
  std::memset(mem.k.data(), 0xEE, mem.k.size());
  std::memset(mem.v.data(), 0xEE, mem.v.size());
  std::vector<token_id> prompt = history;
  for (int i = 0; i < 8; ++i) prompt.push_back(token_id(777 + i));
  load_info li = hk.start_load({"t", "A"}, prompt, kv_target{&mem.layout, table});
  REQUIRE(li.status == errc::ok);
  REQUIRE(li.tokens == 40);
  // ...and, as the engine does, open the save from where the load ended: it replaces
  // the partial block 2, whose DRAM copy (also on SSD) is given up.
  sh = hk.start_save({"t", "A"}, prompt, li.tokens, kv_source{&mem.layout, table}, std::nullopt, &st);
  REQUIRE(st == errc::ok);
  // Another session takes every DRAM slot it can get and fills it.
  {
    std::vector<token_id> other = make_tokens(2, 6 * 16);
    (void)kv.put({"t", "B"}, other, 0, make_blocks(kv.block_bytes(), 2, 0, 6));
  }
  for (std::uint32_t l = 0; l < geom16.num_layers; ++l) {
    REQUIRE(hk.wait_layer(li.handle, l) == errc::ok);
    for (std::size_t p = 40; p < prompt.size(); ++p) mem.fill_token(1, table, p);
    REQUIRE(hk.save_layer(sh, l) == errc::ok);
  }
  REQUIRE(hk.finish_load(li.handle) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);
  for (std::size_t p = 0; p < 40; ++p) {
    INFO("position " << p);
    CHECK(mem.token_equals(1, table, p));
  }
  CHECK(kv.stats().deferred_frees >= 1);  // the replaced block's slot waited for the load
}

// 97eabc8: a read's verdict started as ok and only a completion callback changed it; a
// broken channel returned without callbacks, so get() reported success for a buffer
// never written and the promoted DRAM slot was adopted as the block's copy.
TEST_CASE("safety: a broken I/O channel is a miss, and what it left behind is never served") {
  temp_dir dir("broken");
  switchable_device* dev = nullptr;
  store_config c = config(dir.str(), 8, 32);
  c.wrap_device = [&](std::unique_ptr<block_device> in, const ssd_space&) -> std::unique_ptr<block_device> {
    auto d = std::make_unique<switchable_device>(std::move(in));
    dev = d.get();
    return d;
  };
  store s(c);
  const auto toks = make_tokens(3, 64);
  const auto data = make_blocks(s.block_bytes(), 3, 0, 4);
  REQUIRE(s.put({"t", "x"}, toks, 0, data) == errc::ok);
  REQUIRE(s.demote({"t", "x"}) == errc::ok);
  dev->break_channels = true;
  std::vector<std::byte> out(4 * s.block_bytes(), std::byte{0x5a});
  get_result g = s.get({"t", "x"}, toks, 0, 4, out);
  CHECK(g.status == errc::device_error);
  CHECK(g.blocks == 0);
  CHECK(g.tokens == 0);
  CHECK(s.stats().quarantined_buffers >= 1);  // the reads in flight may still land
  read_lease lease(4);
  std::vector<block_view> views(4);
  g = s.acquire({"t", "x"}, toks, views, lease);
  CHECK(g.status == errc::device_error);
  CHECK(g.blocks == 0);
  CHECK_FALSE(lease);
  dev->break_channels = false;
  std::uint32_t blocks = 0;
  CHECK(served_tokens(s, {"t", "x"}, toks, data, &blocks) == 64);  // nothing bad was adopted
  CHECK(blocks == 4);
}

// 97eabc8: an edit that made the history shorter (put 80 tokens, then 20 tokens
// replacing from block 1) lost the session at reopen: the first put's blocks 2..4 were
// erased, so that put was judged incomplete and its block 0 went with it.
TEST_CASE("safety: a history made shorter survives a crash") {
  temp_dir dir("shorter");
  const auto t80 = make_tokens(4, 80);
  std::vector<token_id> t20(t80.begin(), t80.begin() + 20);
  t20[18] = 4242;  // the edit, inside block 1
  const auto d80 = make_blocks(geom16.validated().block_bytes(), 4, 0, 5);
  const auto d20b1 = make_blocks(geom16.validated().block_bytes(), 4, 1, 1, 9);
  run_and_crash([&] {
    store_config c = config(dir.str(), 8, 32);
    c.write_through = true;
    store s(c);
    if (s.put({"t", "e"}, t80, 0, d80) != errc::ok) ::_exit(1);
    if (s.put({"t", "e"}, t20, 1, d20b1) != errc::ok) ::_exit(2);
  });
  store s(config(dir.str(), 8, 32));
  std::vector<std::byte> want(d80.begin(), d80.begin() + long(s.block_bytes()));
  want.insert(want.end(), d20b1.begin(), d20b1.end());
  CHECK(served_tokens(s, {"t", "e"}, t20, want) == 20);
}

// 97eabc8: one damaged block in the session's last turn made recovery drop the whole
// session, the intact earlier turns included (validity cascaded through put groups).
TEST_CASE("safety: a damaged block in the last turn keeps the verified prefix") {
  temp_dir dir("damaged");
  const std::size_t bb = geom16.validated().block_bytes();
  const auto t100 = make_tokens(5, 100);
  std::vector<token_id> t40(t100.begin(), t100.begin() + 40);
  const auto turn1 = make_blocks(bb, 5, 0, 3);  // blocks 0, 1, partial 2
  const auto all = make_blocks(bb, 5, 0, 7);
  run_and_crash([&] {
    store_config c = config(dir.str(), 8, 32);
    c.write_through = true;
    store s(c);
    if (s.put({"t", "d"}, t40, 0, turn1) != errc::ok) ::_exit(1);
    // Turn 2 re-saves block 2 (now whole) and adds 3..6.
    if (s.put({"t", "d"}, t100, 2, std::span(all).subspan(2 * bb)) != errc::ok) ::_exit(2);
  });
  const auto slots = slots_of_block(dir.str(), geom16, 5);
  REQUIRE(!slots.empty());
  flip_payload_byte(dir.str(), geom16, slots.front());
  store s(config(dir.str(), 8, 32));
  std::uint32_t blocks = 0;
  CHECK(served_tokens(s, {"t", "d"}, t100, all, &blocks) == 80);  // blocks 0..4, both turns
  CHECK(blocks == 5);
}

// 97eabc8: slots that could not be read at open were marked stale and their headers
// zeroed: a transient EIO at startup destroyed committed blocks.
TEST_CASE("safety: an unreadable slot at open is quarantined, not erased") {
  temp_dir dir("eio-open");
  const auto toks = make_tokens(6, 64);
  const auto data = make_blocks(geom16.validated().block_bytes(), 6, 0, 4);
  {
    store_config c = config(dir.str(), 8, 32);
    c.write_through = true;
    store s(c);
    REQUIRE(s.put({"t", "q"}, toks, 0, data) == errc::ok);
  }
  {
    store_config c = config(dir.str(), 8, 32);
    c.wrap_device = [&](std::unique_ptr<block_device> in, const ssd_space&) -> std::unique_ptr<block_device> {
      auto d = std::make_unique<switchable_device>(std::move(in));
      d->fail_reads = true;  // the whole scan fails
      return d;
    };
    c.close_flush_ms = 0;
    store s(c);
    CHECK(s.lookup({"t", "q"}, toks).tokens == 0);
    CHECK(s.stats().quarantined_slots == 32);
  }
  store s(config(dir.str(), 8, 32));
  CHECK(served_tokens(s, {"t", "q"}, toks, data) == 64);  // all back once readable
}

// 97eabc8: the sequence counter restarted at the highest header + 1, below a surviving
// tombstone's bound, so a re-created session's write-through blocks were thrown away
// at the next restart.
TEST_CASE("safety: a session re-created after a tombstoned drop survives restarts") {
  temp_dir dir("tomb");
  const auto toks = make_tokens(7, 48);
  const auto data = make_blocks(geom16.validated().block_bytes(), 7, 0, 3);
  const auto other = make_tokens(8, 160);
  switchable_device* dev = nullptr;
  auto with_device = [&](store_config c) {
    c.write_through = true;
    c.wrap_device = [&](std::unique_ptr<block_device> in, const ssd_space&) -> std::unique_ptr<block_device> {
      auto d = std::make_unique<switchable_device>(std::move(in));
      dev = d.get();
      return d;
    };
    return c;
  };
  {
    store s(with_device(config(dir.str(), 16, 32)));
    REQUIRE(s.put({"t", "z"}, toks, 0, data) == errc::ok);
    REQUIRE(s.put({"t", "other"}, other, 0, make_blocks(s.block_bytes(), 8, 0, 10)) == errc::ok);
    REQUIRE(s.drop({"t", "other"}) == errc::ok);  // erased: the highest sequences leave the disk
    dev->fail_writes = true;
    REQUIRE(s.drop({"t", "z"}) == errc::ok);  // not erased: a tombstone covers it
  }
  {
    // The restart cannot erase either: the tombstone stays; the session is re-created.
    auto c = with_device(config(dir.str(), 16, 32));
    c.wrap_device = [&, inner = c.wrap_device](std::unique_ptr<block_device> in, const ssd_space& sp) {
      auto d = inner(std::move(in), sp);
      dev->fail_writes = true;
      return d;
    };
    store s(c);
    CHECK(s.lookup({"t", "z"}, toks).tokens == 0);
    dev->fail_writes = false;
    REQUIRE(s.put({"t", "z"}, toks, 0, data) == errc::ok);
  }
  store s(config(dir.str(), 16, 32));
  CHECK(served_tokens(s, {"t", "z"}, toks, data) == 48);
}

// 97eabc8: a smaller max_sessions at restart erased sessions in hash order.
TEST_CASE("safety: fewer records at restart keep the most recently saved sessions") {
  temp_dir dir("recent");
  const std::size_t bb = geom16.validated().block_bytes();
  {
    store_config c = config(dir.str(), 16, 64);
    c.write_through = true;
    store s(c);
    for (int i = 0; i < 8; ++i) {
      const std::string n = "r" + std::to_string(i);
      REQUIRE(s.put({"t", n}, make_tokens(100 + i, 32), 0, make_blocks(bb, 100 + i, 0, 2)) == errc::ok);
    }
  }
  store_config c = config(dir.str(), 16, 64);
  c.max_sessions = 3;
  store s(c);
  for (int i = 0; i < 8; ++i) {
    const std::string n = "r" + std::to_string(i);
    INFO("session " << i);
    CHECK(s.lookup({"t", n}, make_tokens(100 + i, 32)).tokens == (i >= 5 ? 32u : 0u));
  }
}

// 97eabc8: MANIFEST did not record the capacity although slot placement depends on it.
TEST_CASE("safety: a reopen with another SSD capacity is refused, naming both values") {
  temp_dir dir("capacity");
  { store s(config(dir.str(), 8, 32)); }
  try {
    store s(config(dir.str(), 8, 40));
    FAIL("reopened with another capacity");
  } catch (const std::runtime_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("ssd_slots=32") && Catch::Contains("ssd_slots=40"));
  }
  store s(config(dir.str(), 8, 32));  // the right capacity still opens
}

// 97eabc8: ~store did not flush DRAM-only sessions; a clean restart lost the DRAM tier.
TEST_CASE("safety: a clean close keeps DRAM-only sessions") {
  temp_dir dir("close");
  const auto toks = make_tokens(9, 64);
  const auto data = make_blocks(geom16.validated().block_bytes(), 9, 0, 4);
  {
    store s(config(dir.str(), 8, 32));  // not write-through: the blocks are in DRAM only
    REQUIRE(s.put({"t", "c"}, toks, 0, data) == errc::ok);
    CHECK(s.stats().ssd_used_bytes == 0);
  }
  store s(config(dir.str(), 8, 32));
  CHECK(served_tokens(s, {"t", "c"}, toks, data) == 64);
  CHECK(s.put({"t", "c"}, toks, 0, data) == errc::ok);
  CHECK(s.close() == errc::ok);
  CHECK(s.put({"t", "c"}, toks, 0, data) == errc::bad_state);  // closed: no more saves
}

// 97eabc8: drop zeroed only the first 4 KiB of each slot: KV (and token ids past 4 KiB
// of header) stayed on disk.
TEST_CASE("safety: a dropped session leaves no byte of it on disk") {
  temp_dir dir("wipe");
  const kv_geometry big{4, 2, 32, dtype::f16, 2048};  // header > 4 KiB of token ids
  store_config c = config(dir.str(), 4, 8, big);
  c.write_through = true;
  store s(c);
  const auto toks = make_tokens(10, 3000);
  REQUIRE(s.put({"t", "w"}, toks, 0, make_blocks(s.block_bytes(), 10, 0, 2)) == errc::ok);
  REQUIRE(s.drop({"t", "w"}) == errc::ok);
  int fd = ::open((dir.str() + "/blocks-0000.dat").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  std::vector<char> buf(1 << 20);
  std::size_t nonzero = 0;
  for (ssize_t n; (n = ::read(fd, buf.data(), buf.size())) > 0;)
    for (ssize_t i = 0; i < n; ++i) nonzero += buf[std::size_t(i)] != 0;
  ::close(fd);
  CHECK(nonzero == 0);
}

// 97eabc8: a failed load of a truncated view reported whole blocks' tokens
// (blocks x tokens_per_block): the engine treated never-loaded positions as cached.
TEST_CASE("safety: a load that fails inside a truncated view reports exactly what it loaded") {
  temp_dir dir("trunc-fail");
  store s(config(dir.str(), 16, 32));
  const auto toks = make_tokens(11, 100);  // blocks 0..5 whole, 6 partial
  REQUIRE(s.put({"t", "v"}, toks, 0, make_blocks(s.block_bytes(), 11, 0, 7)) == errc::ok);
  // Cut [8, 24): block 0 keeps 8 tokens, block 1 keeps 8, the rest move back by 16.
  truncation_plan plan{};
  plan.needed = true;
  plan.history = 100;
  plan.sink = 8;
  plan.drop = 16;
  plan.kept = 84;
  plan.shift = -16;
  REQUIRE(s.truncate({"t", "v"}, toks, plan) == errc::ok);
  REQUIRE(s.demote({"t", "v"}) == errc::ok);
  const auto slots = slots_of_block(dir.str(), geom16, 3);  // view entry 3 is block 3
  REQUIRE(slots.size() == 1);
  flip_payload_byte(dir.str(), geom16, slots.front());
  std::vector<token_id> view(toks.begin(), toks.begin() + 8);
  view.insert(view.end(), toks.begin() + 24, toks.end());
  std::vector<block_view> views(8);
  read_lease lease(8);
  get_result g = s.acquire({"t", "v"}, view, views, lease);
  CHECK(g.status == errc::checksum_error);
  CHECK(g.blocks == 3);
  CHECK(g.tokens == 8 + 8 + 16);  // not 3 x 16
}

// 97eabc8: an index shard held ~2 x (max_sessions/64 + 8) entries and open() checked
// only the global pool: keys landing in one shard filled it, and the next insert or
// probe spun forever with the shard's mutex held.
TEST_CASE("safety: a full index shard refuses, it never hangs") {
  cache_index idx({4096, 1024, 16, 64});
  std::uint32_t opened = 0;
  errc why = errc::ok;
  for (std::uint64_t i = 0; i < 100000; ++i) {
    session_hash k{{i * 0x9E3779B97F4A7C15ull, i << 6}};  // every key in shard 0
    locked_session s = idx.open(k, true, &why);
    if (!s) break;
    ++opened;
  }
  CHECK(why == errc::no_space);
  CHECK(opened > 64);
  CHECK(opened < 4096);
  // Look-ups of absent keys in the full shard end too.
  CHECK(idx.find(session_hash{{12345, 999ull << 6}}) == no_slot);
}

// 97eabc8: commit, abort and release looked the record up again by key: after a drop and
// re-create they unpinned the new session's pins (and a commit landed in it).
TEST_CASE("safety: a reservation belongs to the incarnation it was made in") {
  store s(config("", 16, 0));
  const auto toks = make_tokens(12, 32);
  std::vector<std::byte*> payloads(2);
  save_reservation r1, r2;
  REQUIRE(s.reserve({"t", "i"}, toks, 0, payloads, r1) == errc::ok);
  REQUIRE(s.drop({"t", "i"}) == errc::ok);
  REQUIRE(s.reserve({"t", "i"}, toks, 0, payloads, r2) == errc::ok);  // the session again
  s.abort(r1);                                                        // must not unpin r2's session
  truncation_plan plan{};
  plan.needed = true;
  plan.history = 32;
  plan.sink = 0;
  plan.drop = 16;
  CHECK(s.truncate({"t", "i"}, toks, plan) == errc::rejected);  // still pinned by r2
  save_reservation r3;
  REQUIRE(s.reserve({"t", "j"}, toks, 0, payloads, r3) == errc::ok);
  REQUIRE(s.drop({"t", "j"}) == errc::ok);
  const auto data = make_blocks(s.block_bytes(), 12, 0, 2);
  REQUIRE(s.put({"t", "j"}, toks, 0, data) == errc::ok);
  CHECK(s.commit(r3) == errc::not_found);  // the old incarnation's blocks never land
  CHECK(served_tokens(s, {"t", "j"}, toks, data) == 32);
  CHECK(s.commit(r2) == errc::ok);
}

// 97eabc8: hook saves wrote only a partial block's valid tokens into a reused slot; the
// rest of the payload, another session's KV, was checksummed, stored and served.
TEST_CASE("safety: a partial block saved through the hooks carries nothing of a slot's previous occupant") {
  store s(config("", 8, 0));
  // Another session fills every slot with non-zero bytes, then goes.
  const auto other = make_tokens(13, 8 * 16);
  REQUIRE(s.put({"t", "prev"}, other, 0, make_blocks(s.block_bytes(), 13, 0, 8)) == errc::ok);
  REQUIRE(s.drop({"t", "prev"}) == errc::ok);
  auto copier = make_host_copy_backend();
  hooks hk(s, *copier);
  paged_memory mem(geom16, 4, 16, 0);
  std::vector<std::uint32_t> table{0, 1, 2, 3};
  const auto toks = make_tokens(14, 40);
  for (std::size_t p = 0; p < toks.size(); ++p) mem.fill_token(14, table, p);
  errc st;
  save_handle sh = hk.start_save({"t", "p"}, toks, 0, kv_source{&mem.layout, table}, std::nullopt, &st);
  REQUIRE(st == errc::ok);
  for (std::uint32_t l = 0; l < geom16.num_layers; ++l) REQUIRE(hk.save_layer(sh, l) == errc::ok);
  REQUIRE(hk.finish_save(sh) == errc::ok);
  std::vector<std::byte> out(3 * s.block_bytes());
  REQUIRE(s.get({"t", "p"}, toks, 0, 3, out).blocks == 3);
  const kv_geometry g = geom16.validated();
  const std::size_t row = std::size_t(g.num_kv_heads) * g.head_dim * g.element_bytes();
  const std::byte* block2 = out.data() + 2 * s.block_bytes();
  std::size_t nonzero = 0;
  for (std::uint32_t l = 0; l < g.num_layers; ++l)
    for (int half = 0; half < 2; ++half) {
      const std::byte* rows = block2 + l * g.layer_bytes() + half * g.half_layer_bytes();
      for (std::size_t i = 8 * row; i < 16 * row; ++i) nonzero += rows[i] != std::byte{0};
    }
  CHECK(nonzero == 0);
}

// 97eabc8: an EIO while demoting on the allocation path evicted the whole victim,
// dropping data the SSD write failure had not touched.
TEST_CASE("safety: an I/O error while making room drops nobody") {
  temp_dir dir("demote-eio");
  switchable_device* dev = nullptr;
  store_config c = config(dir.str(), 4, 32);
  c.wrap_device = [&](std::unique_ptr<block_device> in, const ssd_space&) -> std::unique_ptr<block_device> {
    auto d = std::make_unique<switchable_device>(std::move(in));
    dev = d.get();
    return d;
  };
  store s(c);
  const auto ta = make_tokens(15, 64);
  const auto da = make_blocks(s.block_bytes(), 15, 0, 4);
  REQUIRE(s.put({"t", "a"}, ta, 0, da) == errc::ok);  // DRAM full
  dev->fail_writes = true;
  const auto tb = make_tokens(16, 16);
  CHECK(s.put({"t", "b"}, tb, 0, make_blocks(s.block_bytes(), 16, 0, 1)) == errc::no_space);
  dev->fail_writes = false;
  CHECK(served_tokens(s, {"t", "a"}, ta, da) == 64);
  CHECK(s.stats().evicted_sessions == 0);
}

namespace {
// A policy that counts what a learning policy reads as a turn's end: an access after
// which the session holds more blocks than at its previous access.
class turn_counter final : public policy::eviction_policy {
 public:
  explicit turn_counter(std::uint32_t n) : eviction_policy(n), last_(n, 0), scratch_(n) {
    for (auto& h : heap_) h.reset(n);
  }
  std::string_view name() const noexcept override { return "turn_counter"; }
  std::uint32_t turn_ends = 0;

 protected:
  void accessed(std::uint32_t r, std::uint64_t, std::uint64_t) noexcept override {
    if (total_blocks(r) > last_[r]) ++turn_ends;
    last_[r] = total_blocks(r);
  }
  void reposition(std::uint32_t r) noexcept override {
    for (std::uint32_t l = 0; l < policy::level_count; ++l) {
      if (state(r).blocks[l])
        heap_[l].set(r, state(r).access);
      else
        heap_[l].erase(r);
    }
  }
  void forget(std::uint32_t r) noexcept override {
    for (auto& h : heap_) h.erase(r);
    last_[r] = 0;
  }
  std::uint32_t victim(policy::level l, policy::victim_filter accept, void* context) noexcept override {
    const std::uint32_t v =
        heap_[std::size_t(l)].find_first([&](std::uint32_t r) { return accept(context, r); }, scratch_.data());
    return v == detail::indexed_heap::npos ? policy::no_record : v;
  }

 private:
  std::vector<std::uint32_t> last_;
  detail::indexed_heap heap_[policy::level_count];
  std::vector<std::uint32_t> scratch_;
};
}  // namespace

// 97eabc8: a load that promoted SSD blocks told the policy "more blocks, then an
// access": the predictive policy counted the load as a turn's end.
TEST_CASE("safety: a load that promotes blocks from SSD is not a turn's end to the policy") {
  temp_dir dir("turns");
  turn_counter* counter = nullptr;
  store_config c = config(dir.str(), 16, 32);
  c.make_policy = [&](std::uint32_t n) {
    auto p = std::make_unique<turn_counter>(n);
    counter = p.get();
    return p;
  };
  store s(c);
  const auto toks = make_tokens(17, 64);
  REQUIRE(s.put({"t", "u"}, toks, 0, make_blocks(s.block_bytes(), 17, 0, 4)) == errc::ok);
  CHECK(counter->turn_ends == 1);  // the save
  REQUIRE(s.demote({"t", "u"}) == errc::ok);
  std::vector<block_view> views(4);
  read_lease lease(4);
  REQUIRE(s.acquire({"t", "u"}, toks, views, lease).blocks == 4);  // promotes all four
  CHECK(counter->turn_ends == 1);                                  // a return, not a turn
}

// Found by test_model: a save into a truncated view numbers its blocks by view position,
// so they share block indices with the original blocks still in the view. A restart
// must still bring back the sink (docs: a truncated session recovers up to its first
// dropped block), whatever was saved after the truncation.
TEST_CASE("safety: a truncated session saved again keeps its sink across a restart") {
  const std::size_t bb = geom16.validated().block_bytes();
  for (std::uint64_t sink : {0u, 2u, 10u, 16u, 20u})
    for (std::uint64_t drop : {16u, 32u, 48u})
      for (bool close_clean : {true, false}) {
        temp_dir dir("trunc-save");
        const auto toks = make_tokens(20, 100);
        std::vector<token_id> view(toks.begin(), toks.begin() + long(sink));
        view.insert(view.end(), toks.begin() + long(sink + drop), toks.end());
        auto work = [&] {
          store_config c = config(dir.str(), 16, 64);
          c.write_through = true;
          store s(c);
          REQUIRE(s.put({"t", "v"}, toks, 0, make_blocks(bb, 20, 0, 7)) == errc::ok);
          truncation_plan plan{true, 100, sink, drop, 100 - drop, -std::int64_t(drop)};
          REQUIRE(s.truncate({"t", "v"}, toks, plan) == errc::ok);
          // A later turn appends to the view; saved from the first block boundary the
          // view allows, or whole when none does.
          std::vector<token_id> longer = view;
          for (int i = 0; i < 20; ++i) longer.push_back(token_id(9000 + i));
          const std::uint32_t n = geom16.blocks_for(longer.size());
          for (std::uint32_t first = n - 1;; --first) {
            errc e = s.put({"t", "v"}, longer, first, make_blocks(bb, 21, first, n - first));
            if (e == errc::ok) break;
            REQUIRE(e == errc::rejected);
            REQUIRE(first > 0);
          }
          if (!close_clean) ::_exit(0);
        };
        if (close_clean)
          work();
        else
          run_and_crash(work);
        INFO("sink " << sink << " drop " << drop << (close_clean ? " clean" : " crash"));
        store s(config(dir.str(), 16, 64));
        CHECK(s.lookup({"t", "v"}, view).tokens >= sink);
      }
}

// Found by fuzz_store_dir (corpus: regress_tombstone_near_limit): a TOMBSTONES record
// whose bound sat just below the sequence limit started the counter there, so every
// block saved afterwards carried a number reads refuse, and new sessions were lost.
TEST_CASE("safety: a damaged sequence bound at open leaves room to number new blocks") {
  temp_dir dir("seq-limit");
  const auto toks = make_tokens(3, 48);
  const auto data = make_blocks(geom16.validated().block_bytes(), 3, 0, 3);
  { store s(config(dir.str(), 16, 32)); }
  {
    const std::uint64_t rec[3] = {1, 2, format::max_sequence - 1};  // no session's: only its bound counts
    std::FILE* f = std::fopen((dir.str() + "/TOMBSTONES").c_str(), "wb");
    REQUIRE(f);
    REQUIRE(std::fwrite(rec, sizeof rec, 1, f) == 1);
    std::fclose(f);
  }
  {
    store s(config(dir.str(), 16, 32));
    REQUIRE(s.put({"t", "new"}, toks, 0, data) == errc::ok);
    REQUIRE(s.demote({"t", "new"}) == errc::ok);
    CHECK(served_tokens(s, {"t", "new"}, toks, data) == 48);  // read back from SSD
  }
  store s(config(dir.str(), 16, 32));
  CHECK(served_tokens(s, {"t", "new"}, toks, data) == 48);
}
