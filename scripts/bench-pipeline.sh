#!/usr/bin/env bash
# The whole quantization pipeline (capture -> DartQuant calibration -> fuse -> GPTQ -> save -> PPL) on
# synthetic checkpoints with the exact shapes of SmolLM2-135M and Llama-3.2-1B, plus the decoder
# forward pass at seqlen 2048 against raw sgemm, measured in the same run; prints markdown tables.
#
# Usage: scripts/bench-pipeline.sh [runs]        (default runs: 1; figures are medians with [min, max])
# Environment (defaults in brackets):
#   BUILD [build-bench]   holds dartquant and bench/bench_forward
#   MODELS ["smollm2-135m-instruct llama-3.2-1b"]   directories under $DQ_DATA_DIR/hf
#   NSAMPLES [4] CALIB_SEQLEN [256] MAX_WINDOWS [2] SEQLEN [256]   calibration / evaluation sizes
#   FWD_LAYERS [2]        decoder depth of the synthetic model bench_forward times (see bench/README.md)
#   TOKENIZER [SmolLM2's tokenizer.json, for configs that have none]
#   THREADS [nproc]  OUTLIERS [4]  SEED [0]  DQ_DATA_DIR [../shared/data]  WORK [/tmp/dq-bench-pipeline]
# Synthetic checkpoints (bf16, seeded) are kept in $WORK between runs; quantized outputs are removed.
# Time on the shared 2-core box: SmolLM2 ~1 min per run; Llama-3.2-1B ~30 min per run, most of it
# GPTQ, whose cost does not shrink with NSAMPLES.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
BUILD=${BUILD:-build-bench}
D=${DQ_DATA_DIR:-../shared/data}
WORK=${WORK:-/tmp/dq-bench-pipeline}
MODELS=${MODELS:-"smollm2-135m-instruct llama-3.2-1b"}
N=${NSAMPLES:-4} L=${CALIB_SEQLEN:-256} K=${MAX_WINDOWS:-2} S=${SEQLEN:-256}
FWD_LAYERS=${FWD_LAYERS:-2} THREADS=${THREADS:-$(nproc)} OUTLIERS=${OUTLIERS:-4} SEED=${SEED:-0}
DQ="$BUILD/dartquant"
for f in "$DQ" "$BUILD/bench/bench_forward"; do
  [ -x "$f" ] || { echo "missing $f: ninja -C $BUILD -j2 dartquant bench_forward" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (GNU time)" >&2; exit 1; }
mkdir -p "$WORK"
res="$WORK/results"; rm -rf "$res"; mkdir -p "$res"

echo "# bench-pipeline: $(date -u +%FT%TZ), $(nproc) cores, --threads $THREADS, OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for model in $MODELS; do
  ckpt="$WORK/$model-bf16-s$SEED-o$OUTLIERS"
  if [ ! -f "$ckpt/model.safetensors" ]; then
    echo "synth $model -> $ckpt" >&2
    "$DQ" synth --config "$D/hf/$model/config.json" --out "$ckpt" --seed "$SEED" --dtype bf16 --outliers "$OUTLIERS" >&2
  fi
  # Configs without a tokenizer.json beside them (Llama-3.2-1B) borrow SmolLM2's (49152 ids, all
  # inside the larger vocabulary); the text's token count differs, the shapes do not.
  tok=()
  [ -f "$ckpt/tokenizer.json" ] || tok=(--tokenizer "${TOKENIZER:-$D/hf/smollm2-135m-instruct/tokenizer.json}")
  for r in $(seq 1 "$RUNS"); do
    echo "quantize $model run $r/$RUNS" >&2
    # Forward throughput first, then the pipeline, so each run's ratio uses its own sgemm baseline.
    DQ_BENCH_MODEL=$model DQ_BENCH_LAYERS=$FWD_LAYERS DQ_DATA_DIR=$D DQ_BENCH_DIR=$WORK \
      OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS \
      "$BUILD/bench/bench_forward" --benchmark_out="$res/$model.$r.forward.json" --benchmark_out_format=json \
      >/dev/null 2>"$res/$model.$r.forward.err"
    /usr/bin/time -v -o "$res/$model.$r.time" \
      "$DQ" --threads "$THREADS" quantize --model "$ckpt" "${tok[@]}" --out "$WORK/out-$model" \
        --rotation dartquant --w-method gptq --w-bits 4 --a-bits 4 \
        --calib "$D/wikitext2/test.gptq.txt" --nsamples "$N" --calib-seqlen "$L" \
        --ppl "$D/wikitext2/test.gptq.txt" --seqlen "$S" --max-windows "$K" --seed "$SEED" \
        --json "$res/$model.$r.json" >"$res/$model.$r.log" 2>&1 || { cat "$res/$model.$r.log" >&2; exit 1; }
    rm -rf "$WORK/out-$model"
  done
done

python3 - "$res" "$D" "$N" "$L" "$K" "$S" "$FWD_LAYERS" <<'PY'
import glob, json, os, re, statistics, sys
res, data, N, L, K, S, fwd_layers = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), int(sys.argv[7])

def med(v):
    v = [x for x in v if x is not None]
    if not v: return "–"
    m = statistics.median(v)
    fmt = (lambda x: f"{x:.3g}") if abs(m) < 10 else (lambda x: f"{x:.0f}")
    return fmt(m) + (f" [{fmt(min(v))}, {fmt(max(v))}]" if len(v) > 1 else "")

