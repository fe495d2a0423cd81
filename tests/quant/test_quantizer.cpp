#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "quant/quantizer.h"

#include "test_helpers.h"

using namespace dq;
using dq::test::gaussian_matrix;
using dq::test::naive_round_up;

namespace {

// Heavy-tailed rows: Gaussian plus a few large outliers, like LLM activations.
Matrix outlier_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  Matrix m = gaussian_matrix(rows, cols, seed);
  std::mt19937 rng(seed + 1);
  std::uniform_int_distribution<int64_t> col(0, cols - 1);
  for (int64_t r = 0; r < rows; ++r)
    for (int k = 0; k < 3; ++k) m(r, col(rng)) *= 12.f;
  return m;
}

QuantSpec spec_of(int bits, bool sym, int group = 0, float clip = 1.f) {
  QuantSpec s;
  s.bits = bits;
  s.symmetric = sym;
  s.group = group;
  s.clip_ratio = clip;
  return s;
}

// Checks fake-quant against the params of each row-group: |x - deq| <= scale/2 inside the
// representable range, the nearest edge of the grid outside it, and codes that round-trip.
void check_bounds(const Matrix& x, const QuantSpec& spec) {
  Matrix fq = x;
  fake_quantize(fq, spec);
  QuantizedMatrix q = quantize(x, spec);
  for (int64_t r = 0; r < x.rows; ++r)
    for (int64_t c = 0; c < x.cols; ++c) {
      QuantParams p = q.params(r, c);
      float lo = p.scale * (0.f - p.zero), hi = p.scale * (float(spec.maxq()) - p.zero);
      float v = x(r, c), d = fq(r, c);
      if (v >= lo && v <= hi) {
        ASSERT_LE(std::abs(v - d), 0.5f * p.scale * (1.f + 1e-5f)) << r << "," << c;
      } else {
        ASSERT_EQ(d, v < lo ? lo : hi) << r << "," << c;
      }
    }
}

}  // namespace

TEST(Quantizer, SymmetricConventionMatchesQuaRot) {
  // max|x| = 7 at 4 bits: scale 1, zero 8, signed codes in [-8, 7]; ties round to even.
  Matrix x(1, 6);
  x.data = {-7.f, 3.5f, 2.5f, -0.5f, 6.9f, 0.f};
  QuantSpec s = spec_of(4, true);
  QuantParams p = find_params(x.row(0), 6, s);
  EXPECT_FLOAT_EQ(p.scale, 1.f);
  EXPECT_EQ(p.zero, 8.f);
  QuantizedMatrix q = quantize(x, s);
  std::vector<int> signed_codes;
  for (uint8_t c : q.codes) signed_codes.push_back(int(c) - 8);
  EXPECT_EQ(signed_codes, (std::vector<int>{-7, 4, 2, 0, 7, 0}));
}

TEST(Quantizer, AsymmetricConventionMatchesGptq) {
  QuantSpec s = spec_of(4, false);
  std::vector<float> a = {-5.f, 10.f, 1.f};
  QuantParams p = find_params(a.data(), 3, s);
  EXPECT_FLOAT_EQ(p.scale, 1.f);
  EXPECT_EQ(p.zero, 5.f);
  // The range always includes 0: an all-positive row has zero 0.
  std::vector<float> b = {3.f, 18.f};
  p = find_params(b.data(), 2, s);
  // Scales are rounded up to 18 - bits = 14 significant bits (1 and 1/7 above have fewer).
  EXPECT_EQ(p.scale, naive_round_up(18.f / 15.f, 14));
  EXPECT_GT(p.scale, 18.f / 15.f);
  EXPECT_EQ(p.zero, 0.f);
  // The clip ratio multiplies both ends.
  s.clip_ratio = 0.9f;
  p = find_params(a.data(), 3, s);
  EXPECT_EQ(p.scale, naive_round_up((9.f + 4.5f) / 15.f, 14));
  EXPECT_EQ(p.zero, std::nearbyint(4.5f / p.scale));
}

