// libFuzzer harness: the shared tier's manifest reader (decode_manifest, records.hpp) on
// arbitrary bytes, as a value read from the network. The harness makes the record's
// identity (model, session, tenant) and its trailing checksum right before decoding, so
// that mutations reach the view's checks instead of stopping at the checksum. It must
// answer ok or verify_failed, never crash or read outside the value, and anything it
// accepts must be a view a store can load: every entry one valid_view_entry accepts where
// the view places it, chains that are the hashes of what each entry continues, a block in
// place that continues the view before it, a canonical encoding (re-encoded, the same bytes).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attnstore/hash.hpp"
#include "attnstore/shared/records.hpp"

namespace {

using namespace attnstore;
using namespace attnstore::shared;

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_manifest: invariant broken: %s\n", what);
    std::abort();
  }
}

const model_id model{{0x1111222233334444ull, 0x5555666677778888ull}};
const manifest_expectation expect{model, session_hash{{91, 92}}, hash128{93, 94}, 16, {.max_tokens = 1 << 16}};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> v(reinterpret_cast<const std::byte*>(data), reinterpret_cast<const std::byte*>(data) + size);
  if (v.size() >= manifest_fixed_bytes + manifest_trailer_bytes) {
    std::memcpy(v.data() + 16, &expect.model.value, 16);
    std::memcpy(v.data() + 32, &expect.session.value, 16);
    std::memcpy(v.data() + 48, &expect.tenant, 16);
    const std::uint64_t cs = checksum64(v.data(), v.size() - manifest_trailer_bytes);
    std::memcpy(v.data() + v.size() - manifest_trailer_bytes, &cs, 8);
  }
  // Exactly as big as the value: a read past it is an ASan finding.
  std::unique_ptr<std::byte[]> exact(new std::byte[v.size() ? v.size() : 1]);
  if (!v.empty()) std::memcpy(exact.get(), v.data(), v.size());
  session_manifest m;
  const shared_status s = decode_manifest({exact.get(), v.size()}, expect, m);
  require(s == shared_status::ok || s == shared_status::verify_failed, "decode answers ok or verify_failed");
  if (s != shared_status::ok) {
    require(m.blocks.empty() && m.tokens.empty(), "a refused manifest leaves nothing");
    return 0;
  }
  require(check_view(m) == shared_status::ok, "an accepted view passes check_view");
  view_continuation view;
  for (std::size_t i = 0; i < m.blocks.size(); ++i) {
    const manifest_block& b = m.blocks[i];
    require(valid_view_entry(b, view.position(), m.tokens_per_block, i + 1 == m.blocks.size()), "entry");
    require(b.chain == chain_hash(b.previous, model, m.tokens_of(i), b.keys), "chain");
    const std::uint64_t saved = std::uint64_t(b.index) * m.tokens_per_block;
    require(saved != view.position() || b.previous == view.previous(), "a block in place continues the view");
    require(m.view_tokens_of(i).size() == b.view_count, "kept tokens");
    view.add(b.chain, b.previous, saved, b.tokens, b.view_first, b.view_count, m.tokens_per_block);
  }
  std::vector<std::byte> again;
  require(encode_manifest(m, again) == shared_status::ok, "an accepted manifest encodes");
  require(again.size() == v.size() && std::memcmp(again.data(), exact.get(), v.size()) == 0, "canonical encoding");
  return 0;
}
