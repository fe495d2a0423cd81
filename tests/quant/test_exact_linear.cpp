// The fake-quant reference's product (exact_linear) against a naive integer computation, and the
// integer runtime's kernels against it: with scales of scale_bits significant bits both give the
// exact block-wise product rounded once, bit for bit. With full-mantissa weight scales (directories
// written before the scale rounding) they agree within the f32 rounding of the dequantized weights.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "quant/intlinear.h"
#include "quant/quantize_model.h"
#include "tensor/kernels.h"
#include "test_helpers.h"

using namespace dq;
using dq::test::gaussian_matrix;

namespace {

struct Case {
  int a_bits, w_bits;
  bool w_sym;
  int w_group, a_group;  // 0: one group per row
};

// Rows with a few large values, like rotated LLM activations before clipping.
Matrix heavy_rows(int64_t rows, int64_t cols, uint32_t seed) {
  Matrix m = gaussian_matrix(rows, cols, seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> col(0, cols - 1);
  for (int64_t r = 0; r < rows; ++r) m(r, col(rng)) *= 20.f;
  return m;
}

QuantSpec weight_spec(const Case& k) {
  QuantSpec s;
  s.bits = k.w_bits;
  s.symmetric = k.w_sym;
  s.group = k.w_group;
  return s;
}

QuantSpec act_spec(const Case& k) {
  QuantSpec s;
  s.bits = k.a_bits;
  s.symmetric = false;
  s.clip_ratio = 0.9f;
  s.group = k.a_group;
  return s;
}

// Y[t, r]: for each block in order, scale_x · scale_w · Σ (qx − zx)(qw − zw) with the sum in int64,
// added in double from 0, rounded once to f32.
Matrix naive_product(const QuantizedMatrix& qx, const QuantizedMatrix& qw, const std::vector<int64_t>& bounds) {
  Matrix y(qx.rows, qw.rows);
  for (int64_t t = 0; t < qx.rows; ++t)
    for (int64_t r = 0; r < qw.rows; ++r) {
      double acc = 0;
      for (size_t b = 0; b + 1 < bounds.size(); ++b) {
        const QuantParams px = qx.params(t, bounds[b]), pw = qw.params(r, bounds[b]);
        int64_t sum = 0;
        for (int64_t c = bounds[b]; c < bounds[b + 1]; ++c)
          sum += (int64_t(qx.codes[size_t(t * qx.cols + c)]) - int64_t(px.zero)) *
                 (int64_t(qw.codes[size_t(r * qw.cols + c)]) - int64_t(pw.zero));
        acc += double(px.scale) * double(pw.scale) * double(sum);
      }
      y(t, r) = float(acc);
    }
  return y;
}

IntWeights pack(const QuantizedMatrix& qw, int64_t act_group) {
  return IntWeights::pack(qw.codes.data(), qw.rows, qw.cols, qw.spec.bits, qw.spec.group, qw.scales.data.data(),
                          qw.zeros.data.data(), act_group);
}

const Case kCases[] = {
    {8, 8, true, 0, 0},     // W8A8 per channel
    {8, 8, false, 36, 0},   // asymmetric 8-bit groups, the last one partial
    {8, 4, true, 0, 0},     // W4A8
    {4, 4, true, 0, 0},     // W4A4
    {4, 4, false, 36, 0},   // W4A4 in groups with a partial last group
    {4, 4, true, 0, 20},    // activations one group per head (the o_proj input)
    {6, 3, true, 36, 20},   // both grouped, blocks where either group starts
};

}  // namespace

TEST(ExactLinear, IsTheNaiveIntegerProductOfTheFakeQuantizedOperands) {
  for (const Case& k : kCases) {
    SCOPED_TRACE("a" + std::to_string(k.a_bits) + " w" + std::to_string(k.w_bits) + " groups " +
                 std::to_string(k.w_group) + "/" + std::to_string(k.a_group));
    const Matrix x = heavy_rows(9, 100, 1), w = gaussian_matrix(13, 100, 2);
    const QuantizedMatrix qx = quantize(x, act_spec(k)), qw = quantize(w, weight_spec(k));
    const std::vector<int64_t> bounds = column_blocks(100, k.w_group, k.a_group);
    Matrix y;
    exact_linear(qx.dequantize(), qw.dequantize(), bounds, y);
    EXPECT_EQ(y.data, naive_product(qx, qw, bounds).data);
    // The fake-quant input rounds to the same codes again (what the reference's hook and the
    // integer runtime's activation quantization see).
    Matrix xq = x;
    fake_quantize(xq, act_spec(k));
    EXPECT_EQ(xq.data, qx.dequantize().data);
  }
}

TEST(ExactLinear, IntegerKernelsReproduceItBitForBit) {
  for (const Case& k : kCases) {
    SCOPED_TRACE("a" + std::to_string(k.a_bits) + " w" + std::to_string(k.w_bits) + " groups " +
                 std::to_string(k.w_group) + "/" + std::to_string(k.a_group));
    // 40 tokens: register tiles and the row-by-row remainder.
    const Matrix x = heavy_rows(40, 100, 3), w = gaussian_matrix(13, 100, 4);
    const QuantizedMatrix qw = quantize(w, weight_spec(k));
    Matrix xq = x, ref;
    fake_quantize(xq, act_spec(k));
    exact_linear(xq, qw.dequantize(), column_blocks(100, k.w_group, k.a_group), ref);
    const IntWeights packed = pack(qw, k.a_group);
    for (IntPath p : supported_int_paths())
      for (IntTiling tiling : {IntTiling::Tiles, IntTiling::Slices, IntTiling::Rows}) {
        Matrix y;
        int_gemm(quantize_activations(x, act_spec(k)), packed, p, y, tiling);
        EXPECT_EQ(y.data, ref.data) << int_path_name(p);
      }
  }
}

// Weight scales with a full f32 significand (as quantize wrote them before the rounding): the
// stored f32 weights are then rounded products scale · (q − zero), so the reference multiplies
// slightly different numbers than the integer sums; they agree within that rounding, 2^-24 of each
// product, plus the final rounding.
TEST(ExactLinear, FullMantissaWeightScalesAgreeWithinTheirRounding) {
  const Case k{4, 4, true, 36, 0};
  const Matrix x = heavy_rows(16, 100, 5), w = gaussian_matrix(13, 100, 6);
  QuantizedMatrix qw = quantize(w, weight_spec(k));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> jitter(1.f, 1.001f);
  for (float& s : qw.scales.data) s *= jitter(rng);  // no longer short
  Matrix xq = x, ref, y;
  fake_quantize(xq, act_spec(k));
  const Matrix wf = qw.dequantize();
  exact_linear(xq, wf, column_blocks(100, k.w_group, 0), ref);
  int_gemm(quantize_activations(x, act_spec(k)), pack(qw, 0), best_int_path(), y);
  int differ = 0;
  for (int64_t t = 0; t < x.rows; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      double magnitude = 0;
      for (int64_t c = 0; c < 100; ++c) magnitude += std::abs(double(xq(t, c)) * wf(r, c));
      const double bound = std::ldexp(magnitude, -24) + std::ldexp(std::abs(double(ref(t, r))), -23);
      EXPECT_LE(std::abs(double(y(t, r)) - ref(t, r)), bound) << t << "," << r;
      differ += y(t, r) != ref(t, r);
    }
  EXPECT_GT(differ, 0);  // the rounded weights do show: this is not the exact case
}

// Large enough for the parallel conversions (the buffers are the calling thread's), on two threads
// and on one: the same bits.
TEST(ExactLinear, ThreadsGiveTheSameBits) {
  const Case k{4, 4, true, 64, 0};
  const Matrix x = heavy_rows(300, 256, 8), w = gaussian_matrix(300, 256, 9);
  Matrix xq = x;
  fake_quantize(xq, act_spec(k));
  const Matrix wf = quantize(w, weight_spec(k)).dequantize();
  const std::vector<int64_t> bounds = column_blocks(256, k.w_group, k.a_group);
  const int threads = num_threads();
  Matrix one, two;
  set_num_threads(1);
  exact_linear(xq, wf, bounds, one);
  set_num_threads(2);
  exact_linear(xq, wf, bounds, two);
  set_num_threads(threads);
  EXPECT_EQ(one.data, two.data);
}
