#!/usr/bin/env bash
# dartquant's GGUF exports checked in llama.cpp itself. Not part of CI: it needs a llama.cpp built
# from its public source, outside this project (never copied into it), e.g.
#   git clone https://github.com/ggml-org/llama.cpp /tmp/llama.cpp
#   cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
#   cmake --build /tmp/llama.cpp/build -j2 --target llama-perplexity llama-simple
# (without network: node-llama-cpp's npm package carries llama.cpp's source of its release as
# node_modules/node-llama-cpp/llama/gitRelease.bundle, which `git clone` takes as a repository).
#
# Usage: [MODELS="stories260K ..."] scripts/check-llamacpp.sh LLAMA_CPP_BUILD_DIR [LINES] [CHUNKS]
# Prints three markdown tables (docs/EXPORT.md holds the last run's):
# 1. Tokenizer ids: for each tokenizer family dartquant reads, a one-layer model with that
#    tokenizer is exported to GGUF; the first LINES (default 300) non-empty lines of WikiText-2 test,
#    as they are and with their leading spaces stripped, are tokenized by `dartquant tokenize` (no
#    special tokens) and by llama.cpp's tokenizer on the GGUF (scripts/llamacpp/tokenize_lines.cpp,
#    no BOS); the table counts the lines whose ids are equal. Llama-3 and Qwen2 are their
#    pre-tokenizers on SmolLM2's vocabulary (tests/fixtures/tokenizer/variants.json); qwen2.5 is
#    Qwen2.5-0.5B's own vocabulary and merges laid out as a tokenizer.json.
# 2. Perplexity, products and greedy text, for stories260K and synthetic SmolLM2-135M /
#    Llama-3.2-1B / Qwen2.5-0.5B shapes (2 layers, seeded weights), each exported as f32, f16,
#    q8_0, q4_0, q4_1:
#    - `dartquant eval --protocol llama.cpp` against llama-perplexity on the same file and text.
#      Protocol alignment: both tokenize the whole text once with BOS first, cut it into the same
#      non-overlapping windows of C tokens (--seqlen C / -c C -b C, the first CHUNKS of them:
#      --max-windows / --chunks), put BOS first in each window and score only the second half of
#      each window (llama-perplexity's rule, which --protocol llama.cpp follows); llama.cpp's KV
#      cache is kept in f32 (-ctk f32 -ctv f32) and flash attention off (-fa off: its CPU kernel
#      casts an f32 cache to f16) so both compute attention in f32.
#    - The same score with every activation a weight reads multiplied by (1 + 1e-5 N(0,1)), 16
#      seeds (scripts/llamacpp/ppl_noise.cpp): the spread f32-level differences cause once
#      activations are rounded to f16 or 8-bit blocks (dartquant's and llama.cpp's f32 activations
#      differ by up to ~2e-5 relative RMS, their sums running in other orders), and how many
#      standard deviations llama.cpp's score lies from its mean.
#    - Products: llama.cpp's graph tensors for the first 128 tokens of the text
#      (scripts/llamacpp/dump_tensors.cpp), and each weight's product recomputed from llama.cpp's
#      own input with ggml's activation rounding (scripts/llamacpp/check_products.py, numpy and
#      llama.cpp's gguf-py): the largest relative difference from llama.cpp's output.
#    - Greedy text: 24 tokens from the same prompt by `dartquant generate --temperature 0` and
#      llama-simple (greedy).
# 3. For each f32 file: dartquant's activations at the weight inputs against llama.cpp's, same 128
#    tokens (scripts/llamacpp/dump_sites.cpp, compare_sites.py): the size of the f32 differences.
# Needs g++, python3 with numpy (Debian: python3-numpy) and llama.cpp's source tree beside its build
# (found through the build's CMakeCache.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${1:?usage: scripts/check-llamacpp.sh LLAMA_CPP_BUILD_DIR [LINES] [CHUNKS]}
LINES=${2:-300}
CHUNKS=${3:-8}
BIN=$LLAMA/bin
for t in llama-perplexity llama-simple; do
  [[ -x $BIN/$t ]] || { echo "check-llamacpp: $BIN/$t not found (build it, see the header)" >&2; exit 1; }
