#!/usr/bin/env bash
# Builds the project and its tests with AddressSanitizer + UndefinedBehaviorSanitizer in
# build-asan/ (-DDQ_SANITIZE=ON, Release -O2 plus -g, benchmarks off) and runs CTest there. Any
# sanitizer report aborts the test (-fno-sanitize-recover=all), so it fails.
#   scripts/sanitize.sh                 # the whole suite
#   scripts/sanitize.sh -E 'Slow|Big'   # extra arguments go to ctest (a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
B=build-asan
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDQ_SANITIZE=ON -DDQ_BENCH=OFF \
  -DCMAKE_CXX_FLAGS="-g" >/dev/null
cmake --build "$B" -j"${DQ_JOBS:-$(nproc)}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
cd "$B"
ctest --output-on-failure -j"${DQ_JOBS:-$(nproc)}" "$@"
