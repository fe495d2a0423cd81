// Constructions of H_K (K = odd·2^j, the part a fast Walsh–Hadamard transform cannot do):
//  - Paley I:  q ≡ 3 (mod 4) a prime power, order q+1:  H = I + S, S the skew conference matrix
//              [[0, 1ᵀ], [−1, Q]] with the Jacobsthal matrix Q[i][j] = χ(i − j) over GF(q).
//  - Paley II: q ≡ 1 (mod 4) a prime power, order 2(q+1): the symmetric conference matrix
//              C = [[0, 1ᵀ], [1, Q]], H = C ⊗ [[1,−1],[−1,−1]] + I ⊗ [[1,1],[1,−1]].
//  - Goethals–Seidel: order 4t, t odd, from four ±1 circulants A,B,C,D with
//              AAᵀ+BBᵀ+CCᵀ+DDᵀ = 4t·I. They are found here by a small deterministic search over
//              sequences invariant under a multiplier subgroup ⟨g⟩ ⊂ Z_t^* (then the periodic
//              autocorrelations are constant on ⟨g⟩-orbits, leaving a few equations), matched by
//              meet-in-the-middle on row sums a²+b²+c²+d² = 4t. Finds 156 (t=39) and 172 (t=43)
//              in milliseconds.
// GF(p^k) is built as Z_p[x]/(f) for the first monic f of degree k in which x has order q−1
// (so x generates the multiplicative group and χ(x^i) = (−1)^i).
#include "linalg/hadamard.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>

#include "linalg/qr.h"
#include "tensor/kernels.h"

namespace dq {

namespace {

using IntMat = std::vector<int8_t>;  // row-major ±1

// q = p^k with p prime? (p, k returned.)
bool prime_power(int64_t q, int64_t& p, int& k) {
  if (q < 2) return false;
  p = 0;
  for (int64_t d = 2; d * d <= q; ++d)
    if (q % d == 0) {
      p = d;
      break;
    }
  if (p == 0) p = q;
  k = 0;
  while (q % p == 0) q /= p, ++k;
  return q == 1;
}

// Quadratic character of GF(q) and subtraction on its elements, encoded as base-p digit strings.
struct FiniteField {
  int64_t p, q;
  int k;
  std::vector<int8_t> chi;  // chi[e]: 0 for e = 0, +1 for squares, −1 otherwise

  explicit FiniteField(int64_t q_) : q(q_) {
    if (!prime_power(q, p, k)) throw Error("hadamard: " + std::to_string(q) + " is not a prime power");
    for (int64_t f = 0; f < q; ++f)  // f encodes the low coefficients of x^k + f(x)
      if (try_modulus(f)) return;
    throw Error("hadamard: no primitive polynomial for GF(" + std::to_string(q) + ")");
  }

  int64_t sub(int64_t a, int64_t b) const {
    int64_t r = 0, w = 1;
    for (int i = 0; i < k; ++i, a /= p, b /= p, w *= p) r += ((a % p - b % p + p) % p) * w;
    return r;
  }

