#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this reader copies it as is");

namespace mini {

// =====================================================================================
// JSON
// =====================================================================================
namespace json {
namespace {

class parser {
 public:
  explicit parser(std::string_view s) : s_(s) {}

  value document() {
    value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  std::string_view s_;
  std::size_t pos_ = 0;

  [[noreturn]] void fail(const char* what) const {
    throw std::runtime_error(std::string("json: ") + what + " at offset " + std::to_string(pos_));
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(char c) {
    if (peek() != c) {
      char msg[32];
      std::snprintf(msg, sizeof msg, "expected '%c'", c);
      fail(msg);
    }
    ++pos_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

  value parse_value(int depth) {
    if (depth > 512) fail("nesting too deep");
    value v;
    const char c = peek();
    if (c == '{') {
      ++pos_;
      v.type = value::kind::object;
      if (peek() == '}') {
        ++pos_;
        return v;
      }
      for (;;) {
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        expect(':');
        v.members.emplace_back(std::move(key), parse_value(depth + 1));
        const char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      ++pos_;
      v.type = value::kind::array;
      if (peek() == ']') {
        ++pos_;
        return v;
      }
      for (;;) {
        v.items.push_back(parse_value(depth + 1));
        const char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.type = value::kind::string;
      v.text = parse_string();
    } else if (literal("true")) {
      v.type = value::kind::boolean;
      v.boolean = true;
    } else if (literal("false")) {
      v.type = value::kind::boolean;
    } else if (literal("null")) {
      v.type = value::kind::null;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      parse_number(v);
    } else {
      fail("unexpected character");
    }
    return v;
  }

  void parse_number(value& v) {
    const std::size_t b = pos_;
    auto digits = [&] {
      const std::size_t d0 = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == d0) fail("malformed number");
    };
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
    } else {
      digits();
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      digits();
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
    }
    v.type = value::kind::number;
    v.text.assign(s_.substr(b, pos_ - b));
    // strtod is locale-dependent in theory; the C locale is the default for this program.
    v.number = std::strtod(v.text.c_str(), nullptr);
  }

  static void put_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= std::uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= std::uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= std::uint32_t(c - 'A' + 10);
      else
        fail("bad \\u escape");
    }
    return v;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) fail("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (pos_ + 2 <= s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u') {
              pos_ += 2;
              const std::uint32_t lo = hex4();
              if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              fail("lone surrogate");
            }
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("lone surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default:
          fail("bad escape");
      }
    }
  }
};

}  // namespace

value::value() = default;
value::~value() = default;
value::value(const value&) = default;
value::value(value&&) noexcept = default;
value& value::operator=(const value&) = default;
value& value::operator=(value&&) noexcept = default;

const value* value::find(std::string_view key) const {
  if (type != kind::object) return nullptr;
  for (const auto& [k, v] : members)
    if (k == key) return &v;
  return nullptr;
}

std::int64_t value::as_int() const {
  if (type != kind::number) throw std::runtime_error("json: expected an integer");
  std::int64_t r = 0;
  const char* b = text.data();
  const char* e = b + text.size();
  auto [p, ec] = std::from_chars(b, e, r);
  if (ec == std::errc() && p == e) return r;
  // 1e3, 4096.0: accept when exactly integral and in range.
  if (std::isfinite(number) && number == std::floor(number) && std::fabs(number) < 9.007199254740992e15)
    return static_cast<std::int64_t>(number);
  throw std::runtime_error("json: " + text + " is not an integer");
}

double value::as_double() const {
  if (type != kind::number) throw std::runtime_error("json: expected a number");
  return number;
}

const std::string& value::as_string() const {
  if (type != kind::string) throw std::runtime_error("json: expected a string");
  return text;
}

value parse(std::string_view text) { return parser(text).document(); }

std::string quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

}  // namespace json

