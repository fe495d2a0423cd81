// Matrix storage, output-reusing linear/gemm, and the parallel dtype conversion with its finite check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "tensor/kernels.h"

#include "test_helpers.h"

using namespace dq;
using dq::test::gaussian_matrix;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Large enough that conversion runs on the thread pool (and Matrix storage gets huge-page advice).
constexpr size_t kBig = size_t(kParallelMinWork) * 3 + 17;

}  // namespace

TEST(Matrix, LargeStorageIsFilledAndCopied) {
  Matrix z(1000, 1500), f(1000, 1500, 2.5f);
  for (size_t i = 0; i < z.size(); ++i) ASSERT_EQ(bits(z.data[i]), 0u) << i;
  for (float v : f.data) ASSERT_EQ(v, 2.5f);
  const Matrix r = gaussian_matrix(1000, 1500, 3);
  const Matrix c = r;
  EXPECT_EQ(c.rows, r.rows);
  EXPECT_EQ(c.cols, r.cols);
  EXPECT_EQ(c.data, r.data);
}

TEST(Matrix, ReshapeForOverwriteKeepsLargeEnoughStorage) {
  Matrix m(64, 64);
  const float* p = m.data.data();
  m.reshape_for_overwrite(32, 100);
  EXPECT_EQ(m.rows, 32);
  EXPECT_EQ(m.cols, 100);
  EXPECT_EQ(m.size(), 3200u);
  EXPECT_EQ(m.data.data(), p);
  m.reshape_for_overwrite(64, 64);  // back within capacity
  EXPECT_EQ(m.data.data(), p);
  m.reshape_for_overwrite(100, 100);  // grows: new storage of the new size
  EXPECT_EQ(m.size(), 10000u);
}

TEST(Linear, IntoReusedOutputMatchesFreshOutputBitForBit) {
  const Matrix W1 = gaussian_matrix(96, 80, 1), W2 = gaussian_matrix(40, 80, 2), W3 = gaussian_matrix(200, 80, 4);
  const Matrix X = gaussian_matrix(50, 80, 3);
  Matrix Y(50, 200, std::numeric_limits<float>::quiet_NaN());  // stale contents must not leak through
  for (const Matrix* W : {&W1, &W2, &W3, &W1}) {  // shrink, grow past capacity, shrink again
    linear(X, *W, Y);
    const Matrix ref = linear(X, *W);
    EXPECT_EQ(Y.rows, X.rows);
    EXPECT_EQ(Y.cols, W->rows);
    EXPECT_EQ(Y.data, ref.data);
  }
}

TEST(Gemm, OneRowProductsMatchANaiveReference) {
  // A single output row goes through sgemv instead of sgemm: every transpose combination, alpha and
  // beta, against a sum in double.
  const int64_t k = 37, n = 29;
  const Matrix a_row = gaussian_matrix(1, k, 5), a_col = gaussian_matrix(k, 1, 5);
  const Matrix B_nk = gaussian_matrix(n, k, 6), B_kn = gaussian_matrix(k, n, 6);
  const Matrix C0 = gaussian_matrix(1, n, 7);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const Matrix& A = ta ? a_col : a_row;
      const Matrix& B = tb ? B_nk : B_kn;
      Matrix C = C0;
      gemm(A, ta, B, tb, C, 0.5f, 2.f);
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0;
        for (int64_t i = 0; i < k; ++i) ref += double(A.data[size_t(i)]) * (tb ? B(j, i) : B(i, j));
        EXPECT_NEAR(C(0, j), 0.5 * ref + 2.0 * C0(0, j), 1e-5) << ta << tb << j;
      }
    }
}

TEST(Gemm, ColumnSplitOverThreadsMatchesANaiveReference) {
  // Products above the split threshold run as column ranges on the OpenMP threads (boundaries at
  // multiples of 16; n = 1001 leaves an odd last range).
  // sgemm and dgemm, one row and many, every transpose, leading dimensions wider than the operands,
  // beta != 0; against sums in double, at 1, 2 and 3 threads.
  const int threads_before = num_threads();
  const int64_t k = 300, n = 1001, pad = 5;
  for (int64_t m : {1, 40})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        // Operands as stored: A is m x k (or k x m), B is n x k (or k x n), each row padded.
        const int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
        const Matrix A = gaussian_matrix(ta ? k : m, lda, 21), B = gaussian_matrix(tb ? n : k, ldb, 22);
        const Matrix C0 = gaussian_matrix(m, ldc, 23);
        auto a = [&](int64_t i, int64_t l) { return double(ta ? A(l, i) : A(i, l)); };
        auto b = [&](int64_t l, int64_t j) { return double(tb ? B(j, l) : B(l, j)); };
        std::vector<double> Ad(A.data.begin(), A.data.end()), Bd(B.data.begin(), B.data.end());
        for (int threads : {1, 2, 3}) {
          set_num_threads(threads);
          Matrix C = C0;
          std::vector<double> Cd(C0.data.begin(), C0.data.end());
          sgemm(ta, tb, m, n, k, 0.5f, A.data.data(), lda, B.data.data(), ldb, 2.f, C.data.data(), ldc);
          dgemm(ta, tb, m, n, k, 0.5, Ad.data(), lda, Bd.data(), ldb, 2.0, Cd.data(), ldc);
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < n; ++j) {
              double ref = 0;
              for (int64_t l = 0; l < k; ++l) ref += a(i, l) * b(l, j);
              ref = 0.5 * ref + 2.0 * C0(i, j);
              ASSERT_NEAR(C(i, j), ref, 1e-3) << m << ta << tb << threads << " " << i << "," << j;
              ASSERT_NEAR(Cd[size_t(i * ldc + j)], ref, 1e-9) << m << ta << tb << threads << " " << i << "," << j;
            }
            for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(C(i, j), C0(i, j)) << "padding written";
          }
        }
      }
  set_num_threads(threads_before);
}

