// The shared tier's records without a server: keys, block records in the SSD layout,
// session manifests, and what a reader does with hostile bytes (every truncation, every
// byte flipped, forged counts, records of another model, session or tenant, random
// bytes). Also shared_tier's configuration checks and the publish bound, which need no
// server either.
#include <catch2/catch.hpp>

#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "attnstore/format/manifest.hpp"
#include "attnstore/hash.hpp"
#include "attnstore/shared/records.hpp"
#include "attnstore/shared/shared_tier.hpp"

using namespace attnstore;
using namespace attnstore::shared;

namespace {

const model_id model_a{{0x1111222233334444ull, 0x5555666677778888ull}};
const model_id model_b{{0x1111222233334444ull, 0x5555666677778889ull}};
const record_shape shape{16, 8192};

std::vector<token_id> make_tokens(std::size_t n, std::uint32_t seed) {
  std::vector<token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = token_id((i * 2654435761u + seed * 40503u) % 151936);
  return t;
}

std::vector<std::byte> make_payload(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& b : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b = std::byte(x);
  }
  return v;
}

/// A block record as the writer makes it.
std::vector<std::byte> make_record(const model_id& m, std::uint32_t index, const hash128& previous,
                                   std::span<const token_id> tokens, const hash128& keys,
                                   std::span<const std::byte> payload, hash128* chain_out) {
  const hash128 chain = chain_hash(previous, m, tokens, keys);
  std::vector<std::byte> rec(shape.record_bytes());
  std::memcpy(rec.data() + shape.header_bytes(), payload.data(), payload.size());
  write_block_header(rec.data(), shape, m, index, chain, keys, tokens, checksum64(payload.data(), payload.size()));
  if (chain_out) *chain_out = chain;
  return rec;
}

/// verify_block_record, and verify_block_parts on the same bytes split as fetch_blocks
/// receives them (the header area apart, the payload in the caller's buffer): the two
/// must agree on every value. Returns the first's answer.
shared_status verify_both(std::span<const std::byte> v, const model_id& m, const block_ref& r,
                          std::vector<std::byte>& out) {
  const shared_status whole = verify_block_record(v, shape, m, r, out.data());
  if (v.size() == shape.record_bytes()) {
    const std::vector<std::byte> payload(v.begin() + std::ptrdiff_t(shape.header_bytes()), v.end());
    CHECK(verify_block_parts(v.first(shape.header_bytes()), payload.data(), shape, m, r) == whole);
  }
  return whole;
}

session_manifest make_manifest(const model_id& m, std::size_t tokens, std::uint32_t seed) {
  session_manifest man;
  man.session = session_hash{{seed * 3ull + 1, seed * 5ull + 2}};
  man.tenant = hash128{seed * 7ull + 3, seed * 11ull + 4};
  man.tokens_per_block = shape.tokens_per_block;
  man.sequence = 42 + seed;
  man.tokens = make_tokens(tokens, seed);
  REQUIRE(build_manifest_blocks(man, m, {}) == shared_status::ok);
  return man;
}

manifest_expectation expect_of(const session_manifest& m, const model_id& model) {
  return manifest_expectation{model, m.session, m.tenant, m.tokens_per_block, {}};
}

}  // namespace

TEST_CASE("keys: fixed format, the chain or session as hash tag, spread over slots", "[records]") {
  const hash128 chain{0x0123456789abcdefull, 0xfedcba9876543210ull};
  const record_key k = block_key(model_a.value, chain);
  CHECK(k.view() == "ats:" + format::hex128(model_a.value) + ":b:{" + format::hex128(chain) + "}");
  CHECK(key_slot(k.view()) == key_slot(format::hex128(chain)));
  const session_hash s{{7, 9}};
  CHECK(manifest_key(model_a.value, s).view() ==
        "ats:" + format::hex128(model_a.value) + ":m:{" + format::hex128(s.value) + "}");
  // Block and manifest of one session are different keys; another model's key differs.
  CHECK(block_key(model_a.value, s.value).view() != manifest_key(model_a.value, s).view());
  CHECK(block_key(model_b.value, chain).view() != k.view());
  // One model's blocks cover the slots (a model tag would put them all in one slot).
  std::set<std::uint16_t> slots;
  hash128 prev{};
  const auto toks = make_tokens(16 * 2000, 1);
  for (int i = 0; i < 2000; ++i) {
    prev = chain_hash(prev, model_a, std::span(toks).subspan(std::size_t(i) * 16, 16));
    slots.insert(key_slot(block_key(model_a.value, prev).view()));
  }
  CHECK(slots.size() > 1800);  // 2000 draws from 16384 slots: ~1885 distinct expected
}

