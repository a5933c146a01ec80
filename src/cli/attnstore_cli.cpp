// attnstore: the operator's command-line tool for a store directory (offline: run it on
// a directory no store has open, or on a copy).
//
//   attnstore inspect DIR [--json]   what the directory holds: model, geometry, sessions,
//                                    blocks and bytes, oldest and newest writes
//   attnstore verify DIR [--json]    reads every slot whole and judges it with the rule
//                                    recovery uses (format::judge_slot); exit status 1 when
//                                    any block is bad, naming each one
//   attnstore stats URL|FILE|- [--json]
//                                    a running engine's store metrics (store::metrics text,
//                                    fetched from http://HOST:PORT/PATH or read from a file)
//                                    summed up: hit ratio, tiers, latency quantiles, errors
//   attnstore drop DIR --session TENANT/SESSION
//                                    erases one session's blocks (every slot holding one is
//                                    zeroed whole and synced, as store::drop does)
//   attnstore purge DIR --tenant TENANT
//                                    erases every session of one tenant the same way
//
// Exit status: 0 fine, 1 bad blocks found (verify) or an erase failed (drop, purge), 2 usage
// error or unreadable directory.
#include <fcntl.h>
#include <netdb.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "attnstore/detail/checkpoint_name.hpp"
#include "attnstore/format/block_header.hpp"
#include "attnstore/format/links.hpp"
#include "attnstore/format/manifest.hpp"
#include "attnstore/hash.hpp"

namespace {

using namespace attnstore;

struct store_dir {
  std::string path;
  std::map<std::string, std::string> manifest;
  std::uint32_t num_layers = 0, tokens_per_block = 0;
  std::string layer_groups;  // kv_geometry::describe() of the store's geometry
  hash128 model{}, secret{};
  std::uint64_t slots = 0, slots_per_file = 0, slot_bytes = 0, header_bytes = 0, block_bytes = 0;
};

std::uint64_t number(const std::map<std::string, std::string>& m, const char* key) {
  auto it = m.find(key);
  if (it == m.end()) throw std::runtime_error(std::string("MANIFEST has no ") + key);
  char* end = nullptr;
  const unsigned long long v = std::strtoull(it->second.c_str(), &end, 10);
  if (!end || *end || it->second.empty()) throw std::runtime_error(std::string("MANIFEST ") + key + " is not a number");
  return v;
}

using format::hex128;
using format::parse_hex128;

store_dir open_dir(const std::string& path) {
  store_dir d;
  d.path = path;
  auto m = format::read_manifest(path);
  if (!m) throw std::runtime_error(path + "/MANIFEST cannot be read: not a store directory");
  d.manifest = *m;
  if (number(d.manifest, "format_version") != format::format_version)
    throw std::runtime_error("format_version " + d.manifest["format_version"] + "; this tool reads version " +
                             std::to_string(format::format_version));
  d.num_layers = std::uint32_t(number(d.manifest, "num_layers"));
  d.tokens_per_block = std::uint32_t(number(d.manifest, "tokens_per_block"));
  d.block_bytes = number(d.manifest, "block_bytes");
  d.layer_groups = d.manifest["layer_groups"];
  if (d.layer_groups.empty()) throw std::runtime_error("MANIFEST has no layer_groups");
  d.slot_bytes = number(d.manifest, "slot_bytes");
  d.slots = number(d.manifest, "ssd_slots");
  d.slots_per_file = number(d.manifest, "slots_per_file");
  if (d.tokens_per_block == 0 || d.tokens_per_block > 65536 || d.block_bytes == 0 || d.block_bytes > (1ull << 30))
    throw std::runtime_error("MANIFEST tokens_per_block/block_bytes are out of range: damaged");
  d.header_bytes = format::header_bytes(d.tokens_per_block);
  if (d.slot_bytes != d.header_bytes + format::round_up(d.block_bytes, format::sector) || d.slots_per_file == 0)
    throw std::runtime_error("MANIFEST slot_bytes/slots_per_file do not match its geometry: damaged");
  if (!parse_hex128(d.manifest["model_id"], d.model)) throw std::runtime_error("MANIFEST model_id is damaged");
  if (!parse_hex128(d.manifest["secret"], d.secret)) throw std::runtime_error("MANIFEST secret is damaged");
  return d;
}

std::string file_name(std::uint64_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "blocks-%04" PRIu64 ".dat", index);
  return buf;
}