TEST(Gemv, StoredRowsMatchANaiveReferenceInEveryDType) {
  // Weights read in place as F32, F16 or BF16 (at an odd byte offset, as a mapped tensor may be),
  // widths covering the 32- and 8-column loops and their tails, enough rows to run in parallel;
  // the reference converts each stored value with the scalar conversions and sums in double.
  for (int64_t cols : {1, 7, 8, 31, 32, 45, 576}) {
    const int64_t rows = 300;
    const Matrix W = gaussian_matrix(rows, cols, 11), x = gaussian_matrix(1, cols, 12);
    for (DType t : {DType::F32, DType::F16, DType::BF16}) {
      const size_t es = dtype_size(t);
      std::vector<uint8_t> stored(1 + size_t(rows * cols) * es);
      std::vector<float> widened(size_t(rows * cols));
      for (size_t i = 0; i < widened.size(); ++i) {
        const float v = W.data[i];
        const uint16_t h = t == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
        widened[i] = t == DType::F32 ? v : t == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
        if (t == DType::F32) std::memcpy(&stored[1 + i * es], &v, 4);
        else std::memcpy(&stored[1 + i * es], &h, 2);
      }
      std::vector<float> y(size_t(rows), NAN);
      gemv(t, stored.data() + 1, rows, cols, x.data.data(), y.data());
      for (int64_t r = 0; r < rows; ++r) {
        double ref = 0, mag = 0;
        for (int64_t c = 0; c < cols; ++c) {
          ref += double(widened[size_t(r * cols + c)]) * x.data[size_t(c)];
          mag += std::abs(double(widened[size_t(r * cols + c)]) * x.data[size_t(c)]);
        }
        EXPECT_NEAR(y[size_t(r)], ref, 1e-5 * mag) << dtype_name(t) << " cols " << cols << " row " << r;
      }
    }
  }
  EXPECT_THROW(gemv(DType::I8, nullptr, 1, 1, nullptr, nullptr), Error);
}

TEST(Gemm, DoubleProductsMatchANaiveReference) {
  // dgemm, one row (dgemv) and several, every transpose combination, alpha and beta: small integers,
  // so every product and sum is exact and the results must be equal.
  const int64_t k = 37, n = 29;
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> v(-50, 50);
  auto random = [&](int64_t count) {
    std::vector<double> x(static_cast<size_t>(count));
    for (double& e : x) e = v(rng);
    return x;
  };
  for (int64_t m : {1, 3})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        const std::vector<double> A = random(m * k), B = random(k * n), C0 = random(m * n);
        std::vector<double> C = C0;
        const int64_t lda = ta ? m : k, ldb = tb ? k : n;
        dgemm(ta, tb, m, n, k, 0.5, A.data(), lda, B.data(), ldb, 2.0, C.data(), n);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < n; ++j) {
            double ref = 0;
            for (int64_t i = 0; i < k; ++i)
              ref += A[size_t(ta ? i * lda + r : r * lda + i)] * B[size_t(tb ? j * ldb + i : i * ldb + j)];
            EXPECT_EQ(C[size_t(r * n + j)], 0.5 * ref + 2.0 * C0[size_t(r * n + j)]) << m << ta << tb << j;
          }
      }
}

TEST(Linear, InnerDimensionZeroGivesZerosInReusedOutput) {
  Matrix X(4, 0), W(3, 0), Y(4, 3, std::numeric_limits<float>::infinity());
  linear(X, W, Y);
  for (float v : Y.data) EXPECT_EQ(v, 0.f);
}

TEST(Linear, RejectsMismatchedInnerDimension) {
  Matrix Y;
  EXPECT_THROW(linear(Matrix(2, 3), Matrix(4, 5), Y), Error);
}

