#!/usr/bin/env bash
# dartquant's GGUF exports checked in llama.cpp itself. Not part of CI: it needs a llama.cpp built
# from its public source, outside this project (never copied into it), e.g.
#   git clone https://github.com/ggml-org/llama.cpp /tmp/llama.cpp
#   cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
#   cmake --build /tmp/llama.cpp/build -j2 --target llama-tokenize llama-perplexity llama-simple
#
# Usage: scripts/check-llamacpp.sh LLAMA_CPP_BUILD_DIR [LINES] [CHUNKS]
# Prints two markdown tables (docs/LLAMACPP.md holds the last run's):
# 1. Tokenizer ids: for each tokenizer family dartquant reads, a one-layer model with that
#    tokenizer is exported to GGUF; the first LINES (default 300) non-empty lines of WikiText-2 test
#    are tokenized by `dartquant tokenize` (no special tokens) and by llama-tokenize on the GGUF
#    (--no-bos); the table counts the lines whose ids are equal.
# 2. Perplexity and greedy text, for stories260K and synthetic SmolLM2-135M / Llama-3.2-1B /
#    Qwen2.5-0.5B shapes (2 layers, seeded weights), each exported as f32, f16, q8_0, q4_0, q4_1:
#    `dartquant eval --protocol llama.cpp` against llama-perplexity on the same file and text.
#    Protocol alignment: both tokenize the whole text once with BOS first, cut it into the same
#    non-overlapping windows of C tokens (--seqlen C / -c C -b C, the first CHUNKS of them:
#    --max-windows / --chunks), put BOS first in each window and score only the second half of
#    each window (llama-perplexity's rule, which --protocol llama.cpp follows); llama.cpp's KV
#    cache is kept in f32 (-ctk f32 -ctv f32) and flash attention off (-fa off: its CPU kernel
#    casts an f32 cache to f16) so both compute attention in f32. Greedy text: 24 tokens from
#    the same prompt by `dartquant generate --temperature 0` and llama-simple (greedy).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${1:?usage: scripts/check-llamacpp.sh LLAMA_CPP_BUILD_DIR [LINES] [CHUNKS]}
LINES=${2:-300}
CHUNKS=${3:-8}
BIN=$LLAMA/bin
for t in llama-tokenize llama-perplexity llama-simple; do
  [[ -x $BIN/$t ]] || { echo "check-llamacpp: $BIN/$t not found (build it, see the header)" >&2; exit 1; }
done
DQ=build/dartquant
[[ -x $DQ ]] || scripts/build.sh
DATA=../shared/data
WORK=$(mktemp -d /tmp/dq-llamacpp.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---- 1. tokenizer ids ----
grep -v '^ *$' "$DATA/wikitext2/wiki.test.raw" | head -n "$LINES" > "$WORK/lines.txt"

# A tokenizer.json variant from tests/fixtures/tokenizer/variants.json, written to DIR/tokenizer.json.
variant() {  # NAME DIR
  python3 - "$1" "$2" "$DATA" <<'EOF'
import json, os, sys
name, out, data = sys.argv[1:4]
v = next(x for x in json.load(open("tests/fixtures/tokenizer/variants.json"))["variants"] if x["name"] == name)
t = json.load(open(f"{data}/hf/{v['base']}/tokenizer.json"))
t.update(v.get("set", {}))
t["model"].update(v.get("model", {}))
os.makedirs(out, exist_ok=True)
json.dump(t, open(f"{out}/tokenizer.json", "w"))
EOF
}

# A small Llama config whose vocabulary fits the tokenizer in DIR (config.json beside it).
tiny_config() {  # DIR [BASE_CONFIG LAYERS]
  python3 - "$@" <<'EOF'
import json, sys
d = sys.argv[1]
t = json.load(open(f"{d}/tokenizer.json"))
n = max(list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]) + 1
if len(sys.argv) > 2:
    c = json.load(open(sys.argv[2]))
    c["num_hidden_layers"] = int(sys.argv[3])
else:
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
c["vocab_size"] = n
c["torch_dtype"] = "float32"
for k in ("bos_token_id", "eos_token_id"):  # ids of the base config's own, larger vocabulary
    if isinstance(c.get(k), int) and c[k] >= n:
        del c[k]
json.dump(c, open(f"{d}/config.json", "w"), indent=1)
EOF
}

family_dir() {  # NAME -> directory with tokenizer.json (+ tokenizer_config.json)
  local name=$1 d=$WORK/tok-$1
  mkdir -p "$d"
  case $name in
    smollm2) cp "$DATA/hf/smollm2-135m-instruct/tokenizer.json" "$d/" ;;
    tinyllama|llama-2-7b-hf|mistral-7b-v0.1)
      local src=$DATA/hf/$name
      [[ $name == tinyllama ]] && src=$DATA/hf/tinyllama-1.1b-chat-v1.0
      cp "$src/tokenizer.json" "$src/tokenizer_config.json" "$d/" ;;
    llama3|qwen2) variant "$([[ $name == llama3 ]] && echo llama3_split || echo qwen_split)" "$d" ;;
  esac
  echo "$d"
}