TEST_CASE("a block record verifies exactly and is byte-identical whoever writes it", "[records]") {
  const auto toks = make_tokens(40, 3);
  const auto p0 = make_payload(shape.block_bytes, 1);
  const auto p1 = make_payload(shape.block_bytes, 2);
  hash128 c0, c1;
  const auto r0 = make_record(model_a, 0, {}, std::span(toks).first(16), {}, p0, &c0);
  const auto r1 = make_record(model_a, 1, c0, std::span(toks).subspan(16, 16), {}, p1, &c1);
  // Content-addressed: the same block written again is the same bytes.
  CHECK(make_record(model_a, 1, c0, std::span(toks).subspan(16, 16), {}, p1, nullptr) == r1);
  std::vector<std::byte> out(shape.block_bytes);
  const block_ref ref1{c1, c0, {}, 1, std::span(toks).subspan(16, 16)};
  REQUIRE(verify_both(r1, model_a, ref1, out) == shared_status::ok);
  CHECK(out == p1);
  // In two pieces (as fetch_blocks receives it): the header area must be exactly its size.
  CHECK(verify_block_parts(std::span(r1).first(shape.header_bytes()), p1.data(), shape, model_a, ref1) ==
        shared_status::ok);
  CHECK(verify_block_parts(std::span(r1).first(shape.header_bytes() - 1), p1.data(), shape, model_a, ref1) ==
        shared_status::verify_failed);
  CHECK(verify_block_parts(std::span(r1).first(shape.header_bytes() + 1), p1.data(), shape, model_a, ref1) ==
        shared_status::verify_failed);
  // The SSD rules accept it as a slot of this model (format::judge_slot with the payload).
  format::block_header h;
  CHECK(format::judge_slot(r1.data(),
                           {shape.header_bytes(), shape.tokens_per_block, model_a.value, shape.block_bytes, 1}, true,
                           &h) == format::slot_verdict::ok);

  SECTION("what does not match what was asked for is verify_failed") {
    auto fails = [&](const std::vector<std::byte>& v, block_ref r, const model_id& m = model_a) {
      return verify_both(v, m, r, out) == shared_status::verify_failed;
    };
    CHECK(fails(r1, ref1, model_b));  // another model
    CHECK(fails(r0, ref1));           // another block under this key
    block_ref r = ref1;
    r.previous = hash128{1, 2};  // a chain that does not continue
    CHECK(fails(r1, r));
    r = ref1;
    r.index = 2;
    CHECK(fails(r1, r));
    r = ref1;
    r.keys = hash128{3, 4};  // keyed otherwise
    CHECK(fails(r1, r));
    const auto other = make_tokens(16, 99);
    r = ref1;
    r.tokens = other;  // other tokens
    CHECK(fails(r1, r));
    r = ref1;
    r.tokens = std::span(toks).subspan(16, 15);  // fewer tokens
    CHECK(fails(r1, r));
    // A record of model_b for the same tokens, planted under model_a's key for the chain.
    hash128 cb;
    const auto rb = make_record(model_b, 1, c0, std::span(toks).subspan(16, 16), {}, p1, &cb);
    CHECK(fails(rb, ref1));
    // A well-formed record whose header names the expected chain, but whose tokens do not
    // hash to it from the previous block (a forged header with a valid checksum).
    auto forged = make_record(model_a, 1, c0, other, {}, p1, nullptr);
    write_block_header(forged.data(), shape, model_a, 1, c1, {}, other, checksum64(p1.data(), p1.size()));
    r = ref1;
    r.tokens = other;
    CHECK(fails(forged, r));
    // A record with session or tenant set (an SSD slot copied in): not a shared record.
    auto with_session = r1;
    format::block_header fh;
    std::memcpy(&fh, with_session.data(), sizeof fh);
    fh.session = hash128{5, 6};
    format::write_header(with_session.data(), fh, std::span(toks).subspan(16, 16));
    CHECK(fails(with_session, ref1));
  }

  SECTION("every truncation and extension is verify_failed") {
    for (std::size_t n = 0; n < r1.size(); n += (n < 4300 ? 1 : 97)) {
      std::vector<std::byte> cut(r1.begin(), r1.begin() + std::ptrdiff_t(n));
      INFO("length " << n);
      CHECK(verify_both(cut, model_a, ref1, out) == shared_status::verify_failed);
    }
    auto longer = r1;
    longer.push_back(std::byte{0});
    CHECK(verify_both(longer, model_a, ref1, out) == shared_status::verify_failed);
  }

  SECTION("any byte changed in the fixed fields, the token ids or the payload is verify_failed") {
    std::mt19937_64 rng(7);
    std::vector<std::size_t> at;
    for (std::size_t i = 0; i < format::fixed_header_bytes + 16 * sizeof(token_id); ++i) at.push_back(i);
    for (int i = 0; i < 400; ++i) at.push_back(shape.header_bytes() + rng() % shape.block_bytes);
    for (std::size_t i : at) {
      auto bad = r1;
      bad[i] ^= std::byte(1 + rng() % 255);
      INFO("byte " << i);
      CHECK(verify_both(bad, model_a, ref1, out) == shared_status::verify_failed);
    }
  }

  SECTION("random bytes are verify_failed, whatever their length") {
    std::mt19937_64 rng(11);
    for (int i = 0; i < 300; ++i) {
      const std::size_t n = i % 3 == 0 ? r1.size() : rng() % (2 * r1.size());
      auto junk = make_payload(n, rng());
      if (i % 5 == 0 && n >= 16) std::memcpy(junk.data(), r1.data(), 16);  // a valid magic and version
      CHECK(verify_both(junk, model_a, ref1, out) == shared_status::verify_failed);
    }
  }
}