 private:
  // Walks the powers of x modulo x^k + f; success iff they visit all q−1 nonzero elements.
  bool try_modulus(int64_t f) {
    std::vector<int64_t> c(static_cast<size_t>(k));
    for (int i = 0; i < k; ++i, f /= p) c[size_t(i)] = f % p;
    if (c[0] == 0) return false;  // x would divide the modulus
    std::vector<int8_t> ch(size_t(q), 0);
    std::vector<int64_t> e(size_t(k), 0);
    e[0] = 1;
    for (int64_t i = 0; i < q - 1; ++i) {
      int64_t code = 0;
      for (int j = k - 1; j >= 0; --j) code = code * p + e[size_t(j)];
      if (ch[size_t(code)] != 0) return false;  // order of x below q−1
      ch[size_t(code)] = (i % 2 == 0) ? 1 : -1;
      int64_t top = e[size_t(k - 1)];  // e·x, then x^k = −f(x)
      for (int j = k - 1; j > 0; --j) e[size_t(j)] = (e[size_t(j - 1)] - top * c[size_t(j)] % p + p * p) % p;
      e[0] = (p * p - top * c[0] % p) % p;
    }
    chi = std::move(ch);
    return true;
  }
};

IntMat paley1(int64_t q) {
  FiniteField F(q);
  const int64_t n = q + 1;
  IntMat H(size_t(n * n));
  auto at = [&](int64_t i, int64_t j) -> int8_t& { return H[size_t(i * n + j)]; };
  for (int64_t j = 1; j < n; ++j) at(0, j) = 1, at(j, 0) = -1;
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = 0; j < q; ++j) at(i + 1, j + 1) = F.chi[size_t(F.sub(i, j))];
  for (int64_t i = 0; i < n; ++i) at(i, i) = 1;  // S has a zero diagonal: H = I + S
  return H;
}

IntMat paley2(int64_t q) {
  FiniteField F(q);
  const int64_t m = q + 1, n = 2 * m;
  std::vector<int8_t> C(size_t(m * m), 1);
  C[0] = 0;
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = 0; j < q; ++j) C[size_t((i + 1) * m + j + 1)] = F.chi[size_t(F.sub(i, j))];
  IntMat H(size_t(n * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      int c = C[size_t(i * m + j)];
      // c = 0 only on the diagonal: the I ⊗ [[1,1],[1,−1]] term; else c·[[1,−1],[−1,−1]].
      int8_t b[4] = {int8_t(c ? c : 1), int8_t(c ? -c : 1), int8_t(c ? -c : 1), int8_t(c ? -c : -1)};
      for (int r = 0; r < 2; ++r)
        for (int s = 0; s < 2; ++s) H[size_t((2 * i + r) * n + 2 * j + s)] = b[r * 2 + s];
    }
  return H;
}

// Four ±1 sequences of length t (odd) whose periodic autocorrelations sum to 0 off zero shift.
bool goethals_seidel_sequences(int64_t t, std::vector<std::vector<int>>& seqs) {
  // Candidate multiplier subgroups, fewest orbits first (fewest unknowns).
  std::map<std::vector<int>, int64_t> seen;  // orbit labelling -> generator
  std::vector<std::pair<int, int64_t>> cands;  // (orbit count, generator)
  for (int64_t g = 2; g < t; ++g) {
    if (std::gcd(g, t) != 1) continue;
    std::vector<int> orb(size_t(t), -1);
    int R = 0;
    for (int64_t x = 0; x < t; ++x) {
      if (orb[size_t(x)] >= 0) continue;
      for (int64_t y = x; orb[size_t(y)] < 0; y = y * g % t) orb[size_t(y)] = R;
      ++R;
    }
    if (R <= 16 && seen.emplace(orb, g).second) cands.push_back({R, g});
  }
  std::sort(cands.begin(), cands.end());
  for (auto [R, g] : cands) {
    std::vector<int> orb(size_t(t), -1), reps;
    for (int64_t x = 0, r = 0; x < t; ++x) {
      if (orb[size_t(x)] >= 0) continue;
      if (x != 0) reps.push_back(int(x));
      for (int64_t y = x; orb[size_t(y)] < 0; y = y * g % t) orb[size_t(y)] = int(r);
      ++r;
    }
    const size_t N = size_t(1) << R, nr = reps.size();
    std::vector<int> rowsum(N);
    std::vector<int16_t> paf(N * nr);
    std::vector<int> a(static_cast<size_t>(t));
    for (size_t m = 0; m < N; ++m) {
      int s = 0;
      for (int64_t x = 0; x < t; ++x) s += a[size_t(x)] = (m >> orb[size_t(x)] & 1) ? -1 : 1;
      rowsum[m] = s;
      for (size_t r = 0; r < nr; ++r) {
        int acc = 0;
        for (int64_t i = 0; i < t; ++i) acc += a[size_t(i)] * a[size_t((i + reps[r]) % t)];
        paf[m * nr + r] = int16_t(acc);
      }
    }
    auto with_sum = [&](int s) {
      std::vector<size_t> v;
      for (size_t m = 0; m < N; ++m)
        if (rowsum[m] == s) v.push_back(m);
      return v;
    };
    auto decode = [&](size_t m) {
      std::vector<int> v(static_cast<size_t>(t));
      for (int64_t x = 0; x < t; ++x) v[size_t(x)] = (m >> orb[size_t(x)] & 1) ? -1 : 1;
      return v;
    };
    // Row sums: the sum of AAᵀ+… applied to the all-ones vector gives a²+b²+c²+d² = 4t.
    for (int A = 1; A * A <= 4 * t; A += 2)
      for (int B = A; A * A + B * B <= 4 * t; B += 2)
        for (int C = B; A * A + B * B + C * C <= 4 * t; C += 2) {
          int d2 = int(4 * t) - A * A - B * B - C * C, D = int(std::lround(std::sqrt(double(d2))));
          if (D * D != d2 || D < C) continue;
          auto LA = with_sum(A), LB = with_sum(B), LC = with_sum(C), LD = with_sum(D);
          if (double(LA.size()) * double(LB.size()) > 4e6) continue;  // keep the search small
          std::unordered_map<std::string, std::pair<size_t, size_t>> half;
          std::string key(nr * 2, '\0');
          auto put = [&](size_t x, size_t y, int sign) {
            for (size_t r = 0; r < nr; ++r) {
              int v = sign * (paf[x * nr + r] + paf[y * nr + r]);
              key[2 * r] = char(v & 0xff), key[2 * r + 1] = char((v >> 8) & 0xff);
            }
          };
          for (size_t x : LA)
            for (size_t y : LB) put(x, y, 1), half.emplace(key, std::make_pair(x, y));
          for (size_t x : LC)
            for (size_t y : LD) {
              put(x, y, -1);
              auto it = half.find(key);
              if (it == half.end()) continue;
              seqs = {decode(it->second.first), decode(it->second.second), decode(x), decode(y)};
              return true;
            }
        }
  }
  return false;
}

IntMat goethals_seidel(int64_t t) {
  std::vector<std::vector<int>> s;
  if (!goethals_seidel_sequences(t, s)) return {};
  const int64_t n = 4 * t;
  IntMat H(size_t(n * n));
  // circulant X[i][j] = x[(j − i) mod t]; (X·R)[i][j] = X[i][t−1−j]; (Xᵀ·R)[i][j] = X[t−1−j][i].
  auto circ = [&](int w, int64_t i, int64_t j) { return s[size_t(w)][size_t(((j - i) % t + t) % t)]; };
  auto XR = [&](int w, int64_t i, int64_t j) { return circ(w, i, t - 1 - j); };
  auto XtR = [&](int w, int64_t i, int64_t j) { return circ(w, t - 1 - j, i); };
  enum { A, B, C, D };
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < t; ++j) {
      const int blocks[4][4] = {
          {circ(A, i, j), XR(B, i, j), XR(C, i, j), XR(D, i, j)},
          {-XR(B, i, j), circ(A, i, j), XtR(D, i, j), -XtR(C, i, j)},
          {-XR(C, i, j), -XtR(D, i, j), circ(A, i, j), XtR(B, i, j)},
          {-XR(D, i, j), XtR(C, i, j), -XtR(B, i, j), circ(A, i, j)}};
      for (int bi = 0; bi < 4; ++bi)
        for (int bj = 0; bj < 4; ++bj) H[size_t((bi * t + i) * n + bj * t + j)] = int8_t(blocks[bi][bj]);
    }
  return H;
}