/// Reads slots in order, `bytes` of each (the header area, or the whole slot), through
/// O_DIRECT where the file system has it (what is on the device, not in the page cache).
class slot_reader {
 public:
  slot_reader(const store_dir& d, std::size_t bytes) : d_(d), bytes_(bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, format::sector, bytes) != 0) throw std::bad_alloc();
    buf_.reset(static_cast<std::byte*>(p));
  }
  ~slot_reader() {
    if (fd_ >= 0) ::close(fd_);
  }
  /// The slot's bytes, or nullptr with `error` set (errno, or -1 for a short read).
  const std::byte* read(std::uint64_t slot, int& error) {
    const std::uint64_t file = slot / d_.slots_per_file;
    if (file != file_ || fd_ < 0) {
      if (fd_ >= 0) ::close(fd_);
      file_ = file;
      const std::string name = d_.path + "/" + file_name(file);
      fd_ = ::open(name.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
      if (fd_ < 0) fd_ = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd_ < 0) {
        error = errno;
        return nullptr;
      }
    }
    const off_t at = off_t((slot % d_.slots_per_file) * d_.slot_bytes);
    const ssize_t got = ::pread(fd_, buf_.get(), bytes_, at);
    if (got != ssize_t(bytes_)) {
      error = got < 0 ? errno : -1;
      return nullptr;
    }
    return buf_.get();
  }

 private:
  struct free_deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  const store_dir& d_;
  std::size_t bytes_;
  std::unique_ptr<std::byte, free_deleter> buf_;
  int fd_ = -1;
  std::uint64_t file_ = ~0ull;
};

/// Reads every slot in order (`whole`: header and payload, else the header area only)
/// and judges it as recovery does. Calls fn(slot, err, verdict, header): err is 0, or
/// the errno (-1: short read) of a slot that could not be read (verdict then empty).
template <class Fn>
void judge_all(const store_dir& d, bool whole, Fn&& fn) {
  slot_reader reader(d, whole ? d.slot_bytes : d.header_bytes);
  // Recovery also refuses puts larger than both tiers; the DRAM tier's size is not in
  // the directory, so that one bound is left out here.
  const format::slot_expectation expect{d.header_bytes, d.tokens_per_block, d.model, d.block_bytes, ~std::uint64_t(0)};
  for (std::uint64_t s = 0; s < d.slots; ++s) {
    int err = 0;
    format::block_header h{};
    const std::byte* area = reader.read(s, err);
    const format::slot_verdict v = area ? format::judge_slot(area, expect, whole, &h) : format::slot_verdict::empty;
    fn(s, area ? 0 : err, v, h);
  }
}

struct session_summary {
  std::string tenant;  // keyed hash, as the headers carry it
  std::uint64_t blocks = 0, superseded = 0, tokens = 0, oldest = ~0ull, newest = 0;
  std::map<std::uint32_t, std::pair<std::uint64_t, std::uint32_t>> newest_copy;  // block -> (sequence, tokens)
};

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

