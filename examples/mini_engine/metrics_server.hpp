// A loopback HTTP endpoint for the demo's store metrics (GET /metrics, Prometheus text).
// The library has no HTTP inside: an engine serves store::metrics() from its own
// endpoint; this is the smallest one that does.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace mini {

class metrics_server {
 public:
  /// Listens on 127.0.0.1:port (0: any free port; port() says which). Throws
  /// std::runtime_error when it cannot.
  metrics_server(std::uint16_t port, std::function<std::string()> body);
  ~metrics_server();
  metrics_server(const metrics_server&) = delete;
  metrics_server& operator=(const metrics_server&) = delete;
  /// Scrapes answered so far.
  std::uint64_t served() const noexcept { return served_.load(); }
  std::uint16_t port() const noexcept { return port_; }

 private:
  void loop();
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::function<std::string()> body_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> served_{0};
  std::thread thread_;
};

}  // namespace mini