TEST_CASE("a manifest round-trips and names only its own session, tenant and model", "[records]") {
  const auto man = make_manifest(model_a, 16 * 5 + 7, 1);  // 6 blocks, the last partial
  REQUIRE(man.blocks.size() == 6);
  CHECK(man.blocks.back().tokens == 7);
  std::vector<std::byte> rec;
  REQUIRE(encode_manifest(man, rec) == shared_status::ok);
  CHECK(rec.size() == manifest_record_bytes(man));
  session_manifest got;
  REQUIRE(decode_manifest(rec, expect_of(man, model_a), got) == shared_status::ok);
  CHECK(got.sequence == man.sequence);
  CHECK(got.tokens == man.tokens);
  REQUIRE(got.blocks.size() == man.blocks.size());
  for (std::size_t i = 0; i < got.blocks.size(); ++i) {
    CHECK(got.blocks[i].chain == man.blocks[i].chain);
    CHECK(got.ref(i).previous == (i ? man.blocks[i - 1].chain : hash128{}));
    CHECK(got.ref(i).tokens.size() == got.blocks[i].tokens);
  }

  auto fails = [&](std::span<const std::byte> v, manifest_expectation e) {
    session_manifest m = got;  // filled: a failure must clear it
    const bool failed = decode_manifest(v, e, m) == shared_status::verify_failed;
    return failed && m.blocks.empty() && m.tokens.empty();
  };
  const auto e = expect_of(man, model_a);
  SECTION("another model, session, tenant or block size") {
    auto x = e;
    x.model = model_b;
    CHECK(fails(rec, x));
    x = e;
    x.session.value.lo ^= 1;
    CHECK(fails(rec, x));
    x = e;
    x.tenant.hi ^= 1;  // another tenant's manifest (copied under this session's key)
    CHECK(fails(rec, x));
    x = e;
    x.tokens_per_block = 32;
    CHECK(fails(rec, x));
    x = e;
    x.limits.max_tokens = man.tokens.size() - 1;
    CHECK(fails(rec, x));
  }
  SECTION("every truncation, every byte changed, random bytes") {
    for (std::size_t n = 0; n < rec.size(); ++n) CHECK(fails(std::span(rec).first(n), e));
    for (std::size_t i = 0; i < rec.size(); ++i) {
      auto bad = rec;
      bad[i] ^= std::byte{0x40};
      INFO("byte " << i);
      CHECK(fails(bad, e));
    }
    std::mt19937_64 rng(5);
    for (int i = 0; i < 300; ++i) {
      auto junk = make_payload(i % 2 ? rec.size() : rng() % 4096, rng());
      if (junk.size() >= 16) std::memcpy(junk.data(), rec.data(), 16);
      CHECK(fails(junk, e));
    }
  }
  SECTION("forged records with valid checksums") {
    // A manifest pointing at another model's blocks: chains of model_b, labelled model_a.
    session_manifest forged = make_manifest(model_b, 16 * 5 + 7, 1);
    forged.model = model_a.value;
    std::vector<std::byte> f;
    REQUIRE(encode_manifest(forged, f) == shared_status::ok);
    CHECK(fails(f, e));
    // A chain that does not continue: block 3 after block 2 of another history.
    forged = man;
    forged.blocks[3].previous = make_manifest(model_a, 16 * 5 + 7, 2).blocks[2].chain;
    REQUIRE(encode_manifest(forged, f) == shared_status::ok);
    CHECK(fails(f, e));
    // Keys digests changed without the chains: they no longer hash.
    forged = man;
    forged.blocks[0].keys = hash128{1, 1};
    REQUIRE(encode_manifest(forged, f) == shared_status::ok);
    CHECK(fails(f, e));
    // Counts that claim far more than the value holds (re-checksummed).
    for (std::uint32_t claim : {0u, 1u, 0x7fffffffu, 0xffffffffu}) {
      auto c = rec;
      std::memcpy(c.data() + 76, &claim, 4);  // token count
      const std::uint64_t cs = checksum64(c.data(), c.size() - 8);
      std::memcpy(c.data() + c.size() - 8, &cs, 8);
      CHECK(fails(c, e));
      c = rec;
      std::memcpy(c.data() + 72, &claim, 4);  // block count
      const std::uint64_t cs2 = checksum64(c.data(), c.size() - 8);
      std::memcpy(c.data() + c.size() - 8, &cs2, 8);
      CHECK(fails(c, e));
    }
  }
  SECTION("keyed blocks hash under their keys") {
    session_manifest k = man;
    std::vector<hash128> keys(k.blocks.size());
    keys[2] = hash128{9, 9};
    REQUIRE(build_manifest_blocks(k, model_a, keys) == shared_status::ok);
    CHECK(k.blocks[1].chain == man.blocks[1].chain);
    CHECK(k.blocks[2].chain != man.blocks[2].chain);
    CHECK(k.blocks[2].chain == chain_hash(k.blocks[1].chain, model_a, k.tokens_of(2), keys[2]));
    REQUIRE(encode_manifest(k, rec) == shared_status::ok);
    session_manifest back;
    CHECK(decode_manifest(rec, e, back) == shared_status::ok);
    CHECK(back.blocks[2].keys == keys[2]);
    CHECK(build_manifest_blocks(k, model_a, std::span(keys).first(2)) == shared_status::invalid_argument);
  }
}