int inspect(const store_dir& d, bool json) {
  std::map<std::string, session_summary> sessions;
  std::uint64_t counts[5] = {}, unreadable = 0, oldest = ~0ull, newest = 0;
  judge_all(d, false, [&](std::uint64_t, int err, format::slot_verdict v, const format::block_header& h) {
    if (err) {
      ++unreadable;
      return;
    }
    ++counts[int(v)];
    if (v != format::slot_verdict::ok) return;
    session_summary& ss = sessions[hex128(h.session)];
    if (ss.tenant.empty()) ss.tenant = hex128(h.tenant);
    ++ss.blocks;
    ss.oldest = std::min(ss.oldest, h.sequence);
    ss.newest = std::max(ss.newest, h.sequence);
    oldest = std::min(oldest, h.sequence);
    newest = std::max(newest, h.sequence);
    auto& nc = ss.newest_copy[h.block_index];
    if (nc.second == 0 || h.sequence > nc.first) {
      if (nc.second != 0) ++ss.superseded;
      nc = {h.sequence, h.token_count};
    } else {
      ++ss.superseded;
    }
  });
  for (auto& [k, ss] : sessions)
    for (auto& [b, c] : ss.newest_copy) ss.tokens += c.second;
  std::uint64_t tombstones = 0;
  if (std::FILE* f = std::fopen((d.path + "/TOMBSTONES").c_str(), "rb")) {
    std::fseek(f, 0, SEEK_END);
    tombstones = std::uint64_t(std::ftell(f)) / 24;
    std::fclose(f);
  }
  const bool clean = ::access((d.path + "/CLEAN").c_str(), F_OK) == 0;
  const std::uint64_t used = counts[int(format::slot_verdict::ok)];
  if (json) {
    std::printf(
        "{\"directory\": \"%s\", \"format_version\": %u, \"model_id\": \"%s\", \"geometry\": {\"num_layers\": %u, "
        "\"layer_groups\": \"%s\", \"tokens_per_block\": %u, \"block_bytes\": %" PRIu64
        "}, "
        "\"slot_bytes\": %" PRIu64 ", \"slots\": %" PRIu64 ", \"blocks\": %" PRIu64 ", \"bytes\": %" PRIu64
        ", \"empty_slots\": %" PRIu64 ", \"damaged_slots\": %" PRIu64 ", \"foreign_slots\": %" PRIu64
        ", \"unreadable_slots\": %" PRIu64 ", \"tombstones\": %" PRIu64
        ", \"clean_close\": %s, "
        "\"oldest_sequence\": %" PRIu64 ", \"newest_sequence\": %" PRIu64 ", \"sessions\": [",
        json_escape(d.path).c_str(), format::format_version, hex128(d.model).c_str(), d.num_layers,
        json_escape(d.layer_groups).c_str(), d.tokens_per_block, d.block_bytes, d.slot_bytes, d.slots, used,
        used * d.slot_bytes, counts[int(format::slot_verdict::empty)], counts[int(format::slot_verdict::junk)],
        counts[int(format::slot_verdict::foreign)], unreadable, tombstones, clean ? "true" : "false", used ? oldest : 0,
        newest);
    bool comma = false;
    for (const auto& [k, ss] : sessions) {
      std::printf("%s{\"session\": \"%s\", \"tenant\": \"%s\", \"blocks\": %" PRIu64 ", \"superseded\": %" PRIu64
                  ", \"tokens\": %" PRIu64 ", \"oldest_sequence\": %" PRIu64 ", \"newest_sequence\": %" PRIu64 "}",
                  comma ? ", " : "", k.c_str(), ss.tenant.c_str(), ss.blocks, ss.superseded, ss.tokens, ss.oldest,
                  ss.newest);
      comma = true;
    }
    std::printf("]}\n");
    return 0;
  }
  std::printf("store %s\n", d.path.c_str());
  std::printf("  format version %u, model_id %s, last close %s\n", format::format_version, hex128(d.model).c_str(),
              clean ? "clean" : "not clean (the next open checks every payload)");
  std::printf("  geometry: %u layers (%s), %u tokens per block (%.2f MiB per block)\n", d.num_layers,
              d.layer_groups.c_str(), d.tokens_per_block, double(d.block_bytes) / 1048576.0);
  std::printf("  slots: %" PRIu64 " (%.2f GiB), %" PRIu64 " holding blocks (%.2f GiB), %" PRIu64 " empty, %" PRIu64
              " damaged, %" PRIu64 " of another model, %" PRIu64 " unreadable; %" PRIu64 " tombstones\n",
              d.slots, double(d.slots * d.slot_bytes) / 1073741824.0, used, double(used * d.slot_bytes) / 1073741824.0,
              counts[int(format::slot_verdict::empty)], counts[int(format::slot_verdict::junk)],
              counts[int(format::slot_verdict::foreign)], unreadable, tombstones);
  std::printf("  writes: oldest sequence %" PRIu64 ", newest %" PRIu64 " (sequences order every put)\n",
              used ? oldest : 0, newest);
  std::printf("  sessions: %zu (keyed hashes: ids are never stored)\n", sessions.size());
  if (!sessions.empty()) {
    std::printf("    %-34s %-34s %8s %10s %10s %12s %12s\n", "session", "tenant", "blocks", "superseded", "tokens",
                "oldest seq", "newest seq");
    for (const auto& [k, ss] : sessions)
      std::printf("    %-34s %-34s %8" PRIu64 " %10" PRIu64 " %10" PRIu64 " %12" PRIu64 " %12" PRIu64 "\n", k.c_str(),
                  ss.tenant.c_str(), ss.blocks, ss.superseded, ss.tokens, ss.oldest, ss.newest);
  }
  return 0;
}