echo "| tokenizer family | llama.cpp pre-tokenizer | lines | equal ids |"
echo "|---|---|---|---|"
for fam in stories260K smollm2 tinyllama llama-2-7b-hf mistral-7b-v0.1 llama3 qwen2; do
  if [[ $fam == stories260K ]]; then
    tok=$DATA/stories260K/tok512.bin
    $DQ export --model "$DATA/stories260K/stories260K.bin" --format gguf --out "$WORK/$fam.gguf" >/dev/null
  else
    d=$(family_dir "$fam")
    tiny_config "$d"
    $DQ synth --config "$d/config.json" --out "$WORK/m-$fam" --dtype f32 >/dev/null
    tok=$d/tokenizer.json
    $DQ export --model "$WORK/m-$fam" --format gguf --out "$WORK/$fam.gguf" >/dev/null
  fi
  $DQ tokenize --tokenizer "$tok" --text-file "$WORK/lines.txt" > "$WORK/$fam.ours"
  : > "$WORK/$fam.theirs"
  while IFS= read -r line; do
    "$BIN/llama-tokenize" -m "$WORK/$fam.gguf" -p "$line" --ids --no-bos --log-disable 2>/dev/null | tail -n 1 \
      | tr -d ' ' >> "$WORK/$fam.theirs"
  done < "$WORK/lines.txt"
  pre=$(python3 -c "
import struct,sys
b=open(sys.argv[1],'rb').read()
i=b.find(b'tokenizer.ggml.pre')+len('tokenizer.ggml.pre')+4
n=struct.unpack_from('<Q',b,i)[0]; print(b[i+8:i+8+n].decode())" "$WORK/$fam.gguf")
  equal=$(paste -d '\t' "$WORK/$fam.ours" "$WORK/$fam.theirs" | awk -F '\t' '$1 == $2' | wc -l)
  echo "| $fam | $pre | $(wc -l < "$WORK/lines.txt") | $equal |"
done
echo

# ---- 2. perplexity and greedy text ----
TEXT=$DATA/wikitext2/wiki.test.raw
PROMPT="The history of the city"
echo "| model | type | ctx x chunks | dartquant eval --protocol llama.cpp | llama-perplexity | rel. diff | greedy text equal |"
echo "|---|---|---|---|---|---|---|"
for model in stories260K smollm2-135m llama-3.2-1b qwen2.5-0.5b; do
  case $model in
    stories260K) src=$DATA/stories260K/stories260K.bin; text=$DATA/tinystories/valid.txt; ctx=256; prompt="Once upon a time" ;;
    smollm2-135m) d=$(family_dir smollm2); tiny_config "$d" "$DATA/hf/smollm2-135m-instruct/config.json" 2 ;;
    llama-3.2-1b) d=$(family_dir llama3); tiny_config "$d" "$DATA/hf/llama-3.2-1b/config.json" 2 ;;
    qwen2.5-0.5b) d=$(family_dir qwen2); tiny_config "$d" "$DATA/hf/qwen2.5-0.5b/config.json" 2 ;;
  esac
  if [[ $model != stories260K ]]; then
    src=$WORK/s-$model; text=$TEXT; ctx=512; prompt=$PROMPT
    $DQ synth --config "$d/config.json" --out "$src" --dtype f32 --seed 1 >/dev/null
  fi
  for type in f32 f16 q8_0 q4_0 q4_1; do
    g=$WORK/$model-$type.gguf
    $DQ export --model "$src" --format gguf --gguf-type "$type" --out "$g" >/dev/null
    $DQ eval --model "$g" --ppl "$text" --seqlen "$ctx" --max-windows "$CHUNKS" --protocol llama.cpp \
      --json "$WORK/$model-$type.eval.json" >/dev/null  # dartquant never replaces a file
    ours=$(python3 -c "import json,sys; print('%.4f' % json.load(open(sys.argv[1]))['ppl'])" "$WORK/$model-$type.eval.json")
    theirs=$("$BIN/llama-perplexity" -m "$g" -f "$text" -c "$ctx" -b "$ctx" --chunks "$CHUNKS" -ctk f32 -ctv f32 -fa off \
      -t 2 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
    rel=$(python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.1e' % abs(a/b-1))" "$ours" "${theirs:-nan}")
    a=$($DQ generate --model "$g" --prompt "$prompt" -n 24 --temperature 0 2>/dev/null)
    b=$("$BIN/llama-simple" -m "$g" -n 24 "$prompt" 2>/dev/null)
    same=no
    [[ "$(echo "$a" | tr -d '\n')" == "$(echo "$b" | tr -d '\n')" ]] && same=yes
    echo "| $model | $type | $ctx x $CHUNKS | $ours | ${theirs:-?} | $rel | $same |"
  done
done
