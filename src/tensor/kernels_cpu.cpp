#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tensor/kernels.h"

namespace dq {

namespace {

// One pool of threads: OpenBLAS always runs on one thread and large products are split over the
// OpenMP threads here. With two pools (OpenBLAS's pthreads and OpenMP's) each one's idle threads
// spin while the other works, on the same cores: on 2 cores, two threads ran the SmolLM2-shape f32
// forward slower than one (`bench -p 256 -n 16`: pp 207 against 341 t/s, tg 3.0 against 6.6).
const bool kBlasSingleThreaded = (openblas_set_num_threads(1), true);

// Calls product(c0, c1) on column ranges [c0, c1) that cover n, in parallel when the product is
// large and no parallel region is already running; boundaries at multiples of 16 columns.
template <class Product>
void over_columns(int64_t m, int64_t n, int64_t k, Product&& product) {
  const int64_t parts = std::min<int64_t>(omp_in_parallel() ? 1 : omp_get_max_threads(), n / 16);
  if (parts <= 1 || double(m) * double(n) * double(k) < double(kParallelMinProduct)) return product(int64_t(0), n);
#pragma omp parallel for num_threads(int(parts)) schedule(static)
  for (int64_t p = 0; p < parts; ++p)
    product(n * p / parts / 16 * 16, p + 1 == parts ? n : n * (p + 1) / parts / 16 * 16);
}

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, float alpha, const float* A, int lda,
               const float* B, int ldb, float beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha, const double* A, int lda,
               const double* B, int ldb, double beta, double* C, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
void blas_gemv(CBLAS_TRANSPOSE t, int m, int n, float alpha, const float* A, int lda, const float* x, int incx,
               float beta, float* y) {
  cblas_sgemv(CblasRowMajor, t, m, n, alpha, A, lda, x, incx, beta, y, 1);
}
void blas_gemv(CBLAS_TRANSPOSE t, int m, int n, double alpha, const double* A, int lda, const double* x, int incx,
               double beta, double* y) {
  cblas_dgemv(CblasRowMajor, t, m, n, alpha, A, lda, x, incx, beta, y, 1);
}

template <class T>
void gemm_raw(bool transA, bool transB, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
              const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  over_columns(m, n, k, [&](int64_t c0, int64_t c1) {
    const T* Bc = transB ? B + c0 * ldb : B + c0;  // op(B)'s columns c0..c1
    const int nc = int(c1 - c0);
    if (m == 1) {
      // One row (decoding a token): OpenBLAS's gemm packs all of B on every call, gemv streams it
      // once. c = op(B)ᵀ·a, where a is A's only row (or, transposed, its only column).
      const int inc_a = transA ? int(lda) : 1;
      if (transB)  // B is n x k
        blas_gemv(CblasNoTrans, nc, int(k), alpha, Bc, int(ldb), A, inc_a, beta, C + c0);
      else  // B is k x n
        blas_gemv(CblasTrans, int(k), nc, alpha, Bc, int(ldb), A, inc_a, beta, C + c0);
      return;
    }
    blas_gemm(transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans, int(m), nc, int(k), alpha, A,
              int(lda), Bc, int(ldb), beta, C + c0, int(ldc));
  });
}

}  // namespace

void sgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_raw(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
           int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_raw(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

namespace {

// Eight stored values from column c of a row, as f32 (F16C and AVX2 are in the x86-64-v3 baseline).
template <DType T>
__m256 load8(const uint8_t* row, int64_t c) {
  if constexpr (T == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
  } else if constexpr (T == DType::BF16) {  // bf16 is the top half of an f32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
  }
}

template <DType T>
float load1(const uint8_t* row, int64_t c) {
  if constexpr (T == DType::F32) {
    float v;
    std::memcpy(&v, row + 4 * c, 4);
    return v;
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * c, 2);
    return T == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
  }
}

template <DType T>
void gemv_rows(const uint8_t* W, int64_t rows, int64_t cols, const float* x, float* y) {
  const size_t row_bytes = size_t(cols) * dtype_size(T);
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* w = W + size_t(r) * row_bytes;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32)  // four independent sums hide the FMA latency
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm256_fmadd_ps(load8<T>(w, c + 8 * u), _mm256_loadu_ps(x + c + 8 * u), acc[u]);
    for (; c + 8 <= cols; c += 8) acc[0] = _mm256_fmadd_ps(load8<T>(w, c), _mm256_loadu_ps(x + c), acc[0]);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
    float sum = 0.f;
    for (float v : lanes) sum += v;
    for (; c < cols; ++c) sum += load1<T>(w, c) * x[c];
    y[r] = sum;
  }
}

}  // namespace

void gemv(DType w_type, const void* W, int64_t rows, int64_t cols, const float* x, float* y) {
  const auto* w = static_cast<const uint8_t*>(W);
  switch (w_type) {
    case DType::F32: return gemv_rows<DType::F32>(w, rows, cols, x, y);
    case DType::F16: return gemv_rows<DType::F16>(w, rows, cols, x, y);
    case DType::BF16: return gemv_rows<DType::BF16>(w, rows, cols, x, y);
    default: throw Error(std::string("gemv: weights stored as ") + dtype_name(w_type) + " are not supported");
  }
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

void rmsnorm(const Matrix& x, const float* gain, float eps, Matrix& out) {
  if (&out != &x) out.reshape_for_overwrite(x.rows, x.cols);
#pragma omp parallel for schedule(static) if (int64_t(x.size()) > kParallelMinWork)
  for (int64_t i = 0; i < x.rows; ++i) {
    const float* r = x.row(i);
    float* o = out.row(i);
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < x.cols; ++j) ss += double(r[j]) * r[j];
    const float inv = float(1.0 / std::sqrt(ss / double(x.cols) + eps));
#pragma omp simd
    for (int64_t j = 0; j < x.cols; ++j) o[j] = r[j] * inv * (gain ? gain[j] : 1.f);
  }
}

void rmsnorm(Matrix& x, const float* gain, float eps) { rmsnorm(x, gain, eps, x); }

// The loops carry `omp simd`: at -O2 GCC vectorises only loops whose trip count needs no
// remainder, and these reductions may be reordered (the sums stay in double).
void softmax(float* x, int64_t n) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = exp_nonpositive(x[i] - mx);
    s += double(x[i]);
  }
  const float inv = float(1.0 / s);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(Matrix& gate, const Matrix& up) {
  if (gate.size() != up.size()) throw Error("swiglu: shape mismatch");
  float* g = gate.data.data();
  const float* u = up.data.data();
  const int64_t n = int64_t(gate.size());
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    // sigmoid(g) from e = exp(−|g|) ≤ 1: 1/(1+e) for g ≥ 0, e/(1+e) below; no overflow either way.
    const float e = exp_nonpositive(-std::abs(g[i]));
    g[i] = g[i] * ((g[i] >= 0.f ? 1.f : e) / (1.f + e)) * u[i];
  }
}

void set_num_threads(int n) { omp_set_num_threads(std::max(1, n)); }

int num_threads() { return omp_get_max_threads(); }

}  // namespace dq