// H_K by a direct construction (no Sylvester doubling: the fast transform does that part).
IntMat direct_construction(int64_t K) {
  if (K == 1) return {1};
  if (K == 2) return {1, 1, 1, -1};
  if (K % 4 != 0) return {};
  int64_t p;
  int k;
  if (prime_power(K - 1, p, k)) return paley1(K - 1);
  if ((K / 2 - 1) % 4 == 1 && prime_power(K / 2 - 1, p, k)) return paley2(K / 2 - 1);
  if ((K / 4) % 2 == 1) return goethals_seidel(K / 4);
  return {};
}

// Constructions are cached: the search behind Goethals–Seidel is not free, and every Hadamard
// object of the same block order shares one H_K.
const IntMat& cached_block(int64_t K) {
  static std::mutex mu;
  static std::map<int64_t, std::unique_ptr<IntMat>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[K];
  if (!slot) slot = std::make_unique<IntMat>(direct_construction(K));
  return *slot;
}

// In place, butterflies (a, b) → (a + b, a − b) at distances h = 1, 2, 4, ... Stages 1, 2, 4 stay
// inside blocks of 8 and run in registers (lane shuffles put each a beside its b), the later ones
// 8 pairs at a time: every element sees the same additions and subtractions, with the same
// operands, as in the plain loop (kept for L < 8), so the results are the same bits.
void fwht(float* x, int64_t L) {
  if (L < 8) {
    for (int64_t h = 1; h < L; h *= 2)
      for (int64_t i = 0; i < L; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          float a = x[j], b = x[j + h];
          x[j] = a + b, x[j + h] = a - b;
        }
    return;
  }
  // One stage inside a vector of 8: p holds each lane's partner; lanes in the first half of each
  // 2h-block take v + p (a + b), the others p − v (a − b with a from the partner).
  // The lane mask is a template argument: blend takes an immediate (clang refuses anything else).
  auto stage = []<int upper>(__m256 v, __m256 p) {
    return _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), upper);
  };
  for (int64_t i = 0; i < L; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    v = stage.operator()<0xAA>(v, _mm256_permute_ps(v, 0xB1));          // h = 1: partners 1 0 3 2 ...
    v = stage.operator()<0xCC>(v, _mm256_permute_ps(v, 0x4E));          // h = 2: partners 2 3 0 1 ...
    v = stage.operator()<0xF0>(v, _mm256_permute2f128_ps(v, v, 0x01));  // h = 4: the other half
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t h = 8; h < L; h *= 2)
    for (int64_t i = 0; i < L; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
}

}  // namespace

