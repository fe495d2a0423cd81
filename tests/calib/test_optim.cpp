#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "calib/losses.h"
#include "calib/orth_optim.h"
#include "linalg/hadamard.h"
#include "tensor/kernels.h"

using namespace dq;

namespace {

// Token vectors like a norm-fused q_proj/up_proj input: Laplace(0, 1) channels plus a massive
// activation shared by 4 fixed outlier channels (u·v with |u| ≈ 10–15, v = (±½, ±½, ±½, ±½) on
// channels 5, 17, 30, 51), each token scaled to rms 1 (x / rms(x)). Independent channels alone
// would not do: a Hadamard already mixes them into a near-Gaussian that no rotation can improve
// on, whereas the outlier direction is mapped by any Hadamard to entries 0, ±1/8, ±1/4 (sums of
// four ±1/16) and a learned rotation can flatten it.
Matrix laplace_with_outliers(int64_t T, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::exponential_distribution<float> ex(1.f);
  auto sign = [&] { return (rng() & 1) ? 1.f : -1.f; };
  const int64_t outliers[4] = {5 % n, 17 % n, 30 % n, 51 % n};
  Matrix X(T, n);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < n; ++c) X(t, c) = ex(rng) * sign();
    const float u = 10.f * (1.f + 0.25f * ex(rng)) * sign();
    for (int k = 0; k < 4; ++k) X(t, outliers[k]) += (k == 2 ? -0.5f : 0.5f) * u;
  }
  rmsnorm(X, nullptr, 0.f);
  return X;
}

Matrix gaussian(int64_t r, int64_t c, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  Matrix X(r, c);
  for (float& v : X.data) v = nd(rng);
  return X;
}

// ‖RᵀR − I‖∞ (max absolute row sum).
double orthogonality_error(const Matrix& R) {
  Matrix G;
  gemm(R, true, R, false, G);
  double worst = 0;
  for (int64_t i = 0; i < G.rows; ++i) {
    double s = 0;
    for (int64_t j = 0; j < G.cols; ++j) s += std::abs(G(i, j) - (i == j ? 1.0 : 0.0));
    worst = std::max(worst, s);
  }
  return worst;
}

float max_abs_rotated(const Matrix& X, const Matrix& R) {
  Matrix O;
  gemm(X, false, R, false, O);
  float m = 0;
  for (float v : O.data) m = std::max(m, std::abs(v));
  return m;
}

// Central finite differences of a loss (double steps on a float input).
void expect_gradient_matches(LossKind kind, const Matrix& O, float tol) {
  Matrix g;
  loss_and_grad(kind, O, &g);
  const float eps = 1e-2f;
  for (size_t i = 0; i < O.size(); ++i) {
    if (kind == LossKind::Whip && std::abs(O.data[i]) < 2 * eps) continue;  // the kink at 0
    Matrix p = O, m = O;
    p.data[i] += eps, m.data[i] -= eps;
    double fd = (double(loss_and_grad(kind, p, nullptr)) - loss_and_grad(kind, m, nullptr)) / (2 * eps);
    ASSERT_NEAR(g.data[i], fd, tol * std::max(1.0, std::abs(fd))) << loss_name(kind) << " at " << i;
  }
}

}  // namespace

TEST(Losses, GradientsMatchFiniteDifferences) {
  Matrix O = gaussian(6, 20, 1, 1.5f);
  expect_gradient_matches(LossKind::Whip, O, 2e-3f);
  expect_gradient_matches(LossKind::Variance, O, 2e-3f);
  expect_gradient_matches(LossKind::Kurtosis, O, 2e-3f);
}

TEST(Losses, ValuesOnKnownInputs) {
  Matrix O(2, 3);
  O.data = {0.f, 1.f, -2.f, 3.f, 3.f, 3.f};
  EXPECT_NEAR(whip_loss(O, nullptr), (1 + std::exp(-1.) + std::exp(-2.) + 3 * std::exp(-3.)) / 2, 1e-6);
  EXPECT_NEAR(variance_loss(O, nullptr), (14.0 / 9.0 + 0.0) / 2, 1e-6);  // token 1: var of {0,1,−2}
  EXPECT_EQ(loss_from_name("kurtosis"), LossKind::Kurtosis);
  EXPECT_THROW(loss_from_name("mse"), Error);
}

