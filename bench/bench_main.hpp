// The main of the benchmarks that run on more than one copy backend: a --backend flag,
// taken out of argv before Google Benchmark reads the rest (it refuses flags it does
// not know), chooses which set of cases is registered.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

/// Removes `--backend NAME` or `--backend=NAME` from argv and returns NAME ("host" when
/// absent).
inline std::string take_backend_flag(int& argc, char** argv) {
  std::string backend = "host";
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--backend" && i + 1 < argc) {
      backend = argv[++i];
    } else if (a.rfind("--backend=", 0) == 0) {
      backend = a.substr(10);
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  return backend;
}

/// Registers the host cases (--backend host, the default) or the CUDA ones
/// (`register_cuda`, nullptr in a build without CUDA; it says why it cannot) and runs
/// them. Returns the exit code: 77 when the CUDA cases cannot run (no GPU), as the
/// GPU tests do.
inline int run_benchmarks(int argc, char** argv, const char* program, void (*register_host)(),
                          bool (*register_cuda)(std::string* why)) {
  const std::string backend = take_backend_flag(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (backend == "host") {
    register_host();
  } else if (backend == "cuda") {
    std::string why = "attnstore was built without CUDA";
    if (!register_cuda || !register_cuda(&why)) {
      std::fprintf(stderr, "%s: no CUDA benchmarks: %s\n", program, why.c_str());
      return 77;
    }
  } else {
    std::fprintf(stderr, "%s: --backend is '%s', allowed host, cuda\n", program, backend.c_str());
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