// =====================================================================================
// safetensors
// =====================================================================================
namespace st {

std::string_view dtype_name(dtype d) {
  switch (d) {
    case dtype::f32:
      return "F32";
    case dtype::f16:
      return "F16";
    case dtype::bf16:
      return "BF16";
    case dtype::f64:
      return "F64";
    default:
      return "?";
  }
}

std::size_t dtype_size(dtype d) {
  switch (d) {
    case dtype::f32:
      return 4;
    case dtype::f16:
      return 2;
    case dtype::bf16:
      return 2;
    case dtype::f64:
      return 8;
    default:
      return 0;
  }
}

namespace {

// Element sizes of the dtypes the format defines (so a file holding, say, I64 tensors
// is still validated and its float tensors readable).
std::size_t any_dtype_size(std::string_view s) {
  if (s == "F64" || s == "I64" || s == "U64") return 8;
  if (s == "F32" || s == "I32" || s == "U32") return 4;
  if (s == "F16" || s == "BF16" || s == "I16" || s == "U16") return 2;
  if (s == "I8" || s == "U8" || s == "BOOL" || s == "F8_E4M3" || s == "F8_E5M2") return 1;
  return 0;
}

dtype parse_dtype(std::string_view s) {
  if (s == "F32") return dtype::f32;
  if (s == "F16") return dtype::f16;
  if (s == "BF16") return dtype::bf16;
  if (s == "F64") return dtype::f64;
  return dtype::other;
}

}  // namespace

std::uint16_t f32_to_bf16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return std::uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  const std::uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return std::uint16_t((u + rounding) >> 16);
}

float bf16_to_f32(std::uint16_t h) { return std::bit_cast<float>(std::uint32_t(h) << 16); }

