#include "linalg/qr.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <limits>
#include <random>
#include <string>

namespace dq {

namespace {

// Thin overloads so the templates below pick the s/d LAPACK and BLAS routine.
lapack_int geqrf(lapack_int n, float* a, float* tau) {
  return LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, n, n, a, n, tau);
}
lapack_int geqrf(lapack_int n, double* a, double* tau) {
  return LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, n, n, a, n, tau);
}
lapack_int orgqr(lapack_int n, float* a, const float* tau) {
  return LAPACKE_sorgqr(LAPACK_ROW_MAJOR, n, n, n, a, n, tau);
}
lapack_int orgqr(lapack_int n, double* a, const double* tau) {
  return LAPACKE_dorgqr(LAPACK_ROW_MAJOR, n, n, n, a, n, tau);
}
void gemm(bool ta, bool tb, int n, float alpha, const float* A, const float* B, float* C) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, n, n,
              n, alpha, A, n, B, n, 0.f, C, n);
}
void gemm(bool ta, bool tb, int n, double alpha, const double* A, const double* B, double* C) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, n, n,
              n, alpha, A, n, B, n, 0.0, C, n);
}
// X ← X·P for lower-triangular P.
void trmm_right_lower(int n, const float* P, float* X) {
  cblas_strmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, n, n, 1.f, P, n, X,
              n);
}
void trmm_right_lower(int n, const double* P, double* X) {
  cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, n, n, 1.0, P, n, X,
              n);
}
// X ← X·U⁻ᵀ (X·Uᵀ = B solved in place) for upper-triangular U.
void trsm_right_upper_t(int n, const float* U, float* X) {
  cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit, n, n, 1.f, U, n, X,
              n);
}
void trsm_right_upper_t(int n, const double* U, double* X) {
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit, n, n, 1.0, U, n, X,
              n);
}

// G ← upper triangle of AᵀA (lower left untouched).
void syrk_upper_ata(int n, const float* A, float* G) {
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, n, n, 1.f, A, n, 0.f, G, n);
}
void syrk_upper_ata(int n, const double* A, double* G) {
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, n, n, 1.0, A, n, 0.0, G, n);
}
// G = UᵀU in place on G's upper triangle. A row-major upper triangle is LAPACK's column-major
// lower one, so asking for 'L' in column-major order avoids LAPACKE's row-major transpose copies.
lapack_int potrf_upper(lapack_int n, float* G) { return LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', n, G, n); }
lapack_int potrf_upper(lapack_int n, double* G) { return LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', n, G, n); }
// X ← X·U⁻¹ for upper-triangular U.
void trsm_right_upper(int n, const float* U, float* X) {
  cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, n, n, 1.f, U, n, X, n);
}
void trsm_right_upper(int n, const double* U, double* X) {
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, n, n, 1.0, U, n, X, n);
}
// X ← U·X for upper-triangular U.
void trmm_left_upper(int n, const float* U, float* X) {
  cblas_strmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, n, n, 1.f, U, n, X, n);
}
void trmm_left_upper(int n, const double* U, double* X) {
  cblas_dtrmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, n, n, 1.0, U, n, X, n);
}

// One Cholesky QR pass: U = chol(QᵀQ) (its strictly lower part zero), Q ← Q·U⁻¹. False when the
// Cholesky fails or U's diagonal spans more than max_ratio.
template <class T>
bool cholesky_qr_pass(int64_t n, T* Q, T* U, T max_ratio) {
  const int ni = int(n);
  std::fill(U, U + n * n, T(0));
  syrk_upper_ata(ni, Q, U);
  if (potrf_upper(lapack_int(n), U) != 0) return false;
  T lo = U[0], hi = U[0];
  for (int64_t i = 0; i < n; ++i) lo = std::min(lo, U[i * n + i]), hi = std::max(hi, U[i * n + i]);
  if (!(lo > T(0)) || hi > max_ratio * lo) return false;
  trsm_right_upper(ni, U, Q);
  return true;
}

}  // namespace

template <class T>
bool qr_positive_cholesky(int64_t n, const T* Z, T* Q, T* U) {
  std::copy(Z, Z + n * n, Q);
  if (cholesky_qr_pass(n, Q, U, T(100))) {
    // One pass loses orthogonality as ~κ(Z)²·ε, and it shows in the column norms (measured: the
    // largest |‖q_j‖² − 1| is ~8x the largest error of Q). Near-orthogonal Z needs no second pass.
    std::vector<double> norms(size_t(n), 0.0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < n; ++j) norms[size_t(j)] += double(Q[r * n + j]) * double(Q[r * n + j]);
    double worst = 0;
    for (double v : norms) worst = std::max(worst, std::abs(v - 1.0));
    if (worst <= 32.0 * double(std::numeric_limits<T>::epsilon())) return true;
    std::vector<T> U2(size_t(n * n));
    if (cholesky_qr_pass(n, Q, U2.data(), T(100))) {
      trmm_left_upper(int(n), U2.data(), U);  // U = U₂·U₁
      return true;
    }
  }
  qr_positive(n, Z, Q, U);
  return false;
}

