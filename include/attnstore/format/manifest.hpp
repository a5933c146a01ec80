// A store directory's MANIFEST (docs/format.md): key=value lines, written once.
#pragma once

#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <string>

#include "attnstore/types.hpp"

namespace attnstore::format {

/// A 128-bit hash as the MANIFEST writes it: 32 lowercase hex digits, `hi` then `lo`.
inline std::string hex128(const hash128& h) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64 "%016" PRIx64, h.hi, h.lo);
  return buf;
}

/// Parses hex128's form; false (and `out` untouched) for anything else.
inline bool parse_hex128(const std::string& s, hash128& out) {
  if (s.size() != 32 || s.find_first_not_of("0123456789abcdef") != std::string::npos) return false;
  out.hi = std::stoull(s.substr(0, 16), nullptr, 16);
  out.lo = std::stoull(s.substr(16), nullptr, 16);
  return true;
}

/// The MANIFEST's key=value lines (comments and other lines skipped), or nullopt when
/// `directory` has none.
inline std::optional<std::map<std::string, std::string>> read_manifest(const std::string& directory) {
  std::ifstream in(directory + "/MANIFEST");
  if (!in) return std::nullopt;
  std::map<std::string, std::string> have;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto eq = line.find('=');
    if (eq != std::string::npos) have[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return have;
}

}  // namespace attnstore::format
