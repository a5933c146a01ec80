// Trace generator presets against the ShareGPT statistics in PAPER.md, determinism,
// and the JSON-lines importer.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine_sim.hpp"
#include "trace.hpp"

using namespace attnstore;

TEST_CASE("trace: the paper preset matches the ShareGPT statistics") {
  trace::generator_options o = trace::preset("paper");
  o.requests = 200000;
  const trace::workload w = trace::generate(o);
  const trace::workload_stats st = trace::describe(w);
  CHECK(st.requests == 200000);
  CHECK(st.mean_turns == Approx(5.75).margin(0.15));                     // mean 5.75 turns
  CHECK(st.multi_turn_fraction == Approx(0.73).margin(0.02));            // 73% multi-turn
  CHECK(st.sessions_over_4k == Approx(0.30).margin(0.06));               // ~30% beyond 4K tokens
  CHECK(st.sessions_over_2k > 0.45);                                     // about half beyond 2K
  CHECK(double(st.sessions) / st.duration == Approx(1.0).margin(0.03));  // 1 session/s
  for (const auto& r : w.requests) {
    REQUIRE(r.input_tokens >= 1);
    REQUIRE(r.output_tokens >= 1);
    REQUIRE(r.think >= 0);
  }
}

TEST_CASE("trace: presets, determinism, options") {
  for (auto name : trace::preset_names()) {
    trace::generator_options o = trace::preset(name);
    o.sessions = 500;
    const auto a = trace::generate(o);
    const auto b = trace::generate(o);
    REQUIRE(a.requests.size() == b.requests.size());
    for (std::size_t i = 0; i < a.requests.size(); ++i) {
      REQUIRE(a.requests[i].input_tokens == b.requests[i].input_tokens);
      REQUIRE(a.requests[i].arrival == b.requests[i].arrival);
    }
    CHECK(a.sessions() == 500);
    // Sessions are contiguous, turns in order, sessions by first arrival.
    for (std::uint32_t s = 0; s < a.sessions(); ++s) {
      auto turns = a.session(s);
      REQUIRE(!turns.empty());
      for (std::uint32_t k = 0; k < turns.size(); ++k) {
        REQUIRE(turns[k].session == s);
        REQUIRE(turns[k].turn == k);
      }
      if (s) REQUIRE(a.session(s - 1).front().arrival <= turns.front().arrival);
    }
  }
  trace::generator_options o = trace::preset("paper");
  o.sessions = 100;
  o.seed = 2;
  const auto c = trace::generate(o);
  o.seed = 1;
  const auto d = trace::generate(o);
  CHECK(c.requests.size() != d.requests.size());
  CHECK_THROWS_AS(trace::preset("nope"), std::invalid_argument);
  trace::generator_options bad = trace::preset("paper");
  CHECK_THROWS_AS(trace::generate(bad), std::invalid_argument);  // no length
  bad.sessions = 10;
  bad.session_rate = 0;
  CHECK_THROWS_AS(trace::generate(bad), std::invalid_argument);
  bad = trace::preset("paper");
  bad.sessions = 10;
  bad.mean_turns = 1.1;
  CHECK_THROWS_AS(trace::generate(bad), std::invalid_argument);
}

