#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite under CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
# Test programs run in parallel, one per core, so each computes on one thread.
cd build && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ctest --output-on-failure -j"$(nproc)"
