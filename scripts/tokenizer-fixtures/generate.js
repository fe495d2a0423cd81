#!/usr/bin/env node
// Writes the expected token ids that tests/tokenizer/test_hf_tokenizer.cpp compares against, using
// the reference Hugging Face tokenizers library (Rust, via its Node binding @anush008/tokenizers).
//
//   cd scripts/tokenizer-fixtures && npm install && node generate.js [DATA_DIR]
//
// Output, in tests/fixtures/tokenizer/:
//   expected/<variant>.torture.json  per case of torture.json: ids and decoded text (hashes, plus
//                                    the values when short) and the ids special tokens add
//   expected/<variant>.<corpus>.txt  per corpus line: "<n_ids> <fnv64(ids)> <fnv64(decode(ids))>",
//                                    ids without special tokens (hashes keep the files small)
// The real tokenizers run every line of WikiText-2 test and PTB valid; the synthetic variants the
// first VARIANT_LINES lines of WikiText-2 test.
'use strict';
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('@anush008/tokenizers');

const ROOT = path.resolve(__dirname, '../..');
const DATA = path.resolve(process.argv[2] || path.join(ROOT, '../shared/data'));
const FIX = path.join(ROOT, 'tests/fixtures/tokenizer');
const VARIANT_LINES = 600;
const REAL = new Set(['smollm2', 'tinyllama', 'mistral']);

// The tokenizer.json a variant describes (the C++ test builds the same one).
function variantJson(v) {
  const j = JSON.parse(fs.readFileSync(path.join(DATA, 'hf', v.base, 'tokenizer.json'), 'utf8'));
  Object.assign(j, v.set || {});
  Object.assign(j.model, v.model || {});
  if (v.add_tokens) j.added_tokens = j.added_tokens.concat(v.add_tokens);
  if (v.merges_as_pairs) j.model.merges = j.model.merges.map((m) => (typeof m === 'string' ? m.split(' ') : m));
  return j;
}

function lines(file) {
  const text = fs.readFileSync(file, 'utf8');
  const out = text.split('\n');
  if (out.length && out[out.length - 1] === '') out.pop();
  return out;
}

// torture.json cases as the bytes the C++ test passes and the string the reference receives
// (lossy UTF-8 decoding: each maximal ill-formed subsequence becomes U+FFFD).
function tortureStrings() {
  const { cases } = JSON.parse(fs.readFileSync(path.join(FIX, 'torture.json'), 'utf8'));
  return cases.map((c) => {
    const unit = c.hex !== undefined ? Buffer.from(c.hex, 'hex') : Buffer.from(c.text, 'utf8');
    return Buffer.concat(Array(c.repeat || 1).fill(unit)).toString('utf8');
  });
}

const MASK = (1n << 64n) - 1n;
function fnv64(bytes) {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = ((h ^ BigInt(b)) * 0x100000001b3n) & MASK;
  return h.toString(16).padStart(16, '0');
}
function idsBytes(ids) {
  const b = Buffer.alloc(ids.length * 4);
  ids.forEach((id, i) => b.writeInt32LE(id, i * 4));
  return b;
}

// Short results are stored in full (readable diagnostics); long ones as hashes. The special-token
// encoding is stored as what is added before and after the plain ids.
const FULL_MAX = 200;
function tortureRow(plain, special, decoded) {
  const row = { n: plain.length, ids_hash: fnv64(idsBytes(plain)), decoded_hash: fnv64(Buffer.from(decoded, 'utf8')) };
  if (plain.length <= FULL_MAX) row.ids = plain;
  if (decoded.length <= FULL_MAX) row.decoded = decoded;
  const k = special.length - plain.length;
  let at = -1;
  for (let s = 0; s <= k && at < 0; ++s) if (plain.every((id, i) => special[s + i] === id)) at = s;
  if (k < 0 || at < 0) throw new Error('special-token encoding does not contain the plain one');
  row.special_prefix = special.slice(0, at);
  row.special_suffix = special.slice(at + plain.length);
  return row;
}

async function encodeAll(tok, texts, special) {
  const encs = await tok.encodeBatch(texts, { addSpecialTokens: special });
  return encs.map((e) => e.getIds());
}

async function main() {
  const { variants } = JSON.parse(fs.readFileSync(path.join(FIX, 'variants.json'), 'utf8'));
  const corpora = {
    wikitext2: lines(path.join(DATA, 'wikitext2/wiki.test.raw')),
    ptb: lines(path.join(DATA, 'ptb/ptb.valid.txt')),
  };
  const torture = tortureStrings();
  fs.mkdirSync(path.join(FIX, 'expected'), { recursive: true });
  for (const v of variants) {
    const tok = Tokenizer.fromString(JSON.stringify(variantJson(v)));
    const plain = await encodeAll(tok, torture, false);
    const special = await encodeAll(tok, torture, true);
    const decoded = await tok.decodeBatch(plain, false);
    const rows = torture.map((_, i) => JSON.stringify(tortureRow(plain[i], special[i], decoded[i])));
    fs.writeFileSync(path.join(FIX, 'expected', `${v.name}.torture.json`), '[\n' + rows.join(',\n') + '\n]\n');
    for (const [name, all] of Object.entries(corpora)) {
      if (!REAL.has(v.name) && name !== 'wikitext2') continue;
      const texts = REAL.has(v.name) ? all : all.slice(0, VARIANT_LINES);
      const ids = await encodeAll(tok, texts, false);
      const dec = await tok.decodeBatch(ids, false);
      const out = ids.map((x, i) => `${x.length} ${fnv64(idsBytes(x))} ${fnv64(Buffer.from(dec[i], 'utf8'))}`);
      fs.writeFileSync(path.join(FIX, 'expected', `${v.name}.${name}.txt`), out.join('\n') + '\n');
    }
    console.log(`${v.name}: done`);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
