// libFuzzer harness: a store directory whose files are fuzz input, opened through the
// real recovery. The invariant is the store's promise to an engine: never wrong KV,
// never a crash. Refusing to open (an exception from the constructor) is fine; a get
// that delivers blocks must deliver exactly the bytes that were put.
//
// Only the public API is used, and the template directory is made at start-up by the
// store itself, so the harness keeps working when the on-disk format or the MANIFEST
// keys change. At start-up a store is created in a template directory, three sessions
// are put (one in two puts) and written to SSD, a fourth takes the first two blocks of
// one of them from SSD (a shared prefix: LINKS) and saves its own after them, and the
// store is closed. Each input is
// then a list of edits applied to a copy of that directory:
//   0 write     file, offset (u32, modulo the file size + 64), n, n bytes
//   1 header    slot, offset (u16, modulo 256), n, n bytes: into a block slot's header
//   2 replace   file: the rest of the input becomes the file (TOMBSTONES, LINKS, MANIFEST...)
//   3 copy      slot a, slot b: slot b becomes a copy of slot a
//   4 reseal    slot: its header checksum is recomputed (format::compute_header_checksum),
//               so edits to header fields reach the checks behind the checksum
//   5 truncate  file, length (u32, modulo the file size + 1); length 0 removes the file
//   6 tombstone session (of the three), sequence bound (u64): appends a record in the
//               TOMBSTONES layout of format 1 (session hash lo, hi, bound), so that
//               the fuzzer reaches the tombstone rules without forging hashes
// "file" picks from the template's files (sorted by name) plus TOMBSTONES; slots are
// format::slot_bytes(geometry) apart in the largest file (blocks-0000.dat).
// The store is then opened; every known session is looked up and read; a new session
// is put, read back, demoted and flushed; the store is closed and opened again, every
// session is read, and the new one must be there whole.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attnstore/store.hpp"

namespace {

namespace fs = std::filesystem;
using namespace attnstore;

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_store_dir: invariant broken: %s\n", what);
    std::abort();
  }
}

std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A session of the template: its tokens, and its blocks' payloads (a function of
// (session, block) only, so every version of a block ever written holds the same
// bytes and any block delivered can be checked exactly).
struct session_data {
  std::string name;
  std::vector<token_id> tokens;
  std::vector<std::byte> blocks;  // blocks_for(tokens) x block_bytes
};

session_data make_session(std::uint64_t id, std::size_t tokens, const kv_geometry& g) {
  session_data s;
  s.name = "s" + std::to_string(id);
  for (std::size_t i = 0; i < tokens; ++i) s.tokens.push_back(token_id(mix(id * 31 + i) % 32000));
  s.blocks.resize(std::size_t(g.blocks_for(tokens)) * g.block_bytes());
  for (std::size_t b = 0; b < g.blocks_for(tokens); ++b) {
    std::uint64_t x = mix(id * 1000003 + b);
    for (std::size_t i = 0; i < g.block_bytes(); i += 8) {
      x = mix(x);
      std::memcpy(s.blocks.data() + b * g.block_bytes() + i, &x, 8);
    }
  }
  return s;
}

struct fixture {
  fs::path base, template_dir, work_dir;
  kv_geometry geometry;
  std::size_t slot = 0;
  std::vector<session_data> sessions;  // in the template
  session_data fresh;                  // put after recovery
  std::vector<std::string> files;      // names the edits pick from
  std::map<std::string, std::vector<char>> contents;
  std::string largest;  // the block file

  store_config config(const fs::path& dir) const {
    store_config c;
    c.geometry = geometry;
    c.model_name = "fuzz";
    c.dram_bytes = 10 * slot;
    c.ssd_directory = dir.string();
    c.ssd_bytes = 10 * slot;
    c.background_thread = false;
    c.direct_io = false;
    c.require_direct_io = false;
    c.log = logger{&logger::quiet, nullptr};
    // Small, so that an iteration stays fast: few staging slots, no pinned memory.
    // pread/pwrite: a closed io_uring releases its files (and their flocks) only when
    // the kernel tears the ring down, later, and the next open then waits 10-20 ms for
    // the lock. Recovery is the same code on either backend.
    c.backend = io_backend::posix;
    c.posix_threads = 1;
    c.queue_depth = 4;
    c.staging_blocks = 8;
    c.max_sessions = 64;
    c.pin_host_memory = false;
    return c;
  }

