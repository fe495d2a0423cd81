#!/usr/bin/env node
// Tokens per second encoding every line of WikiText-2 test (no special tokens): the reference
// Hugging Face tokenizers library against dartquant's bench_tokenizer, in one run, as a ratio.
//
//   cd scripts/tokenizer-fixtures && npm install
//   node bench.js [BENCH_BINARY] [DATA_DIR]      (default ../../build/bench/bench_tokenizer)
//
// The reference runs encodeBatch over all lines (its fastest path) twice: with one worker thread
// (RAYON_NUM_THREADS=1, like ours) and with its default thread pool. Both the wall-clock and the
// process CPU rates are printed; on a busy machine the CPU figures are the steadier ones.
'use strict';
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const ROOT = path.resolve(__dirname, '../..');
const MODELS = { smollm2: 'smollm2-135m-instruct', tinyllama: 'tinyllama-1.1b-chat-v1.0', mistral: 'mistral-7b-v0.1' };

async function reference(dataDir, reps) {
  const { Tokenizer } = require('@anush008/tokenizers');
  const text = fs.readFileSync(path.join(dataDir, 'wikitext2/wiki.test.raw'), 'utf8');
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  const out = {};
  for (const [name, dir] of Object.entries(MODELS)) {
    const tok = Tokenizer.fromFile(path.join(dataDir, 'hf', dir, 'tokenizer.json'));
    await tok.encodeBatch(lines, { addSpecialTokens: false });  // warm the word cache
    let tokens = 0;
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    for (let r = 0; r < reps; ++r)
      for (const e of await tok.encodeBatch(lines, { addSpecialTokens: false })) tokens += e.getLength();
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    const c = process.cpuUsage(c0);
    out[name] = { tokens_per_rep: tokens / reps, wall_per_s: tokens / wall, cpu_per_s: tokens / ((c.user + c.system) / 1e6) };
  }
  return out;
}

function ours(binary, dataDir) {
  const json = execFileSync(binary, ['--benchmark_filter=Encode', '--benchmark_format=json', '--benchmark_min_time=2'],
    { env: { ...process.env, DQ_DATA_DIR: dataDir }, maxBuffer: 1 << 24, stdio: ['ignore', 'pipe', 'ignore'] });
  const out = {};
  for (const b of JSON.parse(json).benchmarks) {
    const name = b.name.split('/')[1];
    const scale = { ns: 1e-9, us: 1e-6, ms: 1e-3, s: 1 }[b.time_unit];
    out[name] = { tokens_per_rep: b.tokens, wall_per_s: b.tokens / (b.real_time * scale), cpu_per_s: b.tokens / (b.cpu_time * scale) };
  }
  return out;
}

async function main() {
  if (process.argv[2] === '--reference-only') {
    process.stdout.write(JSON.stringify(await reference(process.argv[3], 3)));
    return;
  }
  const binary = path.resolve(process.argv[2] || path.join(ROOT, 'build/bench/bench_tokenizer'));
  const dataDir = path.resolve(process.argv[3] || path.join(ROOT, '../shared/data'));
  const runRef = (env) => JSON.parse(execFileSync(process.execPath, [__filename, '--reference-only', dataDir],
    { env: { ...process.env, ...env }, maxBuffer: 1 << 24 }));
  const ref1 = runRef({ RAYON_NUM_THREADS: '1' });
  const refN = runRef({});
  const us = ours(binary, dataDir);
  const M = (x) => (x / 1e6).toFixed(2).padStart(6) + 'M';
  console.log('tokens/s encoding WikiText-2 test (wall | cpu); ratio = dartquant / reference');
  for (const name of Object.keys(MODELS)) {
    const o = us[name], a = ref1[name], b = refN[name];
    if (o.tokens_per_rep !== a.tokens_per_rep) console.log(`  ${name}: token counts differ (${o.tokens_per_rep} vs ${a.tokens_per_rep})`);
    console.log(`${name.padEnd(10)} dartquant ${M(o.wall_per_s)} | ${M(o.cpu_per_s)}` +
      `   reference 1 thread ${M(a.wall_per_s)} | ${M(a.cpu_per_s)}  ratio ${(o.wall_per_s / a.wall_per_s).toFixed(2)}x | ${(o.cpu_per_s / a.cpu_per_s).toFixed(2)}x` +
      `   reference all threads ${M(b.wall_per_s)} wall  ratio ${(o.wall_per_s / b.wall_per_s).toFixed(2)}x`);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
