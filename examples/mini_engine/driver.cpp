#include "driver.hpp"

#include <algorithm>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>

namespace mini {
namespace {
std::vector<std::uint32_t> synth_tokens(std::mt19937_64& rng, std::size_t n, int vocab) {
  std::vector<std::uint32_t> t(n);
  for (auto& x : t) x = std::uint32_t(rng() % std::uint64_t(vocab));
  return t;
}

// The value after "key": in a flat JSON object line (numbers or strings).
bool json_field(const std::string& line, const std::string& key, std::string& out) {
  auto k = line.find("\"" + key + "\"");
  if (k == std::string::npos) return false;
  auto c = line.find(':', k);
  if (c == std::string::npos) return false;
  auto v = line.find_first_not_of(" \t", c + 1);
  if (v == std::string::npos) return false;
  if (line[v] == '"') {
    auto e = line.find('"', v + 1);
    if (e == std::string::npos) return false;
    out = line.substr(v + 1, e - v - 1);
  } else {
    auto e = line.find_first_of(",}", v);
    out = line.substr(v, e - v);
    while (!out.empty() && (out.back() == ' ' || out.back() == '\t')) out.pop_back();
  }
  return true;
}
}  // namespace

std::vector<request> make_workload(const workload_options& o, int vocab) {
  if (o.sessions < 1 || o.turns < 1) throw std::invalid_argument("workload: sessions and turns must be >= 1");
  if (o.user_min > o.user_max || o.reply_min > o.reply_max || o.reply_min == 0)
    throw std::invalid_argument("workload: need user_min <= user_max and 1 <= reply_min <= reply_max");
  std::mt19937_64 rng(o.seed);
  std::vector<request> out;
  for (int t = 0; t < o.turns; ++t)
    for (int s = 0; s < o.sessions; ++s) {
      request r;
      r.session = "session-" + std::to_string(s);
      std::size_t n = t == 0 ? o.first_user_tokens : o.user_min + rng() % (o.user_max - o.user_min + 1);
      r.user_tokens = synth_tokens(rng, n, vocab);
      r.reply_tokens = o.reply_min + rng() % (o.reply_max - o.reply_min + 1);
      out.push_back(std::move(r));
    }
  return out;
}

std::vector<request> load_jsonl(const std::string& path, int vocab) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("trace: cannot open " + path);
  std::vector<request> out;
  std::mt19937_64 rng(42);
  std::string line;
  for (int no = 1; std::getline(in, line); ++no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::string session, input, output;
    if (!json_field(line, "session", session) || !json_field(line, "input_tokens", input) ||
        !json_field(line, "output_tokens", output))
      throw std::runtime_error(path + ":" + std::to_string(no) +
                               ": need \"session\", \"input_tokens\", \"output_tokens\"");
    request r;
    r.session = session;
    long in_n = std::stol(input), out_n = std::stol(output);
    if (in_n < 1 || out_n < 1)
      throw std::runtime_error(path + ":" + std::to_string(no) + ": token counts must be >= 1");
    r.user_tokens = synth_tokens(rng, std::size_t(in_n), vocab);
    r.reply_tokens = std::size_t(out_n);
    out.push_back(std::move(r));
  }
  return out;
}

run_summary summarize(const std::string& mode, std::vector<turn_result> turns, double wall_s,
                      std::size_t long_history) {
  run_summary s;
  s.mode = mode;
  s.wall_s = wall_s;
  std::vector<double> long_ttft;
  for (const auto& t : turns) {
    s.prefill_tokens += t.prefill_tokens;
    s.reused_tokens += t.reused_tokens;
    s.prompt_tokens += t.prompt_tokens;
    s.reused_dram_blocks += t.dram_blocks;
    s.reused_ssd_blocks += t.ssd_blocks;
    s.prefill_s += t.ttft_ms / 1000;
    if (t.history_tokens >= long_history) long_ttft.push_back(t.ttft_ms);
  }
  s.long_turns = long_ttft.size();
  if (!long_ttft.empty()) {
    std::sort(long_ttft.begin(), long_ttft.end());
    const std::size_t n = long_ttft.size();
    s.ttft_median_long_ms = n % 2 ? long_ttft[n / 2] : (long_ttft[n / 2 - 1] + long_ttft[n / 2]) / 2;
  }
  s.prompt_tokens_per_s = s.prefill_s > 0 ? double(s.prompt_tokens) / s.prefill_s : 0;
  s.turns = std::move(turns);
  return s;
}

}  // namespace mini
