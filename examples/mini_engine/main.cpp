// mini_engine: a small Llama on the CPU serving multi-turn conversations, run with
// attnstore (history loaded layer by layer from DRAM or SSD) and without (every turn
// prefills the whole conversation), side by side.
#include <cstdio>
#include <string>

#include "driver.hpp"

int main(int argc, char** argv) {
  mini::compare_options o;
  int code = 0;
  bool json = false;
  for (int i = 1; i < argc; ++i) json |= std::string(argv[i]) == "--json";
  if (!mini::parse_compare_args(argc, argv, o, code)) return code;
  try {
    if (!json) std::printf("mini_engine: %d sessions x %d turns; modes:", o.workload.sessions, o.workload.turns);
    if (!json)
      for (auto& m : o.modes) std::printf(" %s", m.c_str());
    if (!json && o.attention != "full") std::printf("; attention: %s", o.attention.c_str());
    auto r = mini::run_compare(o);
    if (json)
      mini::print_compare_json(r);
    else
      mini::print_compare(r, o);
    return r.outputs_identical || o.context_limit ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mini_engine: %s\n", e.what());
    return 1;
  }
}
