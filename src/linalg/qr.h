// QR of square matrices with the sign convention diag(U) > 0, which makes the factorisation
// unique, and its reverse-mode derivative. Two routes to the same factors: Householder (LAPACK
// geqrf/orgqr, panel work that runs far below the BLAS-3 rate) and Cholesky QR (syrk, potrf,
// trsm: BLAS-3 throughout, accurate when Z is well conditioned, as QR-Orth's latent is).
#pragma once
#include <cstdint>

#include "tensor/tensor.h"

namespace dq {

// Z = Q·U for a row-major n×n Z: Q orthogonal, U upper triangular with a positive diagonal.
// T is float or double. Throws Error if Z is singular (a zero on U's diagonal).
template <class T>
void qr_positive(int64_t n, const T* Z, T* Q, T* U);

// The same factors by Cholesky QR: U₁ = chol(ZᵀZ), Q₁ = Z·U₁⁻¹. One pass loses orthogonality as
// ~κ(Z)²·ε; when Q₁'s column norms are off 1 by more than 32ε, a second pass (Cholesky QR2:
// U₂ = chol(Q₁ᵀQ₁), Q = Q₁·U₂⁻¹, U = U₂·U₁) restores it. Cholesky's diagonal is positive, so
// this is the unique positive-diagonal QR. Where Z is too ill-conditioned for it (a Cholesky
// fails, or a pass's diagonal spans more than 1e2, a lower bound on κ), it falls back to
// qr_positive's Householder route and returns false.
template <class T>
bool qr_positive_cholesky(int64_t n, const T* Z, T* Q, T* U);

// Reverse mode of qr_positive for an upstream gradient on Q only (Ū = 0):
//   Z̄ = Q · tril(QᵀQ̄ − Q̄ᵀQ, −1) · U⁻ᵀ
// (equal to METHOD.md's (Q̄ + Q·copyltu(−Q̄ᵀQ))·U⁻ᵀ for square Z; checked against finite
// differences in tests/linalg).
template <class T>
void qr_backward(int64_t n, const T* Q, const T* U, const T* Qbar, T* Zbar);

// The same from B = QᵀQ̄ (Z̄ = Q·tril(B − Bᵀ, −1)·U⁻ᵀ). For a loss of O = X·Q, B = Oᵀ·(dL/dO):
// the caller never forms Q̄ = Xᵀ·dL/dO, which saves an n×n×n product per step.
template <class T>
void qr_backward_from_b(int64_t n, const T* Q, const T* U, const T* B, T* Zbar);

// float conveniences on Matrix.
struct QRFactors {
  Matrix Q, U;
};
QRFactors qr_positive(const Matrix& Z);
QRFactors qr_positive_cholesky(const Matrix& Z);
Matrix qr_backward(const QRFactors& f, const Matrix& Qbar);
Matrix qr_backward_from_b(const QRFactors& f, const Matrix& B);

// A seeded Haar-random orthogonal n×n matrix (Q of a Gaussian matrix, diag(U) > 0).
Matrix random_orthogonal(int64_t n, uint64_t seed);

}  // namespace dq
