#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan + UBSan) in build-fuzz/ and runs each for a bounded
# time on its seed corpus. Exits non-zero if any harness finds a crash, a leak, a timeout or an
# out-of-memory input (saved as build-fuzz/artifacts/<fuzzer>-*).
#   scripts/fuzz.sh [SECONDS_PER_FUZZER (default 30)] [FUZZER ...]   e.g. scripts/fuzz.sh 600 gguf
# Reproduce a finding: build-fuzz/fuzz/fuzz_<name> build-fuzz/artifacts/<name>-crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
all=(safetensors config llama2c llama2c_vocab hf_tokenizer gguf jsonl runtime)
fuzzers=("$@")
[ ${#fuzzers[@]} -eq 0 ] && fuzzers=("${all[@]}")

scripts/install-deps.sh
CXX="${DQ_FUZZ_CXX:-clang++}"
command -v "$CXX" >/dev/null || CXX=clang++-14
B=build-fuzz
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_CXX_FLAGS="-g -fsanitize=fuzzer-no-link" -DDQ_SANITIZE=ON -DDQ_FUZZ=ON -DDQ_BENCH=OFF >/dev/null
cmake --build "$B" -j"${DQ_JOBS:-$(nproc)}" --target fuzzers

# Seeds are regenerated each run (small files; nothing binary is committed). The working corpus
# (build-fuzz/corpus/<name>) keeps what earlier runs found.
rm -rf "$B/seeds"
ASAN_OPTIONS=detect_leaks=0 "$B/fuzz/dq_seed_corpus" ../shared/data . "$B/seeds"
mkdir -p "$B/artifacts"

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
failed=()
for f in "${fuzzers[@]}"; do
  exe="$B/fuzz/fuzz_$f"
  [ -x "$exe" ] || { echo "fuzz.sh: no fuzzer '$f' (have: ${all[*]})" >&2; exit 2; }
  mkdir -p "$B/corpus/$f" "$B/seeds/$f"
  log="$B/artifacts/$f.log"
  dict=()
  case "$f" in safetensors|config|hf_tokenizer|jsonl|runtime) dict=(-dict=fuzz/json.dict) ;; esac
  # -timeout: one input taking longer is a finding (hang); -rss_limit_mb: memory a hostile file
  # makes us take is a finding too (limits must be checked before allocating).
  if "$exe" "${dict[@]}" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$B/artifacts/$f-" "$B/corpus/$f" "$B/seeds/$f" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "fuzz_$f: ok, $runs executions in ${secs}s"
  else
    echo "fuzz_$f: FAILED (log: $log)" >&2
    grep -m1 -A25 -E 'ERROR: |runtime error|dq-fuzz invariant|uncaught|deadly signal' "$log" >&2 || tail -40 "$log" >&2
    failed+=("$f")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: findings in: ${failed[*]}" >&2
  exit 1
fi
