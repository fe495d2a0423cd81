// DartQuant calibration on the real stories260K model: capture keeps the requested fraction of
// token vectors, spilling to disk changes nothing, and training lowers the Whip loss.
#include <gtest/gtest.h>

#include "calib/calibrate.h"
#include "io/file.h"
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