  fixture() {
    const char* tmp = std::getenv("ATTNSTORE_TEST_TMP");
    fs::path root = tmp && *tmp ? fs::path(tmp) : fs::temp_directory_path();
    fs::create_directories(root);
    std::string pattern = (root / "fuzz-store-XXXXXX").string();
    require(::mkdtemp(pattern.data()) != nullptr, "mkdtemp");
    base = pattern;
    template_dir = base / "template";
    work_dir = base / "work";
    geometry = kv_geometry{4, 2, 64, dtype::f16, 32}.validated();
    slot = format::slot_bytes(geometry);
    sessions = {make_session(1, 80, geometry), make_session(2, 64, geometry), make_session(3, 50, geometry)};
    fresh = make_session(4, 40, geometry);
    {
      store s(config(template_dir));
      const std::size_t bb = s.block_bytes();
      for (std::size_t i = 0; i < sessions.size(); ++i) {
        const auto& d = sessions[i];
        const session_key key{"t", d.name};
        if (i == 2) {  // two puts: one block, then the rest (two put groups on disk)
          require(s.put(key, std::span(d.tokens).first(32), 0, std::span(d.blocks).first(bb)) == errc::ok, "put");
          require(s.put(key, d.tokens, 1, std::span(d.blocks).subspan(bb)) == errc::ok, "put");
        } else {
          require(s.put(key, d.tokens, 0, d.blocks) == errc::ok, "put");
        }
        require(s.demote(key) == errc::ok, "demote");
      }
      // A fourth session that starts with s1's first two blocks takes them from SSD (a
      // shared prefix: its blocks hold s1's slots, named in LINKS) and saves its own after.
      session_data shared = make_session(5, 84, geometry);
      std::copy(sessions[0].tokens.begin(), sessions[0].tokens.begin() + 64, shared.tokens.begin());
      std::copy(sessions[0].blocks.begin(), sessions[0].blocks.begin() + std::ptrdiff_t(2 * bb), shared.blocks.begin());
      const session_key key{"t", shared.name};
      std::vector<std::byte> out(2 * bb);
      require(s.get(key, shared.tokens, 0, 2, out).blocks == 2, "shared get");
      require(s.put(key, shared.tokens, 2, std::span(shared.blocks).subspan(2 * bb)) == errc::ok, "shared put");
      require(s.demote(key) == errc::ok, "demote");
      sessions.push_back(std::move(shared));
      require(s.flush() == errc::ok, "flush");
    }
    for (const auto& e : fs::directory_iterator(template_dir)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file() || name == "LOCK") continue;
      std::ifstream f(e.path(), std::ios::binary);
      contents[name].assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
      files.push_back(name);
      if (largest.empty() || contents[name].size() > contents[largest].size()) largest = name;
    }
    if (!contents.count("TOMBSTONES")) files.push_back("TOMBSTONES");
    require(contents.count("LINKS") == 1, "the template has a LINKS file");
    std::sort(files.begin(), files.end());
    std::string names;
    for (const auto& n : files) names += " " + n;
    std::fprintf(stderr, "fuzz_store_dir: template in %s, files:%s; block file %s, slot %zu bytes\n",
                 template_dir.c_str(), names.c_str(), largest.c_str(), slot);
    self_check();
  }

  // The untouched template must recover whole, or the harness checks nothing.
  void self_check();

  ~fixture() {
    std::error_code ec;
    fs::remove_all(base, ec);
  }
};

fixture& the_fixture() {
  static fixture f;
  return f;
}

// The open file descriptors and what they are, from /proc/self/fd: a store that is
// destroyed (or whose constructor threw) must have closed all of its own.
std::map<int, std::string> open_fds() {
  std::map<int, std::string> fds;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc/self/fd", ec)) {
    std::error_code ec2;
    fds[std::atoi(e.path().filename().c_str())] = fs::read_symlink(e.path(), ec2).string();
  }
  return fds;
}

