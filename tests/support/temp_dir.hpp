// A fresh directory for one test, removed afterwards.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

namespace attnstore::testing {

class temp_dir {
 public:
  /// Under `root` when given, else $ATTNSTORE_TEST_TMP, else the system's temporary directory.
  explicit temp_dir(const std::string& tag = "t", const std::string& root_dir = "") {
    const char* base = std::getenv("ATTNSTORE_TEST_TMP");
    std::filesystem::path root = !root_dir.empty() ? std::filesystem::path(root_dir)
                                 : base && *base   ? std::filesystem::path(base)
                                                   : std::filesystem::temp_directory_path();
    std::filesystem::create_directories(root);
    std::random_device rd;
    path_ = root / (tag + "-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~temp_dir() {
    if (const char* keep = std::getenv("ATTNSTORE_TEST_KEEP"); keep && *keep == '1') return;  // for a post-mortem
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::string str() const { return path_.string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace attnstore::testing
