#!/usr/bin/env node
// dartquant's GGUF exports checked in llama.cpp through node-llama-cpp, whose npm package ships a
// prebuilt llama.cpp (no compiler, no llama.cpp checkout needed). Not part of CI. Setup, outside
// the project:
//   mkdir -p /tmp/nlc && cd /tmp/nlc && npm init -y && npm i -E node-llama-cpp@3.21.1
// Run from the project root (build/dartquant built):
//   NODE_PATH=/tmp/nlc/node_modules node scripts/check-llamacpp.mjs [LINES] [WINDOWS] [ONLY] > table.md
// ONLY (a regular expression) keeps the tokenizer rows whose family and the perplexity rows whose
// "model type" it matches, e.g. 'llama-3.2-1b (f32|q4_0)'. Prints the tables of docs/EXPORT.md:
// 1. Tokenizer ids: for each tokenizer family dartquant reads (Qwen2.5: its real vocabulary), a
//    one-layer model with that tokenizer is exported to GGUF; the first LINES (default 300)
//    non-empty lines of WikiText-2 test are tokenized by `dartquant tokenize` (no special tokens) and by llama.cpp's
//    tokenizer on the GGUF (no special tokens); the table counts lines with equal ids.
// 2. Perplexity and greedy text for stories260K and synthetic SmolLM2-135M / Llama-3.2-1B /
//    Qwen2.5-0.5B shapes (2 layers, seeded weights), exported as f32, f16, q8_0, q4_0, q4_1.
//    Protocol (llama-perplexity's, which `dartquant eval --protocol llama.cpp` follows): the
//    whole text tokenized once with BOS first, cut into non-overlapping windows of C tokens, the
//    first WINDOWS (default 4) of them; BOS put first in each window; only the second half of each
//    window scored. llama.cpp's side evaluates each window in a fresh sequence and reads the
//    probability of the actual next token from its full next-token distribution (temperature 1,
//    no top-k/top-p/min-p); dartquant's is `eval --protocol llama.cpp`, which also rounds the
//    activations at each weight's input as llama.cpp's CPU kernels do for the weight's type.
//    Greedy text: 24 tokens after the same prompt, `dartquant generate --temperature 0` against
//    llama.cpp's argmax.
import {execFileSync} from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {createRequire} from "node:module";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const {getLlama, LlamaLogLevel} = await import(require.resolve("node-llama-cpp"));

const LINES = Number(process.argv[2] || 300), WINDOWS = Number(process.argv[3] || 4);
const ONLY = new RegExp(process.argv[4] || "");
const DQ = process.env.DQ || "build/dartquant", DATA = "../shared/data";  // DQ: another build
const work = fs.mkdtempSync(path.join(os.tmpdir(), "dq-llamacpp-"));
const dq = (...args) => execFileSync(DQ, ["--threads", "1", ...args], {encoding: "utf8", maxBuffer: 1 << 28});
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});

// A tokenizer.json variant from tests/fixtures/tokenizer/variants.json, in its own directory.
function variant(name) {
  const v = JSON.parse(fs.readFileSync("tests/fixtures/tokenizer/variants.json", "utf8")).variants.find(x => x.name === name);
  const t = JSON.parse(fs.readFileSync(`${DATA}/hf/${v.base}/tokenizer.json`, "utf8"));
  Object.assign(t, v.set || {});
  Object.assign(t.model, v.model || {});
  const dir = path.join(work, "tok-" + name);
  fs.mkdirSync(dir, {recursive: true});
  fs.writeFileSync(path.join(dir, "tokenizer.json"), JSON.stringify(t));
  return dir;
}

// Qwen2.5's tokenizer.json rebuilt from its vocab.json, merges.txt and tokenizer_config.json
// (../shared/data has no tokenizer.json for it) as Qwen2's tokenizer.json files are laid out,
// except their NFC normalizer, which dartquant does not implement (no-op on NFC text such as
// WikiText-2's).
function qwen25Dir() {
  const src = `${DATA}/hf/qwen2.5-0.5b`, dir = path.join(work, "tok-qwen2.5");
  const cfg = JSON.parse(fs.readFileSync(`${src}/tokenizer_config.json`, "utf8"));
  const merges = fs.readFileSync(`${src}/merges.txt`, "utf8").split("\n").filter(l => l && !l.startsWith("#version"));
  const byteLevel = {type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: false};
  const split = JSON.parse(fs.readFileSync("tests/fixtures/tokenizer/variants.json", "utf8")).variants
    .find(x => x.name === "qwen_split").set.pre_tokenizer.pretokenizers[0];
  const t = {version: "1.0", truncation: null, padding: null,
    added_tokens: Object.entries(cfg.added_tokens_decoder).map(([id, a]) => ({id: Number(id), ...a})),
    normalizer: null, pre_tokenizer: {type: "Sequence", pretokenizers: [split, byteLevel]},
    post_processor: byteLevel, decoder: byteLevel,
    model: {type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "",
            fuse_unk: false, byte_fallback: false, ignore_merges: false,
            vocab: JSON.parse(fs.readFileSync(`${src}/vocab.json`, "utf8")), merges}};
  fs.mkdirSync(dir, {recursive: true});
  fs.writeFileSync(path.join(dir, "tokenizer.json"), JSON.stringify(t));
  fs.copyFileSync(`${src}/tokenizer_config.json`, path.join(dir, "tokenizer_config.json"));
  return dir;
}