int verify(const store_dir& d, bool json) {
  const bool progress = !json && ::isatty(STDERR_FILENO);
  std::uint64_t checked = 0, empty = 0;
  std::vector<std::string> bad;
  int last_percent = -1;
  judge_all(d, true, [&](std::uint64_t s, int err, format::slot_verdict v, const format::block_header& h) {
    char where[96];
    std::snprintf(where, sizeof where, "%s slot %" PRIu64 " (offset %" PRIu64 ")",
                  file_name(s / d.slots_per_file).c_str(), s % d.slots_per_file, (s % d.slots_per_file) * d.slot_bytes);
    if (err) {
      bad.push_back(std::string(where) + ": read error: " + (err > 0 ? std::strerror(err) : "short read"));
      ++checked;
    } else if (v == format::slot_verdict::empty) {
      ++empty;
    } else {
      ++checked;
      if (v != format::slot_verdict::ok) {
        std::string name = std::string(where) + ": " + to_string(v);
        if (v != format::slot_verdict::junk)
          name += " (session " + hex128(h.session) + ", block " + std::to_string(h.block_index) + ", sequence " +
                  std::to_string(h.sequence) + ")";
        bad.push_back(name);
      }
    }
    const int percent = int((s + 1) * 100 / d.slots);
    if (progress && percent != last_percent) {
      last_percent = percent;
      std::fprintf(stderr, "\rverify: %3d%% [%-50s] %" PRIu64 "/%" PRIu64 " slots", percent,
                   std::string(std::size_t(percent / 2), '#').c_str(), s + 1, d.slots);
    }
  });
  if (progress) std::fprintf(stderr, "\n");
  if (json) {
    std::printf("{\"directory\": \"%s\", \"slots\": %" PRIu64 ", \"empty_slots\": %" PRIu64
                ", \"blocks_checked\": %" PRIu64 ", \"blocks_bad\": %zu, \"bad\": [",
                json_escape(d.path).c_str(), d.slots, empty, checked, bad.size());
    for (std::size_t i = 0; i < bad.size(); ++i) std::printf("%s\"%s\"", i ? ", " : "", json_escape(bad[i]).c_str());
    std::printf("]}\n");
  } else {
    std::printf("verify %s: %" PRIu64 " blocks checked, %zu bad, %" PRIu64 " empty slots\n", d.path.c_str(), checked,
                bad.size(), empty);
    for (const auto& b : bad) std::printf("  bad: %s\n", b.c_str());
  }
  return bad.empty() ? 0 : 1;
}

/// flock(LOCK_EX) within 3 s: a store that just closed may still hold its data files'
/// locks for a moment (the kernel tears its io_uring down asynchronously), as
/// ssd_space's own open allows for.
bool lock_within(int fd) {
  for (int i = 0; i < 300; ++i) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return true;
    if (errno != EWOULDBLOCK) return false;
    ::usleep(10000);
  }
  return false;
}

