#!/usr/bin/env bash
# The integer runtime's speed and memory table (bench/README.md, issue 18): synthetic checkpoints with
# the exact shapes of SmolLM2-135M and Llama-3.2-1B (full depth, bf16, random weights), quantized
# with RTN and --rotation quarot (the rotation does not change the speed), then `dartquant bench`
# for f32, fake-quant W4A4KV4 and integer W4A4KV4 / W4A8 / W8A8 at each thread count, all in one run;
# prints one markdown table per model.
#
# Usage: scripts/bench-runtime.sh [prepare|bench|table|all]    (default all; table: only print the results there are)
# Environment (defaults in brackets):
#   BUILD [build]   MODELS ["smollm2-135m-instruct llama-3.2-1b"]   WORK [/tmp/dq-bench-runtime]
#   P [512] N [128] R [3]   prompt tokens, generated tokens, repetitions
#   THREADS ["1 2"]   DQ_DATA_DIR [../shared/data]   SEED [0]
#   INT_PATHS [""]   integer kernel paths to run as well, forced (bench --int-path), e.g. "avx2" for the
#                    AVX2 + FMA baseline (Zen 3 build machines) on an AVX-512 machine: rows int-avx2-w4a8, ...
#   P_<model> / N_<model> / R_<model> (dashes and dots as _): per-model overrides, e.g.
#   P_llama_3_2_1b=128 N_llama_3_2_1b=16 R_llama_3_2_1b=1 for the 1B shape on a slow machine.
# Checkpoints and quantized directories are kept in $WORK between runs; results go to $WORK/results.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
BUILD=${BUILD:-build}
D=${DQ_DATA_DIR:-../shared/data}
WORK=${WORK:-/tmp/dq-bench-runtime}
MODELS=${MODELS:-"smollm2-135m-instruct llama-3.2-1b"}
THREADS=${THREADS:-"1 2"} SEED=${SEED:-0}
DQ="$BUILD/dartquant"
[ -x "$DQ" ] || { echo "missing $DQ: cmake --build $BUILD -j2 --target dartquant" >&2; exit 1; }
mkdir -p "$WORK/results"

# name -> quantize options (all RTN, QuaRot rotations with online R3/R4).
declare -A QUANT=(
  [w4a4kv4]="--w-bits 4 --a-bits 4 --kv-bits 4"
  [w4a8]="--w-bits 4 --a-bits 8"
  [w8a8]="--w-bits 8 --a-bits 8"
)

prepare() {
  local model=$1 ckpt="$WORK/$1/bf16"
  mkdir -p "$WORK/$model"
  if [ ! -f "$ckpt/model.safetensors" ]; then
    echo "synth $model -> $ckpt" >&2
    "$DQ" synth --config "$D/hf/$model/config.json" --out "$ckpt" --seed "$SEED" --dtype bf16 >&2
  fi
  for q in "${!QUANT[@]}"; do
    [ -f "$WORK/$model/$q/quantized.safetensors" ] && continue
    echo "quantize $model $q" >&2
    # shellcheck disable=SC2086
    "$DQ" quantize --model "$ckpt" --out "$WORK/$model/$q" --rotation quarot --w-method rtn ${QUANT[$q]} \
      --seed "$SEED" >&2
  done
}

bench() {
  local model=$1 key=${1//[-.]/_}
  local pv="P_$key" nv="N_$key" rv="R_$key"
  local p=${!pv:-${P:-512}} n=${!nv:-${N:-128}} r=${!rv:-${R:-3}}
  echo "bench $model: -p $p -n $n -r $r, threads $THREADS, $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  for t in $THREADS; do
    local runs=("f32 bf16" "fake-w4a4kv4 w4a4kv4 --fake-quant" "int-w4a4kv4 w4a4kv4" "int-w4a8 w4a8" "int-w8a8 w8a8")
    for ip in ${INT_PATHS:-}; do
      for q in w4a4kv4 w4a8 w8a8; do runs+=("int-$ip-$q $q --int-path $ip"); done
    done
    for run in "${runs[@]}"; do
      set -- $run
      local name=$1 dir=$2
      shift 2
      "$DQ" bench --model "$WORK/$model/$dir" -p "$p" -n "$n" -r "$r" --threads "$t" "$@" \
        --json "$WORK/results/$model.$name.t$t.json" --force >&2
    done
  done
}

table() {
  python3 - "$WORK/results" "$MODELS" <<'PY'
import json, os, sys
res, models = sys.argv[1], sys.argv[2].split()
mib = 1 / 1048576
for model in models:
    rows = []
    for f in sorted(os.listdir(res)):
        if f.startswith(model + ".") and f.endswith(".json"):
            rows.append((f, json.load(open(os.path.join(res, f)))))
    if not rows:
        continue
    print(f"\n### {model}\n")
    print("| run | threads | kernels | pp t/s | pp t/cpu-s | tg t/s | tg t/cpu-s | cpu share pp/tg | peak RSS MiB | packed MiB | f32 linears MiB | lm_head MiB | KV MiB | load avg |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    order = ["f32", "fake-w4a4kv4", "int-w4a4kv4", "int-w4a8", "int-w8a8"]
    order += [f"int-{p}-{q}" for p in ("avx2", "avx-vnni", "avx512-vnni", "scalar") for q in ("w4a4kv4", "w4a8", "w8a8")]
    rows.sort(key=lambda fr: (fr[1]["threads"], order.index(fr[0].split(".")[-3]) if fr[0].split(".")[-3] in order else 9))
    for f, j in rows:
        name = f.split(".")[-3]
        t = {x["test"][:2]: x for x in j["tests"]}
        def ts(k, field="avg_ts"):
            if k not in t: return "–"
            s = f"{t[k][field]:.2f}"
            return s + (f" ± {t[k]['stddev_ts']:.2f}" if field == "avg_ts" else "")
        share = "/".join(f"{t[k]['avg_cpu_share']:.2f}" for k in ("pp", "tg") if k in t)
        print(f"| {name} ({t['pp']['test'] if 'pp' in t else ''}/{t['tg']['test'] if 'tg' in t else ''}) | {j['threads']} | {'+'.join(j['kernels']) or 'f32'} | "
              f"{ts('pp')} | {ts('pp', 'avg_cpu_ts')} | {ts('tg')} | {ts('tg', 'avg_cpu_ts')} | {share} | "
              f"{j['peak_rss_bytes'] * mib:.0f} | {j['packed_weight_bytes'] * mib:.1f} | {j['f32_linear_bytes'] * mib:.1f} | "
              f"{j['lm_head_bytes'] * mib:.1f} {j['lm_head_dtype']} | {j['kv_cache_bytes'] * mib:.2f} | {' '.join(f'{x:.1f}' for x in j['load_average'])} |")
PY
}

echo "# bench-runtime: $(date -u +%FT%TZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for model in $MODELS; do
  case $STAGE in prepare|all) prepare "$model" ;; esac
done
for model in $MODELS; do
  case $STAGE in bench|all) bench "$model" ;; esac
done
table
