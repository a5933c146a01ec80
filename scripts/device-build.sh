#!/bin/bash
# Builds, here, what scripts/device-check.sh runs on a lent GPU machine (H100/H200,
# sm_90): the GPU tests and the benchmarks' CUDA modes, Release, in build-device.
# The device image has the CUDA driver, glibc, libstdc++ and libgcc, but not liburing,
# libxxhash or Google Benchmark: every other shared library the binaries need is copied
# to build-device/lib (libstdc++ and libgcc_s also to build-device/lib/fallback, used
# there only if the image's are too old). Binaries are stripped into build-device/bin.
# Carry build-device/bin and build-device/lib (not the whole build-device: objects).
#
# Usage: scripts/device-build.sh            (JOBS=N for ninja -jN, default 2)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/build-device
jobs=${JOBS:-2}
tests=(test_cuda_probe test_cuda_rope test_cuda_pipeline)
benches=(pipeline_bench rope_bench)

mkdir -p "$build"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNSTORE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 >"$build/configure.log" 2>&1 || {
  cat "$build/configure.log" >&2
  exit 1
}
ninja -C "$build" -j"$jobs" "${tests[@]}" "${benches[@]}"

rm -rf "$build/bin" "$build/lib"
mkdir -p "$build/bin" "$build/lib/fallback"
for t in "${tests[@]}"; do strip -o "$build/bin/$t" "$build/tests/$t"; done
for b in "${benches[@]}"; do strip -o "$build/bin/$b" "$build/bench/$b"; done

# Libraries the image has: the C runtime, the C++ runtime, the loader, the driver.
base='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libcuda)\.so'
for f in "$build"/bin/*; do
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  case "$name" in
    libstdc++.so.* | libgcc_s.so.*) cp -L "$path" "$build/lib/fallback/$name" ;;
    *) [[ "$name" =~ $base ]] || cp -L "$path" "$build/lib/$name" ;;
  esac
done
strip --strip-unneeded "$build"/lib/*.so* "$build"/lib/fallback/*.so* 2>/dev/null || true

# What the binaries ask of the image's C and C++ runtimes (the image is newer than this
# machine's Debian 12: glibc 2.36, GLIBCXX 3.4.30).
need() { objdump -T "$build"/bin/* "$build"/lib/*.so* 2>/dev/null | grep -o "$1[0-9.]*" | sort -uV | tail -1; }
echo "device-build: binaries: ${tests[*]} ${benches[*]}"
echo "device-build: carried libraries: $(cd "$build/lib" && find . -type f | sort | tr '\n' ' ')"
echo "device-build: newest symbol versions needed: $(need GLIBC_2) $(need GLIBCXX_3) $(need CXXABI_1)"
echo "device-build: size to carry: $(du -sh "$build/bin" "$build/lib" | awk '{print $2 ": " $1}' | tr '\n' ' ')"
total=$(du -sk "$build/bin" "$build/lib" | awk '{s += $1} END {print s}')
if ((total > 60 * 1024)); then
  echo "device-build: ${total} KiB is over the 60 MiB budget for the carried folders" >&2
  exit 1
fi
# They must start here too (each skips without a GPU: exit 77).
for t in "${tests[@]}"; do
  set +e
  LD_LIBRARY_PATH=$build/lib "$build/bin/$t" >/dev/null 2>&1
  rc=$?
  set -e
  [ "$rc" = 77 ] || [ "$rc" = 0 ] || {
    echo "device-build: $t exited $rc here (expected 77: no GPU)" >&2
    exit 1
  }
done
for b in "${benches[@]}"; do
  LD_LIBRARY_PATH=$build/lib "$build/bin/$b" --benchmark_list_tests >/dev/null ||
    {
      echo "device-build: $b does not start" >&2
      exit 1
    }
done
echo "device-build: ok; on the device: bash scripts/device-check.sh (carry build-device/bin, build-device/lib)"
