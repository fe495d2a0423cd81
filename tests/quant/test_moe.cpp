// Mixture-of-experts models (Mixtral, DeepSeek-MoE) on small synthetic checkpoints: routing against
// a naive per-token reference written here, fused rotations (R1, R2, per-expert R4) leaving the
// log-probabilities unchanged, GPTQ Hessians built only from routed tokens, the full quantize
// pipeline through the CLI, and the memory plan of the exact Mixtral-8x7B shapes.
//
// Tolerances: fp32 throughout. The MLP comparison sums the same products in another order
// (relative 1e-6 on O(1) values; 1e-4 is loose). Rotations: as in test_rotate, 1e-3 on
// log-probabilities, while a wrong fold moves them by 0.1 or more. Routing itself is discrete, so a
// near tie could flip under rotation; the synthetic routers (N(0, 1/hidden) rows) make that rare
// and the tests use a few hundred tokens.
#include <gtest/gtest.h>

#include "test_helpers.h"
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "model/export.h"
#include "model/synth.h"
#include "quant/plan.h"
#include "quant/quantize_model.h"
#include "rotate/rotate.h"
#include "tensor/kernels.h"

using namespace dq;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using test::kData;
using test::kValid;
using test::slurp;
const std::string kMixtral = kData + "/hf/mixtral-8x7b-v0.1";

using Scratch = test::ScratchDir;


// Mixtral-8x7B's config cut down (8 experts, top-2 kept), with its tokenizer beside it.
std::string small_mixtral(const Scratch& s) {
  return test::cut_config(s, "mixtral-8x7b-v0.1", {{"hidden_size", 64}, {"intermediate_size", 128}, {"num_attention_heads", 4},
                                                   {"num_key_value_heads", 2}, {"num_hidden_layers", 2}},
                          "cfg_mixtral");
}

// DeepSeek-MoE-16B's structure scaled down: a dense first layer, 8 fine-grained routed experts
// (top-3, probabilities not renormalised), 2 shared experts. Mixtral's tokenizer, for real text.
std::string small_deepseek(const Scratch& s, bool norm_topk = false) {
  json j = {{"architectures", {"DeepseekForCausalLM"}},
            {"model_type", "deepseek"},
            {"vocab_size", 32000},
            {"hidden_size", 64},
            {"intermediate_size", 192},
            {"moe_intermediate_size", 32},
            {"num_hidden_layers", 3},
            {"num_attention_heads", 4},
            {"num_key_value_heads", 4},
            {"n_routed_experts", 8},
            {"n_shared_experts", 2},
            {"num_experts_per_tok", 3},
            {"first_k_dense_replace", 1},
            {"moe_layer_freq", 1},
            {"norm_topk_prob", norm_topk},
            {"scoring_func", "softmax"},
            {"max_position_embeddings", 4096},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 10000.0},
            {"tie_word_embeddings", false}};
  fs::create_directories(s.path() / "cfg_deepseek");
  test::spit(s / "cfg_deepseek/config.json", j.dump(2));
  fs::copy_file(kMixtral + "/tokenizer.json", s / "cfg_deepseek/tokenizer.json");
  return s / "cfg_deepseek/config.json";
}

Model synth_and_load(const std::string& config, const std::string& dir, int outliers = 0) {
  SynthOptions o;
  o.dtype = DType::F32;
  o.seed = 7;
  o.outliers = outliers;
  synth_model(config, dir, o);
  return load_model(dir);
}

Matrix random_rows(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  Matrix x(rows, cols);
  for (float& v : x.data) v = n(rng);
  return x;
}

// The naive reference: per token, softmax over the router logits in double, the k largest (lower
// index first on ties), renormalised as the config says, then each chosen expert's SwiGLU times its
// weight, plus the always-on expert.
struct NaiveChoice {
  std::vector<int> experts;
  std::vector<double> weights;
};
NaiveChoice naive_route(const ModelConfig& c, const Matrix& router, const float* h) {
  const int E = int(router.rows), D = int(router.cols);
  std::vector<double> p(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(router(e, d)) * h[d];
    p[size_t(e)] = s;
  }
  const double mx = *std::max_element(p.begin(), p.end());
  double z = 0;
  for (double& v : p) z += (v = std::exp(v - mx));
  for (double& v : p) v /= z;
  std::vector<int> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[size_t(a)] > p[size_t(b)]; });
  NaiveChoice ch;
  double sum = 0;
  for (int i = 0; i < c.experts_per_tok; ++i) sum += p[size_t(order[size_t(i)])];
  for (int i = 0; i < c.experts_per_tok; ++i) {
    ch.experts.push_back(order[size_t(i)]);
    ch.weights.push_back(c.norm_topk_prob ? p[size_t(order[size_t(i)])] / sum : p[size_t(order[size_t(i)])]);
  }
  return ch;
}

