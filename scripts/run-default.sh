#!/usr/bin/env bash
# The main job on the default model: builds dartquant, then learns DartQuant rotations for
# stories260K, quantizes it to W4A4KV16 (GPTQ weights) and prints FP vs quantized perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
D=../shared/data
out=${OUT:-out}
mkdir -p "$out"
# --force: a rerun replaces this script's earlier outputs (dartquant replaces only files it wrote).
echo "== FP32 stories260K"
build/dartquant eval --model $D/stories260K/stories260K.bin --ppl $D/tinystories/valid.txt --seqlen 256 \
  --json "$out/fp.json" --force
echo "== DartQuant W4A4KV16 (GPTQ, per-channel weights)"
build/dartquant quantize --model $D/stories260K/stories260K.bin --rotation dartquant \
  --w-bits 4 --w-method gptq --a-bits 4 --calib $D/tinystories/calib.txt --nsamples 128 --calib-seqlen 256 \
  --ppl $D/tinystories/valid.txt --seqlen 256 --out "$out/stories260K-w4a4" --json "$out/w4a4.json" --force
echo "reports: $out/fp.json $out/w4a4.json; model: $out/stories260K-w4a4"
