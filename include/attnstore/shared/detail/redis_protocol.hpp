// Pure helpers of the Redis Cluster client: endpoint parsing and error-reply classification.
// No I/O, no allocation; everything a server sends is treated as untrusted text.
#pragma once

#include <cstdint>
#include <string_view>

#include "attnstore/shared/redis_cluster.hpp"

namespace attnstore::shared::detail {

/// A node address as text; `host` points into the parsed string.
struct endpoint {
  std::string_view host;
  std::uint16_t port = 0;
};

/// A host name or address as a node reports it: 1..255 bytes, no spaces or control bytes.
constexpr bool valid_host(std::string_view host) noexcept {
  if (host.empty() || host.size() > 255) return false;
  for (char c : host) {
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f) return false;
  }
  return true;
}

/// Parses "host:port" or "[v6addr]:port" (port 1..65535, host at most 255 bytes). An empty
/// host (":6379", which Redis 7 sends when a node's endpoint is unknown: "the node you asked")
/// is accepted only when allow_empty_host. False when malformed.
constexpr bool parse_endpoint(std::string_view s, endpoint& out, bool allow_empty_host) noexcept {
  std::string_view host;
  std::string_view port;
  if (!s.empty() && s.front() == '[') {
    const std::size_t close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') return false;
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
    if (host.empty()) return false;
  } else {
    const std::size_t colon = s.rfind(':');
    if (colon == std::string_view::npos) return false;
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return false;  // bare IPv6 needs brackets
  }
  if (host.empty() ? !allow_empty_host : !valid_host(host)) return false;
  if (port.empty() || port.size() > 5) return false;
  unsigned value = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value == 0 || value > 65535) return false;
  out.host = host;
  out.port = static_cast<std::uint16_t>(value);
  return true;
}

/// What an error reply means for the client.
struct error_reply {
  enum class redirect : std::uint8_t { none, moved, ask };
  redis_status status = redis_status::server_error;
  redirect kind = redirect::none;
  std::uint16_t slot = 0;  ///< MOVED/ASK: the slot
  endpoint target;         ///< MOVED/ASK: where to go (host may be empty: the replying node's)
};

/// Classifies an error reply's text ("MOVED 3999 127.0.0.1:6381", "OOM command not
/// allowed...", ...) by its first word. A MOVED or ASK that does not parse is
/// protocol_error; an unknown first word is server_error.
constexpr error_reply classify_error(std::string_view msg) noexcept {
  error_reply r;
  const std::size_t sp = msg.find(' ');
  const std::string_view code = msg.substr(0, sp);
  if (code == "MOVED" || code == "ASK") {
    r.status = redis_status::protocol_error;
    if (sp == std::string_view::npos) return r;
    std::string_view rest = msg.substr(sp + 1);
    const std::size_t sp2 = rest.find(' ');
    if (sp2 == std::string_view::npos) return r;
    const std::string_view slot = rest.substr(0, sp2);
    if (slot.empty() || slot.size() > 5) return r;
    unsigned value = 0;
    for (char c : slot) {
      if (c < '0' || c > '9') return r;
      value = value * 10 + static_cast<unsigned>(c - '0');
    }
    if (value >= redis_slot_count) return r;
    if (!parse_endpoint(rest.substr(sp2 + 1), r.target, true)) return r;
    r.slot = static_cast<std::uint16_t>(value);
    r.kind = code == "MOVED" ? error_reply::redirect::moved : error_reply::redirect::ask;
    r.status = redis_status::ok;
    return r;
  }
  if (code == "OOM") {
    r.status = redis_status::oom;
  } else if (code == "LOADING") {
    r.status = redis_status::loading;
  } else if (code == "CLUSTERDOWN" || code == "MASTERDOWN" || code == "READONLY") {
    r.status = redis_status::cluster_down;
  } else if (code == "TRYAGAIN" || code == "BUSY") {
    r.status = redis_status::try_again;
  } else if (code == "NOAUTH" || code == "WRONGPASS" || code == "NOPERM") {
    r.status = redis_status::auth_error;
  }
  return r;
}

}  // namespace attnstore::shared::detail
