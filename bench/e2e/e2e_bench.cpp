// e2e_bench: the mini engine on a multi-turn workload, with and without attnstore.
// TTFT is reported as the median over turns with at least 2K history tokens; the
// reuse runs load the history from DRAM (store-dram) and, after each turn's KV was
// demoted, from SSD (store-ssd). --json prints one JSON object last (see docs).
#include <cstdio>
#include <string>

#include "driver.hpp"

int main(int argc, char** argv) {
  mini::compare_options o;
  o.workload.sessions = 4;
  o.workload.turns = 9;  // histories pass 2K tokens from about turn 6
  o.verbose = false;
  int code = 0;
  bool json = false;
  for (int i = 1; i < argc; ++i) json |= std::string(argv[i]) == "--json";
  if (!mini::parse_compare_args(argc, argv, o, code)) return code;
  try {
    auto r = mini::run_compare(o);
    mini::print_compare(r, o);
    if (json) mini::print_compare_json(r);
    return r.outputs_identical ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "e2e_bench: %s\n", e.what());
    return 1;
  }
}