// Reads the input front to back; past its end every read is 0.
struct cursor {
  const std::uint8_t* p;
  std::size_t n;
  bool done() const { return n == 0; }
  std::uint8_t u8() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  std::uint32_t u16() { return u8() | std::uint32_t(u8()) << 8; }
  std::uint32_t u32() { return u16() | u16() << 16; }
};

void apply_edits(fixture& fx, cursor in, std::map<std::string, std::vector<char>>& files) {
  // The block file, and the whole slots it holds now (edits truncate and remove files;
  // a removed one stays removed: `none`, no slots).
  std::size_t slots = 0;
  std::vector<char> none;
  auto block_file = [&]() -> std::vector<char>& {
    auto it = files.find(fx.largest);
    std::vector<char>& f = it == files.end() ? none : it->second;
    slots = f.size() / fx.slot;
    return f;
  };
  auto pick_file = [&](std::uint8_t b) -> std::vector<char>& { return files[fx.files[b % fx.files.size()]]; };
  for (int edits = 0; !in.done() && edits < 64; ++edits) {
    switch (in.u8() % 7) {
      case 0: {
        auto& f = pick_file(in.u8());
        const std::size_t off = in.u32() % (f.size() + 64);
        const std::size_t len = in.u8();
        if (f.size() < off + len) f.resize(off + len);
        for (std::size_t i = 0; i < len; ++i) f[off + i] = char(in.u8());
        break;
      }
      case 1: {
        const std::size_t s = in.u8();
        const std::size_t off = in.u16() % 256;
        const std::size_t len = in.u8();
        auto& f = block_file();
        for (std::size_t i = 0; i < len; ++i) {
          const std::uint8_t v = in.u8();
          if (slots && (s % slots) * fx.slot + off + i < f.size()) f[(s % slots) * fx.slot + off + i] = char(v);
        }
        break;
      }
      case 2: {
        auto& f = pick_file(in.u8());
        f.assign(reinterpret_cast<const char*>(in.p), reinterpret_cast<const char*>(in.p) + in.n);
        in.n = 0;
        break;
      }
      case 3: {
        const std::size_t a = in.u8(), b = in.u8();
        auto& f = block_file();
        if (slots && a % slots != b % slots)
          std::memcpy(f.data() + (b % slots) * fx.slot, f.data() + (a % slots) * fx.slot, fx.slot);
        break;
      }
      case 4: {
        const std::size_t s = in.u8();
        auto& f = block_file();
        if (slots && format::header_bytes(fx.geometry.tokens_per_block) <= fx.slot) {
          std::byte* area = reinterpret_cast<std::byte*>(f.data() + (s % slots) * fx.slot);
          const std::uint64_t sum = format::compute_header_checksum(area);
          std::memcpy(area + offsetof(format::block_header, header_checksum), &sum, sizeof sum);
        }
        break;
      }
      case 6: {
        const session_hash h = hash_session({"t", fx.sessions[in.u8() % fx.sessions.size()].name});
        const std::uint64_t rec[3] = {h.value.lo, h.value.hi, std::uint64_t(in.u32()) | std::uint64_t(in.u32()) << 32};
        auto& f = files["TOMBSTONES"];
        f.insert(f.end(), reinterpret_cast<const char*>(rec), reinterpret_cast<const char*>(rec + 3));
        break;
      }
      default: {
        const std::uint8_t which = in.u8();
        auto& f = pick_file(which);
        const std::size_t len = in.u32() % (f.size() + 1);
        if (len == 0)
          files.erase(fx.files[which % fx.files.size()]);
        else
          f.resize(len);
        break;
      }
    }
  }
}

void write_dir(const fs::path& dir, const std::map<std::string, std::vector<char>>& files) {
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir);
  for (const auto& [name, bytes] : files) {
    std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    require(bool(f), "writing the store directory");
  }
}

