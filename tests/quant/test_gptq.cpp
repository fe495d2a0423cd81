#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "quant/gptq.h"
#include "tensor/kernels.h"

#include "test_helpers.h"

using namespace dq;
using dq::test::gaussian_matrix;

namespace {

// Correlated layer inputs X = G L (tokens x in) with a random mixing L and uneven channel scales.
Matrix correlated_inputs(int64_t tokens, int64_t in, uint32_t seed) {
  Matrix G = gaussian_matrix(tokens, in, seed);
  Matrix L = gaussian_matrix(in, in, seed + 1);
  for (int64_t i = 0; i < in; ++i)
    for (int64_t j = 0; j < in; ++j)
      L(i, j) *= (1.f + 3.f * float(i % 7 == 0)) / std::sqrt(float(in));
  return matmul(G, L);
}

Matrix hessian_of(const Matrix& X) {
  HessianAccumulator acc(X.cols);
  acc.add(X);
  return acc.hessian();
}

double output_error(const Matrix& X, const Matrix& W, const Matrix& Wq) {
  Matrix Y = linear(X, W), Yq = linear(X, Wq);
  double e = 0;
  for (size_t i = 0; i < Y.size(); ++i)
    e += double(Y.data[i] - Yq.data[i]) * (Y.data[i] - Yq.data[i]);
  return std::sqrt(e);
}

QuantSpec spec_of(int bits, bool sym, int group = 0) {
  QuantSpec s;
  s.bits = bits;
  s.symmetric = sym;
  s.group = group;
  return s;
}

struct Reference {
  Matrix weight;
  std::vector<uint8_t> codes;
  double error = 0;
};

// Column-by-column GPTQ in double without blocking or Cholesky: after quantizing column j, its
// error e_j = (w_j - q_j) / [H⁻¹]_jj moves w_k by -e_j [H⁻¹]_jk, and j is eliminated from H⁻¹
// (H⁻¹ <- H⁻¹ - H⁻¹[:, j] H⁻¹[j, :] / [H⁻¹]_jj), the OBS update GPTQ's Cholesky form reproduces.
Reference naive_gptq(const Matrix& W0, const Matrix& H0, const QuantSpec& spec,
                     const GptqOptions& opt) {
  const int64_t rows = W0.rows, n = W0.cols;
  std::vector<double> W(W0.data.begin(), W0.data.end()), H(H0.data.begin(), H0.data.end());
  auto w = [&](int64_t r, int64_t c) -> double& { return W[size_t(r * n + c)]; };
  for (int64_t j = 0; j < n; ++j)
    if (H[size_t(j * n + j)] == 0) {
      H[size_t(j * n + j)] = 1;
      for (int64_t r = 0; r < rows; ++r) w(r, j) = 0;
    }
  const int64_t gs = spec.group > 0 ? spec.group : n, ng = spec.num_groups(n);
  const bool dynamic = spec.group > 0 && !opt.static_groups;
  std::vector<QuantParams> params(size_t(rows * ng));
  auto fill = [&](int64_t g) {  // from the current W, columns in original order
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> seg(&w(r, g * gs), &w(r, g * gs) + std::min(gs, n - g * gs));
      params[size_t(r * ng + g)] = find_params(seg.data(), int64_t(seg.size()), spec);
    }
  };
  if (!dynamic)
    for (int64_t g = 0; g < ng; ++g) fill(g);

  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  if (opt.act_order)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return H[size_t(a * n + a)] > H[size_t(b * n + b)];
    });

  // Damped inverse by Gauss-Jordan elimination (original column indices throughout).
  double mean = 0;
  for (int64_t j = 0; j < n; ++j) mean += H[size_t(j * n + j)];
  mean /= double(n);
  std::vector<double> A = H, Hinv(size_t(n * n), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    A[size_t(j * n + j)] += opt.damp * mean;
    Hinv[size_t(j * n + j)] = 1;
  }
  for (int64_t c = 0; c < n; ++c) {
    double piv = A[size_t(c * n + c)];
    for (int64_t k = 0; k < n; ++k) {
      A[size_t(c * n + k)] /= piv;
      Hinv[size_t(c * n + k)] /= piv;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      double f = A[size_t(r * n + c)];
      for (int64_t k = 0; k < n; ++k) {
        A[size_t(r * n + k)] -= f * A[size_t(c * n + k)];
        Hinv[size_t(r * n + k)] -= f * Hinv[size_t(c * n + k)];
      }
    }
  }
  auto hi = [&](int64_t a, int64_t b) -> double& { return Hinv[size_t(a * n + b)]; };

  Reference ref;
  ref.weight = Matrix(rows, n);
  ref.codes.resize(size_t(rows * n));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = order[size_t(t)];
    if (dynamic && j % gs == 0) fill(j / gs);
    const double d = hi(j, j);
    for (int64_t r = 0; r < rows; ++r) {
      QuantParams p = params[size_t(r * ng + (spec.group > 0 ? j / gs : 0))];
      double x = w(r, j), q = quant_code(x, p, spec.maxq()), deq = dequant_code(q, p);
      ref.codes[size_t(r * n + j)] = uint8_t(q);
      ref.weight(r, j) = float(deq);
      ref.error += (x - deq) * (x - deq) / d / 2;
      double e = (x - deq) / d;
      for (int64_t u = t + 1; u < n; ++u) w(r, order[size_t(u)]) -= e * hi(j, order[size_t(u)]);
    }
    for (int64_t a = t + 1; a < n; ++a)
      for (int64_t b = t + 1; b < n; ++b) {
        int64_t ia = order[size_t(a)], ib = order[size_t(b)];
        hi(ia, ib) -= hi(ia, j) * hi(j, ib) / d;
      }
  }
  return ref;
}