// A directory holding the family's tokenizer.json (and tokenizer_config.json where it has one).
function familyDir(fam) {
  if (fam === "qwen2.5") return qwen25Dir();
  const src = {smollm2: "smollm2-135m-instruct", tinyllama: "tinyllama-1.1b-chat-v1.0", "llama-2": "llama-2-7b-hf",
               mistral: "mistral-7b-v0.1"}[fam];
  if (!src) return variant(fam === "llama-3" ? "llama3_split" : "qwen_split");
  const dir = path.join(work, "tok-" + fam);
  fs.mkdirSync(dir, {recursive: true});
  for (const f of ["tokenizer.json", "tokenizer_config.json"])
    if (fs.existsSync(`${DATA}/hf/${src}/${f}`)) fs.copyFileSync(`${DATA}/hf/${src}/${f}`, path.join(dir, f));
  return dir;
}

// config.json beside the tokenizer: a base config (or a tiny Llama) with the tokenizer's vocabulary.
function writeConfig(dir, base, layers) {
  const t = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
  const ids = Object.values(t.model.vocab).concat((t.added_tokens || []).map(a => a.id));
  const c = base ? JSON.parse(fs.readFileSync(base, "utf8")) :
    {architectures: ["LlamaForCausalLM"], model_type: "llama", hidden_size: 64, intermediate_size: 128,
     num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, rms_norm_eps: 1e-5,
     rope_theta: 10000.0, tie_word_embeddings: false};
  c.num_hidden_layers = layers;
  c.vocab_size = ids.reduce((a, b) => Math.max(a, b), 0) + 1;
  // BOS/EOS ids of the base config's own, larger vocabulary: use the tokenizer's.
  for (const k of ["bos_token_id", "eos_token_id"]) if (c[k] >= c.vocab_size) delete c[k];
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(c, null, 1));
}

const ggufString = (file, key) => {  // a string value from a GGUF header
  const b = fs.readFileSync(file), k = Buffer.from(key);
  const i = b.indexOf(k) + k.length + 4;
  return b.subarray(i + 8, i + 8 + Number(b.readBigUInt64LE(i))).toString();
};

// ---- 1. tokenizer ids ----
const lines = fs.readFileSync(`${DATA}/wikitext2/wiki.test.raw`, "utf8").split("\n").filter(l => l.trim()).slice(0, LINES);
fs.writeFileSync(path.join(work, "lines.txt"), lines.join("\n") + "\n");
console.log("| tokenizer family | tokenizer.ggml.model / pre | lines | equal ids | equal ids, leading spaces stripped |\n|---|---|---|---|---|");
const stripped = lines.map(l => l.trimStart());
fs.writeFileSync(path.join(work, "stripped.txt"), stripped.join("\n") + "\n");
for (const fam of ["stories260K", "smollm2", "tinyllama", "llama-2", "mistral", "llama-3", "qwen2", "qwen2.5"]) {
  if (!ONLY.test(fam)) continue;
  const gguf = path.join(work, fam + ".gguf");
  let tok;
  if (fam === "stories260K") {
    tok = `${DATA}/stories260K/tok512.bin`;
    dq("export", "--model", `${DATA}/stories260K/stories260K.bin`, "--format", "gguf", "--out", gguf);
  } else {
    const dir = familyDir(fam);
    writeConfig(dir, null, 1);
    dq("synth", "--config", path.join(dir, "config.json"), "--out", path.join(work, "m-" + fam), "--dtype", "f32");
    dq("export", "--model", path.join(work, "m-" + fam), "--format", "gguf", "--out", gguf);
    tok = path.join(dir, "tokenizer.json");
  }
  const model = await llama.loadModel({modelPath: gguf});
  const equal = file => {
    const ours = dq("tokenize", "--tokenizer", tok, "--text-file", path.join(work, file)).trim().split("\n");
    const text = fs.readFileSync(path.join(work, file), "utf8").split("\n");
    return ours.filter((o, i) => JSON.stringify(Array.from(model.tokenize(text[i], false))) === o.replace(/ /g, "")).length;
  };
  const a = equal("lines.txt"), b = equal("stripped.txt");
  await model.dispose();
  console.log(`| ${fam} | ${ggufString(gguf, "tokenizer.ggml.model")} / ${ggufString(gguf, "tokenizer.ggml.pre")} | ${lines.length} | ${a} | ${b} |`);
}
console.log();