// The scale rounding against a naive quantizer with the unrounded textbook scale, on heavy-tailed
// rows, every bit width, both grids, clip ratios and a partial last group: the stored scale is the
// naive one rounded up to 18 - bits significant bits (so it is at most 2^-(17-bits) larger), the
// zero point follows it, codes stay in range, values the naive grid covers are not clipped and stay
// within half a step, and every dequantized value has at most 18 significant bits (exact in f32).
TEST(Quantizer, RoundedScalesKeepTheQuantizerProperties) {
  const Matrix x = outlier_matrix(24, 100, 11);
  for (int bits = 2; bits <= 8; ++bits)
    for (bool sym : {true, false})
      for (float clip : {1.f, 0.9f}) {
        SCOPED_TRACE(std::to_string(bits) + (sym ? " sym " : " asym ") + std::to_string(clip));
        const QuantSpec s = spec_of(bits, sym, 36, clip);
        const QuantizedMatrix q = quantize(x, s);
        const float half = float(1 << (bits - 1)), maxq = float(s.maxq());
        for (int64_t r = 0; r < x.rows; ++r)
          for (int64_t g = 0; g < 3; ++g) {
            const int64_t c0 = g * 36, c1 = std::min<int64_t>(100, c0 + 36);
            float mn = 0, mx = 0;
            for (int64_t c = c0; c < c1; ++c) mn = std::min(mn, x(r, c)), mx = std::max(mx, x(r, c));
            const float lo = clip * mn, hi = clip * mx;
            const float naive = sym ? std::max(-lo, hi) / (half - 1.f) : (hi - lo) / maxq;
            const float scale = q.scales(r, g), zero = q.zeros(r, g);
            ASSERT_EQ(scale, naive_round_up(naive, 18 - bits));
            ASSERT_LE(scale, naive * (1.f + std::ldexp(1.f, bits - 17)));
            ASSERT_EQ(zero, sym ? half : std::nearbyint(-lo / scale));
            for (int64_t c = c0; c < c1; ++c) {
              const float code = q.codes[size_t(r * 100 + c)], v = x(r, c);
              ASSERT_LE(code, maxq);
              const float d = scale * (code - zero);
              ASSERT_EQ(double(d), double(scale) * (double(code) - zero));  // exact in f32
              int e;
              const double f = std::frexp(double(d), &e);
              ASSERT_EQ(std::ldexp(f, 18), std::nearbyint(std::ldexp(f, 18)));  // <= 18 significant bits
              // The naive grid's range: [-(half - 1), half - 1] steps (sym), [lo, hi] (asym).
              const bool covered = sym ? std::abs(v) <= naive * (half - 1.f) : v >= lo && v <= hi;
              if (covered) {
                ASSERT_LE(std::abs(v - d), 0.5f * scale * (1.f + 1e-5f)) << r << "," << c;
              }
            }
          }
      }
}

TEST(Quantizer, SymmetricPerChannelBound) {
  Matrix w = gaussian_matrix(32, 200, 1);
  for (int bits : {2, 3, 4, 8}) check_bounds(w, spec_of(bits, true));
}

TEST(Quantizer, AsymmetricPerTokenWithClip) {
  Matrix x = outlier_matrix(64, 256, 2);
  for (int bits : {4, 8}) {
    QuantSpec s = spec_of(bits, false, 0, 0.9f);
    check_bounds(x, s);
    // A clip ratio below 1 leaves each row's extreme value outside the grid (on its edge).
    QuantizedMatrix q = quantize(x, s);
    int64_t clipped_rows = 0;
    for (int64_t r = 0; r < x.rows; ++r) {
      QuantParams p = q.params(r, 0);
      float lo = p.scale * (0.f - p.zero), hi = p.scale * (float(s.maxq()) - p.zero);
      auto [mn, mx] = std::minmax_element(x.row(r), x.row(r) + x.cols);
      clipped_rows += (*mn < lo || *mx > hi);
    }
    EXPECT_EQ(clipped_rows, x.rows);
  }
}

TEST(Quantizer, PartialLastGroup) {
  Matrix w = gaussian_matrix(8, 172, 3);
  QuantSpec s = spec_of(4, true, 64);
  EXPECT_EQ(s.num_groups(172), 3);
  check_bounds(w, s);
  QuantizedMatrix q = quantize(w, s);
  ASSERT_EQ(q.scales.cols, 3);
  for (int64_t r = 0; r < w.rows; ++r) {
    QuantParams last = find_params(w.row(r) + 128, 44, s);
    EXPECT_EQ(q.scales(r, 2), last.scale);
  }
  check_bounds(w, spec_of(3, false, 172 / 4 + 1));
}