TEST(Losses, QuantLossIsTheRoundingErrorAndShrinksTheRange) {
  // One token, 4 bits over [−1, 2]: scale 0.2, zero point 5; 0.3 -> 0.4 (error 0.1), 1.05 -> 1.0.
  Matrix O(1, 4);
  O.data = {-1.f, 0.3f, 1.05f, 2.f};
  Matrix g;
  const float L = quant_loss(O, &g);
  EXPECT_NEAR(L, 0.1 * 0.1 + 0.05 * 0.05, 1e-6);
  EXPECT_EQ(g.data[1], 0.f);  // inside entries get the straight-through 0
  EXPECT_EQ(g.data[2], 0.f);
  EXPECT_GT(g.data[3], 0.f);  // dL/ds > 0: lowering the max lowers the error
  EXPECT_LT(g.data[0], 0.f);
  // A constant token quantizes exactly.
  Matrix C(1, 5, 0.f);
  EXPECT_EQ(quant_loss(C, &g), 0.f);
}

TEST(OrthOptim, QrOrthStaysOrthogonalFor200Steps) {
  for (int64_t n : {64, 96}) {
    OrthOptions opt;
    opt.lr = 0.05f;
    RotationOptimizer o(random_hadamard(n, 1), opt);
    EXPECT_LT(orthogonality_error(o.rotation()), 1e-5);
    for (int s = 0; s < 200; ++s) o.step(laplace_with_outliers(512, n, 100 + uint64_t(s)));
    EXPECT_LT(orthogonality_error(o.rotation()), 1e-5) << n;
  }
}

TEST(OrthOptim, WhipFallsAndBeatsRandomHadamardOnOutliers) {
  const int64_t n = 64;
  const Matrix R0 = random_hadamard(n, 1);
  const Matrix eval = laplace_with_outliers(4096, n, 7);
  Matrix O0;
  gemm(eval, false, R0, false, O0);
  const float start = whip_loss(O0, nullptr);
  // Fresh 2048-token batches (smaller ones mostly add gradient noise at this lr).
  for (OptimizerKind kind : {OptimizerKind::SGD, OptimizerKind::Adam}) {
    OrthOptions opt;
    opt.optimizer = kind;
    opt.lr = kind == OptimizerKind::SGD ? 0.05f : 0.01f;
    RotationOptimizer o(R0, opt);
    for (int s = 0; s < 200; ++s) o.step(laplace_with_outliers(2048, n, 1000 + uint64_t(s)));
    Matrix O;
    gemm(eval, false, o.rotation(), false, O);
    const float end = whip_loss(O, nullptr);
    const float max_learned = max_abs_rotated(eval, o.rotation()), max_had = max_abs_rotated(eval, R0);
    std::printf("%s: whip %.4f -> %.4f, max|XR| hadamard %.3f learned %.3f, unrotated %.3f\n",
                optimizer_name(kind), start, end, max_had, max_learned,
                max_abs_rotated(eval, Matrix::identity(n)));
    EXPECT_LT(end, 0.98f * start) << optimizer_name(kind);
    EXPECT_LT(max_learned, max_had) << optimizer_name(kind);
  }
}

TEST(OrthOptim, CayleyDecreasesLossAndStaysNearlyOrthogonal) {
  const int64_t n = 64;
  const Matrix R0 = random_hadamard(n, 1);
  const Matrix eval = laplace_with_outliers(4096, n, 7);
  OrthOptions opt;
  opt.method = OrthMethod::Cayley;
  // The fixed-point Cayley estimate (s = 2) drifts off the manifold as α‖W‖ grows: ~2e-4 after
  // 200 steps at this lr, ~1e-2 at lr 0.1, ~2e-1 at the contraction bound α = 1/‖W‖₁.
  opt.lr = 0.02f;
  RotationOptimizer o(R0, opt);
  Matrix O;
  gemm(eval, false, R0, false, O);
  const float start = whip_loss(O, nullptr);
  for (int s = 0; s < 200; ++s) o.step(laplace_with_outliers(2048, n, 1000 + uint64_t(s)));
  gemm(eval, false, o.rotation(), false, O);
  const float end = whip_loss(O, nullptr);
  const double orth = orthogonality_error(o.rotation());
  std::printf("cayley: whip %.4f -> %.4f, ||RtR-I||inf %.2e\n", start, end, orth);
  EXPECT_LT(end, 0.98f * start);
  EXPECT_LT(orth, 1e-3);
}

