// Synthetic checkpoints: real shapes, load and evaluate, deterministic, massive activations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "io/file.h"
#include "model/forward.h"
#include "model/synth.h"
#include "tensor/kernels.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;

namespace {

// PPL of the first window of valid.txt (the eval command itself is exercised through the CLI).
double first_window_ppl(const Model& m, int seqlen) {
  std::vector<int32_t> ids = m.tokenizer->encode(read_file(kValid), true);
  ids.resize(size_t(seqlen));
  double sum = 0;
  for (double v : next_token_nll(m, ids, 1, seqlen)) sum += v;
  return std::exp(sum / (seqlen - 1));
}

// Mean |x| per channel at one site, over all layers' calls.
struct ChannelMagnitude : Hook {
  Site site;
  std::vector<std::vector<double>> per_layer;
  explicit ChannelMagnitude(Site s) : site(s) {}
  void at(Site s, int layer, Matrix& x) override {
    if (s != site) return;
    std::vector<double> mean(size_t(x.cols));
    for (int64_t r = 0; r < x.rows; ++r)
      for (int64_t c = 0; c < x.cols; ++c) mean[size_t(c)] += std::abs(x(r, c)) / double(x.rows);
    per_layer.push_back(mean);
  }
};

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
  return v[v.size() / 2];
}

}  // namespace

TEST(Synth, SmolLM2ConfigWithTwoLayersLoadsAndEvaluates) {
  ScratchDir dir;
  const std::string out = dir / "smol";
  CliResult r = run_cli("synth --config " + kData + "/hf/smollm2-135m-instruct/config.json --out " + out +
                            " --layers 2 --seed 7",
                        dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Model m = load_model(out);  // checks every tensor's shape against the config
  EXPECT_EQ(m.config.num_layers, 2);
  EXPECT_EQ(m.config.hidden_size, 576);
  EXPECT_EQ(m.config.vocab_size, 49152);
  EXPECT_TRUE(m.config.tie_embeddings);
  EXPECT_FALSE(m.weights.has("lm_head.weight"));
  EXPECT_EQ(m.weights.stored_dtype("model.layers.1.mlp.down_proj.weight"), DType::BF16);
  ASSERT_TRUE(m.tokenizer) << "tokenizer.json beside the config was not copied";
  json report = cli_eval("--model " + out + " --ppl " + kValid + " --seqlen 128 --max-windows 1", dir);
  ASSERT_TRUE(report.contains("ppl"));
  const double ppl = report["ppl"].get<double>();
  std::printf("synthetic SmolLM2 (2 layers): ppl %.1f on one 128-token window\n", ppl);
  EXPECT_TRUE(std::isfinite(ppl));
  EXPECT_GT(ppl, 1.0);
}

TEST(Synth, Qwen2ShapedConfigHasBiasesAndEvaluates) {
  ScratchDir dir;
  SynthOptions o;
  o.dtype = DType::F16;
  synth_model(small_qwen_config(dir), dir / "qwen", o);
  Model m = load_model(dir / "qwen", kTok512);
  EXPECT_EQ(m.config.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(m.config.qkv_bias);
  for (const char* b : {"q", "k", "v"}) {
    const std::string name = layer_name(1, std::string("self_attn.") + b + "_proj.bias");
    ASSERT_TRUE(m.weights.has(name)) << name;
    EXPECT_EQ(m.weights.stored_dtype(name), DType::F16);
  }
  EXPECT_EQ(m.weights.shape("model.layers.0.self_attn.k_proj.bias"), std::vector<int64_t>{32});
  const double ppl = first_window_ppl(m, 64);
  EXPECT_TRUE(std::isfinite(ppl));
  EXPECT_GT(ppl, 1.0);
}

TEST(Synth, WeightsAreScaledLikeATrainedModel) {
  ScratchDir dir;
  SynthOptions o;
  o.dtype = DType::F32;
  synth_model(small_qwen_config(dir), dir / "m", o);
  Model m = load_model(dir / "m", kTok512);
  auto stdev = [&](const std::string& name, double mean) {
    Matrix w = m.weights.get(name);
    double s = 0;
    for (float v : w.data) s += (v - mean) * (v - mean);
    return std::sqrt(s / double(w.size()));
  };
  EXPECT_NEAR(stdev("model.layers.0.self_attn.q_proj.weight", 0) * std::sqrt(128.0), 1.0, 0.05);
  EXPECT_NEAR(stdev("model.layers.0.mlp.down_proj.weight", 0) * std::sqrt(320.0 * 4), 1.0, 0.05);
  EXPECT_NEAR(stdev("model.embed_tokens.weight", 0), 0.02, 0.002);  // Qwen's initializer_range
  EXPECT_LT(stdev("model.layers.1.input_layernorm.weight", 1.0), 0.1);
}

TEST(Synth, SameSeedSameBytesOnAnyThreadCount) {
  ScratchDir dir;
  const std::string cfg = small_qwen_config(dir);
  SynthOptions o;
  o.seed = 42;
  o.outliers = 3;
  const int threads = num_threads();
  set_num_threads(1);
  synth_model(cfg, dir / "a", o);
  set_num_threads(2);
  synth_model(cfg, dir / "b", o);
  set_num_threads(threads);
  o.seed = 43;
  synth_model(cfg, dir / "c", o);
  const std::string a = slurp(dir / "a/model.safetensors");
  EXPECT_GT(a.size(), 100000u);
  EXPECT_EQ(a, slurp(dir / "b/model.safetensors"));
  EXPECT_EQ(slurp(dir / "a/config.json"), slurp(dir / "b/config.json"));
  EXPECT_NE(a, slurp(dir / "c/model.safetensors"));
}

TEST(Synth, OutlierChannelsShowAtTheQkvAndUpInputs) {
  ScratchDir dir;
  const std::string cfg = small_qwen_config(dir);
  SynthOptions o;
  o.seed = 5;
  o.outliers = 3;
  synth_model(cfg, dir / "outliers", o);
  o.outliers = 0;
  synth_model(cfg, dir / "plain", o);
  const std::vector<int> massive = synth_outlier_channels(5, 3, 128);
  ASSERT_EQ(massive.size(), 3u);

  for (const char* which : {"outliers", "plain"}) {
    Model m = load_model(dir / which, kTok512);
    std::vector<int32_t> ids = m.tokenizer->encode(read_file(kValid), true);
    ids.resize(64);
    ChannelMagnitude attn(Site::AttnIn), mlp(Site::MlpIn);
    forward(m, ids, 1, 64, {&attn, &mlp});
    for (auto* site : {&attn, &mlp}) {
      ASSERT_EQ(site->per_layer.size(), 2u);
      for (const auto& mean : site->per_layer) {
        std::vector<double> rest;
        double smallest_massive = 1e300;
        for (int c = 0; c < 128; ++c) {
          if (std::count(massive.begin(), massive.end(), c)) smallest_massive = std::min(smallest_massive, mean[size_t(c)]);
          else rest.push_back(mean[size_t(c)]);
        }
        const double ratio = smallest_massive / median(rest);
        if (std::string(which) == "outliers") EXPECT_GT(ratio, 20.0) << site_name(site->site);
        else EXPECT_LT(ratio, 5.0) << site_name(site->site);
      }
    }
  }
}