/// Zeroes every slot holding a block of one session (`drop --session T/S`) or of every
/// session of one tenant (`purge --tenant T`): whole slots (KV and token ids), then each
/// file touched is synced. The store must not have the directory open (its lock, flock
/// on the slot files, is taken here too, so a running store refuses this).
int erase_matching(const store_dir& d, const std::string& verb, const std::string& session_id,
                   const std::string& tenant_id) {
  hash128 key{}, companion_key{};
  std::string what;
  if (!session_id.empty()) {
    const auto slash = session_id.find('/');
    if (slash == std::string::npos) throw std::invalid_argument("--session takes TENANT/SESSION");
    const std::string tenant = session_id.substr(0, slash), session = session_id.substr(slash + 1);
    const session_key sk{tenant, session};  // views of the two strings above
    key = hash_session(sk, d.secret).value;
    what = "session " + hex128(key);
    // and its checkpoint (state groups, window tails), which the hooks keep as a companion
    detail::checkpoint_name companion;
    if (detail::checkpoint_key(sk, companion)) companion_key = hash_session(companion.key, d.secret).value;
  } else {
    key = hash_tenant(tenant_id, d.secret);
    what = "tenant " + hex128(key);
  }
  const bool by_session = !session_id.empty();
  // The store's own lock first: a store that has the directory open holds it.
  const int lock = ::open((d.path + "/LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock < 0 || !lock_within(lock)) {
    if (lock >= 0) ::close(lock);
    throw std::runtime_error(d.path + " is locked: a store has it open; " + verb + " through the store");
  }
  struct unlock {
    int fd;
    ~unlock() { ::close(fd); }
  } held{lock};
  auto matches = [&](const hash128& session, const hash128& tenant) {
    return by_session ? session == key || (!companion_key.is_zero() && session == companion_key) : tenant == key;
  };
  // Shared prefixes (LINKS): a slot another session's block holds stays, and the
  // sessions erased get a tombstone so recovery never brings them back from it (nor
  // from their own links to others' slots).
  struct content {
    hash128 chain;
    std::uint64_t checksum;
    std::uint32_t index;
    bool operator<(const content& o) const {
      return std::tie(chain.hi, chain.lo, checksum, index) < std::tie(o.chain.hi, o.chain.lo, o.checksum, o.index);
    }
  };
  std::map<content, bool> held_by_others;
  std::map<std::pair<std::uint64_t, std::uint64_t>, bool> to_tombstone;  // sessions erased that links involve
  std::uint64_t bound = 0;                                               // above every sequence seen
  for (const format::link_record& l : format::read_links(d.path + "/LINKS")) {
    bound = std::max(bound, l.sequence + 1);
    if (l.magic != format::link_magic) continue;  // a retirement: nobody holds the slot through it
    if (matches(l.session, l.tenant))
      to_tombstone[{l.session.lo, l.session.hi}] = true;
    else
      held_by_others[{l.chain, l.checksum, l.block_index}] = true;
  }
  std::vector<std::uint64_t> victims;
  std::uint64_t unreadable = 0, kept = 0;
  judge_all(d, false, [&](std::uint64_t s, int err, format::slot_verdict v, const format::block_header& h) {
    if (err) {
      ++unreadable;
      return;
    }
    if (v != format::slot_verdict::ok) return;
    bound = std::max(bound, h.sequence + 1);
    if (!matches(h.session, h.tenant)) return;
    if (held_by_others.count({h.chain, h.payload_checksum, h.block_index})) {
      ++kept;
      to_tombstone[{h.session.lo, h.session.hi}] = true;
    } else {
      victims.push_back(s);
    }
  });
  if (!to_tombstone.empty()) {
    std::FILE* t = std::fopen((d.path + "/TOMBSTONES").c_str(), "ab");
    bool ok = t != nullptr;
    for (const auto& [sess, _] : to_tombstone) {
      const std::uint64_t rec[3] = {sess.first, sess.second, bound};
      ok = ok && std::fwrite(rec, sizeof(rec), 1, t) == 1;
    }
    ok = ok && std::fflush(t) == 0 && ::fdatasync(::fileno(t)) == 0;
    if (t) std::fclose(t);
    const int dirfd = ::open(d.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ok = ok && dirfd >= 0 && ::fsync(dirfd) == 0;
    if (dirfd >= 0) ::close(dirfd);
    if (!ok) throw std::runtime_error("cannot write " + d.path + "/TOMBSTONES; nothing was erased");
  }
  void* zeros = nullptr;
  if (posix_memalign(&zeros, format::sector, d.slot_bytes) != 0) throw std::bad_alloc();
  std::memset(zeros, 0, d.slot_bytes);
  std::map<std::uint64_t, int> files;  // file index -> fd (locked)
  int failed = 0;
  for (std::uint64_t s : victims) {
    const std::uint64_t f = s / d.slots_per_file;
    if (!files.count(f)) {
      const std::string name = d.path + "/" + file_name(f);
      int fd = ::open(name.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
      if (fd < 0) fd = ::open(name.c_str(), O_RDWR | O_CLOEXEC);
      if (fd >= 0 && !lock_within(fd)) {
        ::close(fd);
        std::free(zeros);
        throw std::runtime_error(name + " is locked: a store has this directory open; " + verb + " through it instead");
      }
      files[f] = fd;
    }
    const int fd = files[f];
    if (fd < 0 ||
        ::pwrite(fd, zeros, d.slot_bytes, off_t((s % d.slots_per_file) * d.slot_bytes)) != ssize_t(d.slot_bytes)) {
      std::fprintf(stderr, "attnstore: cannot erase %s slot %" PRIu64 ": %s\n", file_name(f).c_str(),
                   s % d.slots_per_file, std::strerror(errno));
      ++failed;
    }
  }
  for (auto& [f, fd] : files) {
    if (fd >= 0 && ::fdatasync(fd) != 0) ++failed;
    if (fd >= 0) ::close(fd);
  }
  std::free(zeros);
  std::printf("%s %s: %s: %zu blocks erased%s", verb.c_str(), d.path.c_str(), what.c_str(),
              victims.size() - std::size_t(failed > 0 ? failed : 0), failed ? ", some could not be" : "");
  if (kept) std::printf("; %" PRIu64 " shared with other sessions kept (tombstoned)", kept);
  if (unreadable) std::printf(" (%" PRIu64 " slots could not be read: run verify)", unreadable);
  std::printf("\n");
  return failed || unreadable ? 1 : 0;
}

// ---------------------------------------------------------------- stats

/// GET http://host[:port]/path, HTTP/1.0 (the body ends at close). Throws on failure.
std::string http_get(const std::string& url) {
  const std::string rest = url.substr(7);
  const auto slash = rest.find('/');
  const std::string hostport = rest.substr(0, slash), path = slash == std::string::npos ? "/" : rest.substr(slash);
  const auto colon = hostport.rfind(':');
  const std::string host = hostport.substr(0, colon),
                    port = colon == std::string::npos ? "80" : hostport.substr(colon + 1);
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res)
    throw std::runtime_error("cannot resolve " + hostport);
  const int fd = ::socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  const bool connected = fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  ::freeaddrinfo(res);
  if (!connected) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("cannot connect to " + hostport + ": " + std::strerror(errno));
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + hostport + "\r\nAccept: text/plain\r\n\r\n";
  if (::write(fd, req.data(), req.size()) != ssize_t(req.size())) {
    ::close(fd);
    throw std::runtime_error("cannot send the request to " + hostport);
  }
  std::string reply;
  char buf[65536];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) reply.append(buf, std::size_t(n));
  ::close(fd);
  const auto body = reply.find("\r\n\r\n");
  if (reply.rfind("HTTP/1.", 0) != 0 || body == std::string::npos || reply.find(" 200 ") > reply.find("\r\n"))
    throw std::runtime_error(url + " did not answer 200 OK");
  return reply.substr(body + 4);
}

/// The samples of a text exposition: "name{labels}" -> value.
std::map<std::string, double> parse_exposition(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto space = line.rfind(' ');
    if (space == std::string::npos) continue;
    out[line.substr(0, space)] = std::strtod(line.c_str() + space + 1, nullptr);
  }
  return out;
}

