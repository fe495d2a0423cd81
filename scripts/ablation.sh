#!/usr/bin/env bash
# Prints the stories260K ablation table (issue 6): DartQuant's loss (whip/variance/kurtosis/quant)
# and orthogonal optimizer (QR-Orth/Cayley), W4A4KV16 with GPTQ weights, PPL on TinyStories valid
# (seqlen 256), plus the final R1 loss and calibration time. Needs build/dartquant.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
seed=${SEED:-0}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
cp build/dartquant "$out/dartquant"  # a rebuild during the run must not swap the binary under it
echo "| loss | orth | R1 loss first → last | R1 seconds | PPL W4A4KV16 |"
echo "|---|---|---|---|---|"
for orth in qr cayley; do
  for loss in whip variance kurtosis quant; do
    "$out/dartquant" --threads 1 quantize --model $D/stories260K/stories260K.bin --calib $D/tinystories/calib.txt \
      --nsamples 128 --calib-seqlen 256 --ppl $D/tinystories/valid.txt --seqlen 256 --seed "$seed" \
      --rotation dartquant --loss $loss --orth $orth --w-bits 4 --w-method gptq --a-bits 4 \
      --out "$out/m" --json "$out/r.json" >/dev/null
    python3 - "$out/r.json" "$loss" "$orth" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); c = j["calibration"]; r = c["r1_curve"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {r[0]['loss']:.4f} → {r[-1]['loss']:.4f} | {c['r1_seconds']:.2f} | {j['ppl']['ppl']:.4f} |")
PY
  done
done
