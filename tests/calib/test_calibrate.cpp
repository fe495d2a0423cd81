// DartQuant calibration on the real stories260K model: capture keeps the requested fraction of
// token vectors, spilling to disk changes nothing, and training lowers the Whip loss.
#include <gtest/gtest.h>

#include <map>

#include "calib/calibrate.h"
#include "io/file.h"
#include "linalg/qr.h"
#include "model/forward.h"
#include "quant/quantize_model.h"

namespace dq {
namespace {

struct CalibFixture {
  Model m;
  std::vector<int32_t> calib;
  static constexpr int kWindows = 16, kLen = 128;
  CalibFixture() {
    m = load_model(DQ_DATA_DIR "/stories260K/stories260K.bin");
    rope_to_halves(m);
    fuse_norms(m);
    calib = sample_windows(m.tokenizer->encode(read_file(DQ_DATA_DIR "/tinystories/calib.txt"), true), kWindows,
                           kLen, 7);
  }
};

CalibOptions small_options(int64_t memory_mib) {
  CalibOptions o;
  o.epochs = 3;
  o.batch = 4;
  o.r1.lr = 0.01f;
  o.memory_mib = memory_mib;
  return o;
}

TEST(Calibrate, SpillingToDiskGivesIdenticalRotations) {
  CalibFixture s;
  CalibResult in_ram = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, small_options(1024));
  CalibResult spilled = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, small_options(0));
  EXPECT_EQ(in_ram.report["spilled_rows"].get<int64_t>(), 0);
  EXPECT_GT(spilled.report["spilled_rows"].get<int64_t>(), 0);
  EXPECT_EQ(in_ram.rotations.r1.data, spilled.rotations.r1.data);
  for (size_t l = 0; l < in_ram.rotations.r2.size(); ++l)
    for (size_t h = 0; h < in_ram.rotations.r2[l].size(); ++h)
      EXPECT_EQ(in_ram.rotations.r2[l][h].data, spilled.rotations.r2[l][h].data);
}

TEST(Calibrate, KeepsTheTokenRatioAndLowersWhipLoss) {
  CalibFixture s;
  CalibOptions o = small_options(1024);
  o.epochs = 6;
  CalibResult r = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, o);
  // R1 pools two sites (q_proj and up_proj inputs) of every layer.
  const double expected = 0.1 * CalibFixture::kWindows * CalibFixture::kLen * 2 * s.m.config.num_layers;
  const double kept = r.report["kept_tokens_r1"].get<double>();
  EXPECT_NEAR(kept, expected, 5 * std::sqrt(expected));
  const auto& curve = r.report["r1_curve"];
  ASSERT_GT(curve.size(), 10u);
  // Mean of the first and last few steps (batches differ, so compare averages).
  auto mean = [&](size_t from, size_t n) {
    double s = 0;
    for (size_t i = from; i < from + n; ++i) s += curve[i]["loss"].get<double>();
    return s / double(n);
  };
  EXPECT_LT(mean(curve.size() - 5, 5), mean(0, 5));
  for (const char* stage : {"capture_cpu_seconds", "r1_cpu_seconds", "r2_cpu_seconds"}) EXPECT_GT(r.report[stage].get<double>(), 0) << stage;
  // Each layer's R2 reports its steps and first/last-epoch loss; the held-out comparison is off
  // by default.
  ASSERT_EQ(r.report["r2_layers"].size(), size_t(s.m.config.num_layers));
  EXPECT_EQ(r.report["r2_layers"][0]["steps"].get<size_t>(), r.report["r2_curves"][0].size());
  EXPECT_FALSE(r.report["r2_layers"][0].contains("holdout"));
  // R1 stays orthogonal.
  const Matrix& R = r.rotations.r1;
  for (int64_t i = 0; i < R.rows; ++i)
    for (int64_t j = 0; j < R.cols; ++j) {
      double d = 0;
      for (int64_t k = 0; k < R.rows; ++k) d += double(R(k, i)) * R(k, j);
      EXPECT_NEAR(d, i == j ? 1.0 : 0.0, 1e-4);
    }
}

}  // namespace
}  // namespace dq

namespace dq {
namespace {

TEST(Calibrate, R2HoldoutComparesLearnedWithHadamardPerHead) {
  CalibFixture s;
  CalibOptions o = small_options(1024);
  o.r2_holdout = 0.25f;
  o.r2.lr = 0.05f;
  CalibResult r = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, o);
  const auto& layers = r.report["r2_layers"];
  int wins = 0;
  for (const auto& layer : layers) {
    const auto& h = layer["holdout"];
    ASSERT_EQ(h["quant_error_learned"].size(), size_t(s.m.config.num_kv_heads));
    int w = 0;
    for (size_t k = 0; k < h["quant_error_learned"].size(); ++k) {
      const double learned = h["quant_error_learned"][k], hadamard = h["quant_error_hadamard"][k];
      EXPECT_GT(learned, 0);  // 4-bit quantization of real activations is never exact
      EXPECT_LT(learned, 0.1);
      w += learned < hadamard;
    }
    EXPECT_EQ(h["learned_wins"].get<int>(), w);
    wins += w;
  }
  // A quarter of layer 0's kept rows is held out (the rest trained).
  EXPECT_NEAR(layers[0]["holdout"]["tokens"].get<double>(), 0.25 * r.report["kept_tokens_r2_per_layer"].get<double>(), 1.0);
  EXPECT_EQ(r.report["r2_holdout_learned_wins"].get<int>(), wins);
  EXPECT_EQ(r.report["r2_holdout_heads"].get<int>(), int(layers.size()) * s.m.config.num_kv_heads);
  o.r2_holdout = 1.f;
  EXPECT_THROW(calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, o), Error);
}

}  // namespace
}  // namespace dq

