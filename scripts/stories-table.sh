#!/usr/bin/env bash
# Prints the README's stories260K table: perplexity on TinyStories valid (seqlen 256) for each
# quantization setting, mean ± std over seeds (calibration windows, rotations). Needs build/dartquant.
# Usage: scripts/stories-table.sh [seeds...]   (default: 0 1 2)
# KEEP=DIR keeps the per-run JSON reports there; several runs (e.g. one per seed, in parallel) can
# share one KEEP directory and `scripts/stories-table.sh --table DIR` prints the table of them all.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
seeds=("$@"); [ $# -eq 0 ] && seeds=(0 1 2)
table() {
python3 - "$1" <<'PY'
import glob, json, os, statistics, sys
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    name = os.path.basename(f).rsplit(".", 2)[0]
    j = json.load(open(f))
    rows.setdefault(name, []).append(j["ppl"]["ppl"] if isinstance(j["ppl"], dict) else j["ppl"])
print("| rotation | setting | weights | PPL (mean ± std) | seeds |")
print("|---|---|---|---|---|")
for name, v in rows.items():
    parts = name.split(" ")
    rot, setting, w = (parts + ["", "", ""])[:3] if name != "fp" else ("–", "FP32", "–")
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"| {rot} | {setting} | {w} | {statistics.mean(v):.4f} ± {sd:.4f} | {len(v)} |")
PY
}
if [ "${1:-}" = "--table" ]; then table "$2"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
cp build/dartquant "$out/dartquant"  # a rebuild during the run must not swap the binary under it
common=(--model $D/stories260K/stories260K.bin --calib $D/tinystories/calib.txt --nsamples 128
        --calib-seqlen 256 --ppl $D/tinystories/valid.txt --seqlen 256)
run() {  # name seed args...
  local name=$1 seed=$2; shift 2
  "$out/dartquant" --threads 1 quantize "${common[@]}" --seed "$seed" --out "$out/m" --json "$out/$name.$seed.json" "$@" >/dev/null
}
"$out/dartquant" --threads 1 eval --model $D/stories260K/stories260K.bin --ppl $D/tinystories/valid.txt --seqlen 256 \
  --json "$out/fp.0.json" >/dev/null
for s in "${seeds[@]}"; do
  run "none W8A8 RTN"          $s --rotation none --w-bits 8 --w-method rtn --a-bits 8
  run "none W4A16 RTN"         $s --rotation none --w-bits 4 --w-method rtn
  run "none W4A16 GPTQ"        $s --rotation none --w-bits 4 --w-method gptq
  run "none W4A4KV16 RTN"      $s --rotation none --w-bits 4 --w-method rtn --a-bits 4
  run "none W4A4KV16 GPTQ"     $s --rotation none --w-bits 4 --w-method gptq --a-bits 4
  run "none W4A4KV4 GPTQ"      $s --rotation none --w-bits 4 --w-method gptq --a-bits 4 --kv-bits 4
  run "quarot W16A16"          $s --rotation quarot --w-bits 16
  run "quarot W4A4KV16 GPTQ"   $s --rotation quarot --w-bits 4 --w-method gptq --a-bits 4
  run "quarot W4A4KV4 GPTQ"    $s --rotation quarot --w-bits 4 --w-method gptq --a-bits 4 --kv-bits 4
  run "dartquant W4A4KV16 GPTQ" $s --rotation dartquant --w-bits 4 --w-method gptq --a-bits 4
  run "dartquant W4A4KV4 GPTQ" $s --rotation dartquant --w-bits 4 --w-method gptq --a-bits 4 --kv-bits 4
done
[ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$out"/*.json "$KEEP"/
table "$out"