int64_t hadamard_block_order(int64_t n, bool* genuine) {
  if (n < 1) throw Error("hadamard: order must be positive, got " + std::to_string(n));
  int64_t odd = n;
  while (odd % 2 == 0) odd /= 2;
  if (genuine) *genuine = true;
  if (odd == 1) return 1;
  for (int64_t K = odd; K <= n; K *= 2)
    if (!cached_block(K).empty()) return K;
  if (genuine) *genuine = false;
  return odd;
}

bool hadamard_integer(int64_t n, std::vector<int8_t>& H) {
  bool genuine;
  const int64_t K = hadamard_block_order(n, &genuine);
  H.clear();
  if (!genuine) return false;
  const IntMat& HK = cached_block(K);
  const int64_t L = n / K;
  H.resize(size_t(n * n));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < n; ++c) {
      int8_t sylvester = (__builtin_popcountll(uint64_t(r % L) & uint64_t(c % L)) & 1) ? -1 : 1;
      H[size_t(r * n + c)] = int8_t(HK[size_t((r / L) * K + c / L)] * sylvester);
    }
  return true;
}

Hadamard::Hadamard(int64_t n, uint64_t fallback_seed) : n_(n) {
  K_ = hadamard_block_order(n, &genuine_);
  L_ = n / K_;
  block_.resize(size_t(K_ * K_));
  if (genuine_) {
    const IntMat& HK = cached_block(K_);
    std::copy(HK.begin(), HK.end(), block_.begin());
  } else {
    Matrix Q = random_orthogonal(K_, fallback_seed);
    const float s = std::sqrt(float(K_));
    for (size_t i = 0; i < block_.size(); ++i) block_[i] = Q.data[i] * s;
  }
}

void Hadamard::apply(float* x, int64_t rows, bool transpose) const {
  const int64_t n = n_, K = K_, L = L_;
  const float scale = 1.f / std::sqrt(float(n));
  // Row by row (a row stays in L1 from the butterflies through the mix): the K-mix
  // y[k'][l] = Σ_k x[k][l]·H_K[k][k'] (H_K[k'][k] transposed) sums over k in order into one f32
  // accumulator per element (fused multiply-adds) and scales the sum: the operations of a product
  // by H_K whose inner dimension runs in order. OpenBLAS's sgemm, which did the mix here before on
  // transposed copies, gave the same bits at every intermediate size of the supported models (checked
  // at 1536, 5632, 8192, 11008 and 14336; at 576 = 36 x 16 its kernel summed in another order), and
  // rotation matrices (matrix(): one term per sum) are exact.
#pragma omp parallel if (rows * n > kParallelMinWork)
  {
    std::vector<float> mixed(size_t(K > 1 ? n : 0));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * n;
      if (L > 1)
        for (int64_t k = 0; k < K; ++k) fwht(row + k * L, L);
      if (K == 1) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) row[i] *= scale;
        continue;
      }
      for (int64_t k2 = 0; k2 < K; ++k2) {
        // H_K's column k2 (its row when transposed): h(k) multiplies x[k].
        const float* hc = block_.data() + (transpose ? k2 * K : k2);
        const int64_t hs = transpose ? 1 : K;
        auto h = [&](int64_t k) { return hc[k * hs]; };
        float* y = mixed.data() + k2 * L;
        int64_t l0 = 0;
        for (; l0 + 32 <= L; l0 += 32) {  // 32 columns' sums in registers through the k loop
          __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
          for (int64_t k = 0; k < K; ++k) {
            const __m256 hk = _mm256_set1_ps(h(k));
            const float* xk = row + k * L + l0;
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(hk, _mm256_loadu_ps(xk + 8 * i), acc[i]);
          }
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(y + l0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(scale)));
        }
        for (; l0 < L; ++l0) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc = std::fma(h(k), row[k * L + l0], acc);
          y[l0] = acc * scale;
        }
      }
      std::copy(mixed.begin(), mixed.end(), row);
    }
  }
}

void Hadamard::apply(Matrix& x, bool transpose) const {
  if (x.cols != n_)
    throw Error("hadamard: rows have " + std::to_string(x.cols) + " entries, transform is of order " +
                std::to_string(n_));
  apply(x.data.data(), x.rows, transpose);
}

Matrix Hadamard::matrix() const {
  Matrix M = Matrix::identity(n_);
  apply(M);  // row i of I·H/√n is row i of H/√n
  return M;
}

std::vector<float> random_signs(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> s(static_cast<size_t>(n));
  for (float& v : s) v = (rng() >> 63) ? -1.f : 1.f;
  return s;
}

Matrix random_hadamard(int64_t n, uint64_t seed) {
  Matrix M = Hadamard(n, seed).matrix();
  const std::vector<float> s = random_signs(n, seed);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) M(i, j) *= s[size_t(i)];
  return M;
}

}  // namespace dq