std::vector<double> naive_swiglu(const ExpertWeights& e, const float* h) {
  const int64_t F = e.gate.rows, D = e.gate.cols;
  std::vector<double> a(static_cast<size_t>(F)), out(static_cast<size_t>(e.down.rows), 0.0);
  for (int64_t f = 0; f < F; ++f) {
    double g = 0, u = 0;
    for (int64_t d = 0; d < D; ++d) {
      g += double(e.gate(f, d)) * h[d];
      u += double(e.up(f, d)) * h[d];
    }
    a[size_t(f)] = g / (1 + std::exp(-g)) * u;
  }
  for (int64_t o = 0; o < e.down.rows; ++o)
    for (int64_t f = 0; f < F; ++f) out[size_t(o)] += double(e.down(o, f)) * a[size_t(f)];
  return out;
}

// x + MLP(norm(x)) of one layer through layer_forward, with the attention branch switched off
// (o_proj zero), against the naive per-token reference.
void check_moe_layer(const Model& m, int layer) {
  const ModelConfig& c = m.config;
  LayerWeights w = load_layer(m, layer);
  ASSERT_EQ(w.router.rows, c.is_moe_layer(layer) ? c.num_experts : 0);
  w.o = Matrix(w.o.rows, w.o.cols);
  const int batch = 2, seq = 40;
  Matrix x = random_rows(batch * seq, c.hidden_size, 100 + uint64_t(layer));
  Matrix out = x;
  layer_forward(c, w, layer, out, batch, seq, {});
  Matrix h = x;
  rmsnorm(h, w.mlp_norm.data.data(), c.rms_eps);
  const int routed = int(w.router.rows);
  double worst = 0;
  for (int64_t t = 0; t < x.rows; ++t) {
    std::vector<double> y(static_cast<size_t>(c.hidden_size), 0.0);
    if (routed > 0) {
      NaiveChoice ch = naive_route(c, w.router, h.row(t));
      double wsum = 0;
      for (size_t i = 0; i < ch.experts.size(); ++i) {
        std::vector<double> e = naive_swiglu(w.experts[size_t(ch.experts[i])], h.row(t));
        for (size_t d = 0; d < y.size(); ++d) y[d] += ch.weights[i] * e[d];
        wsum += ch.weights[i];
      }
      if (c.norm_topk_prob) EXPECT_NEAR(wsum, 1.0, 1e-9);
      else EXPECT_LT(wsum, 1.0);
    }
    for (size_t e = size_t(routed); e < w.experts.size(); ++e) {
      std::vector<double> a = naive_swiglu(w.experts[e], h.row(t));
      for (size_t d = 0; d < y.size(); ++d) y[d] += a[d];
    }
    for (int64_t d = 0; d < c.hidden_size; ++d)
      worst = std::max(worst, std::abs(double(out(t, d)) - (double(x(t, d)) + y[size_t(d)])));
  }
  EXPECT_LT(worst, 1e-4) << c.architecture << " layer " << layer;
}

Matrix all_log_probs(const Model& m, const std::vector<int32_t>& tokens, int batch, int seq, const Hooks& hooks = {}) {
  Matrix x = forward(m, tokens, batch, seq, hooks);
  return log_probs(m, x, 0, x.rows);
}

double max_abs_diff(const Matrix& a, const Matrix& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(double(a.data[i]) - double(b.data[i])));
  return d;
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> u(0, vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = u(rng);
  return t;
}

}  // namespace