done
DQ=build/dartquant
[[ -x $DQ ]] || scripts/build.sh
SRC=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$LLAMA/CMakeCache.txt")
[[ -d $SRC/gguf-py ]] || { echo "check-llamacpp: llama.cpp's source tree not found from $LLAMA/CMakeCache.txt" >&2; exit 1; }
DATA=../shared/data
WORK=$(mktemp -d /tmp/dq-llamacpp.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
for tool in dump_tensors tokenize_lines; do
  g++ -std=c++17 -O2 -I"$SRC/include" -I"$SRC/ggml/include" "scripts/llamacpp/$tool.cpp" -o "$WORK/$tool" \
    -L"$BIN" -lllama -lggml -lggml-base -Wl,-rpath,"$BIN"
done
for tool in ppl_noise dump_sites; do
  g++ -std=c++20 -O2 -march=x86-64-v3 -fopenmp -Isrc "scripts/llamacpp/$tool.cpp" -o "$WORK/$tool" \
    -Wl,--start-group build/libdq_*.a -Wl,--end-group $(pkg-config --libs openblas libpcre2-8) -llapacke
done

# ---- 1. tokenizer ids ----
grep -m "$LINES" -v '^ *$' "$DATA/wikitext2/wiki.test.raw" > "$WORK/lines.txt"  # grep | head would fail on SIGPIPE
sed 's/^ *//' "$WORK/lines.txt" > "$WORK/stripped.txt"

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

# Qwen2.5's tokenizer.json rebuilt from its vocab.json, merges.txt and tokenizer_config.json
# (../shared/data has no tokenizer.json for it) as Qwen2's tokenizer.json files are laid out, except
# their NFC normalizer, which dartquant does not implement (a no-op on NFC text such as WikiText-2).
qwen25() {  # DIR
  python3 - "$1" "$DATA/hf/qwen2.5-0.5b" <<'EOF'
import json, shutil, sys
out, src = sys.argv[1:3]
cfg = json.load(open(f"{src}/tokenizer_config.json"))
merges = [l for l in open(f"{src}/merges.txt", encoding="utf-8").read().split("\n") if l and not l.startswith("#version")]
split = next(v for v in json.load(open("tests/fixtures/tokenizer/variants.json"))["variants"]
             if v["name"] == "qwen_split")["set"]["pre_tokenizer"]["pretokenizers"][0]
byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
t = {"version": "1.0", "truncation": None, "padding": None,
     "added_tokens": [{"id": int(i), **a} for i, a in cfg["added_tokens_decoder"].items()],
     "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
     "post_processor": byte_level, "decoder": byte_level,
     "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
               "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
               "vocab": json.load(open(f"{src}/vocab.json", encoding="utf-8")), "merges": merges}}
json.dump(t, open(f"{out}/tokenizer.json", "w"))
shutil.copy(f"{src}/tokenizer_config.json", out)
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
    qwen2.5) qwen25 "$d" ;;
  esac
  echo "$d"
}

