#include "quant/gptq.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <string>

#include "tensor/kernels.h"

namespace dq {

HessianAccumulator::HessianAccumulator(int64_t dim) : dim_(dim) {
  if (dim <= 0) throw Error("HessianAccumulator: dimension must be positive");
  sum_.assign(size_t(dim * dim), 0.0);
}

void HessianAccumulator::add(const Matrix& X) {
  if (X.cols != dim_)
    throw Error("HessianAccumulator: input has " + std::to_string(X.cols) + " columns, expected " +
                std::to_string(dim_));
  add(X.data.data(), X.rows);
}

void HessianAccumulator::add(const float* X, int64_t tokens) {
  // Bounded chunks keep the f32 partial sums short; the running total is f64.
  constexpr int64_t kChunk = 4096;
  const int64_t d = dim_;
  std::vector<float> chunk(size_t(d * d));  // one chunk's XᵀX; freed between calls
  for (int64_t t0 = 0; t0 < tokens; t0 += kChunk) {
    int64_t m = std::min(kChunk, tokens - t0);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, int(d), int(m), 1.f, X + t0 * d, int(d), 0.f,
                chunk.data(), int(d));
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = i; j < d; ++j) sum_[size_t(i * d + j)] += chunk[size_t(i * d + j)];
  }
  tokens_ += tokens;
}

Matrix HessianAccumulator::hessian() const {
  const int64_t d = dim_;
  Matrix H(d, d);
  if (tokens_ == 0) return H;
  const double s = 2.0 / double(tokens_);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i; j < d; ++j) H(i, j) = H(j, i) = float(sum_[size_t(i * d + j)] * s);
  return H;
}

namespace {

// C -= A B (row-major, leading dimensions given).
void gemm_sub(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc) {
  sgemm(false, false, m, n, k, -1.f, A, lda, B, ldb, 1.f, C, ldc);
}
void gemm_sub(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B,
              int64_t ldb, double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k), -1.0, A, int(lda),
              B, int(ldb), 1.0, C, int(ldc));
}