// ---- 2. perplexity and greedy text ----
// dartquant's attention is f32 throughout: an f32 cache, and no flash attention, whose CPU kernel
// (llama.cpp's default, "auto") casts an f32 cache's keys and values to f16 and rounds the queries
// to f16 for its dot products.
const F32_KV = {experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32", flashAttention: false};
async function llamaPpl(gguf, text, ctx) {
  const model = await llama.loadModel({modelPath: gguf});
  const context = await model.createContext({contextSize: ctx, batchSize: ctx, sequences: 1, ...F32_KV});
  // tokenize() adds no BOS itself: the GGUF's add_bos_token says whether llama.cpp puts one first.
  const bos = model.tokens.bos, addBos = model.tokens.shouldPrependBosToken;
  const all = (addBos ? [bos] : []).concat(Array.from(model.tokenize(fs.readFileSync(text, "utf8"), false)));
  let sum = 0, n = 0;
  const seq = context.getSequence();
  for (let w = 0; w < WINDOWS; ++w) {
    await seq.clearHistory();  // each window on its own, as llama-perplexity clears the KV cache
    const win = all.slice(w * ctx, (w + 1) * ctx);
    if (addBos) win[0] = bos;
    const input = win.map((t, i) => i >= ctx / 2 && i < ctx - 1
      ? [t, {generateNext: {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}] : t);
    const out = await seq.controlledEvaluate(input);
    for (let i = ctx / 2; i < ctx - 1; ++i, ++n) sum -= Math.log(out[i].next.probabilities.get(win[i + 1]));
  }
  await context.dispose();
  await model.dispose();
  return Math.exp(sum / n);
}

async function llamaGreedy(gguf, prompt, n) {
  const model = await llama.loadModel({modelPath: gguf});
  const context = await model.createContext({contextSize: 256, sequences: 1, ...F32_KV});
  const seq = context.getSequence();
  const ids = (model.tokens.shouldPrependBosToken ? [model.tokens.bos] : []).concat(Array.from(model.tokenize(prompt, false)));
  const out = [];
  let input = ids;
  for (let i = 0; i < n; ++i) {
    const last = input.length - 1;
    const r = await seq.controlledEvaluate(input.map((t, j) => j === last ? [t, {generateNext: {token: true, options: {temperature: 0}}}] : t));
    const next = r[last].next.token;
    if (next === model.tokens.eos) break;  // as dartquant generate stops
    out.push(next);
    input = [next];
  }
  const text = model.detokenize([...ids, ...out]).trim();
  // llama.cpp leaves special tokens out of the text; dartquant decodes as transformers does, with them.
  const bos = model.tokens.shouldPrependBosToken ? model.detokenize([model.tokens.bos], true) : "";
  await context.dispose();
  await model.dispose();
  return {text, bos};
}

console.log("| model | type | ctx x windows | dartquant eval --protocol llama.cpp | llama.cpp | rel. diff | greedy text equal |");
console.log("|---|---|---|---|---|---|---|");
const shapes = {"smollm2-135m": ["smollm2", "smollm2-135m-instruct"], "llama-3.2-1b": ["llama-3", "llama-3.2-1b"],
                "qwen2.5-0.5b": ["qwen2", "qwen2.5-0.5b"]};
for (const name of ["stories260K", ...Object.keys(shapes)]) {
  let src = `${DATA}/stories260K/stories260K.bin`, text = `${DATA}/tinystories/valid.txt`, ctx = 256, prompt = "Once upon a time";
  if (name !== "stories260K") {
    const [fam, cfg] = shapes[name];
    const dir = familyDir(fam);
    writeConfig(dir, `${DATA}/hf/${cfg}/config.json`, 2);
    src = path.join(work, "s-" + name);
    dq("synth", "--config", path.join(dir, "config.json"), "--out", src, "--dtype", "f32", "--seed", "1");
    text = `${DATA}/wikitext2/wiki.test.raw`; ctx = 128; prompt = "The history of the city";
  }
  for (const type of ["f32", "f16", "q8_0", "q4_0", "q4_1"]) {
    if (!ONLY.test(`${name} ${type}`)) continue;
    const gguf = path.join(work, `${name}-${type}.gguf`);
    dq("export", "--model", src, "--format", "gguf", "--gguf-type", type, "--out", gguf);
    const report = path.join(work, `${name}-${type}.eval.json`);  // dartquant never replaces a file
    dq("eval", "--model", gguf, "--ppl", text, "--seqlen", String(ctx), "--max-windows", String(WINDOWS),
       "--protocol", "llama.cpp", "--json", report);
    const ours = JSON.parse(fs.readFileSync(report, "utf8")).ppl;
    const theirs = await llamaPpl(gguf, text, ctx);
    const generated = dq("generate", "--model", gguf, "--prompt", prompt, "-n", "24", "--temperature", "0").trim();
    const {text: b, bos} = await llamaGreedy(gguf, prompt, 24);
    const a = bos && generated.startsWith(bos) ? generated.slice(bos.length).trim() : generated;
    console.log(`| ${name} | ${type} | ${ctx} x ${WINDOWS} | ${ours.toFixed(4)} | ${theirs.toFixed(4)} | ` +
                `${Math.abs(ours / theirs - 1).toExponential(1)} | ${a === b ? "yes" : "no"} |`);
    fs.rmSync(gguf);
  }
}
fs.rmSync(work, {recursive: true, force: true});