TEST(OrthOptim, CosineScheduleAndOptionChecks) {
  OrthOptions opt;
  opt.cosine = true;
  opt.total_steps = 10;
  opt.lr = 1.f;
  RotationOptimizer o(Matrix::identity(4), opt);
  EXPECT_FLOAT_EQ(o.lr_at(0), 1.f);
  EXPECT_NEAR(o.lr_at(5), 0.5f, 1e-6);
  EXPECT_NEAR(o.lr_at(10), 0.f, 1e-6);
  opt.total_steps = 0;
  EXPECT_THROW(RotationOptimizer(Matrix::identity(4), opt), Error);
  OrthOptions cay;
  cay.method = OrthMethod::Cayley;
  cay.optimizer = OptimizerKind::Adam;
  EXPECT_THROW(RotationOptimizer(Matrix::identity(4), cay), Error);
  EXPECT_THROW(RotationOptimizer(Matrix::identity(4), OrthOptions{}).step(Matrix(3, 5)), Error);
  EXPECT_EQ(orth_from_name("cayley"), OrthMethod::Cayley);
  EXPECT_EQ(optimizer_from_name("adam"), OptimizerKind::Adam);
}

TEST(OrthOptim, BatchedR2SumsHeadsAndLearns) {
  // 4 query heads sharing 2 KV-head latents (GQA group of 2), head_dim 16.
  const int64_t hq = 4, hkv = 2, d = 16;
  std::vector<Matrix> init;
  for (int64_t h = 0; h < hkv; ++h) init.push_back(random_hadamard(d, 10 + uint64_t(h)));
  OrthOptions opt;
  opt.lr = 0.05f;
  BatchedRotationOptimizer b(init, hq, opt);
  const Matrix X = laplace_with_outliers(512, hq * d, 3);
  // The first loss is the sum over query heads of each head's Whip loss under its latent.
  float expect = 0;
  for (int64_t j = 0; j < hq; ++j) {
    Matrix Xj(X.rows, d), O;
    for (int64_t t = 0; t < X.rows; ++t) std::copy(X.row(t) + j * d, X.row(t) + (j + 1) * d, Xj.row(t));
    gemm(Xj, false, init[size_t(j / (hq / hkv))], false, O);
    expect += whip_loss(O, nullptr);
  }
  const float first = b.step(X);
  EXPECT_NEAR(first, expect, 1e-4 * expect);
  float last = first;
  for (int s = 0; s < 100; ++s) last = b.step(X);
  EXPECT_LT(last, first);
  for (const Matrix& R : b.rotations()) EXPECT_LT(orthogonality_error(R), 1e-5);
  EXPECT_THROW(BatchedRotationOptimizer(init, 3, opt), Error);
}

