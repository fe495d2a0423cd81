// Householder QR of square matrices (LAPACK geqrf/orgqr) with the sign convention diag(U) > 0,
// which makes the factorisation unique, and its reverse-mode derivative.
#pragma once
#include <cstdint>

#include "tensor/tensor.h"

namespace dq {

// Z = Q·U for a row-major n×n Z: Q orthogonal, U upper triangular with a positive diagonal.
// T is float or double. Throws Error if Z is singular (a zero on U's diagonal).
template <class T>
void qr_positive(int64_t n, const T* Z, T* Q, T* U);

// Reverse mode of qr_positive for an upstream gradient on Q only (Ū = 0):
//   Z̄ = Q · tril(QᵀQ̄ − Q̄ᵀQ, −1) · U⁻ᵀ
// (equal to METHOD.md's (Q̄ + Q·copyltu(−Q̄ᵀQ))·U⁻ᵀ for square Z; checked against finite
// differences in tests/linalg).
template <class T>
void qr_backward(int64_t n, const T* Q, const T* U, const T* Qbar, T* Zbar);

// float conveniences on Matrix.
struct QRFactors {
  Matrix Q, U;
};
QRFactors qr_positive(const Matrix& Z);
Matrix qr_backward(const QRFactors& f, const Matrix& Qbar);

// A seeded Haar-random orthogonal n×n matrix (Q of a Gaussian matrix, diag(U) > 0).
Matrix random_orthogonal(int64_t n, uint64_t seed);

}  // namespace dq