/// histogram_quantile as Prometheus computes it: linear within the bucket holding the
/// rank. `series` is "name" or "name{labels,"; NaN when the histogram is empty.
double quantile(const std::map<std::string, double>& m, const std::string& name, const std::string& labels, double q) {
  std::vector<std::pair<double, double>> buckets;  // (upper bound, cumulative count)
  const std::string prefix = name + "_bucket{" + (labels.empty() ? "" : labels + ",") + "le=\"";
  for (auto it = m.lower_bound(prefix); it != m.end() && it->first.rfind(prefix, 0) == 0; ++it) {
    const std::string le = it->first.substr(prefix.size(), it->first.size() - prefix.size() - 2);
    buckets.push_back({le == "+Inf" ? INFINITY : std::strtod(le.c_str(), nullptr), it->second});
  }
  std::sort(buckets.begin(), buckets.end());
  if (buckets.empty() || buckets.back().second <= 0) return NAN;
  const double rank = q * buckets.back().second;
  double lower = 0, below = 0;
  for (const auto& [le, count] : buckets) {
    if (count >= rank) {
      if (std::isinf(le)) return lower;  // beyond the last finite bound: report that bound
      return lower + (le - lower) * (count > below ? (rank - below) / (count - below) : 0);
    }
    lower = le;
    below = count;
  }
  return lower;
}