TEST_CASE("trace: JSON lines import, ordering and errors") {
  std::istringstream in(
      "# a comment\n"
      "{\"session\": \"b\", \"turn\": 1, \"input_tokens\": 20, \"output_tokens\": 30, \"timestamp\": 110.5}\n"
      "{\"session\": \"a\", \"turn\": 0, \"input_tokens\": 5, \"output_tokens\": 6, \"timestamp\": 50, \"extra\": [1, "
      "{\"x\": null}]}\n"
      "\n"
      "{\"timestamp\": 100, \"output_tokens\": 40, \"input_tokens\": 10, \"session\": \"b\", \"turn\": 0}\n"
      "{\"session\": 7, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 60}\n"
      "{\"session\": 7, \"input_tokens\": 3, \"output_tokens\": 4, \"timestamp\": 65}\n");
  std::string err;
  auto r = trace::read_jsonl(in, &err);
  REQUIRE(r.has_value());
  const trace::workload& w = *r;
  CHECK(w.open_loop);
  REQUIRE(w.sessions() == 3);
  // Sessions ordered by first prompt: a (50), 7 (60), b (100); times from the first.
  CHECK(w.session(0).size() == 1);
  CHECK(w.session(0)[0].input_tokens == 5);
  CHECK(w.session(0)[0].arrival == 0);
  REQUIRE(w.session(1).size() == 2);
  CHECK(w.session(1)[1].input_tokens == 3);  // no turn numbers: by timestamp
  CHECK(w.session(1)[1].think == Approx(5));
  REQUIRE(w.session(2).size() == 2);
  CHECK(w.session(2)[0].input_tokens == 10);  // turn 0 first although logged second
  CHECK(w.session(2)[1].output_tokens == 30);
  CHECK(w.session(2)[1].arrival == Approx(60.5));
  CHECK(w.session(2)[1].think == Approx(10.5));

  // Round trip through write_jsonl.
  std::ostringstream out;
  trace::write_jsonl(w, out);
  std::istringstream back(out.str());
  auto r2 = trace::read_jsonl(back, &err);
  REQUIRE(r2.has_value());
  REQUIRE(r2->requests.size() == w.requests.size());
  for (std::size_t i = 0; i < w.requests.size(); ++i) {
    CHECK(r2->requests[i].input_tokens == w.requests[i].input_tokens);
    CHECK(r2->requests[i].arrival == Approx(w.requests[i].arrival));
  }

  auto fails = [](const char* text, const char* what) {
    std::istringstream in(text);
    std::string e;
    auto r = trace::read_jsonl(in, &e);
    INFO(e);
    CHECK_FALSE(r.has_value());
    CHECK(r.error() == errc::invalid_argument);
    CHECK(e.find(what) != std::string::npos);
  };
  fails("{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2}\n", "line 1: missing \"timestamp\"");
  fails("\n{\"session\": 1, \"input_tokens\": -1, \"output_tokens\": 2, \"timestamp\": 0}\n", "line 2");
  fails("{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 0} x\n", "text after");
  fails("[1, 2]\n", "expected a JSON object");
  fails("{\"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 0}\n", "missing \"session\"");
  fails(
      "{\"session\": 1, \"turn\": 0, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 5}\n"
      "{\"session\": 1, \"turn\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 4}\n",
      "back in time");
  // Values that would be undefined to convert, or would not survive a round trip, are
  // refused (found by tests/fuzz/fuzz_trace_import.cpp).
  fails("{\"session\": 1e308, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 0}\n", "within +-2^53");
  fails("{\"session\": 1, \"input_tokens\": 1.5, \"output_tokens\": 2, \"timestamp\": 0}\n", "integer 0..4e9");
  fails("{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 1e300}\n", "within +-1e15");
  fails("{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 1e999}\n", "\"timestamp\"");
  // An ignored value nested past 64 levels is refused, not recursed into without bound.
  const std::string deep = "{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 0, \"x\": " +
                           std::string(100000, '[') + std::string(100000, ']') + "}\n";
  fails(deep.c_str(), "nested deeper than 64");
  const std::string nested =
      "{\"session\": 1, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 0, \"x\": " + std::string(64, '[') +
      std::string(64, ']') + "}\n";
  std::istringstream ok(nested);
  CHECK(trace::read_jsonl(ok).has_value());
}

TEST_CASE("trace: a session whose lines do not all have turn numbers is ordered by timestamp") {
  // Turn 0 at 10 s, no turn at 5 s, turn 1 at 1 s: ordering by turn where both lines
  // have one and by time otherwise would be a cycle. All by time: 1 s, 5 s, 10 s.
  std::istringstream in(
      "{\"session\": 1, \"turn\": 0, \"input_tokens\": 1, \"output_tokens\": 2, \"timestamp\": 10}\n"
      "{\"session\": 1, \"input_tokens\": 3, \"output_tokens\": 4, \"timestamp\": 5}\n"
      "{\"session\": 1, \"turn\": 1, \"input_tokens\": 5, \"output_tokens\": 6, \"timestamp\": 1}\n");
  std::string err;
  auto r = trace::read_jsonl(in, &err);
  INFO(err);
  REQUIRE(r.has_value());
  REQUIRE(r->requests.size() == 3);
  CHECK(r->requests[0].input_tokens == 5);
  CHECK(r->requests[1].input_tokens == 3);
  CHECK(r->requests[2].input_tokens == 1);
  CHECK(r->requests[2].think == Approx(5));
}