struct Case {
  const char* name;
  QuantSpec spec;
  GptqOptions opt;
};

std::vector<Case> reference_cases() {
  std::vector<Case> cases;
  GptqOptions small;
  small.block = 32;
  cases.push_back({"per_channel", spec_of(4, true), small});
  cases.push_back({"default_block", spec_of(3, true), {}});
  GptqOptions act = small;
  act.act_order = true;
  cases.push_back({"act_order", spec_of(4, true), act});
  cases.push_back({"groups_aligned", spec_of(4, true, 64), small});
  cases.push_back({"groups_across_blocks", spec_of(3, false, 48), small});
  GptqOptions act_static = act;
  act_static.static_groups = true;
  cases.push_back({"act_order_static_groups", spec_of(4, true, 40), act_static});
  GptqOptions stat = small;
  stat.static_groups = true;
  QuantSpec mse = spec_of(4, false, 64);
  mse.mse_clip = true;
  cases.push_back({"static_groups_mse", mse, stat});
  return cases;
}

}  // namespace

TEST(Hessian, BatchingDoesNotMatter) {
  Matrix X = gaussian_matrix(1000, 24, 11);
  HessianAccumulator all(24), parts(24);
  all.add(X);
  for (int64_t t0 = 0; t0 < X.rows; t0 += 300) {
    int64_t m = std::min<int64_t>(300, X.rows - t0);
    parts.add(X.row(t0), m);
  }
  EXPECT_EQ(parts.tokens(), 1000);
  Matrix direct;
  gemm(X, true, X, false, direct, 2.f / 1000.f);
  Matrix a = all.hessian(), b = parts.hessian();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a.data[i], direct.data[i], 1e-4f);
    EXPECT_NEAR(b.data[i], a.data[i], 1e-5f);
  }
  EXPECT_THROW(all.add(Matrix(3, 5)), Error);
  EXPECT_EQ(HessianAccumulator(4).hessian().data, std::vector<float>(16, 0.f));
}

TEST(Gptq, MatchesNaiveReferenceInDouble) {
  Matrix X = correlated_inputs(600, 160, 21);
  Matrix H = hessian_of(X);
  Matrix W = gaussian_matrix(24, 160, 22);
  for (Case c : reference_cases()) {
    SCOPED_TRACE(c.name);
    Reference ref = naive_gptq(W, H, c.spec, c.opt);
    c.opt.f64 = true;
    GptqResult res = gptq(W, H, c.spec, c.opt);
    EXPECT_EQ(res.q.codes, ref.codes);
    for (size_t i = 0; i < W.size(); ++i)
      ASSERT_NEAR(res.weight.data[i], ref.weight.data[i], 1e-6f);
    EXPECT_NEAR(res.error, ref.error, 1e-9 * ref.error);
    EXPECT_EQ(res.retries, 0);
    EXPECT_EQ(res.weight.data, res.q.dequantize().data);
    // GPTQ chose its codes on the rounded scales (18 - bits significant bits, quantizer.h).
    for (float s : res.q.scales.data) ASSERT_EQ(dq::test::naive_round_up(s, 18 - c.spec.bits), s);
  }
}

TEST(Gptq, F32AgreesWithReference) {
  // f32 rounding flips the odd code at a rounding boundary (and then that row's later columns), so
  // the f32 path is held to near-identity, not equality.
  Matrix X = correlated_inputs(600, 160, 23);
  Matrix H = hessian_of(X);
  Matrix W = gaussian_matrix(24, 160, 24);
  for (const Case& c : reference_cases()) {
    SCOPED_TRACE(c.name);
    Reference ref = naive_gptq(W, H, c.spec, c.opt);
    GptqResult res = gptq(W, H, c.spec, c.opt);
    size_t same = 0;
    for (size_t i = 0; i < ref.codes.size(); ++i) same += res.q.codes[i] == ref.codes[i];
    EXPECT_GE(double(same), 0.99 * double(ref.codes.size()));
    EXPECT_NEAR(res.error, ref.error, 0.01 * ref.error);
    EXPECT_NEAR(output_error(X, W, res.weight), output_error(X, W, ref.weight),
                0.01 * output_error(X, W, ref.weight));
    EXPECT_EQ(res.weight.data, res.q.dequantize().data);
  }
}