TEST(Moe, ConfigAndNames) {
  Scratch s;
  ModelConfig mx = load_config(kMixtral + "/config.json");
  EXPECT_EQ(mx.num_experts, 8);
  EXPECT_EQ(mx.experts_per_tok, 2);
  EXPECT_EQ(mx.moe_intermediate, 14336);
  EXPECT_TRUE(mx.norm_topk_prob);
  EXPECT_TRUE(mx.is_moe_layer(0));
  auto e = mlp_experts(mx, 3);
  ASSERT_EQ(e.size(), 8u);
  EXPECT_EQ(e[5].gate, "model.layers.3.block_sparse_moe.experts.5.w1.weight");
  EXPECT_EQ(e[5].up, "model.layers.3.block_sparse_moe.experts.5.w3.weight");
  EXPECT_EQ(e[5].down, "model.layers.3.block_sparse_moe.experts.5.w2.weight");
  EXPECT_EQ(router_name(mx, 3), "model.layers.3.block_sparse_moe.gate.weight");

  ModelConfig ds = load_config(small_deepseek(s));
  EXPECT_FALSE(ds.is_moe_layer(0));
  EXPECT_TRUE(ds.is_moe_layer(1));
  EXPECT_FALSE(ds.norm_topk_prob);
  auto d0 = mlp_experts(ds, 0), d1 = mlp_experts(ds, 1);
  ASSERT_EQ(d0.size(), 1u);
  EXPECT_EQ(d0[0].gate, "model.layers.0.mlp.gate_proj.weight");
  EXPECT_EQ(d0[0].intermediate, 192);
  ASSERT_EQ(d1.size(), 9u);
  EXPECT_EQ(d1[2].down, "model.layers.1.mlp.experts.2.down_proj.weight");
  EXPECT_EQ(d1[8].up, "model.layers.1.mlp.shared_experts.up_proj.weight");
  EXPECT_EQ(d1[8].intermediate, 64);
  EXPECT_FALSE(d1[8].routed);
  EXPECT_EQ(router_name(ds, 1), "model.layers.1.mlp.gate.weight");
  EXPECT_EQ(router_name(ds, 0), "");
}

TEST(Moe, RoutingMatchesNaiveReference) {
  Scratch s;
  Model mx = synth_and_load(small_mixtral(s), s / "mixtral");
  check_moe_layer(mx, 0);
  check_moe_layer(mx, 1);
  Model ds = synth_and_load(small_deepseek(s), s / "deepseek");
  check_moe_layer(ds, 0);  // dense: one always-on expert
  check_moe_layer(ds, 2);
  // llama.cpp's "llama" holds Mixtral's experts (tests/model/test_export.cpp), not DeepSeek's.
  try {
    export_gguf(ds, s / "ds.gguf", {});
    ADD_FAILURE() << "GGUF export of a DeepSeek-MoE model should be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shared experts"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(s / "ds.gguf"));
  fs::remove_all(s.path() / "cfg_deepseek");
  Model dsn = synth_and_load(small_deepseek(s, true), s / "deepseek_norm");
  check_moe_layer(dsn, 1);
}

TEST(Moe, FusedRotationsLeaveLogitsUnchanged) {
  Scratch s;
  for (bool deepseek : {false, true}) {
    const std::string cfg = deepseek ? small_deepseek(s) : small_mixtral(s);
    Model fp = synth_and_load(cfg, s / (deepseek ? "ds" : "mx"), 2);
    const int batch = 2, seq = 48;
    const std::vector<int32_t> tokens = random_tokens(batch * seq, fp.config.vocab_size, 3);
    const Matrix ref = all_log_probs(fp, tokens, batch, seq);

    Model rot = fp;
    fuse_norms(rot);
    apply_rotations(rot, random_hadamard_rotations(rot.config, 11));
    EXPECT_LT(max_abs_diff(all_log_probs(rot, tokens, batch, seq), ref), 1e-3) << "R1 + R2, deepseek=" << deepseek;
    fold_r4(rot);
    OnlineHadamard r4(rot.config, false, true);
    EXPECT_TRUE(r4.genuine());
    EXPECT_LT(max_abs_diff(all_log_probs(rot, tokens, batch, seq, {&r4}), ref), 1e-3) << "R4, deepseek=" << deepseek;
    // Negative control: R4 folded but not applied online moves the outputs.
    EXPECT_GT(max_abs_diff(all_log_probs(rot, tokens, batch, seq), ref), 0.05);
  }
}