TEST(OrthOptim, CholeskyAndHouseholderRoutesGiveTheSameRotations) {
  // Same iterates, two ways: Cholesky QR2 with the backward from Oᵀ·dL/dO, and Householder QR
  // with dL/dR = Xᵀ·dL/dO. SGD and Adam; 30 steps let a
  // systematic difference show. (The iteration itself amplifies rounding differences: at SGD lr
  // 0.05 ~3x per step after step 25; at lr 0.01 on OpenBLAS's AVX-512 kernels the losses part by
  // 1.6e-5 at step 43; both routes stay orthogonal to 5e-7: chaos, not inaccuracy.)
  for (OptimizerKind kind : {OptimizerKind::SGD, OptimizerKind::Adam}) {
    const int64_t n = 64;
    OrthOptions opt;
    opt.optimizer = kind;
    opt.lr = 0.01f;
    RotationOptimizer chol(random_hadamard(n, 1), opt);
    opt.method = OrthMethod::QRHouseholder;
    RotationOptimizer house(random_hadamard(n, 1), opt);
    for (int s = 0; s < 30; ++s) {
      const Matrix X = laplace_with_outliers(512, n, 300 + uint64_t(s));
      const float a = chol.step(X, 2.f), b = house.step(X, 2.f);
      ASSERT_NEAR(a, b, 1e-5 * std::abs(b)) << s;
    }
    const Matrix R0 = random_hadamard(n, 1);
    float worst = 0, moved = 0;
    for (size_t i = 0; i < R0.size(); ++i) {
      worst = std::max(worst, std::abs(chol.rotation().data[i] - house.rotation().data[i]));
      moved = std::max(moved, std::abs(chol.rotation().data[i] - R0.data[i]));
    }
    EXPECT_LT(worst, 1e-5) << optimizer_name(kind);
    EXPECT_GT(moved, 1e-2) << optimizer_name(kind);
  }
  EXPECT_EQ(orth_from_name("qr-householder"), OrthMethod::QRHouseholder);
}

TEST(OrthOptim, DivergenceIsReportedNotLeftToLapack) {
  // A rate that throws the parameters off every scale used to end in LAPACK's "geqrf failed" or a
  // zero pivot; each route says the calibration diverged at its step instead.
  for (OrthMethod method : {OrthMethod::QR, OrthMethod::QRHouseholder}) {
    OrthOptions opt;
    opt.method = method;
    opt.lr = 3e38f;
    RotationOptimizer r(random_hadamard(64, 1), opt);
    const Matrix X = laplace_with_outliers(256, 64, 7);
    try {
      r.step(X, 1e3f);
      ADD_FAILURE() << "a step to infinite parameters was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()),
                "rotation calibration diverged at step 0 (its parameters are not finite): lower the learning rate");
    }
  }
}

TEST(OrthOptim, R2RmsNormalisationMakesTheLossScaleInvariant) {
  // With per-head RMS normalisation the loss, and so every step, ignores each token's head scale.
  const int64_t hq = 4, d = 16;
  std::vector<Matrix> init = {random_hadamard(d, 10), random_hadamard(d, 11)};
  OrthOptions opt;
  opt.lr = 0.05f;
  const Matrix X = laplace_with_outliers(256, hq * d, 3);
  Matrix Xs = X;  // each token's head slices scaled by different factors
  for (int64_t t = 0; t < Xs.rows; ++t)
    for (int64_t c = 0; c < Xs.cols; ++c) Xs(t, c) *= 0.01f + float((t + c / d) % 7);
  BatchedRotationOptimizer a(init, hq, opt, true), b(init, hq, opt, true), raw(init, hq, opt, false);
  for (int s = 0; s < 5; ++s) EXPECT_NEAR(a.step(X), b.step(Xs), 1e-3) << s;
  for (size_t h = 0; h < init.size(); ++h)
    for (size_t i = 0; i < init[h].size(); ++i) ASSERT_NEAR(a.rotations()[h].data[i], b.rotations()[h].data[i], 1e-5);
  // Without it the scaled input gives another loss. And a normalised head row has RMS 1.
  EXPECT_GT(std::abs(raw.step(Xs) - a.step(X)), 1.f);
  const Matrix rows = a.head_rows(Xs, 1);
  double ss = 0;
  for (int64_t j = 0; j < d; ++j) ss += double(rows(3, j)) * rows(3, j);
  EXPECT_NEAR(ss / double(d), 1.0, 1e-5);
}

namespace dq {

TEST(Losses, WhipMatchesLibmExponentials) {
  // Whip on a batch wider than one vector register, against a sum of libm exponentials.
  Matrix O = gaussian(7, 37, 3, 2.f);
  double ref = 0;
  for (float v : O.data) ref += std::exp(-std::abs(double(v)));
  EXPECT_NEAR(whip_loss(O, nullptr), ref / double(O.rows), 1e-6 * ref / double(O.rows));
}

}  // namespace dq