int stats(const std::string& source, bool json) {
  std::string text;
  if (source.rfind("http://", 0) == 0) {
    text = http_get(source);
  } else if (source == "-") {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    text = ss.str();
  } else {
    std::ifstream f(source);
    if (!f) throw std::runtime_error("cannot read " + source);
    std::ostringstream ss;
    ss << f.rdbuf();
    text = ss.str();
  }
  const auto m = parse_exposition(text);
  auto v = [&](const std::string& k) {
    auto it = m.find(k);
    return it == m.end() ? 0.0 : it->second;
  };
  if (!m.count("attnstore_lookups_total")) throw std::runtime_error(source + " holds no attnstore metrics");
  const double lookups = v("attnstore_lookups_total"), hits = v("attnstore_lookup_hits_total");
  const double dram_blocks = v("attnstore_blocks_served_dram_total"),
               ssd_blocks = v("attnstore_blocks_served_ssd_total");
  const double errors = v("attnstore_checksum_failures_total") + v("attnstore_io_errors_total") +
                        v("attnstore_quarantined_slots_total") + v("attnstore_quarantined_buffers_total");
  struct q3 {
    const char* label;
    std::string name, labels;
  };
  const q3 lat[] = {{"lookup", "attnstore_lookup_seconds", ""},
                    {"load from DRAM", "attnstore_load_seconds", "source=\"dram\""},
                    {"load from SSD", "attnstore_load_seconds", "source=\"ssd\""},
                    {"save", "attnstore_save_seconds", ""},
                    {"SSD read batch", "attnstore_ssd_read_seconds", ""},
                    {"SSD write batch", "attnstore_ssd_write_seconds", ""},
                    {"prefetch lead", "attnstore_prefetch_lead_seconds", ""}};
  auto pct = [](double a, double b) { return b > 0 ? 100.0 * a / b : 0.0; };
  if (json) {
    std::printf(
        "{\"lookups\": %.0f, \"hit_ratio\": %.6f, \"loads\": %.0f, \"ssd_block_share\": %.6f, "
        "\"saves\": %.0f, \"save_failures\": %.0f, \"dram_used_ratio\": %.6f, \"ssd_used_ratio\": %.6f, "
        "\"sessions\": %.0f, \"errors\": %.0f, \"latency_seconds\": {",
        lookups, lookups > 0 ? hits / lookups : 0.0, v("attnstore_gets_total"),
        dram_blocks + ssd_blocks > 0 ? ssd_blocks / (dram_blocks + ssd_blocks) : 0.0, v("attnstore_puts_total"),
        v("attnstore_put_failed_total"),
        v("attnstore_dram_capacity_bytes") > 0 ? v("attnstore_dram_used_bytes") / v("attnstore_dram_capacity_bytes")
                                               : 0.0,
        v("attnstore_ssd_capacity_bytes") > 0 ? v("attnstore_ssd_used_bytes") / v("attnstore_ssd_capacity_bytes") : 0.0,
        v("attnstore_sessions"), errors);
    bool comma = false;
    for (const q3& l : lat) {
      const double p50 = quantile(m, l.name, l.labels, 0.5), p99 = quantile(m, l.name, l.labels, 0.99);
      if (std::isnan(p50)) continue;
      std::printf("%s\"%s\": {\"p50\": %.9f, \"p99\": %.9f}", comma ? ", " : "", l.label, p50, p99);
      comma = true;
    }
    std::printf("}}\n");
    return 0;
  }
  std::printf("attnstore stats from %s\n", source.c_str());
  std::printf("  lookups %.0f, hit ratio %.1f %% (%.0f tokens reusable)\n", lookups, pct(hits, lookups),
              v("attnstore_tokens_reusable_total"));
  std::printf("  loads %.0f: %.0f blocks from DRAM, %.0f from SSD (%.1f %% SSD)\n", v("attnstore_gets_total"),
              dram_blocks, ssd_blocks, pct(ssd_blocks, dram_blocks + ssd_blocks));
  std::printf("  saves %.0f (%.0f blocks), %.0f rejected, %.0f failed; %.0f no-space\n", v("attnstore_puts_total"),
              v("attnstore_put_blocks_total"), v("attnstore_put_rejected_total"), v("attnstore_put_failed_total"),
              v("attnstore_no_space_total"));
  std::printf("  DRAM %.1f %% of %.2f GiB, SSD %.1f %% of %.2f GiB, %.0f sessions\n",
              pct(v("attnstore_dram_used_bytes"), v("attnstore_dram_capacity_bytes")),
              v("attnstore_dram_capacity_bytes") / 1073741824.0,
              pct(v("attnstore_ssd_used_bytes"), v("attnstore_ssd_capacity_bytes")),
              v("attnstore_ssd_capacity_bytes") / 1073741824.0, v("attnstore_sessions"));
  std::printf("  prefetch: %.0f started, %.0f completed, %.0f cancelled; %.0f sessions evicted, %.0f expired\n",
              v("attnstore_prefetch_started_total"), v("attnstore_prefetch_completed_total"),
              v("attnstore_prefetch_cancelled_total"), v("attnstore_evicted_sessions_total"),
              v("attnstore_expired_sessions_total"));
  std::printf("  latency (p50 / p99):\n");
  for (const q3& l : lat) {
    const double p50 = quantile(m, l.name, l.labels, 0.5), p99 = quantile(m, l.name, l.labels, 0.99);
    if (std::isnan(p50))
      std::printf("    %-16s -\n", l.label);
    else
      std::printf("    %-16s %10.1f us / %10.1f us\n", l.label, p50 * 1e6, p99 * 1e6);
  }
  std::printf("  errors: %.0f checksum failures, %.0f I/O errors, %.0f quarantined slots, %.0f quarantined buffers%s\n",
              v("attnstore_checksum_failures_total"), v("attnstore_io_errors_total"),
              v("attnstore_quarantined_slots_total"), v("attnstore_quarantined_buffers_total"),
              errors > 0 ? "  <- look at the device (docs/operations.md)" : "");
  return 0;
}