TEST(Moe, HessiansCountOnlyRoutedTokens) {
  Scratch s;
  Model m = synth_and_load(small_deepseek(s), s / "ds");
  const ModelConfig& c = m.config;
  const int layer = 1, batch = 2, seq = 50;
  LayerWeights w = load_layer(m, layer);
  const int n = int(w.experts.size());
  HessianHook hh(c, layer, true, 0, n);
  Matrix x = random_rows(batch * seq, c.hidden_size, 5);
  Matrix h = x;
  // The norm output the experts read: attention changes x first, so take it from the hook.
  struct Grab : Hook {
    Matrix h;
    void at(Site site, int, Matrix& x) override {
      if (site == Site::MlpIn) h = x;
    }
  } grab;
  layer_forward(c, w, layer, x, batch, seq, {&grab, &hh});
  std::vector<std::vector<int64_t>> routed(static_cast<size_t>(c.num_experts));
  for (int64_t t = 0; t < grab.h.rows; ++t)
    for (int e : naive_route(c, w.router, grab.h.row(t)).experts) routed[size_t(e)].push_back(t);
  int64_t total = 0;
  for (int e = 0; e < c.num_experts; ++e) {
    HessianAccumulator* a = hh.of(Site::ExpertIn, e);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->tokens(), int64_t(routed[size_t(e)].size())) << "expert " << e;
    EXPECT_EQ(hh.of(Site::DownIn, e)->tokens(), a->tokens());
    total += a->tokens();
    if (routed[size_t(e)].empty()) continue;
    // H = 2 XᵀX / n over the routed rows only.
    const Matrix H = a->hessian();
    for (int64_t i : {0, 7, 63})
      for (int64_t j : {0, 31, 63}) {
        double ref = 0;
        for (int64_t t : routed[size_t(e)]) ref += double(grab.h(t, i)) * grab.h(t, j);
        ref = 2 * ref / double(routed[size_t(e)].size());
        EXPECT_NEAR(H(i, j), ref, 1e-4 * (1 + std::abs(ref)));
      }
  }
  EXPECT_EQ(total, int64_t(batch) * seq * c.experts_per_tok);
  EXPECT_EQ(hh.of(Site::ExpertIn, n - 1)->tokens(), int64_t(batch) * seq);  // the shared experts see all
  EXPECT_EQ(hh.of(Site::DownIn, n - 1)->dim(), 64);
  EXPECT_EQ(hh.of(Site::AttnIn)->tokens(), int64_t(batch) * seq);
}

TEST(Moe, QuantizePipelineRunsOnBothKinds) {
  Scratch s;
  for (bool deepseek : {false, true}) {
    const std::string cfg = deepseek ? small_deepseek(s) : small_mixtral(s);
    const std::string model = s / (deepseek ? "ds" : "mx"), out = model + "_q", report = model + ".json";
    SynthOptions o;
    o.outliers = 2;
    synth_model(cfg, model, o);
    const test::CliResult q = test::run_cli(
        "quantize --model " + model + " --out " + out +
            " --rotation dartquant --w-method gptq --w-bits 4 --a-bits 4 --calib " + kValid +
            " --nsamples 4 --calib-seqlen 64 --epochs 1 --batch 2 --experts-per-pass 3"
            " --ppl " + kValid + " --seqlen 64 --max-windows 2 --json " + report,
        s);
    ASSERT_EQ(q.exit_code, 0) << q.err;
    json r = json::parse(slurp(report));
    EXPECT_TRUE(std::isfinite(r["ppl"]["ppl"].get<double>()));
    const json& layer = r["gptq_layers"][1];
    const std::string e0 = deepseek ? "mlp.experts.0.down_proj.weight" : "block_sparse_moe.experts.0.w2.weight";
    ASSERT_TRUE(layer.contains(e0)) << layer.dump();
    int64_t tokens = 0;
    for (auto& [name, v] : layer.items())
      if (name.find(deepseek ? "down_proj" : "w2") != std::string::npos && name.find("experts.") != std::string::npos &&
          name.find("shared") == std::string::npos)
        tokens += v["tokens"].get<int64_t>();
    EXPECT_EQ(tokens, 4 * 64 * (deepseek ? 3 : 2));  // every token reaches k experts
    if (deepseek) {
      EXPECT_EQ(layer["mlp.shared_experts.down_proj.weight"].value("method", "gptq"), "gptq");
      EXPECT_TRUE(r["gptq_layers"][0].contains("mlp.down_proj.weight"));
    }
    EXPECT_FALSE(layer.contains(deepseek ? "mlp.gate.weight" : "block_sparse_moe.gate.weight"));  // router stays 16-bit
    EXPECT_TRUE(fs::exists(out + "/config.json"));
  }
}

TEST(Moe, PlanForMixtral8x7bFits24GiB) {
  const ModelConfig c = load_config(kMixtral + "/config.json");
  const MemoryPlan p = plan_memory(c, {});
  EXPECT_NEAR(p.report["parameters_billion"].get<double>(), 46.7, 0.1);
  EXPECT_TRUE(p.fits) << p.report.dump(2);
  EXPECT_GE(p.experts_per_pass, 1);
  EXPECT_LE(p.peak_gib, 24.0);
  // All eight experts' Hessians at once would not fit.
  PlanOptions all;
  all.experts_per_pass = 8;
  EXPECT_FALSE(plan_memory(c, all).fits);
}