// A truncated view (truncate.hpp): 6 blocks of 16 tokens, cut after a sink of 5 tokens by
// 2 blocks, then 2 blocks saved after the view (the last partial). What the store publishes.
struct truncated_view {
  session_manifest man;
  std::vector<remote_block> blocks;
  explicit truncated_view(const model_id& m) {
    man.session = session_hash{{91, 92}};
    man.tenant = hash128{93, 94};
    man.tokens_per_block = 16;
    man.sequence = 7;
    const auto hist = make_tokens(6 * 16, 21);
    std::vector<hash128> chain(6);
    hash128 prev{};
    for (std::uint32_t i = 0; i < 6; ++i) prev = chain[i] = chain_hash(prev, m, std::span(hist).subspan(i * 16, 16));
    auto add = [&](std::span<const token_id> t, const hash128& previous, std::uint32_t index, std::uint32_t first,
                   std::uint32_t count) {
      man.tokens.insert(man.tokens.end(), t.begin(), t.end());
      blocks.push_back(remote_block{previous, {}, index, std::uint32_t(t.size()), first, count});
    };
    add(std::span(hist).first(16), {}, 0, 0, 5);               // the sink: block 0's first 5 tokens
    add(std::span(hist).subspan(32, 16), chain[1], 2, 5, 11);  // block 2 from its token 5 (view 5..15)
    for (std::uint32_t i = 3; i < 6; ++i) add(std::span(hist).subspan(i * 16, 16), chain[i - 1], i, 0, 16);
    // Saved after the view (at view positions 64 and 80: blocks 4 and 5 again), continuing
    // its digest.
    const auto more = make_tokens(20, 22);
    hash128 digest{};
    const std::uint32_t kept[][3] = {{0, 0, 5}, {2, 5, 11}, {3, 0, 16}, {4, 0, 16}, {5, 0, 16}};
    for (const auto& k : kept) digest = view_link(digest, chain[k[0]], k[0], k[1], k[2]);
    add(std::span(more).first(16), digest, 4, 0, 16);
    const hash128 next = view_link(digest, chain_hash(digest, m, std::span(more).first(16)), 4, 0, 16);
    add(std::span(more).subspan(16, 4), next, 5, 0, 4);
    REQUIRE(build_view_blocks(man, m, blocks) == shared_status::ok);
  }
};