template <class T>
void qr_positive(int64_t n, const T* Z, T* Q, T* U) {
  const size_t nn = size_t(n * n);
  std::vector<T> a(Z, Z + nn), tau(static_cast<size_t>(n));
  if (lapack_int info = geqrf(lapack_int(n), a.data(), tau.data()); info != 0)
    throw Error("qr: geqrf failed (info " + std::to_string(info) + ")");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) U[i * n + j] = j >= i ? a[size_t(i * n + j)] : T(0);
  if (lapack_int info = orgqr(lapack_int(n), a.data(), tau.data()); info != 0)
    throw Error("qr: orgqr failed (info " + std::to_string(info) + ")");
  std::copy(a.begin(), a.end(), Q);
  // Z = (Q·D)(D·U) for D = diag(sign(U_ii)): flip columns of Q and rows of U where U_ii < 0.
  for (int64_t i = 0; i < n; ++i) {
    T d = U[i * n + i];
    if (d == T(0)) throw Error("qr: matrix is singular (zero pivot " + std::to_string(i) + ")");
    if (d < T(0)) {
      for (int64_t j = i; j < n; ++j) U[i * n + j] = -U[i * n + j];
      for (int64_t r = 0; r < n; ++r) Q[r * n + i] = -Q[r * n + i];
    }
  }
}

template <class T>
void qr_backward(int64_t n, const T* Q, const T* U, const T* Qbar, T* Zbar) {
  std::vector<T> B(size_t(n * n));
  gemm(true, false, int(n), T(1), Q, Qbar, B.data());  // B = QᵀQ̄
  qr_backward_from_b(n, Q, U, B.data(), Zbar);
}

template <class T>
void qr_backward_from_b(int64_t n, const T* Q, const T* U, const T* B, T* Zbar) {
  const int ni = int(n);
  std::vector<T> P(size_t(n * n), T(0));
  for (int64_t i = 1; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) P[size_t(i * n + j)] = B[size_t(i * n + j)] - B[size_t(j * n + i)];
  std::copy(Q, Q + n * n, Zbar);
  trmm_right_lower(ni, P.data(), Zbar);  // Q·tril(B − Bᵀ, −1) (P's zero diagonal is used as is)
  trsm_right_upper_t(ni, U, Zbar);
}

template void qr_positive<float>(int64_t, const float*, float*, float*);
template void qr_positive<double>(int64_t, const double*, double*, double*);
template void qr_backward<float>(int64_t, const float*, const float*, const float*, float*);
template void qr_backward<double>(int64_t, const double*, const double*, const double*, double*);
template bool qr_positive_cholesky<float>(int64_t, const float*, float*, float*);
template bool qr_positive_cholesky<double>(int64_t, const double*, double*, double*);
template void qr_backward_from_b<float>(int64_t, const float*, const float*, const float*, float*);
template void qr_backward_from_b<double>(int64_t, const double*, const double*, const double*, double*);

QRFactors qr_positive(const Matrix& Z) {
  if (Z.rows != Z.cols) throw Error("qr: matrix must be square");
  QRFactors f{Matrix(Z.rows, Z.rows), Matrix(Z.rows, Z.rows)};
  qr_positive<float>(Z.rows, Z.data.data(), f.Q.data.data(), f.U.data.data());
  return f;
}

QRFactors qr_positive_cholesky(const Matrix& Z) {
  if (Z.rows != Z.cols) throw Error("qr: matrix must be square");
  QRFactors f{Matrix(Z.rows, Z.rows), Matrix(Z.rows, Z.rows)};
  qr_positive_cholesky<float>(Z.rows, Z.data.data(), f.Q.data.data(), f.U.data.data());
  return f;
}

Matrix qr_backward_from_b(const QRFactors& f, const Matrix& B) {
  if (B.rows != f.Q.rows || B.cols != f.Q.cols) throw Error("qr_backward: shape mismatch");
  Matrix Zbar(f.Q.rows, f.Q.cols);
  qr_backward_from_b<float>(f.Q.rows, f.Q.data.data(), f.U.data.data(), B.data.data(), Zbar.data.data());
  return Zbar;
}

Matrix qr_backward(const QRFactors& f, const Matrix& Qbar) {
  if (Qbar.rows != f.Q.rows || Qbar.cols != f.Q.cols) throw Error("qr_backward: shape mismatch");
  Matrix Zbar(f.Q.rows, f.Q.cols);
  qr_backward<float>(f.Q.rows, f.Q.data.data(), f.U.data.data(), Qbar.data.data(),
                     Zbar.data.data());
  return Zbar;
}

Matrix random_orthogonal(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> Z(size_t(n * n)), Q(Z.size()), U(Z.size());
  for (double& z : Z) z = normal(rng);
  qr_positive<double>(n, Z.data(), Q.data(), U.data());
  Matrix R(n, n);
  for (size_t i = 0; i < Q.size(); ++i) R.data[i] = float(Q[i]);
  return R;
}

}  // namespace dq
