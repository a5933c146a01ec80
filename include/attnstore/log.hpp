// Logging hook: a function pointer and a context, so the library never owns an I/O sink.
#pragma once

#include <cstdio>
#include <string_view>

namespace attnstore {

enum class log_level : unsigned char { debug, info, warning, error };

/// Where the library's messages go. The default writes warnings and errors to stderr.
struct logger {
  void (*fn)(void* context, log_level level, std::string_view message) = &logger::to_stderr;
  void* context = nullptr;

  void operator()(log_level level, std::string_view message) const noexcept {
    if (fn) fn(context, level, message);
  }
  static void to_stderr(void*, log_level level, std::string_view message) noexcept {
    if (level < log_level::warning) return;
    std::fprintf(stderr, "attnstore: %.*s\n", int(message.size()), message.data());
  }
  static void quiet(void*, log_level, std::string_view) noexcept {}
};

}  // namespace attnstore
