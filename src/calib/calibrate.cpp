#include "calib/calibrate.h"

#include <chrono>
#include <numeric>
#include <random>

namespace dq {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Token vectors kept from one site, stored as bf16 rows.
struct Sample {
  int64_t cols = 0;
  std::vector<uint16_t> data;
  int64_t rows() const { return cols ? int64_t(data.size()) / cols : 0; }
  void add(const float* row) {
    for (int64_t j = 0; j < cols; ++j) data.push_back(f32_to_bf16(row[j]));
  }
  Matrix gather(const std::vector<int64_t>& idx, size_t from, size_t n) const {
    Matrix x(int64_t(n), cols);
    for (size_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < cols; ++j) x(int64_t(i), j) = bf16_to_f32(data[size_t(idx[from + i] * cols + j)]);
    return x;
  }
};

// Keeps each token row with probability `ratio`, seeded, at the R1 sites (pooled) and per layer
// at the o_proj input.
class CaptureHook : public Hook {
 public:
  CaptureHook(const ModelConfig& c, float ratio, uint64_t seed)
      : ratio_(ratio), rng_(seed), r2_(size_t(c.num_layers)) {
    r1_.cols = c.hidden_size;
    for (auto& s : r2_) s.cols = c.q_dim();
  }
  void at(Site site, int layer, Matrix& x) override {
    Sample* s = site == Site::AttnIn || site == Site::MlpIn ? &r1_
                : site == Site::OprojIn                    ? &r2_[size_t(layer)]
                                                           : nullptr;
    if (!s) return;
    std::bernoulli_distribution keep(ratio_);
    for (int64_t r = 0; r < x.rows; ++r)
      if (keep(rng_)) s->add(x.row(r));
  }
  Sample r1_;
  std::vector<Sample> r2_;

 private:
  float ratio_;
  std::mt19937_64 rng_;
};

// Epochs of shuffled mini-batches; returns the loss curve.
template <class Step>
nlohmann::json train(const Sample& s, int64_t batch_rows, int epochs, uint64_t seed, Step step,
                     const std::function<void(int, int)>& progress) {
  nlohmann::json curve = nlohmann::json::array();
  std::vector<int64_t> idx(size_t(s.rows()));
  std::iota(idx.begin(), idx.end(), 0);
  std::mt19937_64 rng(seed);
  const int64_t per_epoch = std::max<int64_t>(1, (s.rows() + batch_rows - 1) / batch_rows);
  auto start = Clock::now();
  int64_t k = 0;
  for (int e = 0; e < epochs; ++e) {
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int64_t b = 0; b < per_epoch; ++b, ++k) {
      size_t from = size_t(b * batch_rows), n = std::min(size_t(batch_rows), idx.size() - from);
      if (n == 0) continue;
      float loss = step(s.gather(idx, from, n));
      curve.push_back({{"step", k}, {"epoch", e}, {"loss", loss}, {"seconds", since(start)}});
    }
    if (progress) progress(e + 1, epochs);
  }
  return curve;
}

}  // namespace

CalibResult calibrate(const Model& m, const std::vector<int32_t>& calib, int windows, int len,
                      const CalibOptions& o, const CalibProgress& progress) {
  const ModelConfig& c = m.config;
  if (o.token_ratio <= 0 || o.token_ratio > 1) throw Error("--token-ratio must be in (0, 1]");
  if (o.epochs < 1 || o.batch < 1) throw Error("--epochs and --batch must be positive");
  CalibResult res;
  auto t0 = Clock::now();
  CaptureHook cap(c, o.token_ratio, o.seed);
  const int per = std::max(1, 8192 / len);
  for (int w0 = 0; w0 < windows; w0 += per) {
    int b = std::min(per, windows - w0);
    std::vector<int32_t> toks(calib.begin() + int64_t(w0) * len, calib.begin() + int64_t(w0 + b) * len);
    forward(m, toks, b, len, {&cap});
    if (progress) progress("capture", w0 + b, windows);
  }
  res.report["capture_seconds"] = since(t0);
  res.report["kept_tokens_r1"] = cap.r1_.rows();
  res.report["kept_tokens_r2_per_layer"] = cap.r2_.empty() ? 0 : cap.r2_[0].rows();
  if (cap.r1_.rows() == 0) throw Error("no token vectors were kept; raise --token-ratio or --nsamples");

  const int64_t batch_rows = std::max<int64_t>(1, int64_t(double(o.batch) * len * o.token_ratio));
  res.report["batch_rows"] = batch_rows;
  Rotations init = random_hadamard_rotations(c, o.seed);  // DartQuant starts from a random Hadamard
  auto t1 = Clock::now();
  RotationOptimizer r1(init.r1, o.r1);
  res.report["r1_curve"] = train(cap.r1_, batch_rows, o.epochs, o.seed + 1,
                                 [&](const Matrix& x) { return r1.step(x); },
                                 [&](int e, int n) { if (progress) progress("R1", e, n); });
  res.rotations.r1 = r1.rotation();
  res.report["r1_seconds"] = since(t1);

  auto t2 = Clock::now();
  nlohmann::json r2_curves = nlohmann::json::array();
  res.rotations.r2.resize(size_t(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    BatchedRotationOptimizer r2(init.r2[size_t(l)], c.num_heads, o.r2);
    r2_curves.push_back(train(cap.r2_[size_t(l)], batch_rows, o.epochs, o.seed + 2 + uint64_t(l),
                              [&](const Matrix& x) { return r2.step(x); }, nullptr));
    res.rotations.r2[size_t(l)] = r2.rotations();
    if (progress) progress("R2", l + 1, c.num_layers);
  }
  res.report["r2_curves"] = r2_curves;
  res.report["r2_seconds"] = since(t2);
  return res;
}

}  // namespace dq