TEST_CASE("trace: the think preset: reading + typing, a heavy tail, users who leave") {
  trace::generator_options o = trace::preset("think");
  o.requests = 100000;
  const trace::workload w = trace::generate(o);
  const trace::workload_stats st = trace::describe(w);
  std::vector<double> think;
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  for (std::uint32_t s = 0; s < w.sessions(); ++s) {
    auto turns = w.session(s);
    for (std::size_t k = 1; k < turns.size(); ++k) {
      const double x = turns[k - 1].output_tokens, y = turns[k].think;
      think.push_back(y);
      sx += x, sy += y, sxx += x * x, syy += y * y, sxy += x * y;
    }
  }
  REQUIRE(think.size() > 50000);
  std::sort(think.begin(), think.end());
  const double n = double(think.size());
  const double median = think[think.size() / 2], p95 = think[think.size() * 95 / 100];
  CHECK(median > 20);  // tens of seconds
  CHECK(median < 60);
  CHECK(p95 > 120);  // a tail to minutes
  CHECK(st.mean_think > median * 1.2);
  // Reading time: the longer the reply, the longer the next think.
  const double corr =
      (sxy / n - sx / n * sy / n) / std::sqrt((sxx / n - sx * sx / n / n) * (syy / n - sy * sy / n / n));
  CHECK(corr > 0.2);
  // Users leave when a turn would take longer than their patience: fewer turns than the
  // paper's conversations (5.75); no think time beyond the generator's clip (typing up to
  // an hour, reading up to 1 s per reply token, 1,500 tokens at most).
  CHECK(st.mean_turns < 5.6);
  CHECK(st.mean_turns > 4.5);
  CHECK(think.back() <= 3600 + 1.0 * 1500);
  CHECK(double(st.sessions) / st.duration == Approx(0.6).margin(0.03));
  // What a front end would see: the typing part of each think time, and when each user
  // left (after the last reply, or out of patience before a turn that never came).
  std::uint64_t typed = 0, left = 0, complete = 0;
  for (std::uint32_t s = 0; s < w.sessions(); ++s) {
    auto turns = w.session(s);
    for (std::size_t k = 0; k < turns.size(); ++k) {
      const trace::request& r = turns[k];
      if (k > 0) {
        REQUIRE(r.typing > 0);
        REQUIRE(r.typing <= r.think + 1e-9);
        ++typed;
      } else {
        REQUIRE(r.typing == 0);
      }
      const bool last = k + 1 == turns.size();
      if (!last) REQUIRE(r.leave == 0);
      if (last && s + 1 < w.sessions()) {  // the trace's last session may be cut by the request count
        REQUIRE(r.leave > 0);
        ++complete;
        left += r.leave > 30;  // out of patience (at least 30 s) or a long read
      }
    }
  }
  CHECK(typed == think.size());
  CHECK(complete == w.sessions() - 1);
  CHECK(left > 0);
  // The paper's think time is one draw: what part is typing, and when users leave, is
  // not known, so it gives no hints.
  trace::generator_options p = trace::preset("paper");
  p.requests = 2000;
  for (const trace::request& r : trace::generate(p).requests) {
    CHECK(r.typing == 0);
    CHECK(r.leave == 0);
  }
}

TEST_CASE("trace: the diurnal preset: arrivals follow the day") {
  trace::generator_options o = trace::preset("diurnal");
  o.sessions = 60000;  // a little more than a day
  const trace::workload w = trace::generate(o);
  std::vector<double> per_hour(24, 0);
  for (std::uint32_t s = 0; s < w.sessions(); ++s) {
    const double t = w.session(s).front().arrival;
    if (t < 86400) per_hour[std::size_t(t / 3600)] += 1;
  }
  // Lowest at midnight (0.25x the mean rate), highest at noon (1.75x).
  const double night = per_hour[23] + per_hour[0], noon = per_hour[11] + per_hour[12];
  INFO("sessions 23:00-01:00 " << night << ", 11:00-13:00 " << noon);
  CHECK(noon > 4 * night);
  CHECK(noon / 7200 == Approx(0.6 * 1.75).epsilon(0.1));
  // The same conversations as think.
  trace::generator_options t = trace::preset("think");
  CHECK(t.think.median == o.think.median);
  CHECK(t.patience.median == o.patience.median);
  CHECK_THROWS_AS(
      [&] {
        o.diurnal_amplitude = 1;
        (void)trace::generate(o);
      }(),
      std::invalid_argument);
}

TEST_CASE("trace: a small real-shaped JSON-lines log imports and replays") {
  std::string path = __FILE__;
  path = path.substr(0, path.find_last_of('/')) + "/data/chat_log.jsonl";
  std::ifstream in(path);
  REQUIRE(in);
  std::string err;
  auto r = trace::read_jsonl(in, &err);
  INFO(err);
  REQUIRE(r.has_value());
  const trace::workload& w = *r;
  REQUIRE(w.sessions() == 4);
  CHECK(w.requests.size() == 10);
  // By first prompt: the uuid conversation (t = 0), the document (3.3 s), 9001 (9.9 s),
  // e2b7 (20.6 s).
  CHECK(w.session(0).size() == 4);
  CHECK(w.session(1).size() == 2);
  CHECK(w.session(1)[0].input_tokens == 1530);
  REQUIRE(w.session(2).size() == 3);
  CHECK(w.session(2)[2].think == Approx(304.5));  // by timestamp: no turn numbers
  CHECK(w.session(3).size() == 1);
  CHECK(w.session(0)[3].arrival == Approx(180.315).margin(1e-3));
  // Every policy replays it (open loop) with the cache's invariants checked.
  sim::sim_config c;
  c.check = true;
  c.tiers.queue_window = 32;
  for (int k = 0; k < 5; ++k) {
    sim::engine_sim e(w, sim::policy_kind(k), c);
    const sim::sim_result x = e.run();
    INFO(sim::to_string(sim::policy_kind(k)) << ": " << x.invariant_error);
    CHECK(x.invariants_ok);
    CHECK(x.requests == 10);
  }
}
