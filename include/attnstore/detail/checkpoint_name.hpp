// The companion session that holds a session's checkpoint (the states of state groups,
// the window tails with window_tails): same tenant, the session id with a suffix. The
// hooks save and load it; store::drop and `attnstore drop` delete it with the session.
#pragma once

#include <cstddef>
#include <cstring>
#include <string_view>

#include "attnstore/types.hpp"

namespace attnstore::detail {

inline constexpr std::string_view checkpoint_suffix =
    "\x1f"
    "attnstore-state";
/// Longest session id whose checkpoint can be named (the name is built on the stack).
inline constexpr std::size_t max_checkpointed_session = 480;

struct checkpoint_name {
  char bytes[max_checkpointed_session + checkpoint_suffix.size()];
  session_key key;
};

/// The companion's key; false when the session id is too long for it.
inline bool checkpoint_key(const session_key& session, checkpoint_name& out) noexcept {
  if (session.session.size() > max_checkpointed_session) return false;
  std::memcpy(out.bytes, session.session.data(), session.session.size());
  std::memcpy(out.bytes + session.session.size(), checkpoint_suffix.data(), checkpoint_suffix.size());
  out.key = {session.tenant, std::string_view(out.bytes, session.session.size() + checkpoint_suffix.size())};
  return true;
}

}  // namespace attnstore::detail