TEST(Quantizer, PerTensor) {
  Matrix x = gaussian_matrix(16, 48, 4);
  QuantSpec s = spec_of(8, true);
  s.per_tensor = true;
  check_bounds(x, s);
  QuantizedMatrix q = quantize(x, s);
  EXPECT_EQ(q.scales.rows, 1);
  EXPECT_EQ(q.scales.cols, 1);
  float amax = 0;
  for (float v : x.data) amax = std::max(amax, std::abs(v));
  EXPECT_EQ(q.scales(0, 0), naive_round_up(amax / 127.f, 10));
  s.symmetric = false;
  check_bounds(x, s);
}

TEST(Quantizer, IntegerPathEqualsFakeQuantExactly) {
  Matrix x = outlier_matrix(24, 172, 5);
  std::vector<QuantSpec> specs;
  for (int bits = 2; bits <= 8; ++bits)
    for (bool sym : {true, false})
      for (int group : {0, 32, 100}) specs.push_back(spec_of(bits, sym, group, sym ? 1.f : 0.9f));
  QuantSpec t = spec_of(4, false);
  t.per_tensor = true;
  specs.push_back(t);
  QuantSpec m = spec_of(3, true, 64);
  m.mse_clip = true;
  specs.push_back(m);
  for (const QuantSpec& s : specs) {
    Matrix fq = x;
    fake_quantize(fq, s);
    QuantizedMatrix q = quantize(x, s);
    for (uint8_t c : q.codes) ASSERT_LE(int(c), s.maxq());
    Matrix dq = q.dequantize();
    ASSERT_EQ(dq.data, fq.data) << "bits " << s.bits << " sym " << s.symmetric << " group "
                                << s.group;
    // Stored form: packed codes round-trip.
    auto packed = pack_codes(q.codes, q.rows, q.cols, s.bits);
    EXPECT_EQ(int64_t(packed.size()), q.rows * packed_row_bytes(q.cols, s.bits));
    EXPECT_EQ(unpack_codes(packed, q.rows, q.cols, s.bits), q.codes);
  }
}

TEST(Quantizer, PackingLayout) {
  std::vector<uint8_t> codes = {0x1, 0x2, 0xF, 0x0, 0x7};
  auto p4 = pack_codes(codes, 1, 5, 4);
  EXPECT_EQ(p4, (std::vector<uint8_t>{0x21, 0x0F, 0x07}));  // low nibble first, row padded
  auto p3 = pack_codes({7, 1, 5}, 1, 3, 3);                 // bits 111 001 101 -> 0b01001111, 0b1
  EXPECT_EQ(p3, (std::vector<uint8_t>{0x4F, 0x01}));
}

// The KV cache's rows: decoding gives exactly the fake-quantized values, for every width, with the
// layout written out by hand for one 4-bit row (codes two per byte, then scales, then zeros).
TEST(Quantizer, EncodedRowsDecodeToTheFakeQuantizedValues) {
  const Matrix x = outlier_matrix(7, 48, 11);
  for (int bits = 2; bits <= 8; ++bits)
    for (int group : {16, 0, 20}) {
      const QuantSpec s = spec_of(bits, false, group, 0.95f);
      Matrix fq = x;
      fake_quantize(fq, s);
      std::vector<uint8_t> enc{0xAB};  // encode_rows appends: what was there stays
      encode_rows(quantize(x, s), enc);
      ASSERT_EQ(int64_t(enc.size()), 1 + x.rows * encoded_row_bytes(x.cols, s));
      EXPECT_EQ(enc[0], 0xAB);
      Matrix dec(x.rows, x.cols);
      decode_rows(enc.data() + 1, x.rows, x.cols, s, dec.data.data());
      ASSERT_EQ(dec.data, fq.data) << "bits " << bits << " group " << group;
    }
  Matrix one(1, 4);
  one.data = {-1.f, 0.f, 2.f, 0.5f};
  const QuantSpec s = spec_of(4, false, 2);
  const QuantizedMatrix q = quantize(one, s);
  std::vector<uint8_t> enc;
  encode_rows(q, enc);
  ASSERT_EQ(enc.size(), 2u + 2 * 4 + 2);
  EXPECT_EQ(enc[0], uint8_t(q.codes[0] | q.codes[1] << 4));
  EXPECT_EQ(enc[1], uint8_t(q.codes[2] | q.codes[3] << 4));
  float scale1;
  std::memcpy(&scale1, enc.data() + 6, 4);
  EXPECT_EQ(scale1, q.scales(0, 1));
  EXPECT_EQ(enc[10], 15);  // group [-1, 0]: scale 1/15, zero 15
  EXPECT_EQ(enc[11], 0);   // group [2, 0.5]: the range [0, 2], zero 0
}

