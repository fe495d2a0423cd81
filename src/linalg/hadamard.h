// Hadamard matrices of order n = K·2^m and the fast orthonormal transform built on them.
//
// Convention (used everywhere in this project): H_n = H_K ⊗ H_{2^m}, where H_{2^m} is Sylvester's
// (symmetric, H[l][l'] = (−1)^popcount(l & l')) and H_K is built by Paley I/II, Sylvester doubling
// or a Goethals–Seidel array (see hadamard.cpp). H_K is in general NOT symmetric, so H_n ≠ H_nᵀ:
// "apply" multiplies each row vector on the right by H/√n (x ← x·H/√n), "apply_transposed" by
// Hᵀ/√n; the two are inverses of each other. Index j of a row = k·2^m + l (k < K, l < 2^m).
#pragma once
#include <cstdint>
#include <vector>

#include "tensor/tensor.h"

namespace dq {

// Builds the ±1 matrix H_n (row-major n×n into H) with H·Hᵀ = n·I. Returns false (H cleared)
// when no construction is available for n here (n not 1, 2 or a multiple of 4, or no known
// construction of its odd part).
bool hadamard_integer(int64_t n, std::vector<int8_t>& H);

// The block order K this project uses for n: the smallest K with n = K·2^m for which H_K has a
// construction (1 for powers of two). When none exists, K is the odd part of n and *genuine is
// set false (the Hadamard class then uses a random orthogonal K×K block).
int64_t hadamard_block_order(int64_t n, bool* genuine = nullptr);

// The orthonormal transform x ← x·H_n/√n on rows, O(n log n) for the 2^m part plus a dense
// K×K mix (one sgemm per chunk of rows).
class Hadamard {
 public:
  // fallback_seed seeds the random orthogonal K×K block used when H_K has no construction.
  explicit Hadamard(int64_t n, uint64_t fallback_seed = 0);

  int64_t size() const { return n_; }
  int64_t block() const { return K_; }   // K
  int64_t pow2() const { return L_; }    // 2^m
  // False when H_K was replaced by a seeded random orthogonal block (the result is orthogonal
  // but not a Hadamard matrix); callers should say so.
  bool genuine() const { return genuine_; }

  // Each of the `rows` contiguous rows of length n: x ← x·H/√n (transpose: x ← x·Hᵀ/√n).
  void apply(float* x, int64_t rows, bool transpose = false) const;
  void apply(Matrix& x, bool transpose = false) const;
  // The dense n×n matrix H/√n (so apply(x) == x · matrix()).
  Matrix matrix() const;

 private:
  int64_t n_, K_, L_;
  bool genuine_;
  std::vector<float> block_;  // H_K (±1), or √K·Q for a random orthogonal Q; row-major K×K
};

// Seeded ±1 vector of length n (std::mt19937_64, one draw per entry), the diagonal of a random
// Hadamard.
std::vector<float> random_signs(int64_t n, uint64_t seed);

// diag(random_signs(n, seed)) · H_n/√n as a dense orthogonal matrix (QuaRot's random Hadamard).
// x·random_hadamard(n, s) == Hadamard(n, s).apply(x ∘ random_signs(n, s)) (the seed also seeds
// the fallback block, if any).
Matrix random_hadamard(int64_t n, uint64_t seed);

}  // namespace dq