def flops_per_token(cfg, seq, lm_head):
    D, I = cfg["hidden_size"], cfg["intermediate_size"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", D // H)
    lin = D * H * hd * 2 + D * KV * hd * 2 + 3 * D * I
    attn = 2 * 2 * hd * H * (seq + 1) / 2
    f = cfg["num_hidden_layers"] * (2 * lin + attn)
    return f + (2 * D * cfg["vocab_size"] if lm_head else 0)

# Result files are MODEL.RUN.json (the model name may contain dots).
models = sorted({re.sub(r"\.\d+\.json$", "", os.path.basename(p)) for p in glob.glob(f"{res}/*.[0-9]*.json")
                 if not p.endswith(".forward.json")},
                key=lambda m: json.load(open(f"{data}/hf/{m}/config.json"))["hidden_size"])
stage_names = [("rotations", "rotations: capture + R1/R2 calibration"), ("layers", "embedding + layers: fuse, rotate, GPTQ, write"),
               ("finish", "classifier, config, rename"), ("eval", "eval (PPL, of the written model)")]
rows = {}
for m in models:
    cfg = json.load(open(f"{data}/hf/{m}/config.json"))
    runs = sorted(p for p in glob.glob(f"{res}/{glob.escape(m)}.*.json")
                  if re.fullmatch(re.escape(m) + r"\.\d+\.json", os.path.basename(p)))
    r = {k: [] for k in ["wall", "rss", "ppl", "eval_tps", "eval_frac", "fwd_tps", "fwd_tps_full", "fwd_frac",
                         "fwd_frac_full", "sgemm", "capture", "r1", "r2",
                         "capture_rss", "r1_rss", "r2_rss"]}
    for s, _ in stage_names: r[s] = []; r[s + "_rss"] = []
    for p in runs:
        j = json.load(open(p))
        st = j["stages"]
        for s, _ in stage_names:
            r[s].append(st.get(s, {}).get("seconds")); r[s + "_rss"].append(st.get(s, {}).get("peak_rss_mib"))
        cal = j.get("calibration", {})
        r["capture"].append(cal.get("capture_seconds")); r["r1"].append(cal.get("r1_seconds")); r["r2"].append(cal.get("r2_seconds"))
        for k in ["capture", "r1", "r2"]: r[k + "_rss"].append(cal.get(k + "_peak_rss_mib"))
        t = open(p.replace(".json", ".time")).read()
        h, mi, sec = ([0, 0] + re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1).split(":"))[-3:]
        r["wall"].append(int(h) * 3600 + int(mi) * 60 + float(sec))
        r["rss"].append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024)
        r["ppl"].append(j.get("ppl", {}).get("ppl"))
        fw = json.load(open(p.replace(".json", ".forward.json")))["benchmarks"][0]
        r["fwd_tps"].append(fw["tok/s"]); r["fwd_tps_full"].append(fw["tok/s_full"])
        r["fwd_frac"].append(fw["frac_sgemm_layer"]); r["fwd_frac_full"].append(fw["frac_sgemm_full"])
        r["sgemm"].append(fw["sgemm_FLOP/s"] / 1e9)
        ev = j.get("ppl", {})
        tps = ev["windows"] * ev["seqlen"] / st["eval"]["seconds"] if ev and "eval" in st else None
        r["eval_tps"].append(tps)
        r["eval_frac"].append(tps * flops_per_token(cfg, S, True) / (fw["sgemm_FLOP/s"]) if tps else None)
    rows[m] = (r, len(runs))

print(f"Pipeline: `quantize --rotation dartquant --w-method gptq --w-bits 4 --a-bits 4 --nsamples {N} "
      f"--calib-seqlen {L} --ppl test.gptq.txt --seqlen {S} --max-windows {K}`; medians [min, max] over runs.\n")
print("| | " + " | ".join(f"{m} ({n} runs)" for m, (_, n) in rows.items()) + " |")
print("|---|" + "---|" * len(rows))
def line(label, key, unit=""):
    print(f"| {label} | " + " | ".join(med(r[key]) + unit for r, _ in rows.values()) + " |")
line("capture (s)", "capture"); line("R1 calibration (s)", "r1"); line("R2 calibration (s)", "r2")
for s, label in stage_names: line(label + " (s)", s)
line("total wall, /usr/bin/time (s)", "wall")
line("peak RSS after capture (MiB)", "capture_rss"); line("peak RSS after R1 (MiB)", "r1_rss"); line("peak RSS after R2 (MiB)", "r2_rss")
for s, label in stage_names: line(f"peak RSS after {s} (MiB)", s + "_rss")
line("peak RSS overall, /usr/bin/time (MiB)", "rss")
line("PPL (random weights: a sanity figure only)", "ppl")
# Evaluation speed is not reported as a rate: it has no baseline interleaved with it (the sgemm
# reference ran minutes earlier under another load) and its seconds include tokenizing the text.
line(f"forward tokens/s, seq 2048, {fwd_layers} layers", "fwd_tps")
line("forward FLOP/s ÷ sgemm FLOP/s (decoder layers)", "fwd_frac")
line("forward tokens/s, seq 2048, full depth (extrapolated)", "fwd_tps_full")
line("forward ÷ sgemm, full depth", "fwd_frac_full")
line("sgemm baseline, same iteration as the forward (GFLOP/s)", "sgemm")
PY
