// libFuzzer harness: the mini engine's safetensors reader (examples/mini_engine) on
// arbitrary bytes, through reader::from_bytes (the file constructor parses the same
// way after mmap). A bad image must be a std::runtime_error, as the reader documents;
// any other exception, a crash or a sanitizer report is a finding. An accepted image
// must be readable tensor by tensor within its own bytes. The same bytes also go to
// json::parse alone, the parser config.json is read with.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

#include "safetensors.hpp"

namespace {

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: invariant broken: %s\n", what);
    std::abort();
  }
}

// `data_section`: the bytes after the header, as the format defines them.
void check_reader(const mini::st::reader& r, std::span<const std::uint8_t> data_section) {
  for (const auto& t : r.tensors()) {
    require(r.contains(t.name) && &r.info(t.name) == &t, "index and tensor list agree");
    require(t.begin <= t.end && t.end <= data_section.size(), "data_offsets inside the data section");
    const auto b = r.bytes(t.name);
    require(b.size() == t.end - t.begin, "bytes() spans data_offsets");
    require(b.empty() || std::memcmp(b.data(), data_section.data() + t.begin, b.size()) == 0,
            "bytes() are the tensor's bytes");
    if (t.type == mini::st::dtype::other) {
      bool threw = false;
      try {
        (void)r.read_f32(t.name);
      } catch (const std::runtime_error&) {
        threw = true;
      }
      require(threw, "a non-float tensor read as float must throw");
      continue;
    }
    require(t.numel() * mini::st::dtype_size(t.type) == b.size(), "element count matches the bytes");
    const std::vector<float> v = r.read_f32(t.name, t.shape);
    require(v.size() == t.numel(), "read_f32 size");
  }
}

void check_json(std::string_view text) {
  mini::json::value v;
  try {
    v = mini::json::parse(text);
  } catch (const std::runtime_error&) {
    return;
  }
  // Walk the accessors the loaders use; each either answers or throws runtime_error.
  auto visit = [](const mini::json::value& x, auto& self, int depth) -> void {
    require(depth <= 600, "nesting beyond the parser's limit");
    try {
      (void)x.as_int();
    } catch (const std::runtime_error&) {
    }
    try {
      (void)x.as_double();
      (void)x.as_string();
    } catch (const std::runtime_error&) {
    }
    for (const auto& i : x.items) self(i, self, depth + 1);
    for (const auto& [k, m] : x.members) {
      require(x.find(k) != nullptr, "find() finds every member");
      self(m, self, depth + 1);
    }
  };
  visit(v, visit, 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> image(size);
  if (size) std::memcpy(image.data(), data, size);
  try {
    const mini::st::reader r = mini::st::reader::from_bytes(std::move(image), "fuzz");
    // Accepted: so the 8-byte length is there and the header fits.
    require(size >= 8, "an accepted image holds the header length");
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
    require(header_len <= size - 8, "an accepted image holds its header");
    check_reader(r, std::span<const std::uint8_t>(data + 8 + header_len, size - 8 - header_len));
  } catch (const std::runtime_error&) {
  }
  check_json(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