TEST(Gptq, ProxyErrorIsTheDampedQuadraticForm) {
  // Sequential OBS on a quadratic is exact: the summed step losses equal
  // ½ Σ_rows (w - ŵ)ᵀ (H + λI) (w - ŵ).
  Matrix X = correlated_inputs(400, 96, 31);
  Matrix H = hessian_of(X);
  Matrix W = gaussian_matrix(16, 96, 32);
  GptqOptions opt;
  opt.f64 = true;
  opt.act_order = true;
  GptqResult res = gptq(W, H, spec_of(3, true), opt);
  double mean = 0;
  for (int64_t j = 0; j < 96; ++j) mean += H(j, j);
  mean /= 96;
  double quad = 0;
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t a = 0; a < 96; ++a)
      for (int64_t b = 0; b < 96; ++b) {
        double h = double(H(a, b)) + (a == b ? res.damp * mean : 0.0);
        quad += double(W(r, a) - res.weight(r, a)) * h * double(W(r, b) - res.weight(r, b));
      }
  EXPECT_NEAR(res.error, 0.5 * quad, 1e-6 * quad);
}

TEST(Gptq, BeatsRtnOnCorrelatedInputs) {
  Matrix X = correlated_inputs(2048, 256, 41);
  HessianAccumulator acc(256);
  for (int64_t t0 = 0; t0 < X.rows; t0 += 512) acc.add(X.row(t0), 512);
  Matrix H = acc.hessian();
  Matrix W = gaussian_matrix(128, 256, 42);
  struct Setting {
    QuantSpec spec;
    bool act_order;
  };
  QuantSpec mse = spec_of(4, true);
  mse.mse_clip = true;
  for (Setting s : {Setting{spec_of(4, true), false}, Setting{spec_of(4, true), true},
                    Setting{spec_of(3, false, 64), false}, Setting{mse, true}}) {
    GptqOptions opt;
    opt.act_order = s.act_order;
    opt.static_groups = true;
    double e_rtn = output_error(X, W, quantize(W, s.spec).dequantize());
    double e_gptq = output_error(X, W, gptq(W, H, s.spec, opt).weight);
    EXPECT_LT(e_gptq, 0.8 * e_rtn) << "bits " << s.spec.bits << " act_order " << s.act_order;
  }
}

TEST(Gptq, DeadColumns) {
  Matrix X = correlated_inputs(512, 64, 51);
  for (int64_t t = 0; t < X.rows; ++t) X(t, 5) = X(t, 17) = 0.f;  // inputs never reach 5, 17
  Matrix H = hessian_of(X);
  Matrix W = gaussian_matrix(32, 64, 52);
  for (bool act : {false, true}) {
    GptqOptions opt;
    opt.act_order = act;
    GptqResult res = gptq(W, H, spec_of(4, false), opt);
    EXPECT_EQ(res.dead_columns, 2);
    for (int64_t r = 0; r < W.rows; ++r) {
      EXPECT_EQ(res.weight(r, 5), 0.f);
      EXPECT_EQ(res.weight(r, 17), 0.f);
    }
    for (float v : res.weight.data) ASSERT_TRUE(std::isfinite(v));
    EXPECT_LT(output_error(X, W, res.weight),
              output_error(X, W, quantize(W, spec_of(4, false)).dequantize()));
  }
}

TEST(Gptq, CholeskyFailureRetriesWithMoreDamping) {
  // H = XᵀX-like minus a large rank-one term: indefinite, with λ_min ≈ -2·mean(diag H).
  const int64_t n = 32;
  Matrix H = hessian_of(correlated_inputs(256, n, 61));
  double mean = 0;
  for (int64_t j = 0; j < n; ++j) mean += H(j, j);
  mean /= double(n);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) H(a, b) -= float(3.0 * mean / double(n));
  Matrix W = gaussian_matrix(8, n, 62);
  GptqResult res = gptq(W, H, spec_of(4, true));
  EXPECT_GE(res.retries, 1);
  EXPECT_NEAR(res.damp, 0.01 * std::pow(10.0, res.retries), 1e-12);
  for (float v : res.weight.data) ASSERT_TRUE(std::isfinite(v));
  GptqOptions strict;
  strict.max_retries = 0;
  EXPECT_THROW(gptq(W, H, spec_of(4, true), strict), Error);
}

TEST(Gptq, RejectsBadInput) {
  Matrix W = gaussian_matrix(4, 8, 71), H = Matrix::identity(8);
  EXPECT_THROW(gptq(W, Matrix::identity(7), spec_of(4, true)), Error);
  EXPECT_THROW(gptq(W, H, QuantSpec{}), Error);
  GptqOptions act;
  act.act_order = true;
  EXPECT_THROW(gptq(W, H, spec_of(4, true, 4), act), Error);
  act.static_groups = true;
  EXPECT_NO_THROW(gptq(W, H, spec_of(4, true, 4), act));
  H(2, 2) = std::nanf("");
  EXPECT_THROW(gptq(W, H, spec_of(4, true)), Error);
}