// Reads a session: whatever get delivers must be the bytes put.
void check_session(store& s, const session_data& d) {
  const session_key key{"t", d.name};
  const std::size_t bb = s.block_bytes();
  const std::uint32_t blocks = std::uint32_t(d.blocks.size() / bb);
  std::vector<block_location> where(blocks + 1);
  const lookup_result l = s.lookup(key, d.tokens, where);
  require(l.tokens <= d.tokens.size() && l.blocks <= blocks, "lookup within the session");
  std::vector<std::byte> out(d.blocks.size(), std::byte{0xEE});
  const get_result g = s.get(key, d.tokens, 0, blocks, out);
  require(g.blocks <= blocks && g.tokens <= d.tokens.size(), "get within the request");
  if (g.blocks > 0) require(std::memcmp(out.data(), d.blocks.data(), std::size_t(g.blocks) * bb) == 0, "wrong KV");
  // A prompt that leaves the session inside its second block: nothing past that matches.
  std::vector<token_id> other = d.tokens;
  const std::size_t diverge = std::min<std::size_t>(other.size() - 1, 40);
  other[diverge] ^= 1;
  const get_result h = s.get(key, other, 0, blocks, out);
  if (h.blocks > 0) require(std::memcmp(out.data(), d.blocks.data(), std::size_t(h.blocks) * bb) == 0, "wrong KV");
  require(h.tokens <= diverge, "a diverging prompt matched past the divergence");
}

void fixture::self_check() {
  write_dir(work_dir, contents);
  store s(config(work_dir));
  for (const auto& d : sessions) {
    std::vector<std::byte> out(d.blocks.size());
    const get_result g = s.get({"t", d.name}, d.tokens, 0, std::uint32_t(d.blocks.size() / s.block_bytes()), out);
    require(g.status == errc::ok && out == d.blocks, "the untouched template recovers every session");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fixture& fx = the_fixture();
  const std::map<int, std::string> fds_before = open_fds();
  std::map<std::string, std::vector<char>> files = fx.contents;
  apply_edits(fx, cursor{data, size}, files);
  write_dir(fx.work_dir, files);

  bool fresh_durable = false;  // the new session was demoted to SSD and flushed
  for (int round = 0; round < 2; ++round) {
    std::unique_ptr<store> s;
    try {
      s = std::make_unique<store>(fx.config(fx.work_dir));
    } catch (const std::exception&) {
      break;  // refused: an acceptable outcome
    }
    for (const auto& d : fx.sessions) check_session(*s, d);
    if (round == 0) {
      // The allocator and the index after recovery: a new session goes in and comes back.
      const session_key key{"t", fx.fresh.name};
      const errc e = s->put(key, fx.fresh.tokens, 0, fx.fresh.blocks);
      require(e == errc::ok || e == errc::no_space || e == errc::device_error, "put after recovery");
      if (e == errc::ok) {
        // To SSD when there is room (it stays in DRAM otherwise), then made durable.
        fresh_durable = s->demote(key) == errc::ok && s->flush() == errc::ok;
        // Acknowledged just now, nothing else running: it must come back whole. (A slot
        // that recovery left free while a recovered block still used it would show here.)
        std::vector<std::byte> out(fx.fresh.blocks.size());
        const std::uint32_t blocks = std::uint32_t(fx.fresh.blocks.size() / s->block_bytes());
        const get_result g = s->get(key, fx.fresh.tokens, 0, blocks, out);
        require(g.status == errc::ok && g.blocks == blocks && out == fx.fresh.blocks,
                "a session put after recovery reads back");
      }
      check_session(*s, fx.fresh);
      for (const auto& d : fx.sessions) check_session(*s, d);
    } else {
      check_session(*s, fx.fresh);
      if (fresh_durable) {
        // Written to SSD, flushed, and the store closed cleanly: reopening must find it.
        std::vector<std::byte> out(fx.fresh.blocks.size());
        const std::uint32_t blocks = std::uint32_t(fx.fresh.blocks.size() / s->block_bytes());
        const get_result g = s->get({"t", fx.fresh.name}, fx.fresh.tokens, 0, blocks, out);
        require(g.status == errc::ok && g.blocks == blocks && out == fx.fresh.blocks,
                "a session acknowledged durable after recovery survives a clean reopen");
      }
    }
  }
  // The directory iterator's own descriptor has a number of its own each time: compare
  // what the descriptors point at, ignoring it.
  for (const auto& [fd, target] : open_fds()) {
    if (fds_before.count(fd) || target.rfind("/proc/", 0) == 0) continue;
    std::fprintf(stderr, "fuzz_store_dir: descriptor %d (%s) left open\n", fd, target.c_str());
    require(false, "file descriptors leak");
  }
  return 0;
}
