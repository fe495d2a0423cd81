// The integer runtime's activation codes against quantize(), the reference they must equal; and
// linears that share an input against each quantizing it on its own.
#include <gtest/gtest.h>

#include <random>

#include "quant/intlinear.h"

using namespace dq;

namespace {

// tokens x cols values: random, plus rows that hit exact rounding midpoints of their own scale and
// the clamp at both ends.
Matrix activations(int64_t tokens, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, 2.f);
  Matrix x(tokens, cols);
  for (float& v : x.data) v = d(rng);
  for (int64_t c = 0; c < cols; ++c) {
    x(0, c) = float(c % 17) * 0.5f - 4.f;  // multiples of 0.5: midpoints for scales of 1/2^k
    if (tokens > 1) x(1, c) = c == 0 ? 1000.f : -float(c % 5);  // one outlier, clipped range
  }
  return x;
}

}  // namespace

TEST(IntLinear, ActivationCodesEqualQuantizeForEveryWidthGroupAndTail) {
  // Widths with a tail after the last 8 values (7, 61, 172) and without (64, 576); per token and
  // per group (including a partial last group of 50), every bit width.
  for (int64_t cols : {7, 61, 64, 172, 576})
    for (int64_t group : {0, 32, 50})
      for (int bits = 2; bits <= 8; ++bits) {
        QuantSpec spec;
        spec.bits = bits;
        spec.symmetric = false;
        spec.clip_ratio = 0.9f;
        spec.group = int(group);
        const Matrix x = activations(5, cols, uint64_t(cols * 10 + bits));
        const IntActs a = quantize_activations(x, spec);
        const QuantizedMatrix q = quantize(x, spec);
        const std::string what = "cols " + std::to_string(cols) + " group " + std::to_string(group) + " bits " + std::to_string(bits);
        ASSERT_EQ(a.codes, q.codes) << what;
        ASSERT_EQ(a.scales, q.scales.data) << what;
        ASSERT_EQ(a.zeros.size(), q.zeros.data.size()) << what;
        for (size_t i = 0; i < a.zeros.size(); ++i) ASSERT_EQ(float(a.zeros[i]), q.zeros.data[i]) << what;
        EXPECT_EQ(a.group, group > 0 ? std::min<int64_t>(group, cols) : cols);
        ASSERT_EQ(a.sums.size(), a.scales.size()) << what;
        for (int64_t r = 0; r < x.rows; ++r)
          for (int64_t g = 0; g < a.groups(); ++g) {
            int32_t sum = 0;
            for (int64_t c = g * a.group; c < std::min(cols, (g + 1) * a.group); ++c) sum += q.codes[size_t(r * cols + c)];
            ASSERT_EQ(a.sums[size_t(r * a.groups() + g)], sum) << what;
          }
      }
}

TEST(IntLinear, NonFiniteActivationsAreAnError) {
  QuantSpec spec;
  spec.bits = 8;
  spec.symmetric = false;
  Matrix x = activations(300, 576, 1);  // large enough for the parallel loop
  x(123, 45) = NAN;
  EXPECT_THROW(quantize_activations(x, spec), Error);
}

TEST(IntLinear, SharedInputGivesEachLinearsOwnProduct) {
  // Two linears given the same activation spec share one quantized input; one given an equal but
  // separate spec does not. Sharing must not change any product.
  const int64_t cols = 64, rows = 6;
  std::mt19937_64 rng(3);
  std::vector<uint8_t> codes(size_t(rows * cols));
  for (auto& c : codes) c = uint8_t(rng() % 16);
  std::vector<float> scales(size_t(rows), 0.01f), zeros(size_t(rows), 8.f);
  QuantSpec s;
  s.bits = 4;
  s.symmetric = false;
  auto spec = std::make_shared<const QuantSpec>(s), other = std::make_shared<const QuantSpec>(s);
  const IntPath path = best_int_path();
  auto make = [&](std::shared_ptr<const QuantSpec> act) {
    return IntLinear(IntWeights::pack(codes.data(), rows, cols, 4, 0, scales.data(), zeros.data(), 0), act, path);
  };
  const IntLinear a = make(spec), b = make(spec), c = make(other);
  EXPECT_TRUE(a.shares_input(b));
  EXPECT_FALSE(a.shares_input(c));
  const Matrix x = activations(9, cols, 4);
  const auto in = a.prepare(x);
  Matrix shared, own;
  b.apply(*in, shared);
  b.apply(x, own);
  EXPECT_EQ(shared.data, own.data);
}
