// Builds against the installed package and round-trips one session through DRAM.
#include <attnstore/config.hpp>
#include <attnstore/store.hpp>

#include <cstdio>
#include <vector>

int main() {
  attnstore::store_config c;
  c.geometry = {2, 2, 64, attnstore::dtype::bf16, 16};
  c.model_name = "consumer";
  c.dram_bytes = 8 << 20;
  attnstore::store s(c);
  std::vector<attnstore::token_id> toks(40, 7);
  std::vector<std::byte> kv(3 * s.block_bytes(), std::byte{0x2a}), out(kv.size());
  if (s.put({"t", "s"}, toks, 0, kv) != attnstore::errc::ok) return 1;
  auto g = s.get({"t", "s"}, toks, 0, 3, out);
  std::printf("attnstore %s: restored %llu tokens, cuda part %d\n", ATTNSTORE_VERSION,
              static_cast<unsigned long long>(g.tokens), ATTNSTORE_HAS_CUDA);
  return g.tokens == 40 && out == kv ? 0 : 1;
}
