#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "linalg/qr.h"
#include "tensor/kernels.h"

using namespace dq;

namespace {

std::vector<double> gaussian(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<double> v(static_cast<size_t>(count));
  for (double& x : v) x = nd(rng);
  return v;
}

// L(Z) = <W, Q(Z)>.
double objective(int64_t n, const std::vector<double>& Z, const std::vector<double>& W) {
  std::vector<double> Q(Z.size()), U(Z.size());
  qr_positive<double>(n, Z.data(), Q.data(), U.data());
  double s = 0;
  for (size_t i = 0; i < Q.size(); ++i) s += W[i] * Q[i];
  return s;
}

// Largest |central finite difference of loss − G| over Z's entries, relative to max(1, largest
// finite difference).
template <class Loss>
double finite_difference_error(const std::vector<double>& Z, const std::vector<double>& G, Loss loss) {
  const double eps = 1e-6;
  double worst = 0, scale = 0;
  for (size_t i = 0; i < Z.size(); ++i) {
    auto Zp = Z, Zm = Z;
    Zp[i] += eps, Zm[i] -= eps;
    const double fd = (loss(Zp) - loss(Zm)) / (2 * eps);
    worst = std::max(worst, std::abs(fd - G[i]));
    scale = std::max(scale, std::abs(fd));
  }
  return worst / std::max(1.0, scale);
}

}  // namespace

TEST(QR, FactorsArePositiveTriangularAndOrthogonal) {
  for (int64_t n : {1, 2, 5, 16, 33, 64}) {
    auto Zd = gaussian(n * n, uint64_t(n));
    std::vector<double> Q(Zd.size()), U(Zd.size());
    qr_positive<double>(n, Zd.data(), Q.data(), U.data());
    double orth = 0, rec = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double qtq = 0, qu = 0;
        for (int64_t k = 0; k < n; ++k) qtq += Q[size_t(k * n + i)] * Q[size_t(k * n + j)];
        for (int64_t k = 0; k < n; ++k) qu += Q[size_t(i * n + k)] * U[size_t(k * n + j)];
        orth = std::max(orth, std::abs(qtq - (i == j)));
        rec = std::max(rec, std::abs(qu - Zd[size_t(i * n + j)]));
        if (j < i) {
          EXPECT_EQ(U[size_t(i * n + j)], 0.0);
        }
      }
    for (int64_t i = 0; i < n; ++i) EXPECT_GT(U[size_t(i * n + i)], 0.0);
    EXPECT_LT(orth, 1e-12) << n;
    EXPECT_LT(rec, 1e-12) << n;

    Matrix Zf(n, n);  // float path agrees
    for (size_t i = 0; i < Zd.size(); ++i) Zf.data[i] = float(Zd[i]);
    QRFactors f = qr_positive(Zf);
    for (size_t i = 0; i < Q.size(); ++i) EXPECT_NEAR(f.Q.data[i], Q[i], 2e-4) << n;
  }
}

TEST(QR, OrthogonalInputGivesItselfBack) {
  Matrix R = random_orthogonal(24, 5);
  QRFactors f = qr_positive(R);
  for (size_t i = 0; i < R.size(); ++i) EXPECT_NEAR(f.Q.data[i], R.data[i], 1e-5);
}

TEST(QR, BackwardMatchesCentralFiniteDifferences) {
  for (int64_t n : {1, 2, 3, 5, 8, 12, 17, 32}) {
    auto Z = gaussian(n * n, 100 + uint64_t(n)), W = gaussian(n * n, 200 + uint64_t(n));
    std::vector<double> Q(Z.size()), U(Z.size()), G(Z.size());
    qr_positive<double>(n, Z.data(), Q.data(), U.data());
    qr_backward<double>(n, Q.data(), U.data(), W.data(), G.data());
    EXPECT_LT(finite_difference_error(Z, G, [&](const std::vector<double>& z) { return objective(n, z, W); }), 1e-7)
        << "n = " << n;
  }
}

TEST(QR, FloatBackwardAgreesWithDouble) {
  const int64_t n = 20;
  auto Z = gaussian(n * n, 1), W = gaussian(n * n, 2);
  std::vector<double> Q(Z.size()), U(Z.size()), G(Z.size());
  qr_positive<double>(n, Z.data(), Q.data(), U.data());
  qr_backward<double>(n, Q.data(), U.data(), W.data(), G.data());
  Matrix Zf(n, n), Wf(n, n);
  for (size_t i = 0; i < Z.size(); ++i) Zf.data[i] = float(Z[i]), Wf.data[i] = float(W[i]);
  Matrix Gf = qr_backward(qr_positive(Zf), Wf);
  for (size_t i = 0; i < G.size(); ++i) EXPECT_NEAR(Gf.data[i], G[i], 1e-3 * (1 + std::abs(G[i])));
}

