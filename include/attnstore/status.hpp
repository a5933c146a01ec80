// Error codes and result<T>: errors are values on every per-request path.
#pragma once

#include <cstdint>
#include <new>
#include <string_view>
#include <type_traits>
#include <utility>

namespace attnstore {

/// Outcome of a call. Every per-request function documents which of these it returns.
enum class errc : std::uint8_t {
  ok = 0,
  not_found,         ///< no such session / block, or nothing reusable
  rejected,          ///< the request conflicts with a policy (pinned, tenant, model)
  retry,             ///< transient: try again later (e.g. everything evictable is busy)
  in_progress,       ///< the operation is still running
  no_space,          ///< a tier (or the file system) has no room for the request
  device_error,      ///< I/O error from the block device or copy engine
  checksum_error,    ///< stored data failed verification; it was not served
  unsupported,       ///< the backend cannot do this (e.g. O_DIRECT on this file system)
  bad_state,         ///< the object is closed or in a state that forbids the call
  invalid_argument,  ///< the caller passed something out of range; see the log line
};

/// Stable lower-case name of a code, for logs and stats.
constexpr std::string_view to_string(errc e) noexcept {
  switch (e) {
    case errc::ok:
      return "ok";
    case errc::not_found:
      return "not_found";
    case errc::rejected:
      return "rejected";
    case errc::retry:
      return "retry";
    case errc::in_progress:
      return "in_progress";
    case errc::no_space:
      return "no_space";
    case errc::device_error:
      return "device_error";
    case errc::checksum_error:
      return "checksum_error";
    case errc::unsupported:
      return "unsupported";
    case errc::bad_state:
      return "bad_state";
    case errc::invalid_argument:
      return "invalid_argument";
  }
  return "unknown";
}

/// Maps a positive errno value to errc. The one place errno becomes errc.
constexpr errc errc_from_errno(int err) noexcept {
  switch (err) {
    case 0:
      return errc::ok;
    case 28 /*ENOSPC*/:
    case 122 /*EDQUOT*/:
    case 27 /*EFBIG*/:
      return errc::no_space;
    case 11 /*EAGAIN*/:
    case 4 /*EINTR*/:
    case 16 /*EBUSY*/:
      return errc::retry;
    case 22 /*EINVAL*/:
    case 95 /*EOPNOTSUPP*/:
    case 38 /*ENOSYS*/:
      return errc::unsupported;
    case 9 /*EBADF*/:
      return errc::bad_state;
    default:
      return errc::device_error;
  }
}

/// A value or an error code. Success never touches the heap beyond what T does.
template <class T>
class [[nodiscard]] result {
 public:
  result(T value) : has_value_(true) { new (&storage_) T(std::move(value)); }  // NOLINT
  result(errc error) : error_(error) {}                                        // NOLINT
  result(const result& o) : error_(o.error_), has_value_(o.has_value_) {
    if (has_value_) new (&storage_) T(*o);
  }
  result(result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) : error_(o.error_), has_value_(o.has_value_) {
    if (has_value_) new (&storage_) T(std::move(*o));
  }
  result& operator=(result o) noexcept(std::is_nothrow_move_constructible_v<T>) {
    reset();
    error_ = o.error_;
    has_value_ = o.has_value_;
    if (has_value_) new (&storage_) T(std::move(*o));
    return *this;
  }
  ~result() { reset(); }

  bool has_value() const noexcept { return has_value_; }
  explicit operator bool() const noexcept { return has_value_; }
  /// errc::ok when a value is held.
  errc error() const noexcept { return has_value_ ? errc::ok : error_; }

  T& operator*() & noexcept { return *std::launder(reinterpret_cast<T*>(&storage_)); }
  const T& operator*() const& noexcept { return *std::launder(reinterpret_cast<const T*>(&storage_)); }
  T* operator->() noexcept { return &**this; }
  const T* operator->() const noexcept { return &**this; }

 private:
  void reset() noexcept {
    if (has_value_) (**this).~T();
    has_value_ = false;
  }
  alignas(T) unsigned char storage_[sizeof(T)];
  errc error_ = errc::ok;
  bool has_value_ = false;
};

}  // namespace attnstore