TEST(Quantizer, ZeroAndTinyRows) {
  Matrix x(3, 16, 0.f);
  for (int64_t c = 0; c < 16; ++c) x(1, c) = 1e-41f * float(c % 3);  // denormals
  x(2, 0) = 1.f;                                                     // one non-zero value
  for (bool sym : {true, false}) {
    Matrix fq = x;
    fake_quantize(fq, spec_of(4, sym));
    for (int64_t c = 0; c < 16; ++c) {
      EXPECT_EQ(fq(0, c), 0.f);
      EXPECT_TRUE(std::isfinite(fq(1, c)));
      EXPECT_LE(std::abs(fq(1, c)), 1e-40f);
    }
    EXPECT_NEAR(fq(2, 0), 1.f, std::ldexp(1.f, -13));  // off the grid by the scale's rounding
    EXPECT_EQ(fq(2, 5), 0.f);
    QuantizedMatrix q = quantize(x, spec_of(4, sym, 0));
    EXPECT_EQ(q.dequantize().data, fq.data);
  }
}

TEST(Quantizer, MseClipLowersError) {
  Matrix x = outlier_matrix(32, 128, 6);
  QuantSpec plain = spec_of(3, true);
  QuantSpec mse = plain;
  mse.mse_clip = true;
  auto err = [&](const QuantSpec& s) {
    Matrix fq = x;
    fake_quantize(fq, s);
    double e = 0;
    for (size_t i = 0; i < x.size(); ++i) e += std::pow(std::abs(x.data[i] - fq.data[i]), 2.4);
    return e;
  };
  // The search includes shrink 1, so it can only help; on heavy tails it helps a lot.
  EXPECT_LT(err(mse), 0.9 * err(plain));
  QuantizedMatrix q = quantize(x, mse);
  QuantizedMatrix q0 = quantize(x, plain);
  for (int64_t r = 0; r < x.rows; ++r) EXPECT_LE(q.scales(r, 0), q0.scales(r, 0));
}

TEST(Quantizer, SixteenBitsIsOff) {
  Matrix x = gaussian_matrix(4, 8, 7);
  Matrix y = x;
  fake_quantize(y, QuantSpec{});
  EXPECT_EQ(y.data, x.data);
  EXPECT_THROW(quantize(x, QuantSpec{}), Error);
}

TEST(Quantizer, RejectsNonFiniteAndBadSpecs) {
  Matrix x = gaussian_matrix(4, 8, 8);
  x(2, 3) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(fake_quantize(x, spec_of(4, true)), Error);
  EXPECT_THROW(quantize(x, spec_of(4, false, 4)), Error);
  x(2, 3) = std::numeric_limits<float>::infinity();
  QuantSpec t = spec_of(4, true);
  t.per_tensor = true;
  EXPECT_THROW(fake_quantize(x, t), Error);
  Matrix ok = gaussian_matrix(4, 8, 9);
  EXPECT_THROW(fake_quantize(ok, spec_of(1, true)), Error);
  EXPECT_THROW(fake_quantize(ok, spec_of(9, true)), Error);
  EXPECT_THROW(fake_quantize(ok, spec_of(4, true, -1)), Error);
  EXPECT_THROW(fake_quantize(ok, spec_of(4, true, 0, 1.5f)), Error);
  t.group = 4;
  EXPECT_THROW(fake_quantize(ok, t), Error);
}
