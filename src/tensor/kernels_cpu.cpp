#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "tensor/kernels.h"

namespace dq {

void sgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m == 1) {
    // One row (decoding a token): OpenBLAS's sgemm packs all of B on every call, sgemv streams it
    // once. c = op(B)ᵀ·a, where a is A's only row (or, transposed, its only column).
    const int inc_a = transA ? int(lda) : 1;
    if (transB)  // B is n x k
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(n), int(k), alpha, B, int(ldb), A, inc_a, beta, C, 1);
    else  // B is k x n
      cblas_sgemv(CblasRowMajor, CblasTrans, int(k), int(n), alpha, B, int(ldb), A, inc_a, beta, C, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
              int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

void dgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
           int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m == 1) {  // as sgemm: a row streams B once instead of packing it
    const int inc_a = transA ? int(lda) : 1;
    cblas_dgemv(CblasRowMajor, transB ? CblasNoTrans : CblasTrans, transB ? int(n) : int(k), transB ? int(k) : int(n),
                alpha, B, int(ldb), A, inc_a, beta, C, 1);
    return;
  }
  cblas_dgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
              int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

void gemm(const Matrix& A, bool transA, const Matrix& B, bool transB, Matrix& C, float alpha,
          float beta) {
  int64_t m = transA ? A.cols : A.rows, k = transA ? A.rows : A.cols;
  int64_t kb = transB ? B.cols : B.rows, n = transB ? B.rows : B.cols;
  if (k != kb) throw Error("gemm: inner dimensions differ (" + std::to_string(k) + " vs " +
                           std::to_string(kb) + ")");
  if (beta == 0.f) {
    if (C.rows != m || C.cols != n) C.reshape_for_overwrite(m, n);
  } else if (C.rows != m || C.cols != n) {
    throw Error("gemm: output shape mismatch");
  }
  if (k == 0) {
    // beta == 0 must not propagate NaN/Inf from reused storage.
    for (float& v : C.data) v = beta == 0.f ? 0.f : v * beta;
    return;
  }
  sgemm(transA, transB, m, n, k, alpha, A.data.data(), A.cols, B.data.data(), B.cols, beta,
        C.data.data(), n);
}

Matrix linear(const Matrix& X, const Matrix& W) {
  Matrix Y;
  linear(X, W, Y);
  return Y;
}

void linear(const Matrix& X, const Matrix& W, Matrix& Y) { gemm(X, false, W, true, Y); }

Matrix matmul(const Matrix& A, const Matrix& B) {
  Matrix Y;
  gemm(A, false, B, false, Y);
  return Y;
}

void rmsnorm(Matrix& x, const float* gain, float eps) {
#pragma omp parallel for schedule(static) if (int64_t(x.size()) > kParallelMinWork)
  for (int64_t i = 0; i < x.rows; ++i) {
    float* r = x.row(i);
    double ss = 0;
    for (int64_t j = 0; j < x.cols; ++j) ss += double(r[j]) * r[j];
    float inv = float(1.0 / std::sqrt(ss / double(x.cols) + eps));
    for (int64_t j = 0; j < x.cols; ++j) r[j] = r[j] * inv * (gain ? gain[j] : 1.f);
  }
}

void softmax(float* x, int64_t n) {
  float mx = *std::max_element(x, x + n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    s += x[i];
  }
  float inv = float(1.0 / s);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(Matrix& gate, const Matrix& up) {
  if (gate.size() != up.size()) throw Error("swiglu: shape mismatch");
  float* g = gate.data.data();
  const float* u = up.data.data();
  const int64_t n = int64_t(gate.size());
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

void set_num_threads(int n) {
  n = std::max(1, n);
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace dq