namespace dq {
namespace {

// Per (layer, site): the sum and energy of every token vector, from a plain f32 forward pass.
struct SiteMoments : Hook {
  struct Moments {
    std::vector<double> sum;
    double energy = 0, rows = 0;
    std::vector<Matrix> x;  // the vectors themselves
  };
  std::map<std::pair<int, Site>, Moments> at_site;
  void at(Site s, int layer, Matrix& x) override {
    if (s != Site::AttnIn && s != Site::MlpIn && s != Site::OprojIn) return;
    Moments& m = at_site[{layer, s}];
    m.sum.resize(size_t(x.cols));
    for (int64_t r = 0; r < x.rows; ++r)
      for (int64_t c = 0; c < x.cols; ++c) m.sum[size_t(c)] += x(r, c), m.energy += double(x(r, c)) * x(r, c);
    m.rows += double(x.rows);
    m.x.push_back(x);
  }
  std::vector<double> mean(const Moments& m) const {
    std::vector<double> mu = m.sum;
    for (double& v : mu) v /= m.rows;
    return mu;
  }
  double share(const Moments& m) const {
    double n2 = 0;
    for (double v : mean(m)) n2 += v * v;
    return n2 / (m.energy / m.rows);
  }
};

// With every token kept and one R1 step per epoch over all of them, the report's mean shares and
// the first step's centred Whip loss can be recomputed from a plain forward pass.
TEST(Calibrate, CentringSubtractsEachGroupsMeanAndReportsTheMeanShare) {
  CalibFixture s;
  const ModelConfig& c = s.m.config;
  CalibOptions o = small_options(1024);
  o.token_ratio = 1.f;
  o.epochs = 1;
  o.batch = CalibFixture::kWindows * 2 * c.num_layers;  // one step sees every R1 row
  o.r2_epochs = 1;
  o.center = true;
  CalibResult r = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, o);

  SiteMoments ref;
  forward(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, {&ref});
  const Matrix H = random_hadamard_rotations(c, o.seed).r1;
  double whip = 0, rows = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int site = 0; site < 2; ++site) {
      const auto& m = ref.at_site.at({l, site ? Site::MlpIn : Site::AttnIn});
      const auto& g = r.report["r1_mean_share"][size_t(2 * l + site)];
      EXPECT_EQ(g["layer"].get<int>(), l);
      EXPECT_NEAR(g["mean_share"].get<double>(), ref.share(m), 0.01 + 0.02 * ref.share(m));
      const std::vector<double> mu = ref.mean(m);
      for (const Matrix& x : m.x)
        for (int64_t t = 0; t < x.rows; ++t, rows += 1)
          for (int64_t j = 0; j < c.hidden_size; ++j) {
            double o_tj = 0;
            for (int64_t k = 0; k < c.hidden_size; ++k) o_tj += (x(t, k) - mu[size_t(k)]) * H(k, j);
            whip += std::exp(-std::abs(o_tj));
          }
    }
    const double r2_share = ref.share(ref.at_site.at({l, Site::OprojIn}));
    EXPECT_GT(r2_share, 0.001);
    EXPECT_NEAR(r.report["r2_mean_share"][size_t(l)].get<double>(), r2_share, 0.01 + 0.02 * r2_share);
  }
  ASSERT_EQ(r.report["r1_curve"].size(), 1u);
  EXPECT_NEAR(r.report["r1_curve"][0]["loss"].get<double>(), whip / rows, 2e-3 * whip / rows);
  // Uncentred, the same step sees another loss (the means are far from zero here).
  o.center = false;
  CalibResult u = calibrate(s.m, s.calib, CalibFixture::kWindows, CalibFixture::kLen, o);
  EXPECT_GT(std::abs(u.report["r1_curve"][0]["loss"].get<double>() - whip / rows), 0.01 * whip / rows);
}

}  // namespace
}  // namespace dq

namespace dq {
namespace {

TEST(Calibrate, AligningTheMeanMakesItAPerTokenConstantAndKeepsOrthogonality) {
  const int64_t n = 24;
  const Matrix R = random_orthogonal(n, 3);
  std::vector<double> mu(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mu[size_t(i)] = std::sin(double(i)) + 0.3;
  const Matrix A = align_mean_with_ones(R, mu);
  double norm2 = 0;
  for (double v : mu) norm2 += v * v;
  std::vector<double> m(static_cast<size_t>(n), 0.0);  // mu·A, computed directly
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) m[size_t(j)] += mu[size_t(i)] * A(i, j);
  for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(std::abs(m[size_t(j)]), std::sqrt(norm2 / double(n)), 1e-5) << j;
  for (int64_t j = 1; j < n; ++j) EXPECT_NEAR(m[size_t(j)], m[0], 1e-5);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double d = 0;
      for (int64_t k = 0; k < n; ++k) d += double(A(k, i)) * A(k, j);
      EXPECT_NEAR(d, i == j ? 1.0 : 0.0, 1e-5);
    }
  // A zero mean leaves R as it is.
  EXPECT_EQ(align_mean_with_ones(R, std::vector<double>(size_t(n), 0.0)).data, R.data);
}

}  // namespace
}  // namespace dq
