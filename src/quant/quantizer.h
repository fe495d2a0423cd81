// Uniform integer quantizers: fake quantization (quantize, then dequantize back to f32), integer
// codes for storage, and RTN of weights. Matrix-level only: callers decide what a row means.
//
// Conventions (GPTQ's storage form with QuaRot's symmetric grid):
// - A code q is an unsigned integer in [0, 2^b - 1] and stands for scale * (q - zero); fake
//   quantization computes exactly that value, so dequantizing stored codes reproduces it bit for
//   bit. q = clamp(round(x / scale) + zero, 0, 2^b - 1), rounding half to even (as torch.round).
// - Symmetric: scale = clip * max|x| / (2^(b-1) - 1), zero = 2^(b-1); q - zero is then the
//   signed code in [-2^(b-1), 2^(b-1) - 1] (the most negative one is reached only by clipping).
// - Asymmetric: lo = clip * min(min x, 0), hi = clip * max(max x, 0) (the range always holds 0,
//   as in GPTQ), scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale), in [0, 2^b - 1].
// - Every scale is rounded up to scale_bits(b) = 18 - b significant bits before the zero point is
//   taken from it (f16_scales rounds it to an f16 instead), so that scale * (q - zero), with |q - zero| < 2^b, has at most 18
//   significant bits: it is exact in f32, and a product of two such values (36 bits) summed over up
//   to 2^17 columns that share their two scales is exact in double. The integer runtime's sums and
//   the fake-quant reference's (double) products therefore both give the exact dequantized product,
//   and round it the same way (docs/FORMAT.md). Rounding up, never down, keeps the range: nothing
//   the unrounded scale would keep is clipped, and the step grows by less than 2^-(17-b).
// - A row-group whose range is zero (or so small that scale would underflow) gets scale 1 and
//   zero as if lo = 0, so it quantizes to exact zeros instead of dividing by 0. A NaN or infinity
//   in the input is an Error.
//
// Granularity: the quantization unit is a row. Weights (out x in) are quantized per output channel,
// activations (tokens x channels) per token. group > 0 splits each row into groups of `group`
// consecutive columns (the input dimension of a weight), the last one partial when
// cols % group != 0; per_tensor uses a single scale/zero for the whole matrix.
//
// MSE clip (weights): per row-group, the range [lo, hi] is shrunk by p = 1, 1 - 1/grid, ... for
// max_shrink * grid steps, keeping the p that minimises sum |x - deq(x)|^norm (GPTQ's
// find_params(mse=True): grid 100, max shrink 0.8, norm 2.4).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "tensor/tensor.h"

namespace dq {

struct QuantSpec {
  int bits = 16;  // 2..8; 16 = not quantized
  bool symmetric = true;
  int group = 0;            // 0 = one group per row; else columns per group along the row
  bool per_tensor = false;  // one scale/zero for the whole matrix (group must be 0)
  float clip_ratio = 1.f;   // multiplies the range; activations use 0.9
  bool mse_clip = false;
  // Round every scale to the nearest f16 before codes are chosen, so formats that store f16 scales
  // (GGUF q4_0/q8_0) carry exactly these values.
  bool f16_scales = false;
  int mse_grid = 100;
  float mse_max_shrink = 0.8f;
  float mse_norm = 2.4f;

  bool enabled() const { return bits < 16; }
  int maxq() const { return (1 << bits) - 1; }  // largest code
  // Groups per row of a matrix with `cols` columns (1 when group == 0 or per_tensor).
  int64_t num_groups(int64_t cols) const;
  // Throws Error naming the bad field.
  void validate() const;
};

// Significant bits of a b-bit quantizer's scale (see the conventions above).
constexpr int scale_bits(int bits) { return 18 - bits; }
// s rounded up to `bits` significant bits (s > 0 and finite).
float round_up_significand(float s, int bits);

struct QuantParams {
  float scale = 1.f;
  float zero = 0.f;  // integer-valued
};

// The code of x (as a float holding an integer in [0, maxq]) and the value a code stands for.
template <class T>
inline T quant_code(T x, QuantParams p, int maxq) {
  T q = std::nearbyint(x / T(p.scale)) + T(p.zero);
  return std::clamp(q, T(0), T(maxq));
}
template <class T>
inline T dequant_code(T q, QuantParams p) {
  return T(p.scale) * (q - T(p.zero));
}

// quant_code of each of x[0, n) (finite values) into out; returns the codes' sum.
int32_t quant_codes(const float* x, int64_t n, QuantParams p, int maxq, uint8_t* out);

// Scale and zero of one row-group x[0, n), following the conventions above (clip ratio and MSE clip
// included). Throws Error on a non-finite value.
QuantParams find_params(const float* x, int64_t n, const QuantSpec& spec);
QuantParams find_params(const double* x, int64_t n, const QuantSpec& spec);

// Fake-quantizes a row-major rows x cols block in place. No-op when !spec.enabled().
void fake_quantize(float* x, int64_t rows, int64_t cols, const QuantSpec& spec);
inline void fake_quantize(Matrix& x, const QuantSpec& spec) {
  fake_quantize(x.data.data(), x.rows, x.cols, spec);
}

// Integer form of a quantized matrix. scales/zeros are rows x num_groups (1 x 1 when per_tensor);
// column c of row r uses group c / spec.group.
struct QuantizedMatrix {
  int64_t rows = 0, cols = 0;
  QuantSpec spec;
  std::vector<uint8_t> codes;  // rows * cols, row-major, unpacked
  Matrix scales, zeros;

  QuantParams params(int64_t r, int64_t c) const;
  Matrix dequantize() const;
};

// Quantizes to codes (RTN for a weight W: out x in). dequantize() of the result equals
// fake_quantize of the same input exactly. Throws Error when !spec.enabled().
QuantizedMatrix quantize(const Matrix& x, const QuantSpec& spec);

// Bit-packing for storage: each row's codes as a little-endian bit stream (code c of a row occupies
// bits [c*bits, (c+1)*bits)), every row padded to a whole byte, so 4-bit codes are two per byte
// with the low nibble first.
int64_t packed_row_bytes(int64_t cols, int bits);
std::vector<uint8_t> pack_codes(const std::vector<uint8_t>& codes, int64_t rows, int64_t cols,
                                int bits);
std::vector<uint8_t> unpack_codes(std::span<const uint8_t> packed, int64_t rows, int64_t cols, int bits);

// Quantized rows as one byte string each, in memory (the quantized KV cache, docs/FORMAT.md): the
// row's codes bit-packed as above, then each group's scale (f32), then each group's zero point (one
// byte: an integer in [0, 255]). Row-groups only (not per_tensor).
int64_t encoded_row_bytes(int64_t cols, const QuantSpec& spec);
// Appends q's rows, encoded, to out.
void encode_rows(const QuantizedMatrix& q, std::vector<uint8_t>& out);
// The values n encoded rows stand for (dequant_code of each code: exactly what fake_quantize
// gives), into out (n x cols).
void decode_rows(const uint8_t* in, int64_t n, int64_t cols, const QuantSpec& spec, float* out);

}  // namespace dq
