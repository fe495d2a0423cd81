#!/usr/bin/env bash
# Soak test of crash-proof resume: `quantize` (DartQuant + GPTQ on stories260K) killed with SIGKILL
# at random instants, each kill followed by a `--resume` that may be killed again, until KILLS
# kills have been made; every chain must finish with output byte-identical to an uninterrupted
# run's. The suite's tests/pipeline/test_kill_resume.cpp does the same for ~35 s.
#   scripts/kill-resume-soak.sh [KILLS (default 300)] [MAX_SECONDS (default 1800)]
# Prints one summary line; exits 1 on the first chain that fails to resume or differs.
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-300}
MAX_SECONDS=${2:-1800}
BIN=build/dartquant
DATA=../shared/data
WORK=$(mktemp -d /tmp/dq-soak-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; trap - EXIT; echo "kept $WORK"; exit 1; }
head -c 100000 $DATA/tinystories/calib.txt >"$WORK/calib.txt"  # short: a run's time goes to the job
run() {  # run OUT: the quantize command, resuming whatever OUT.partial holds
  exec "$BIN" --threads 1 quantize --model $DATA/stories260K/stories260K.bin --calib "$WORK/calib.txt" \
    --nsamples 8 --calib-seqlen 128 --epochs 2 --rotation dartquant --w-method gptq --a-bits 4 --out "$1" --resume \
    >/dev/null 2>"$1.err"
}

start=$(date +%s.%N)
(run "$WORK/whole")
whole_ms=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%d", (e - s) * 1000 }')
kills=0 chains=0 finished_before_kill=0 done_at_kill=0
SECONDS=0
while (( kills < KILLS && SECONDS < MAX_SECONDS )); do
  out="$WORK/chain$chains"; chains=$((chains + 1)); done=0
  for _ in 1 2 3 4 5 6; do
    (run "$out") & pid=$!
    sleep "$(awk -v r=$RANDOM -v t="$whole_ms" 'BEGIN { printf "%.3f", r / 32768 * t / 3000 }')"  # up to a third of a run
    kill -9 $pid 2>/dev/null || true
    rc=0; wait $pid 2>/dev/null || rc=$?
    if (( rc == 0 )); then finished_before_kill=$((finished_before_kill + 1)); done=1; break; fi
    if (( rc != 137 )); then fail "resumed run failed in chain $chains: $(cat "$out.err")"; fi
    kills=$((kills + 1))
    if [[ -d $out ]]; then done_at_kill=$((done_at_kill + 1)); done=1; break; fi
  done
  if (( ! done )); then
    (run "$out") || fail "final resume failed in chain $chains: $(cat "$out.err")"
  fi
  if ! diff -r "$WORK/whole" "$out" >/dev/null; then fail "chain $chains differs: $(diff -rq "$WORK/whole" "$out" | head -3)"; fi
  if [[ -e $out.partial/state.json ]]; then fail "chain $chains kept a checkpoint after finishing"; fi
  rm -rf "$out" "$out.partial" "$out.err"
done
echo "kill-resume soak: $kills SIGKILLs at random instants in $chains chains (one run ${whole_ms} ms; $finished_before_kill runs finished before their kill, $done_at_kill kills hit a finished run); all $chains outputs byte-identical to the uninterrupted run; ${SECONDS} s"