std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return std::uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN
  if (a >= 0x477FF000u) return std::uint16_t(sign | 0x7C00u);                        // rounds to >= 65520: inf
  if (a >= 0x38800000u) {                                                            // normal half
    // Rebias exponent (127 -> 15) and round the 23-bit mantissa to 10 bits, ties to even.
    const std::uint32_t m = a - 0x38000000u;
    const std::uint32_t r = m + 0x0FFFu + ((m >> 13) & 1u);
    return std::uint16_t(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal: +-0
  // Subnormal half: value = mant * 2^-24.
  const int e = int(a >> 23);  // 102..112
  const std::uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - e;  // bits to drop so that the result is in units of 2^-24
  const std::uint32_t q = mant >> shift;
  const std::uint32_t rem = mant & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  std::uint32_t r = q;
  if (rem > half || (rem == half && (q & 1u))) ++r;
  return std::uint16_t(sign | r);
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1Fu;
  const std::uint32_t m = h & 0x3FFu;
  if (e == 0) {
    if (m == 0) return std::bit_cast<float>(sign);
    const float v = float(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return std::bit_cast<float>(sign | 0x7F800000u | (m << 13));
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

std::size_t tensor_info::numel() const {
  std::size_t n = 1;
  for (const auto d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void reader::fail(const std::string& what) const { throw std::runtime_error("safetensors: " + path_ + ": " + what); }

reader::reader(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) {
    const int err = errno;
    ::close(fd);
    fail(std::string("cannot stat: ") + std::strerror(err));
  }
  const std::size_t size = static_cast<std::size_t>(sb.st_size);
  if (size < 8) {  // also keeps mmap from seeing a length of 0
    ::close(fd);
    fail("file of " + std::to_string(size) + " bytes is too short for a header");
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) fail(std::string("cannot mmap: ") + std::strerror(err));
  map_ = static_cast<const std::byte*>(p);
  map_size_ = size;
  mapped_ = true;
  try {
    parse();
  } catch (...) {
    ::munmap(const_cast<std::byte*>(map_), map_size_);
    map_ = nullptr;
    throw;
  }
}

reader reader::from_bytes(std::vector<std::byte> image, const std::string& name) {
  reader r;
  r.path_ = name;
  r.owned_ = std::move(image);
  r.map_ = r.owned_.data();
  r.map_size_ = r.owned_.size();
  r.parse();
  return r;
}

void reader::parse() {
  const std::size_t size = map_size_;
  if (size < 8) fail("file of " + std::to_string(size) + " bytes is too short for a header");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::uint64_t(std::to_integer<unsigned>(map_[i]));
  if (header_len > size - 8)
    fail("bad header: length " + std::to_string(header_len) + " runs past the end of the file");
  if (header_len > (std::uint64_t(100) << 20))
    fail("bad header: length " + std::to_string(header_len) + " above 100 MiB");
  const std::string_view text(reinterpret_cast<const char*>(map_ + 8), static_cast<std::size_t>(header_len));
  json::value h;
  try {
    h = json::parse(text);
  } catch (const std::exception& e) {
    fail(std::string("bad header: ") + e.what());
  }
  if (!h.is_object()) fail("bad header: not a JSON object");
  data_ = map_ + 8 + header_len;
  const std::size_t data_size = size - 8 - static_cast<std::size_t>(header_len);

  for (const auto& member : h.members) {
    const std::string& name = member.first;
    const json::value& entry = member.second;
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("bad header: __metadata__ is not an object");
      for (const auto& [k, v] : entry.members) {
        if (!v.is_string()) fail("bad header: __metadata__ value '" + k + "' is not a string");
        metadata_[k] = v.text;
      }
      continue;
    }
    auto bad = [&](const std::string& what) { fail("bad header: tensor '" + name + "': " + what); };
    if (!entry.is_object()) bad("entry is not an object");
    const json::value* dt = entry.find("dtype");
    const json::value* shape = entry.find("shape");
    const json::value* offs = entry.find("data_offsets");
    if (!dt || !dt->is_string()) bad("missing or non-string dtype");
    if (!shape || !shape->is_array()) bad("missing or non-array shape");
    if (!offs || !offs->is_array() || offs->items.size() != 2) bad("data_offsets must be [begin, end]");
    tensor_info t;
    t.name = name;
    t.dtype_str = dt->text;
    t.type = parse_dtype(dt->text);
    const std::size_t esize = any_dtype_size(dt->text);
    if (esize == 0) bad("unknown dtype '" + dt->text + "'");
    std::size_t numel = 1;
    for (const auto& d : shape->items) {
      std::int64_t v = -1;
      try {
        v = d.as_int();
      } catch (const std::exception&) {
        bad("shape entries must be integers");
      }
      if (v < 0 || v > (std::int64_t(1) << 48)) bad("shape entry " + std::to_string(v) + " out of range");
      t.shape.push_back(v);
      if (v != 0 && numel > (std::numeric_limits<std::size_t>::max() / 16) / std::size_t(v)) bad("shape too large");
      numel *= std::size_t(v);
    }
    std::int64_t b = -1, e = -1;
    try {
      b = offs->items[0].as_int();
      e = offs->items[1].as_int();
    } catch (const std::exception&) {
      bad("data_offsets must be integers");
    }
    if (b < 0 || e < b || std::uint64_t(e) > data_size)
      bad("data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] outside the " +
          std::to_string(data_size) + " data bytes");
    t.begin = std::size_t(b);
    t.end = std::size_t(e);
    if (t.end - t.begin != numel * esize)
      bad("data_offsets span " + std::to_string(t.end - t.begin) + " bytes, but " + dt->text + " " +
          shape_string(t.shape) + " needs " + std::to_string(numel * esize));
    if (index_.count(name)) bad("duplicate tensor");
    index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
}

reader::~reader() {
  if (map_ && mapped_) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

// owned_'s buffer moves with it, so map_ stays valid for an image in memory.
reader::reader(reader&& o) noexcept
    : path_(std::move(o.path_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)),
      mapped_(std::exchange(o.mapped_, false)),
      owned_(std::move(o.owned_)),
      data_(std::exchange(o.data_, nullptr)),
      tensors_(std::move(o.tensors_)),
      index_(std::move(o.index_)),
      metadata_(std::move(o.metadata_)) {}

reader& reader::operator=(reader&& o) noexcept {
  if (this != &o) {
    if (map_ && mapped_) ::munmap(const_cast<std::byte*>(map_), map_size_);
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    mapped_ = std::exchange(o.mapped_, false);
    owned_ = std::move(o.owned_);
    data_ = std::exchange(o.data_, nullptr);
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

bool reader::contains(std::string_view name) const { return index_.find(name) != index_.end(); }

const tensor_info& reader::info(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("missing tensor '" + std::string(name) + "'");
  return tensors_[it->second];
}

std::span<const std::byte> reader::bytes(std::string_view name) const {
  const tensor_info& t = info(name);
  return {data_ + t.begin, t.end - t.begin};
}

void reader::read_f32_into(std::string_view name, std::span<float> out) const {
  const tensor_info& t = info(name);
  const std::size_t n = t.numel();
  if (out.size() != n)
    fail("tensor '" + t.name + "': destination holds " + std::to_string(out.size()) + " floats, tensor has " +
         std::to_string(n));
  const std::byte* src = data_ + t.begin;
  switch (t.type) {
    case dtype::f32:
      // An empty tensor's vector may have no storage, and memcpy from or to a null
      // pointer is undefined even for 0 bytes.
      if (n) std::memcpy(out.data(), src, n * 4);  // little-endian host
      break;
    case dtype::f64:
      for (std::size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      break;
    case dtype::bf16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = bf16_to_f32(h);
      }
      break;
    case dtype::f16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = f16_to_f32(h);
      }
      break;
    default:
      fail("tensor '" + t.name + "': dtype " + t.dtype_str + " cannot be converted to float (F32, F16, BF16, F64 can)");
  }
}

std::vector<float> reader::read_f32(std::string_view name) const {
  std::vector<float> out(info(name).numel());
  read_f32_into(name, out);
  return out;
}

std::vector<float> reader::read_f32(std::string_view name, std::span<const std::int64_t> expected) const {
  const tensor_info& t = info(name);
  if (!std::equal(t.shape.begin(), t.shape.end(), expected.begin(), expected.end()))
    fail("tensor '" + t.name + "' has shape " + shape_string(t.shape) + ", expected " + shape_string(expected));
  return read_f32(name);
}

void write(const std::string& path, std::span<const tensor_ref> tensors, dtype storage,
           const std::map<std::string, std::string>& metadata) {
  auto fail = [&](const std::string& what) { throw std::runtime_error("safetensors: " + path + ": " + what); };
  if (storage != dtype::f32 && storage != dtype::f16 && storage != dtype::bf16)
    fail("can only write F32, F16 or BF16 tensors");
  const std::size_t esize = dtype_size(storage);

  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool f2 = true;
    for (const auto& [k, v] : metadata) {
      if (!f2) header += ',';
      f2 = false;
      header += json::quote(k) + ':' + json::quote(v);
    }
    header += '}';
    first = false;
  }
  std::vector<std::size_t> offsets;
  std::size_t off = 0;
  std::map<std::string_view, int> seen;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") fail("invalid tensor name '" + t.name + "'");
    if (!seen.emplace(t.name, 0).second) fail("duplicate tensor '" + t.name + "'");
    std::size_t numel = 1;
    for (const auto d : t.shape) {
      if (d < 0) fail("tensor '" + t.name + "': negative dimension");
      numel *= static_cast<std::size_t>(d);
    }
    if (numel != t.data.size())
      fail("tensor '" + t.name + "': shape " + shape_string(t.shape) + " holds " + std::to_string(numel) +
           " elements, data has " + std::to_string(t.data.size()));
    off = (off + 7) & ~std::size_t(7);
    offsets.push_back(off);
    if (!first) header += ',';
    first = false;
    header += json::quote(t.name) + ":{\"dtype\":\"" + std::string(dtype_name(storage)) + "\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(off) + ',' + std::to_string(off + numel * esize) + "]}";
    off += numel * esize;
  }
  header += '}';
  while (header.size() % 8) header += ' ';

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail("cannot create " + tmp + ": " + std::strerror(errno));
  bool ok = true;
  auto put = [&](const void* p, std::size_t n) {
    if (ok && n && std::fwrite(p, 1, n, f) != n) ok = false;
  };
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((std::uint64_t(header.size()) >> (8 * i)) & 0xFF);
  put(len, 8);
  put(header.data(), header.size());
  std::size_t written = 0;
  std::vector<unsigned char> buf;
  static const unsigned char zeros[8] = {};
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    put(zeros, offsets[i] - written);
    written = offsets[i];
    const auto& d = tensors[i].data;
    if (storage == dtype::f32) {
      put(d.data(), d.size() * 4);
    } else {
      buf.resize(d.size() * 2);
      for (std::size_t j = 0; j < d.size(); ++j) {
        const std::uint16_t h = storage == dtype::bf16 ? f32_to_bf16(d[j]) : f32_to_f16(d[j]);
        std::memcpy(&buf[2 * j], &h, 2);
      }
      put(buf.data(), buf.size());
    }
    written += d.size() * esize;
  }
  if (std::fclose(f) != 0) ok = false;
  if (!ok) {
    std::remove(tmp.c_str());
    fail("write error on " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    fail("cannot rename " + tmp + ": " + std::strerror(err));
  }
}

}  // namespace st
}  // namespace mini