TEST_CASE("a truncated view's manifest round-trips; hostile view metadata is verify_failed", "[records]") {
  const truncated_view tv(model_a);
  const session_manifest& man = tv.man;
  std::vector<std::byte> rec;
  REQUIRE(encode_manifest(man, rec) == shared_status::ok);
  CHECK(rec.size() == manifest_record_bytes(man));
  const manifest_expectation e{model_a, man.session, man.tenant, 16, {}};
  session_manifest got;
  REQUIRE(decode_manifest(rec, e, got) == shared_status::ok);
  REQUIRE(got.blocks.size() == 7);
  for (std::size_t i = 0; i < 7; ++i) {
    INFO("block " << i);
    CHECK(got.blocks[i].chain == man.blocks[i].chain);
    CHECK(got.ref(i).previous == tv.blocks[i].previous);
    CHECK(got.ref(i).index == tv.blocks[i].index);
    CHECK(got.blocks[i].view_first == tv.blocks[i].view_first);
    CHECK(got.blocks[i].view_count == tv.blocks[i].view_count);
  }
  CHECK(got.view_tokens_of(1).size() == 11);
  CHECK(got.view_tokens_of(1)[0] == man.tokens[16 + 5]);

  // An entry's field set to a hostile value, the record's checksum made right again: only
  // the view's own checks stand between it and a load at wrong positions.
  auto patched = [&](std::size_t block, std::size_t offset, std::uint32_t value) {
    auto v = rec;
    std::memcpy(v.data() + manifest_fixed_bytes + block * manifest_block_bytes + offset, &value, 4);
    const std::uint64_t cs = checksum64(v.data(), v.size() - manifest_trailer_bytes);
    std::memcpy(v.data() + v.size() - manifest_trailer_bytes, &cs, 8);
    return v;
  };
  auto fails = [&](const std::vector<std::byte>& v) {
    session_manifest m = got;
    return decode_manifest(v, e, m) == shared_status::verify_failed && m.blocks.empty();
  };
  constexpr std::size_t tokens_at = 32, index_at = 36, first_at = 40, count_at = 44;
  CHECK(fails(patched(1, first_at, 16)));           // a kept range that starts past the block
  CHECK(fails(patched(1, count_at, 0)));            // nothing kept
  CHECK(fails(patched(1, count_at, 12)));           // a kept range that ends past the block
  CHECK(fails(patched(1, first_at, 0xffffffffu)));  // wraps around
  CHECK(fails(patched(2, index_at, 0)));            // block 0 (after nothing) with a previous chain
  CHECK(fails(patched(3, index_at, 1)));            // moved forward: view position 32, saved at 16
  CHECK(fails(patched(2, index_at, 1)));            // not moved, but not after the view before it
  CHECK(fails(patched(0, count_at, 4)));            // then block 2 would move by 33 tokens: not whole blocks
  CHECK(fails(patched(1, first_at, 4)));            // a kept tail that moved by 31 tokens
  CHECK(fails(patched(3, tokens_at, 15)));          // a partial block before the last
  CHECK(fails(patched(6, tokens_at, 17)));          // more tokens than a block holds
  // A block said to be saved at 0 but continuing something, or the reverse.
  {
    auto v = rec;
    std::memset(v.data() + manifest_fixed_bytes + 0, 1, 1);  // block 0's previous not zero
    const std::uint64_t cs = checksum64(v.data(), v.size() - manifest_trailer_bytes);
    std::memcpy(v.data() + v.size() - manifest_trailer_bytes, &cs, 8);
    CHECK(fails(v));
  }
  // A block saved after the view that claims to continue anything but the view's digest
  // (here: the chain of the block before it, as if the view were untruncated).
  {
    auto v = rec;
    std::memcpy(v.data() + manifest_fixed_bytes + 5 * manifest_block_bytes, &man.blocks[4].chain, 16);
    const std::uint64_t cs = checksum64(v.data(), v.size() - manifest_trailer_bytes);
    std::memcpy(v.data() + v.size() - manifest_trailer_bytes, &cs, 8);
    CHECK(fails(v));
  }
  // The writer's side refuses the same views before anything is queued.
  session_manifest m = man;
  auto blocks = tv.blocks;
  blocks[1].view_first = 4;
  CHECK(build_view_blocks(m, model_a, blocks) == shared_status::invalid_argument);
  blocks = tv.blocks;
  blocks[5].previous = man.blocks[4].chain;
  CHECK(build_view_blocks(m, model_a, blocks) == shared_status::invalid_argument);
  blocks = tv.blocks;
  blocks.pop_back();  // tokens for 7 blocks, 6 described
  CHECK(build_view_blocks(m, model_a, blocks) == shared_status::invalid_argument);
}

