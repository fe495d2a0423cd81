// The compute backend seam: every dense kernel the model, quantizers and optimizers use.
// The CPU implementation (kernels_cpu.cpp) uses OpenBLAS and OpenMP; another backend provides the
// same functions.
#pragma once
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

// x <- x / rms(x) * gain (gain may be null = all ones), row by row.
void rmsnorm(Matrix& x, const float* gain, float eps);
// In-place softmax of n values.
void softmax(float* x, int64_t n);
// gate <- silu(gate) * up, elementwise.
void swiglu(Matrix& gate, const Matrix& up);

// Loops over fewer elements than this run on one thread (waking threads costs more).
constexpr int64_t kParallelMinWork = 1 << 16;

// Threads used by BLAS and by our own parallel loops (one pool size for both).
void set_num_threads(int n);
int num_threads();

}  // namespace dq