TEST(QR, SingularAndNonSquareAreErrors) {
  EXPECT_THROW(qr_positive(Matrix(3, 3)), Error);
  EXPECT_THROW(qr_positive(Matrix(3, 4)), Error);
}

namespace {

// A well-conditioned latent like QR-Orth's: an orthogonal matrix plus a Gaussian perturbation
// (entries of std size/√n; size 0.3 needs one Cholesky QR pass, size 1 two in float).
std::vector<double> near_orthogonal(int64_t n, uint64_t seed, double size = 0.3) {
  Matrix R = random_orthogonal(n, seed);
  auto E = gaussian(n * n, seed + 1);
  std::vector<double> Z(E.size());
  for (size_t i = 0; i < Z.size(); ++i) Z[i] = R.data[i] + size * E[i] / std::sqrt(double(n));
  return Z;
}

}  // namespace

TEST(QR, CholeskyQRMatchesHouseholder) {
  for (int64_t n : {1, 2, 5, 16, 64, 200})
    for (double size : {0.3, 1.0}) {
    auto Zd = near_orthogonal(n, 40 + uint64_t(n), size);
    std::vector<double> Qh(Zd.size()), Uh(Zd.size()), Qc(Zd.size()), Uc(Zd.size());
    qr_positive<double>(n, Zd.data(), Qh.data(), Uh.data());
    EXPECT_TRUE(qr_positive_cholesky<double>(n, Zd.data(), Qc.data(), Uc.data())) << n;
    for (size_t i = 0; i < Qh.size(); ++i) {
      ASSERT_NEAR(Qc[i], Qh[i], 1e-12) << n;
      ASSERT_NEAR(Uc[i], Uh[i], 1e-12) << n;
    }
    Matrix Zf(n, n);  // the float routes agree within 1e-5
    for (size_t i = 0; i < Zd.size(); ++i) Zf.data[i] = float(Zd[i]);
    QRFactors h = qr_positive(Zf), c = qr_positive_cholesky(Zf);
    for (size_t i = 0; i < Qh.size(); ++i) {
      ASSERT_NEAR(c.Q.data[i], h.Q.data[i], 1e-5) << n;
      ASSERT_NEAR(c.U.data[i], h.U.data[i], 1e-5) << n;
    }
    }
}

TEST(QR, CholeskyFallsBackToHouseholderWhenIllConditioned) {
  const int64_t n = 12;
  auto Z = near_orthogonal(n, 3);
  for (int64_t r = 0; r < n; ++r) Z[size_t(r * n + 4)] *= 1e-4;  // κ(Z) ~ 1e4
  std::vector<double> Qh(Z.size()), Uh(Z.size()), Qc(Z.size()), Uc(Z.size());
  qr_positive<double>(n, Z.data(), Qh.data(), Uh.data());
  EXPECT_FALSE(qr_positive_cholesky<double>(n, Z.data(), Qc.data(), Uc.data()));
  EXPECT_EQ(Qc, Qh);
  EXPECT_EQ(Uc, Uh);
}

// The backward from B = Oᵀ·dL/dO, for L(Z) = <W, X·Q(Z)> (so dL/dO = W), against central
// finite differences of L through the Cholesky QR2 forward.
TEST(QR, BackwardFromActivationsMatchesFiniteDifferences) {
  for (int64_t n : {1, 3, 8, 17}) {
    const int64_t T = 2 * n + 3;
    auto Z = near_orthogonal(n, 60 + uint64_t(n)), X = gaussian(T * n, 61), W = gaussian(T * n, 62);
    auto loss = [&](const std::vector<double>& z) {
      std::vector<double> Q(z.size()), U(z.size());
      qr_positive_cholesky<double>(n, z.data(), Q.data(), U.data());
      double s = 0;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < n; ++j) {
          double o = 0;
          for (int64_t k = 0; k < n; ++k) o += X[size_t(t * n + k)] * Q[size_t(k * n + j)];
          s += W[size_t(t * n + j)] * o;
        }
      return s;
    };
    std::vector<double> Q(Z.size()), U(Z.size()), B(Z.size(), 0.0), G(Z.size());
    qr_positive_cholesky<double>(n, Z.data(), Q.data(), U.data());
    for (int64_t t = 0; t < T; ++t)  // B = Oᵀ W with O = X Q
      for (int64_t i = 0; i < n; ++i) {
        double o = 0;
        for (int64_t k = 0; k < n; ++k) o += X[size_t(t * n + k)] * Q[size_t(k * n + i)];
        for (int64_t j = 0; j < n; ++j) B[size_t(i * n + j)] += o * W[size_t(t * n + j)];
      }
    qr_backward_from_b<double>(n, Q.data(), U.data(), B.data(), G.data());
    EXPECT_LT(finite_difference_error(Z, G, loss), 1e-7) << "n = " << n;
  }
}