TEST_CASE("manifest sequences increase and follow the clock", "[records]") {
  const std::uint64_t a = next_manifest_sequence(0);
  CHECK(a > 1'600'000'000'000'000ull);  // microseconds since 1970, after 2020
  CHECK(next_manifest_sequence(a) > a);
  CHECK(next_manifest_sequence(~0ull - 1) == ~0ull);
}

TEST_CASE("shared_tier checks its configuration and bounds publish without a server", "[records]") {
  shared_tier_config c;
  c.cluster.seeds = {"127.0.0.1:1"};  // nothing listens there
  c.cluster.connect_timeout = std::chrono::milliseconds{50};
  c.cluster.command_timeout = std::chrono::milliseconds{50};
  c.cluster.request_timeout = std::chrono::milliseconds{100};
  c.cluster.log.fn = &logger::quiet;
  c.model = model_a;
  c.fleet_secret = hash128{1, 2};
  c.tokens_per_block = shape.tokens_per_block;
  c.block_bytes = shape.block_bytes;
  c.max_bytes_in_flight = shape.record_bytes() + 1024;
  auto throws_naming = [&](shared_tier_config bad, const char* field) {
    try {
      shared_tier t(bad);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what()).find(field) != std::string::npos;
    }
    return false;
  };
  auto bad = c;
  bad.model = {};
  CHECK(throws_naming(bad, "model"));
  bad = c;
  bad.fleet_secret = {};
  CHECK(throws_naming(bad, "fleet_secret"));
  bad = c;
  bad.tokens_per_block = 0;
  CHECK(throws_naming(bad, "tokens_per_block"));
  bad = c;
  bad.cluster.max_value_bytes = shape.record_bytes() - 1;
  CHECK(throws_naming(bad, "max_value_bytes"));
  bad = c;
  bad.max_bytes_in_flight = shape.record_bytes() - 1;
  CHECK(throws_naming(bad, "max_bytes_in_flight"));
  bad = c;
  bad.block_ttl = std::chrono::milliseconds{-1};
  CHECK(throws_naming(bad, "block_ttl"));
  bad = c;
  bad.cluster.seeds = {"no-port"};
  CHECK(throws_naming(bad, "seeds"));

  shared_tier tier(c);
  const auto s = tier.identify(session_key{"tenant", "session"});
  CHECK(s.session == hash_session(session_key{"tenant", "session"}, c.fleet_secret));
  CHECK(s.tenant == hash_tenant("tenant", c.fleet_secret));
  CHECK(!(s.session == hash_session(session_key{"tenant", "session"}, {})));  // keyed by the fleet secret
  const auto toks = make_tokens(32, 1);
  const auto p = make_payload(shape.block_bytes, 1);
  const std::byte* two[] = {p.data(), p.data()};
  const std::byte* one[] = {p.data(), nullptr};
  publish_request req{.sequence = 1, .tokens = toks, .keys = {}, .payloads = two};
  CHECK(tier.publish(s, req) == shared_status::busy);  // two records exceed the bound: refused at once
  req.sequence = 0;
  CHECK(tier.publish(s, req) == shared_status::invalid_argument);
  req.sequence = 1;
  req.payloads = std::span(two).first(1);  // one payload entry for two blocks
  CHECK(tier.publish(s, req) == shared_status::invalid_argument);
  req.payloads = one;
  CHECK(tier.publish(s, req) == shared_status::ok);  // one record fits; the writer finds no server
  CHECK(tier.flush(std::chrono::milliseconds{5000}) == shared_status::ok);
  const auto st = tier.stats();
  CHECK(st.publishes == 1);
  CHECK(st.publishes_refused == 1);
  CHECK(st.write_failures.node_down + st.write_failures.timeout >= 1);
  CHECK(st.manifests_written == 0);
  CHECK(st.bytes_in_flight == 0);
  session_manifest m;
  CHECK(tier.fetch_manifest(s, m) == shared_status::node_down);
}