void usage(std::FILE* to) {
  std::fputs(
      "attnstore: inspect and verify an attnstore store directory (offline)\n"
      "  attnstore inspect DIR [--json]   model, geometry, sessions, blocks and bytes, oldest and newest writes\n"
      "  attnstore verify DIR [--json]    read every slot whole and check it as recovery does;\n"
      "                                   exit status 1 when any block is bad (each one is named)\n"
      "  attnstore stats URL|FILE|- [--json]\n"
      "                                   a running engine's metrics (http://HOST:PORT/metrics) summed up\n"
      "  attnstore drop DIR --session TENANT/SESSION\n"
      "                                   erase one session's blocks (zeroed whole, synced)\n"
      "  attnstore purge DIR --tenant TENANT\n"
      "                                   erase every session of one tenant (zeroed whole, synced)\n"
      "Exit status: 0 fine, 1 bad blocks (verify), 2 usage error or not a readable store directory.\n",
      to);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  bool json = false;
  std::string session, tenant;
  bool has_tenant = false;
  for (std::size_t i = 0; i < args.size();) {
    if (args[i] == "--json") {
      json = true;
      args.erase(args.begin() + long(i));
    } else if (args[i] == "--session" && i + 1 < args.size()) {
      session = args[i + 1];
      args.erase(args.begin() + long(i), args.begin() + long(i) + 2);
    } else if (args[i] == "--tenant" && i + 1 < args.size()) {
      tenant = args[i + 1];  // may be empty: the default tenant
      has_tenant = true;
      args.erase(args.begin() + long(i), args.begin() + long(i) + 2);
    } else {
      ++i;
    }
  }
  if (args.size() == 1 && (args[0] == "--help" || args[0] == "-h")) {
    usage(stdout);
    return 0;
  }
  const bool known =
      args.size() == 2 && (args[0] == "inspect" || args[0] == "verify" || args[0] == "stats" ||
                           (args[0] == "drop" && !session.empty()) || (args[0] == "purge" && has_tenant));
  if (!known) {
    usage(stderr);
    return 2;
  }
  try {
    if (args[0] == "stats") return stats(args[1], json);
    const store_dir d = open_dir(args[1]);
    if (args[0] == "drop") return erase_matching(d, "drop", session, "");
    if (args[0] == "purge") return erase_matching(d, "purge", "", tenant);
    return args[0] == "inspect" ? inspect(d, json) : verify(d, json);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attnstore: %s\n", e.what());
    return 2;
  }
}
