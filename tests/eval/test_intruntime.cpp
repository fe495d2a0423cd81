// The integer runtime against the fake-quant reference on stories260K: every linear, the whole model
// and the perplexity bit for bit, identical results on every kernel path, and the paths reported.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <tuple>

#include "eval/perplexity.h"
#include "eval/runtime.h"
#include "quant/quantize_model.h"
#include "quant/quantizer.h"
#include "tensor/kernels.h"
#include "model/model.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// One scratch directory for the program, removed at exit.
struct Scratch {
  fs::path path = fs::temp_directory_path() / ("dq_intruntime_" + std::to_string(getpid()));
  Scratch() { fs::create_directories(path); }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& n) const { return (path / n).string(); }
};

// Quantized stories260K directories, made once per program.
const std::string& quantized(const std::string& name, const std::string& args) {
  static Scratch dir;
  static std::map<std::string, std::string> done;
  auto it = done.find(name);
  if (it != done.end()) return it->second;
  const std::string out = dir / name;
  const CliResult r = run_cli_logged("quantize --model " + kStories + " --out " + out + " " + args, dir / (name + "-log"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return done.emplace(name, out).first->second;
}

// Copies of every site's activation, as the hooks after it will see it.
struct Capture : Hook {
  std::map<std::pair<int, int>, Matrix> seen;
  void at(Site s, int layer, Matrix& x) override { seen[{int(s), layer}] = x; }
};

const std::vector<int32_t> kTokens{1, 403, 407, 261, 378, 275, 3, 9, 14, 300, 120, 45, 77, 2, 411, 89};

}  // namespace

// Each integer linear, fed the input its site sees on the integer path, against the reference's
// product of the fake-quantized input with the stored (dequantized) weight: the same bits.
TEST(IntRuntime, EveryLinearReproducesTheFakeQuantProduct) {
  const std::pair<const char*, const char*> runs[] = {
      {"w8a8", "--w-bits 8 --a-bits 8"},
      {"w4a8", "--w-bits 4 --a-bits 8 --rotation quarot"},
      {"w4a4kv4g24", "--w-bits 4 --a-bits 4 --kv-bits 4 --rotation quarot --w-group 24 --w-asym"},
      {"w3a6", "--w-bits 3 --a-bits 6 --rotation quarot --w-group 40"}};
  for (const auto& [name, args] : runs) {
    SCOPED_TRACE(args);
    const std::string dir = quantized(name, args);
    Model m = load_model(dir);
    ASSERT_EQ(use_integer_runtime(m), "");
    RuntimeHooks rt(m);
    EXPECT_STREQ(rt.path(), "integer");
    Capture c;
    Hooks hooks = rt.hooks();
    hooks.push_back(&c);  // last: sees what the integer linears read (after R4, not quantized)
    forward(m, kTokens, 2, 8, hooks);
    const ActQuantConfig q = quant_config(m);
    int checked = 0;
    for (int l = 0; l < m.config.num_layers; ++l) {
      const std::pair<Site, const char*> linears[] = {
          {Site::AttnIn, "self_attn.q_proj.weight"}, {Site::AttnIn, "self_attn.k_proj.weight"},
          {Site::AttnIn, "self_attn.v_proj.weight"}, {Site::OprojIn, "self_attn.o_proj.weight"},
          {Site::MlpIn, "mlp.gate_proj.weight"},     {Site::MlpIn, "mlp.up_proj.weight"},
          {Site::DownIn, "mlp.down_proj.weight"}};
      for (const auto& [site, suffix] : linears) {
        const std::string wname = layer_name(l, suffix);
        const auto packed = m.weights.packed(wname);
        ASSERT_TRUE(packed) << wname;
        const Matrix& x = c.seen.at({int(site), l});
        const QuantSpec spec = q.input(m.config, site);
        Matrix y, ref, xq = x;
        packed->apply(x, y);
        fake_quantize(xq, spec);
        const Matrix w = m.weights.get(wname);
        exact_linear(xq, w, column_blocks(w.cols, q.weight_group, spec.group), ref);
        EXPECT_EQ(y.data, ref.data) << wname;
        ++checked;
      }
    }
    EXPECT_EQ(checked, 7 * m.config.num_layers);
  }
}

TEST(IntRuntime, EveryKernelPathGivesIdenticalOutputs) {
  const std::string dir = quantized("w4a4", "--w-bits 4 --a-bits 4 --kv-bits 8 --rotation quarot --w-group 24");
  Matrix first;
  for (IntPath p : supported_int_paths()) {
    Model m = load_model(dir);
    ASSERT_EQ(use_integer_runtime(m, p), "");
    RuntimeHooks rt(m);
    const Matrix y = forward(m, kTokens, 2, 8, rt.hooks());
    if (first.empty())
      first = y;
    else
      EXPECT_EQ(y.data, first.data) << int_path_name(p);
  }
}

// The whole model on both paths, 8 windows of the validation text: the same final hidden states,
// bit for bit, for every bit width and grouping (W8A8, W4A8, W4A4 with KV16, KV4 and KV8, weights
// per channel and in groups of 24 with a partial last group, asymmetric weights, W3A6 in groups of
// 40), o_proj's input one group per head: every code of every site is the reference's.
TEST(IntRuntime, WholeModelReproducesFakeQuantBitForBit) {
  const std::pair<const char*, const char*> runs[] = {
      {"w8a8", "--w-bits 8 --a-bits 8"},
      {"w4a8", "--w-bits 4 --a-bits 8 --rotation quarot"},
      {"w4a4kv16", "--w-bits 4 --a-bits 4 --rotation quarot"},
      {"w4a4kv4g24", "--w-bits 4 --a-bits 4 --kv-bits 4 --rotation quarot --w-group 24 --w-asym"},
      {"w4a4", "--w-bits 4 --a-bits 4 --kv-bits 8 --rotation quarot --w-group 24"},
      {"w3a6", "--w-bits 3 --a-bits 6 --rotation quarot --w-group 40"}};
  constexpr int kWindows = 8, kSeq = 256;
  for (const auto& [name, args] : runs) {
    SCOPED_TRACE(args);
    const std::string dir = quantized(name, args);
    std::map<bool, Matrix> out;  // [integer]
    for (bool integer : {false, true}) {
      Model m = load_model(dir);
      if (integer) {
        ASSERT_EQ(use_integer_runtime(m), "");
      }
      RuntimeHooks rt(m);
      ASSERT_STREQ(rt.path(), integer ? "integer" : "fake-quant");
      const std::vector<int32_t> ids = tokenize_file(m, kValid);
      out[integer] = forward(m, std::vector<int32_t>(ids.begin(), ids.begin() + kWindows * kSeq), kWindows, kSeq,
                             rt.hooks());
    }
    EXPECT_EQ(out[true].data, out[false].data);
  }
}

// Perplexity through the CLI on both paths, DartQuant rotations with online R3/R4, GPTQ weights:
// the same number (docs/FORMAT.md has the full-text figures).
TEST(IntRuntime, PerplexityEqualsFakeQuant) {
  const std::string calib = " --rotation dartquant --w-method gptq --calib " + kCalib + " --nsamples 8 --calib-seqlen 128 --epochs 2";
  const std::pair<const char*, const char*> runs[] = {
      {"dq_w8a8", "--w-bits 8 --a-bits 8"},
      {"dq_w4a8", "--w-bits 4 --a-bits 8"},
      {"dq_w4a4kv16", "--w-bits 4 --a-bits 4"},
      {"dq_w4a4kv4", "--w-bits 4 --a-bits 4 --kv-bits 4"}};
  for (const auto& [name, args] : runs) {
    SCOPED_TRACE(name);
    const std::string dir = quantized(name, args + calib);
    ScratchDir tmp;
    const std::string ppl = " --model " + dir + " --ppl " + kValid + " --seqlen 256 --max-windows 6";
    const json integer = cli_eval(ppl, tmp), fake = cli_eval("--fake-quant" + ppl, tmp);
    ASSERT_EQ(integer.at("path"), "integer");
    ASSERT_EQ(fake.at("path"), "fake-quant");
    EXPECT_EQ(integer.at("ppl").get<double>(), fake.at("ppl").get<double>());
  }
}

// eval --fp-sites (a diagnostic: which site's activation quantization costs what). With every
// linear input listed, a W4A4 model scores as the W4A16 model of the same rotation and RTN weights
// (the same stored weights; products summed in another order, hence the tolerance); with one site
// listed it scores differently from the full W4A4 model; the report says what ran.
TEST(IntRuntime, FpSitesLeaveThoseActivationsUnquantized) {
  const std::string w4a4 = quantized("qr_w4a4", "--rotation quarot --w-bits 4 --a-bits 4");
  const std::string w4a16 = quantized("qr_w4a16", "--rotation quarot --w-bits 4");
  ScratchDir tmp;
  const std::string ppl = " --ppl " + kValid + " --seqlen 256 --max-windows 4";
  const json all = cli_eval("--model " + w4a4 + " --fp-sites attn_in,o_proj_in,mlp_in,down_in" + ppl, tmp);
  const json weights_only = cli_eval("--model " + w4a16 + ppl, tmp);
  const json full = cli_eval("--model " + w4a4 + ppl, tmp);
  const json down = cli_eval("--model " + w4a4 + " --fp-sites down_in" + ppl, tmp);
  ASSERT_EQ(all.at("path"), "fake-quant");
  EXPECT_EQ(all.at("integer_unavailable"), "--fp-sites");
  EXPECT_EQ(down.at("fp_sites"), json::array({"down_in"}));
  EXPECT_NEAR(all.at("ppl").get<double>(), weights_only.at("ppl").get<double>(), 1e-5 * weights_only.at("ppl").get<double>());
  EXPECT_GT(std::abs(down.at("ppl").get<double>() - full.at("ppl").get<double>()), 1e-3);
  EXPECT_GT(std::abs(all.at("ppl").get<double>() - full.at("ppl").get<double>()), 1e-3);
  EXPECT_NE(run_cli("eval --model " + w4a4 + " --fp-sites q" + ppl, tmp).exit_code, 0);
  EXPECT_NE(run_cli("eval --model " + w4a16 + " --fp-sites down_in" + ppl, tmp).exit_code, 0);
}

// The decoded rows of a quantized KV cache: layer l's keys or values, tokens x kv_dim.
Matrix cached(const KvCache& cache, const ModelConfig& c, bool keys, int l) {
  const KvRows& rows = (keys ? cache.k : cache.v)[size_t(l)];
  Matrix out(rows.tokens, c.kv_dim());
  cache.quantizer->decode(rows.codes.data(), rows.tokens, c.kv_dim(), out.data.data());
  return out;
}

// A W4A4KV4 model (R3 on, so the quantizer follows a rotation) on both paths: the quantized cache
// holds 4-bit codes two per byte with a scale and zero point per token and head, and its decoded
// rows are exactly the K/V fake quantization's output on the same path, and the integer path's rows
// are the fake-quant reference's.
TEST(IntRuntime, QuantizedKvCacheHoldsTheFakeQuantizedKv) {
  const std::string dir = quantized("w4a4kv4g24", "--w-bits 4 --a-bits 4 --kv-bits 4 --rotation quarot --w-group 24 --w-asym");
  const std::vector<int32_t> prompt(kTokens.begin(), kTokens.begin() + 12);
  std::map<bool, Capture> seen;  // [integer]: K/V after every runtime hook, no cache
  std::map<std::tuple<bool, bool, int>, Matrix> decoded;  // [integer, keys, layer]
  for (bool integer : {false, true}) {
    Model m = load_model(dir);
    if (integer) {
      ASSERT_EQ(use_integer_runtime(m), "");
    }
    const ModelConfig& c = m.config;
    ASSERT_TRUE(m.quantization.at("online").at("r3").get<bool>());
    RuntimeHooks rt(m);
    Hooks hooks = rt.hooks();
    hooks.push_back(&seen[integer]);
    forward(m, prompt, 1, int(prompt.size()), hooks);
    KvCache cache = rt.kv_cache();
    ASSERT_TRUE(cache.quantizer);
    forward(m, prompt, 1, int(prompt.size()), rt.hooks(), &cache);
    KvCache stray = rt.kv_cache();  // its quantizer must be among the hooks that run with it
    EXPECT_THROW(forward(m, prompt, 1, int(prompt.size()), {}, &stray), Error);
    const int64_t row_bytes = c.kv_dim() / 2 + c.num_kv_heads * 5;  // codes, f32 scales, u8 zeros
    EXPECT_EQ(cache.quantizer->row_bytes(c.kv_dim()), row_bytes);
    EXPECT_EQ(cache.bytes(), size_t(2 * c.num_layers * int64_t(prompt.size()) * row_bytes));
    for (bool keys : {true, false})
      for (int l = 0; l < c.num_layers; ++l) {
        const Matrix& d = decoded[{integer, keys, l}] = cached(cache, c, keys, l);
        EXPECT_EQ(d.data, seen[integer].seen.at({int(keys ? Site::K : Site::V), l}).data) << l;
      }
  }
  for (const auto& [key, a] : decoded) {
    const auto [integer, keys, l] = key;
    if (integer) {
      EXPECT_EQ(a.data, decoded.at({false, keys, l}).data) << (keys ? "K" : "V") << " layer " << l;
    }
  }
}

namespace {

// The W4A4 model with a 4-bit KV cache (R3, weights in groups of 24, asymmetric) and the W4A8 one
// with an f32 cache (KV16), each on the fake-quant and on the integer path: fn(model, its runtime
// hooks, integer).
template <class Fn>
void for_each_kv_run(Fn fn) {
  const std::pair<const char*, const char*> runs[] = {
      {"w4a4kv4g24", "--w-bits 4 --a-bits 4 --kv-bits 4 --rotation quarot --w-group 24 --w-asym"},
      {"w4a8", "--w-bits 4 --a-bits 8 --rotation quarot"}};
  for (const auto& [name, args] : runs)
    for (bool integer : {false, true}) {
      SCOPED_TRACE(std::string(name) + (integer ? " integer" : " fake-quant"));
      Model m = load_model(quantized(name, args));
      if (integer) {
        ASSERT_EQ(use_integer_runtime(m), "");
      }
      const RuntimeHooks rt(m);
      fn(m, rt, integer);
    }
}

}  // namespace

// Generation with the KV cache against recomputing the whole sequence, on the fake-quant and the
// integer path, with the 4-bit quantized cache and with an f32 one (KV16): the same greedy tokens.
// Decoding one token at a time changes the product shapes (float rounding only), so the cached rows
// match recomputation's except where a value sits on a rounding boundary; the first layer's K/V do
// not depend on other tokens and on the integer path (exact sums) are bit-identical.
TEST(IntRuntime, CachedDecodingMatchesRecomputation) {
  for_each_kv_run([](const Model& m, const RuntimeHooks& rt, bool integer) {
    const bool kv4 = m.quantization.at("kv_cache").at("bits") == 4;
    auto greedy = [&](const Matrix& x) { return greedy_next(m, x); };
    std::vector<int32_t> full{1, 403, 407}, fresh = full;
    KvCache cache = rt.kv_cache();
    ASSERT_EQ(cache.quantizer != nullptr, kv4);
    for (int i = 0; i < 24; ++i) {
      Capture recomputed;
      Hooks hooks = rt.hooks();
      hooks.push_back(&recomputed);
      const int32_t a = greedy(forward(m, full, 1, int(full.size()), hooks));
      const int32_t b = greedy(forward(m, fresh, 1, int(fresh.size()), rt.hooks(), &cache));
      ASSERT_EQ(a, b) << "step " << i;
      ASSERT_EQ(cache.tokens(), int64_t(full.size()));
      const Matrix& k0 = recomputed.seen.at({int(Site::K), 0});
      if (integer) {
        EXPECT_EQ(kv4 ? cached(cache, m.config, true, 0).data : cache.k[0].f32.data, k0.data);
      }
      full.push_back(a);
      fresh = {b};
    }
  });
}

// A prompt run in chunks against the KV cache (prefill, as bench and generate run prompts) against
// one pass over it without a cache, on both paths, with the 4-bit cache and with an f32 one (KV16):
// the chunks' final-norm rows are the one pass's last rows, bit for bit. Every operation but
// attention works per token (the integer products are exact, the reference's are in double), the
// cached rows are the K/V hooks' output, and chunks of a multiple of 64 tokens give attention the
// very query blocks and products of the one pass. 200 tokens in chunks of 64 leave a last chunk of 8.
TEST(IntRuntime, ChunkedPrefillEqualsOnePass) {
  for_each_kv_run([](const Model& m, const RuntimeHooks& rt, bool) {
    const std::vector<int32_t> ids = tokenize_file(m, kValid);
    const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 200);
    const Matrix whole = forward(m, prompt, 1, int(prompt.size()), rt.hooks());
    KvCache cache = rt.kv_cache();
    const Matrix last = prefill(m, prompt, rt.hooks(), cache, 64);
    ASSERT_EQ(cache.tokens(), int64_t(prompt.size()));
    ASSERT_EQ(last.rows, 8);
    const std::vector<float> tail(whole.data.end() - int64_t(last.size()), whole.data.end());
    EXPECT_EQ(last.data, tail);
  });
}