echo "| tokenizer family | tokenizer.ggml.model / pre | lines | equal ids | equal ids, leading spaces stripped |"
echo "|---|---|---|---|---|"
for fam in stories260K smollm2 tinyllama llama-2-7b-hf mistral-7b-v0.1 llama3 qwen2 qwen2.5; do
  if [[ $fam == stories260K ]]; then
    tok=$DATA/stories260K/tok512.bin
    $DQ export --model "$DATA/stories260K/stories260K.bin" --format gguf --out "$WORK/$fam.gguf" >/dev/null
  else
    d=$(family_dir "$fam")
    tiny_config "$d"
    $DQ synth --config "$d/config.json" --out "$WORK/m-$fam" --dtype f32 >/dev/null
    tok=$d/tokenizer.json
    $DQ export --model "$WORK/m-$fam" --format gguf --out "$WORK/$fam.gguf" 2>/dev/null >/dev/null
  fi
  equal=()
  for text in lines stripped; do
    $DQ tokenize --tokenizer "$tok" --text-file "$WORK/$text.txt" > "$WORK/$fam.ours"
    "$WORK/tokenize_lines" "$WORK/$fam.gguf" "$WORK/$text.txt" > "$WORK/$fam.theirs"
    equal+=("$(paste -d '\t' "$WORK/$fam.ours" "$WORK/$fam.theirs" | awk -F '\t' '$1 == $2' | wc -l)")
  done
  kind=$(python3 -c "
import struct,sys
b=open(sys.argv[1],'rb').read()
def s(k):
    i=b.find(k)+len(k)+4; n=struct.unpack_from('<Q',b,i)[0]; return b[i+8:i+8+n].decode()
print(s(b'tokenizer.ggml.model'), '/', s(b'tokenizer.ggml.pre'))" "$WORK/$fam.gguf")
  echo "| $fam | $kind | $(wc -l < "$WORK/lines.txt") | ${equal[0]} | ${equal[1]} |"
done
echo

# ---- 2. perplexity, products and greedy text ----
# yes when two generations match from the prompt on (llama-simple prints the BOS piece before it)
# up to an unfinished UTF-8 character at the end, which dartquant prints as U+FFFD and llama-simple
# as its raw bytes.
greedy_equal() {  # OURS THEIRS PROMPT
  python3 - "$@" <<'EOF'
import sys
a, b = (open(f, "rb").read().decode("utf-8", "replace").replace("\n", "").rstrip("\ufffd") for f in sys.argv[1:3])
p = sys.argv[3]
print("yes" if p in a and p in b and a.split(p, 1)[1] == b.split(p, 1)[1] else "no")
EOF
}
TEXT=$DATA/wikitext2/wiki.test.raw
PROMPT="The history of the city"
echo "| model | type | ctx x chunks | dartquant eval --protocol llama.cpp | llama-perplexity | rel. diff | dartquant, activations x (1 + 1e-5 N), 16 seeds: mean ± std | llama.cpp from that mean, in std | products, max rel. diff | greedy text equal |"
echo "|---|---|---|---|---|---|---|---|---|---|"
sites=()
for model in ${MODELS:-stories260K smollm2-135m llama-3.2-1b qwen2.5-0.5b}; do
  case $model in
    stories260K) src=$DATA/stories260K/stories260K.bin; text=$DATA/tinystories/valid.txt; ctx=256; prompt="Once upon a time"
                 tok=$DATA/stories260K/tok512.bin ;;
    smollm2-135m) d=$(family_dir smollm2); tiny_config "$d" "$DATA/hf/smollm2-135m-instruct/config.json" 2 ;;
    llama-3.2-1b) d=$(family_dir llama3); tiny_config "$d" "$DATA/hf/llama-3.2-1b/config.json" 2 ;;
    qwen2.5-0.5b) d=$(family_dir qwen2); tiny_config "$d" "$DATA/hf/qwen2.5-0.5b/config.json" 2 ;;
  esac
  if [[ $model != stories260K ]]; then
    src=$WORK/s-$model; text=$TEXT; ctx=512; prompt=$PROMPT; tok=$d/tokenizer.json
    $DQ synth --config "$d/config.json" --out "$src" --dtype f32 --seed 1 >/dev/null
  fi
  head -c 4000 "$text" | tr '\n' ' ' > "$WORK/head.txt"
  ids=$($DQ tokenize --tokenizer "$tok" --text-file "$WORK/head.txt" --add-special | head -n 1 \
        | python3 -c "import json,sys; print(','.join(map(str, json.load(sys.stdin)[:128])))")
  for type in f32 f16 q8_0 q4_0 q4_1; do
    g=$WORK/$model-$type.gguf
    $DQ export --model "$src" --format gguf --gguf-type "$type" --out "$g" >/dev/null
    $DQ eval --model "$g" --ppl "$text" --seqlen "$ctx" --max-windows "$CHUNKS" --protocol llama.cpp \
      --json "$WORK/$model-$type.eval.json" >/dev/null  # dartquant never replaces a file
    ours=$(python3 -c "import json,sys; print('%.4f' % json.load(open(sys.argv[1]))['ppl'])" "$WORK/$model-$type.eval.json")
    "$BIN/llama-perplexity" -m "$g" -f "$text" -c "$ctx" -b "$ctx" --chunks "$CHUNKS" -ctk f32 -ctv f32 -fa off \
      -t 2 > "$WORK/perplexity.log" 2>&1 || echo "check-llamacpp: llama-perplexity failed on $g (exit $?)" >&2
    theirs=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$WORK/perplexity.log")
    rel=$(python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.1e' % abs(a/b-1))" "$ours" "${theirs:-nan}")
    noise=$("$WORK/ppl_noise" "$g" "$text" "$ctx" "$CHUNKS" 1e-5 16 | python3 -c "
import statistics as st, sys
v = [float(l) for l in sys.stdin]; m, sd = st.mean(v), st.stdev(v); theirs = float(sys.argv[1])
print('%.4f ± %.4f | %s' % (m, sd, '%+.1f' % ((theirs - m) / sd) if sd > 0 else '-'))" "${theirs:-nan}")
    mkdir -p "$WORK/dump"
    "$WORK/dump_tensors" "$g" "$ids" "$WORK/dump" 2>/dev/null
    products=$(PYTHONPATH="$SRC/gguf-py" python3 scripts/llamacpp/check_products.py "$g" "$WORK/dump")
    if [[ $type == f32 ]]; then
      mkdir -p "$WORK/ours"
      "$WORK/dump_sites" "$g" "$ids" "$WORK/ours"
      sites+=("$(python3 scripts/llamacpp/compare_sites.py "$WORK/ours" "$WORK/dump" | sed "s/^/| $model | /; s/: / | /; s/\$/ |/")")
      rm -rf "$WORK/ours"
    fi
    rm -rf "$WORK/dump"
    $DQ generate --model "$g" --prompt "$prompt" -n 24 --temperature 0 > "$WORK/ours.txt" 2>/dev/null
    "$BIN/llama-simple" -m "$g" -n 24 "$prompt" > "$WORK/theirs.txt" 2>/dev/null
    same=$(greedy_equal "$WORK/ours.txt" "$WORK/theirs.txt" "$prompt")
    echo "| $model | $type | $ctx x $CHUNKS | $ours | ${theirs:-?} | $rel | $noise | $products | $same |"
  done
done
echo
echo "| model (f32) | site (llama.cpp's tensor) | relative RMS difference of the activations, by layer |"
echo "|---|---|---|"
printf '%s\n' "${sites[@]}"
