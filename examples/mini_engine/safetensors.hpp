// safetensors: reading and writing the safetensors checkpoint format, plus the small
// JSON reader it (and config.json) needs.
//
// File layout: an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [a, b],
//    "data_offsets": [begin, end]}, ...}
// padded with spaces, then the tensor data; offsets are relative to the end of the header.
//
// Reading maps the file and converts F32, F16, BF16 (and F64) tensors to float. Every
// error is a std::runtime_error that names the file and, where there is one, the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mini {

// ---- JSON -----------------------------------------------------------------------------
namespace json {

struct value {
  enum class kind : std::uint8_t { null, boolean, number, string, array, object };
  kind type = kind::null;
  bool boolean = false;
  double number = 0;                                   // kind::number
  std::string text;                                    // kind::string, or a number's literal
  std::vector<value> items;                            // kind::array
  std::vector<std::pair<std::string, value>> members;  // kind::object, in file order

  // Out of line, where value is complete (a vector of pairs holding value needs that).
  value();
  ~value();
  value(const value&);
  value(value&&) noexcept;
  value& operator=(const value&);
  value& operator=(value&&) noexcept;

  bool is_null() const { return type == kind::null; }
  bool is_number() const { return type == kind::number; }
  bool is_string() const { return type == kind::string; }
  bool is_array() const { return type == kind::array; }
  bool is_object() const { return type == kind::object; }
  /// Member `key` of an object, or nullptr (also when this is not an object).
  const value* find(std::string_view key) const;
  /// The number as an exact integer; throws std::runtime_error when it is not one
  /// (fractional, out of the int64 range, or not a number).
  std::int64_t as_int() const;
  double as_double() const;              // throws when not a number
  const std::string& as_string() const;  // throws when not a string
};

/// Parses one JSON document (RFC 8259; nesting up to 512 levels). Throws
/// std::runtime_error("json: <what> at offset N").
value parse(std::string_view text);
/// `s` as a quoted JSON string literal.
std::string quote(std::string_view s);

}  // namespace json

// ---- safetensors ----------------------------------------------------------------------
namespace st {

enum class dtype : std::uint8_t { f32, f16, bf16, f64, other };

/// "F32", "F16", "BF16", "F64"; "?" for other.
std::string_view dtype_name(dtype d);
/// Bytes of one element (0 for other).
std::size_t dtype_size(dtype d);

// float <-> 16-bit conversions (round to nearest even; NaN stays NaN).
std::uint16_t f32_to_bf16(float f);
float bf16_to_f32(std::uint16_t h);
std::uint16_t f32_to_f16(float f);
float f16_to_f32(std::uint16_t h);
/// f rounded to the nearest bf16 (what a BF16 checkpoint stores).
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
inline float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

struct tensor_info {
  std::string name;
  dtype type = dtype::other;
  std::string dtype_str;  // as written in the header
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte range within the data section
  std::size_t numel() const;
};

std::string shape_string(std::span<const std::int64_t> shape);  // "[a, b]"

/// A safetensors file, memory-mapped read-only (or an image in memory). Move-only.
class reader {
 public:
  /// Opens and validates the header. Throws std::runtime_error naming the file for an
  /// unreadable file, a truncated or malformed header, an unknown layout of an entry, or
  /// data offsets that do not match the dtype and shape or run past the end.
  explicit reader(const std::string& path);
  /// Parses a safetensors image held in memory, with the same checks and errors as the
  /// file constructor; `name` stands for the file name in messages. The reader owns the
  /// image (move it in to avoid a copy). For tests and fuzzing.
  static reader from_bytes(std::vector<std::byte> image, const std::string& name = "<memory>");
  ~reader();
  reader(reader&&) noexcept;
  reader& operator=(reader&&) noexcept;
  reader(const reader&) = delete;
  reader& operator=(const reader&) = delete;

  const std::string& path() const { return path_; }
  bool contains(std::string_view name) const;
  /// Throws std::runtime_error("safetensors: <file>: missing tensor '<name>'").
  const tensor_info& info(std::string_view name) const;
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Raw bytes of a tensor (in the file's dtype).
  std::span<const std::byte> bytes(std::string_view name) const;

  /// The tensor converted to float (F32, F16, BF16, F64). Throws for a missing tensor or
  /// an unsupported dtype.
  std::vector<float> read_f32(std::string_view name) const;
  /// Same, after checking the shape equals `expected`; throws naming the file, the
  /// tensor, the shape found and the shape expected otherwise.
  std::vector<float> read_f32(std::string_view name, std::span<const std::int64_t> expected) const;
  /// Converts into `out`, whose size must be the tensor's element count.
  void read_f32_into(std::string_view name, std::span<float> out) const;

 private:
  reader() = default;
  /// Validates the header of the image at map_ (map_size_ bytes) and fills the tables.
  void parse();

  std::string path_;
  const std::byte* map_ = nullptr;  // the image: mmapped (mapped_) or owned_.data()
  std::size_t map_size_ = 0;
  bool mapped_ = false;
  std::vector<std::byte> owned_;      // the image of from_bytes
  const std::byte* data_ = nullptr;   // start of the data section
  std::vector<tensor_info> tensors_;  // file order
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
  [[noreturn]] void fail(const std::string& what) const;
};

/// One tensor to write: float data converted to the file's dtype on the way.
struct tensor_ref {
  std::string name;
  std::vector<std::int64_t> shape;
  std::span<const float> data;  // numel(shape) floats, row-major
};

/// Writes a safetensors file (to path + ".tmp", then renamed over `path`). Tensors are
/// stored in the given order, each converted to `storage` (F32, F16 or BF16), 8-byte
/// aligned. Throws std::runtime_error for a size mismatch, a duplicate or empty name,
/// an unsupported dtype, or an I/O error.
void write(const std::string& path, std::span<const tensor_ref> tensors, dtype storage = dtype::f32,
           const std::map<std::string, std::string>& metadata = {});

}  // namespace st
}  // namespace mini