// Replaces the symmetric positive definite A (n x n) by the upper Cholesky factor U of A⁻¹
// (A⁻¹ = UᵀU), row-major with a zero lower triangle. False when the factorisation fails.
// With J the order reversal, J A J = L Lᵀ gives A = V Vᵀ with V = J L J upper triangular, hence
// A⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹: one potrf and one trtri instead of potrf, potri and potrf again.
bool inverse_upper_cholesky(std::vector<double>& A, int64_t n) {
  // Reversing the buffer maps element (i, j) to (n-1-i, n-1-j), i.e. A -> J A J. A symmetric
  // row-major buffer is the same matrix read column-major, so LAPACK runs column-major.
  const lapack_int N = lapack_int(n);
  std::reverse(A.begin(), A.end());
  if (LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', N, A.data(), N) != 0) return false;
  std::reverse(A.begin(), A.end());  // column-major upper triangle now holds V
  if (LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', N, A.data(), N) != 0) return false;
  // Column-major upper (i <= j) lives at A[i + j n]; move it to row-major upper.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) {
      A[size_t(i * n + j)] = A[size_t(j * n + i)];
      A[size_t(j * n + i)] = 0.0;
    }
  return true;
}

bool all_finite(const Matrix& m) {
  return std::all_of(m.data.begin(), m.data.end(), [](float v) { return std::isfinite(v); });
}

template <class T>
GptqResult run(const Matrix& W0, Matrix Hm, const QuantSpec& spec, const GptqOptions& opt) {
  const int64_t rows = W0.rows, n = W0.cols;
  const int maxq = spec.maxq();
  GptqResult res;

  // H stays f32 (its values are f32 already); only the factorisation's copy is f64, which halves
  // the peak for the widest layers.
  std::vector<float>& H = Hm.data;
  std::vector<T> W(W0.data.begin(), W0.data.end());
  for (int64_t j = 0; j < n; ++j) {
    if (H[size_t(j * n + j)] != 0.f) continue;
    H[size_t(j * n + j)] = 1.f;
    for (int64_t r = 0; r < rows; ++r) W[size_t(r * n + j)] = 0;
    ++res.dead_columns;
  }

  // Parameters: per output channel or static groups now, from W; dynamic groups as GPTQ reaches
  // them.
  const bool dynamic = spec.group > 0 && !opt.static_groups;
  const int64_t gs = spec.group > 0 ? spec.group : n, ng = spec.num_groups(n);
  Matrix scales(rows, ng), zeros(rows, ng);
  auto fill_params = [&](int64_t g) {  // group g's columns are still in original order here
    const int64_t c0 = g * gs, len = std::min(gs, n - c0);
    std::atomic<bool> bad{false};
#pragma omp parallel for schedule(static) if (spec.mse_clip || rows * len > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      try {
        QuantParams p = find_params(&W[size_t(r * n + c0)], len, spec);
        scales(r, g) = p.scale;
        zeros(r, g) = p.zero;
      } catch (const Error&) {
        bad = true;
      }
    }
    if (bad) throw Error("gptq: non-finite weight during quantization");
  };
  if (!dynamic)
    for (int64_t g = 0; g < ng; ++g) fill_params(g);

  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t(0));
  if (opt.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return H[size_t(a * n + a)] > H[size_t(b * n + b)];
    });
    std::vector<float> Hp(H.size());
    std::vector<T> Wp(W.size());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) Hp[size_t(i * n + j)] = H[size_t(perm[i] * n + perm[j])];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) Wp[size_t(r * n + j)] = W[size_t(r * n + perm[j])];
    H.swap(Hp);
    W.swap(Wp);
  }

  double mean_diag = 0;
  for (int64_t j = 0; j < n; ++j) mean_diag += H[size_t(j * n + j)];
  mean_diag /= double(n);
  if (!(mean_diag > 0)) throw Error("gptq: Hessian has a non-positive mean diagonal");
  double frac = opt.damp;
  std::vector<double> A;
  for (;;) {
    A.assign(H.begin(), H.end());
    for (int64_t j = 0; j < n; ++j) A[size_t(j * n + j)] += frac * mean_diag;
    if (inverse_upper_cholesky(A, n)) break;
    if (res.retries == opt.max_retries)
      throw Error("gptq: Cholesky factorisation failed with damping " + std::to_string(frac) +
                  " after " + std::to_string(res.retries) + " retries");
    ++res.retries;
    frac *= 10;
  }
  res.damp = frac;
  H = {};
  std::vector<T> U(A.begin(), A.end());
  A = {};

  // Blocks of `block` columns: inside a block each row is quantized column by column with its error
  // pushed onto the block's later columns; the rest of W gets the block's errors in one GEMM.
  std::vector<uint8_t> codes(size_t(rows * n));
  std::vector<T> err;
  std::vector<double> row_loss(size_t(rows), 0.0);
  for (int64_t i1 = 0, i2; i1 < n; i1 = i2) {
    i2 = std::min(n, i1 + opt.block);
    if (dynamic) {
      // A block never crosses a group start, so a group's parameters see every earlier update.
      i2 = std::min(i2, (i1 / gs + 1) * gs);
      if (i1 % gs == 0) fill_params(i1 / gs);
    }
    const int64_t count = i2 - i1;
    err.assign(size_t(rows * count), T(0));
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* w = &W[size_t(r * n + i1)];
      T* e = &err[size_t(r * count)];
      double loss = 0;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i1 + i;
        const T* u = &U[size_t(j * n + i1)];
        const int64_t g = spec.group > 0 ? perm[size_t(j)] / gs : 0;
        const QuantParams p{scales(r, g), zeros(r, g)};
        const T x = w[i], q = quant_code(x, p, maxq), d = dequant_code(q, p);
        codes[size_t(r * n + j)] = uint8_t(q);
        w[i] = d;
        const T ei = (x - d) / u[i];
        loss += double(ei) * double(ei);
        for (int64_t k = i + 1; k < count; ++k) w[k] -= ei * u[k];
        e[i] = ei;
      }
      row_loss[size_t(r)] += loss;
    }
    if (i2 < n)
      gemm_sub(rows, n - i2, count, err.data(), count, &U[size_t(i1 * n + i2)], n, &W[size_t(i2)],
               n);
  }
  res.error = 0.5 * std::accumulate(row_loss.begin(), row_loss.end(), 0.0);

  QuantizedMatrix& qm = res.q;
  qm.rows = rows;
  qm.cols = n;
  qm.spec = spec;
  qm.codes.resize(size_t(rows * n));
  qm.scales = std::move(scales);
  qm.zeros = std::move(zeros);
  res.weight = Matrix(rows, n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      qm.codes[size_t(r * n + perm[j])] = codes[size_t(r * n + j)];
      res.weight(r, perm[j]) = float(W[size_t(r * n + j)]);
    }
  return res;
}

}  // namespace

GptqResult gptq(const Matrix& W, Matrix H, const QuantSpec& spec, const GptqOptions& opt) {
  spec.validate();
  if (!spec.enabled()) throw Error("gptq: 16 bits means not quantized");
  if (spec.per_tensor) throw Error("gptq: per-tensor quantization is not supported");
  if (H.rows != W.cols || H.cols != W.cols)
    throw Error("gptq: Hessian is " + std::to_string(H.rows) + "x" + std::to_string(H.cols) +
                ", expected " + std::to_string(W.cols) + "x" + std::to_string(W.cols));
  if (opt.block < 1) throw Error("gptq: block size must be >= 1");
  if (!(opt.damp > 0)) throw Error("gptq: damping must be positive");
  if (opt.max_retries < 0) throw Error("gptq: max_retries must be >= 0");
  if (opt.act_order && spec.group > 0 && !opt.static_groups)
    throw Error("gptq: act_order with groups needs static_groups (stored groups are contiguous)");
  if (!all_finite(W)) throw Error("gptq: non-finite weight");
  if (!all_finite(H)) throw Error("gptq: non-finite Hessian");
  return opt.f64 ? run<double>(W, std::move(H), spec, opt) : run<float>(W, std::move(H), spec, opt);
}

}  // namespace dq
