#!/usr/bin/env bash
# DartQuant calibration sweep, paired against QuaRot. For every seed, QuaRot once and DartQuant once
# per configuration (a line of extra `quantize` options in CONFIGS, e.g. "--lr-r1 0.05 --epochs 5";
# the line "defaults" adds none; lines starting with # are skipped);
# then, per configuration: mean PPL, the paired gain over QuaRot (same seed: same calibration
# windows and the same random Hadamard that DartQuant starts from), the share of QuaRot's gap to FP
# closed ((mean QuaRot − mean DartQuant) / (mean QuaRot − FP)), and the seeds DartQuant wins.
# Usage: scripts/calib-sweep.sh OUTDIR CONFIGS [seeds...]      (default seeds 0 1 2 3 4)
#        scripts/calib-sweep.sh --table OUTDIR                 (summary of what OUTDIR holds)
# Runs already in OUTDIR are kept, so a sweep can be extended or resumed, and several sweeps (e.g. one
# per seed) can share OUTDIR in parallel once fp.json exists. Env (defaults: stories260K
# protocol of the README): MODEL, CALIB, PPL, SEQLEN (256), CALIB_SEQLEN (256), NSAMPLES (128),
# MAX_WINDOWS (all), QUANT (default "--w-bits 4 --w-method rtn --a-bits 4"). Run it under nice.
# KL=1 ranks by `eval --kl-base MODEL` (KL of the next-token distributions to the unquantized model,
# per token, on the same windows) instead of perplexity: FP is then 0, and "gap closed" is the share
# of QuaRot's KL that DartQuant removes. For models whose perplexity means nothing (random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
table() {
python3 - "$1" <<'PY'
import glob, json, os, statistics, sys
d = sys.argv[1]
def ppl(f):  # the metric: KL to the base when measured, else perplexity
    j = json.load(open(f))
    if "kl" in j: return j["kl"]["mean"]
    return j["ppl"]["ppl"] if isinstance(j["ppl"], dict) else j["ppl"]
fp = ppl(os.path.join(d, "fp.json")) if os.path.exists(os.path.join(d, "fp.json")) else 0.0
quarot = {int(f.rsplit(".", 2)[1]): ppl(f) for f in glob.glob(os.path.join(d, "quarot.*.json"))}
configs = {}
for f in glob.glob(os.path.join(d, "dq-*.json")):
    name, seed = os.path.basename(f)[3:].rsplit(".", 2)[:2]
    configs.setdefault(name, {})[int(seed)] = ppl(f)
names = {}
for f in glob.glob(os.path.join(d, "dq-*.args")):
    names[os.path.basename(f)[3:-5]] = open(f).read().strip() or "(defaults)"
metric = "KL" if any("kl" in json.load(open(f)) for f in glob.glob(os.path.join(d, "quarot.*.json"))) else "PPL"
f = ".6f" if metric == "KL" else ".4f"
print(f"FP {fp:{f}}; QuaRot {metric} {statistics.mean(quarot.values()):{f}} over {len(quarot)} seeds")
print(f"| options | seeds | DartQuant {metric} | QuaRot {metric} (same seeds) | paired gain (mean ± std) | gap closed | wins |")
print("|---|---|---|---|---|---|---|")
rows = []
for name, runs in configs.items():
    seeds = sorted(s for s in runs if s in quarot)
    if not seeds: continue
    dq = [runs[s] for s in seeds]; q = [quarot[s] for s in seeds]
    gain = [a - b for a, b in zip(q, dq)]
    sd = statistics.stdev(gain) if len(gain) > 1 else 0.0
    closed = (statistics.mean(q) - statistics.mean(dq)) / (statistics.mean(q) - fp)
    rows.append((-closed, f"| `{names.get(name, name)}` | {len(seeds)} | {statistics.mean(dq):{f}} | {statistics.mean(q):{f}} | "
                 f"{statistics.mean(gain):+{f}} ± {sd:{f}} | {100 * closed:.1f}% | {sum(g > 0 for g in gain)}/{len(seeds)} |"))
for _, r in sorted(rows): print(r)
PY
}
if [ "${1:-}" = "--table" ]; then table "$2"; exit 0; fi
[ $# -ge 2 ] || { echo "usage: $0 OUTDIR CONFIGS [seeds...] | --table OUTDIR" >&2; exit 2; }
out=$1 configs=$2; shift 2
seeds=("$@"); [ $# -eq 0 ] && seeds=(0 1 2 3 4)
mkdir -p "$out"
bin="$out/dartquant"; [ -x "$bin" ] || cp build/dartquant "$bin"  # a rebuild must not swap the binary mid-sweep
model=${MODEL:-$D/stories260K/stories260K.bin}
eval_args=(--ppl "${PPL:-$D/tinystories/valid.txt}" --seqlen "${SEQLEN:-256}")
[ -n "${MAX_WINDOWS:-}" ] && eval_args+=(--max-windows "$MAX_WINDOWS")
read -r -a quant <<< "${QUANT:---w-bits 4 --w-method rtn --a-bits 4}"
common=(--model "$model" --calib "${CALIB:-$D/tinystories/calib.txt}" --nsamples "${NSAMPLES:-128}"
        --calib-seqlen "${CALIB_SEQLEN:-256}" "${quant[@]}")
run() {  # json args...  (skipped when the report exists)
  local json=$1; shift
  [ -s "$json" ] && return 0
  if [ -n "${KL:-}" ]; then
    "$bin" --threads 1 quantize "${common[@]}" --out "$out/model.$$" "$@" >/dev/null
    "$bin" --threads 1 eval --model "$out/model.$$" "${eval_args[@]}" --kl-base "$model" --json "$json.$$" >/dev/null
  else
    "$bin" --threads 1 quantize "${common[@]}" "${eval_args[@]}" --out "$out/model.$$" --json "$json.$$" "$@" >/dev/null
  fi
  rm -rf "$out/model.$$"
  mv "$json.$$" "$json"
}
[ -n "${KL:-}" ] || [ -s "$out/fp.json" ] || "$bin" --threads 1 eval --model "$model" "${eval_args[@]}" --json "$out/fp.json" >/dev/null
for s in "${seeds[@]}"; do
  run "$out/quarot.$s.json" --rotation quarot --seed "$s"
  while IFS= read -r line; do
    [ -z "${line// }" ] || [ "${line:0:1}" = "#" ] && continue
    name=$(printf '%s' "$line" | tr -c 'A-Za-z0-9.\n-' '_')
    echo "$line" > "$out/dq-$name.args"
    [ "$line" = defaults ] && line=
    read -r -a extra <<< "$line"
    run "$out/dq-$name.$s.json" --rotation dartquant --seed "$s" "${extra[@]}"
  done < "$configs"
done
table "$out"
