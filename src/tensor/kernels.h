// The compute backend seam: every dense kernel the model, quantizers and optimizers use.
// The CPU implementation (kernels_cpu.cpp) uses OpenBLAS and OpenMP; another backend provides the
// same functions.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tensor/tensor.h"

namespace dq {

// C = alpha * op(A) * op(B) + beta * C with row-major operands; op = transpose when the flag is set.
// Shapes are checked; when beta == 0, C is reshaped, reusing its storage if large enough.
void gemm(const Matrix& A, bool transA, const Matrix& B, bool transB, Matrix& C,
          float alpha = 1.f, float beta = 0.f);
// Y = X Wᵀ (a linear layer; W is out x in).
Matrix linear(const Matrix& X, const Matrix& W);
// The same into Y, reusing Y's storage when large enough: hot loops keep their output buffers
// instead of allocating (and page-faulting in) a fresh one per call. Y must not be X or W.
void linear(const Matrix& X, const Matrix& W, Matrix& Y);
// Y = A B.
Matrix matmul(const Matrix& A, const Matrix& B);

// Raw row-major sgemm: C[m,n] = alpha * op(A) op(B) + beta * C, leading dimensions given.
void sgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The same in double (the fake-quant reference's exact products, quant/quantize_model.h).
void dgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
           int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// y[r] = Σ_c W[r, c] · x[c] for a row-major rows x cols W stored as F32, F16 or BF16 and read where
// it is (decoding multiplies a mapped 16-bit classifier in place instead of keeping an f32 copy of
// twice its size). Accumulates in f32 partial sums (a different order from sgemv's).
void gemv(DType w_type, const void* W, int64_t rows, int64_t cols, const float* x, float* y);

// exp(x) for x ≤ 0 within a few float ulps (relative error < 1e-6), branch-free and inline so that
// loops over it vectorise (libm's expf is a call per element); inputs below −87 give exp(−87).
inline float exp_nonpositive(float x) {
  // Cody–Waite: x = k·ln2 + r with |r| ≤ ln2/2, exp(r) by Cephes' expf polynomial, 2^k into the
  // exponent bits. Clamped at −87 so that 2^k stays a normal float (exp(−87) ≈ 1.6e−38).
  x = x < -87.f ? -87.f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  const float p = ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                     1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r) + r + 1.f;
  const int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// x <- x / rms(x) * gain (gain may be null = all ones), row by row.
void rmsnorm(Matrix& x, const float* gain, float eps);
// The same into out (reshaped to x's shape, its storage reused): one pass instead of a copy and
// then the norm in place.
void rmsnorm(const Matrix& x, const float* gain, float eps, Matrix& out);
// In-place softmax of n values (exponentials by exp_nonpositive, their sum in double).
void softmax(float* x, int64_t n);
// gate <- silu(gate) * up, elementwise (the sigmoid by exp_nonpositive).
void swiglu(Matrix& gate, const Matrix& up);

// Loops over fewer elements than this run on one thread (waking threads costs more).
constexpr int64_t kParallelMinWork = 1 << 16;
// Products (f32 and integer) of fewer multiply-adds than this run on one thread; a one-token
// 576 x 576 product (a SmolLM2 layer's q or o while decoding) is above it.
constexpr int64_t kParallelMinProduct = 1 << 18;

// OpenMP threads for our own loops and for large products, which sgemm/dgemm split over them.
// OpenBLAS itself runs on one thread (one pool: two would spin against each other), so LAPACK's
// factorizations (linalg/qr, quant/gptq) run on one thread.
void set_num_threads(int n);
int num_threads();

}  // namespace dq
