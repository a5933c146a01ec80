// libFuzzer harness: the JSON-lines trace importer (bench/sim/trace.hpp, read_jsonl) on
// arbitrary bytes. It must return a workload or invalid_argument, never crash, hang or
// allocate out of proportion to its input. An accepted log must also be well formed
// (what the simulator relies on) and survive a round trip through write_jsonl.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <string_view>

#include "trace.hpp"

namespace {

// A broken invariant is a finding: abort so that libFuzzer (or the replay) reports it.
void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_trace_import: invariant broken: %s\n", what);
    std::abort();
  }
}

void check_workload(const attnstore::trace::workload& w) {
  require(!w.first.empty() && w.first.front() == 0 && w.first.back() == w.requests.size(), "first[] bounds");
  double prev_first = -1;
  for (std::uint32_t s = 0; s < w.sessions(); ++s) {
    require(w.first[s] < w.first[s + 1], "a session without turns");
    auto turns = w.session(s);
    require(turns.front().arrival >= prev_first, "sessions not ordered by their first prompt");
    prev_first = turns.front().arrival;
    for (std::uint32_t k = 0; k < turns.size(); ++k) {
      const auto& r = turns[k];
      require(r.session == s && r.turn == k, "session or turn number");
      require(std::isfinite(r.arrival) && r.arrival >= 0, "arrival finite and >= 0");
      require(std::isfinite(r.think) && r.think >= 0, "think finite and >= 0");
      require(k == 0 ? r.think == 0 : r.arrival >= turns[k - 1].arrival, "arrivals go forward within a session");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  std::string error;
  auto r = attnstore::trace::read_jsonl(in, &error);
  if (!r) {
    require(r.error() == attnstore::errc::invalid_argument, "the only error is invalid_argument");
    require(error.rfind("line ", 0) == 0, "the error names the line");
    return 0;
  }
  check_workload(*r);
  // What write_jsonl writes, read_jsonl reads back: same sessions, same turns.
  std::ostringstream out;
  attnstore::trace::write_jsonl(*r, out);
  std::istringstream back(out.str());
  auto again = attnstore::trace::read_jsonl(back, &error);
  require(again.has_value(), "write_jsonl's output is rejected by read_jsonl");
  require(again->sessions() == r->sessions() && again->requests.size() == r->requests.size(), "round trip sizes");
  for (std::size_t i = 0; i < r->requests.size(); ++i) {
    require(again->requests[i].input_tokens == r->requests[i].input_tokens &&
                again->requests[i].output_tokens == r->requests[i].output_tokens,
            "round trip token counts");
  }
  return 0;
}