TEST(Kernels, VectorisedExpMatchesLibm) {
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.f * float(i) / 200000.f;
    const double ref = std::exp(double(x));
    worst = std::max(worst, std::abs(double(exp_nonpositive(x)) - ref) / ref);
  }
  EXPECT_LT(worst, 1e-6);
  EXPECT_EQ(exp_nonpositive(0.f), 1.f);
  EXPECT_GT(exp_nonpositive(-1000.f), 0.f);  // clamped, not 0 or NaN
  EXPECT_LT(exp_nonpositive(-1000.f), 2e-38f);
}

// Lengths around the vector width and a long row; values spread so that some exponentials underflow.
TEST(Kernels, SoftmaxMatchesADoubleReference) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 8.f);
  for (int64_t n : {1, 3, 8, 9, 17, 1000}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = nd(rng);
    std::vector<double> ref(x.begin(), x.end());
    const double mx = *std::max_element(ref.begin(), ref.end());
    double sum = 0;
    for (double& v : ref) sum += (v = std::exp(v - mx));
    softmax(x.data(), n);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      // exp's own error plus that of the float argument x − max (half an ulp of its magnitude).
      const double arg = std::abs(std::log(ref[size_t(i)])), rel = 2e-6 + arg * 6e-8;
      EXPECT_NEAR(x[size_t(i)], ref[size_t(i)] / sum, rel * ref[size_t(i)] / sum + 1e-30) << n << " " << i;
      total += x[size_t(i)];
    }
    EXPECT_NEAR(total, 1.0, 1e-5);
  }
}

// silu(g)·u against g·u/(1 + e^−g) in double, including gates far out on both sides.
TEST(Kernels, SwigluMatchesADoubleReference) {
  Matrix gate = gaussian_matrix(3, 37, 11, 6.f), up = gaussian_matrix(3, 37, 12);
  gate(0, 0) = 120.f;
  gate(0, 1) = -120.f;
  gate(0, 2) = 0.f;
  const Matrix g0 = gate;
  swiglu(gate, up);
  for (size_t i = 0; i < gate.size(); ++i) {
    const double g = g0.data[i], ref = g / (1.0 + std::exp(-g)) * up.data[i];
    ASSERT_TRUE(std::isfinite(gate.data[i]));
    EXPECT_NEAR(gate.data[i], ref, 1e-6 * std::abs(ref) + 1e-30) << i;
  }
}

TEST(ConvertToF32, HalfFormatsMatchScalarConversionInParallel) {
  std::vector<uint16_t> h(kBig);
  for (size_t i = 0; i < h.size(); ++i) h[i] = uint16_t(i * 2654435761u >> 7);  // every bit pattern mix
  for (DType t : {DType::BF16, DType::F16}) {
    for (uint16_t& v : h)  // keep finite: clear exponent-all-ones patterns
      if ((t == DType::BF16 ? (v & 0x7F80) == 0x7F80 : (v & 0x7C00) == 0x7C00)) v &= 0xBFFF;
    std::vector<float> out(h.size());
    EXPECT_TRUE(convert_to_f32(t, h.data(), h.size(), out.data())) << dtype_name(t);
    for (size_t i = 0; i < h.size(); ++i) {
      const float ref = t == DType::BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
      ASSERT_EQ(bits(out[i]), bits(ref)) << dtype_name(t) << " element " << i;
    }
  }
}

TEST(ConvertToF32, ReportsNaNOrInfAnywhere) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t at : {size_t(0), kBig / 2, kBig - 1}) {
    for (float bad : {nan, inf, -inf}) {
      std::vector<float> f(kBig, 1.5f), out(kBig);
      f[at] = bad;
      EXPECT_FALSE(convert_to_f32(DType::F32, f.data(), f.size(), out.data())) << at;
      EXPECT_EQ(bits(out[at]), bits(bad));
      std::vector<uint16_t> b(kBig, f32_to_bf16(1.5f)), h(kBig, f32_to_f16(1.5f));
      b[at] = f32_to_bf16(bad);
      h[at] = f32_to_f16(bad);
      EXPECT_FALSE(convert_to_f32(DType::BF16, b.data(), b.size(), out.data())) << at;
      EXPECT_FALSE(convert_to_f32(DType::F16, h.data(), h.size(), out.data())) << at;
    }
  }
  std::vector<double> d(kBig, 0.25);
  std::vector<float> out(kBig);
  EXPECT_TRUE(convert_to_f32(DType::F64, d.data(), d.size(), out.data()));
  d[7] = 1e300;  // finite in f64, Inf once narrowed to f32
  EXPECT_FALSE(convert_to_f32(DType::F64, d.data(), d.size(), out.data()));
}
