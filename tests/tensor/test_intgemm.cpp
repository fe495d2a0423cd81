// Integer kernels against naive integer references: every activation x weight bit width, odd sizes
// and group tails, the scalar path and every path this CPU supports, worst-case magnitudes.
#include <gtest/gtest.h>

#include <random>

#include "tensor/intgemm.h"

using namespace dq;

namespace {

std::vector<uint8_t> random_codes(int64_t n, int bits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(0, (1 << bits) - 1);
  std::vector<uint8_t> c(static_cast<size_t>(n));
  for (auto& v : c) v = uint8_t(d(rng));
  return c;
}

// Per-group scales in (0.5, 1.5) and code zeros anywhere in [0, maxq].
struct Params {
  std::vector<float> scales, zeros;
};
Params random_params(int64_t n, int bits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> s(0.5f, 1.5f);
  std::uniform_int_distribution<int> z(0, (1 << bits) - 1);
  Params p;
  for (int64_t i = 0; i < n; ++i) {
    p.scales.push_back(s(rng));
    p.zeros.push_back(float(z(rng)));
  }
  return p;
}

int offset(int bits) { return bits <= 4 ? 8 : 1 << (bits - 1); }

IntWeights pack(const std::vector<uint8_t>& codes, int64_t rows, int64_t cols, int bits, int64_t group,
                int64_t act_group, uint64_t seed) {
  const int64_t g = group > 0 ? group : cols, ng = (cols + g - 1) / g;
  const Params p = random_params(rows * ng, bits, seed);
  return IntWeights::pack(codes.data(), rows, cols, bits, group, p.scales.data(), p.zeros.data(), act_group);
}

int64_t naive_dot(const uint8_t* a, const std::vector<uint8_t>& codes, int64_t row, int64_t cols, int bits,
                  int64_t c0, int64_t c1) {
  int64_t s = 0;
  for (int64_t c = c0; c < c1; ++c) s += int64_t(a[c]) * (int64_t(codes[size_t(row * cols + c)]) - offset(bits));
  return s;
}

// One token's codes in one group of scale 1.
IntActs one_token(std::vector<uint8_t> codes, int bits, int64_t group, int32_t zero) {
  IntActs a;
  a.rows = 1;
  a.cols = int64_t(codes.size());
  a.bits = bits;
  a.group = group;
  a.codes = std::move(codes);
  a.scales.assign(size_t(a.groups()), 1.f);
  a.zeros.assign(size_t(a.groups()), zero);
  return a;
}

const int64_t kSizes[] = {64, 172, 576, 11008};

}  // namespace

TEST(IntGemm, ScalarPathAlwaysOffered) {
  const std::vector<IntPath> p = supported_int_paths();
  ASSERT_FALSE(p.empty());
  EXPECT_EQ(p.front(), IntPath::Scalar);
  EXPECT_EQ(best_int_path(), p.back());
  for (IntPath q : p) std::printf("[ supported ] %s\n", int_path_name(q));
}

TEST(IntGemm, PackedValuesAreCodesMinusOffset) {
  for (int bits = 2; bits <= 8; ++bits)
    for (int64_t cols : {1, 31, 33, 172}) {
      const auto codes = random_codes(3 * cols, bits, uint64_t(bits * 100 + cols));
      const IntWeights w = pack(codes, 3, cols, bits, 0, 0, 1);
      EXPECT_EQ(w.nibbles, bits <= 4);
      for (int64_t r = 0; r < 3; ++r)
        for (int64_t c = 0; c < cols; ++c)
          ASSERT_EQ(w.value(r, c), int(codes[size_t(r * cols + c)]) - offset(bits)) << bits << " " << c;
      // Resident bytes: half a byte per weight for 4-bit codes (runs of 32), one for 8-bit.
      EXPECT_EQ(w.row_bytes, bits <= 4 ? (cols + 31) / 32 * 16 : cols);
    }
}

TEST(IntGemm, DotEqualsNaiveSumOnEveryPathBitWidthAndRange) {
  for (int64_t cols : kSizes)
    for (int wb = 2; wb <= 8; ++wb) {
      const int64_t rows = 2;
      const auto codes = random_codes(rows * cols, wb, uint64_t(cols * 10 + wb));
      const IntWeights w = pack(codes, rows, cols, wb, 0, 0, 7);
      for (int ab = 2; ab <= 8; ++ab) {
        const auto a = random_codes(cols, ab, uint64_t(cols + ab));
        // Whole rows, a range starting mid-run (odd), and one inside a single run.
        const std::pair<int64_t, int64_t> ranges[] = {{0, cols}, {1, cols - 3}, {33, std::min<int64_t>(cols, 61)}};
        for (IntPath p : supported_int_paths())
          for (int64_t r = 0; r < rows; ++r)
            for (auto [c0, c1] : ranges)
              ASSERT_EQ(int64_t(int_dot(p, ab, w, r, a.data(), c0, c1)), naive_dot(a.data(), codes, r, cols, wb, c0, c1))
                  << int_path_name(p) << " a" << ab << " w" << wb << " cols " << cols << " [" << c0 << "," << c1 << ")";
      }
    }
}

TEST(IntGemm, WorstCaseMagnitudesDoNotSaturate) {
  // Largest activation codes against the most negative (and the largest) weight values: where
  // maddubs would saturate (a = 8 with 8-bit weights) the dispatcher must route around it.
  const int64_t cols = 11008;
  for (int wb = 2; wb <= 8; ++wb)
    for (int ab = 2; ab <= 8; ++ab) {
      std::vector<uint8_t> codes(size_t(2 * cols));
      for (int64_t c = 0; c < cols; ++c) {
        codes[size_t(c)] = 0;                                // most negative value
        codes[size_t(cols + c)] = uint8_t((1 << wb) - 1);  // largest
      }
      const IntWeights w = pack(codes, 2, cols, wb, 0, 0, 3);
      const std::vector<uint8_t> a(size_t(cols), uint8_t((1 << ab) - 1));
      for (IntPath p : supported_int_paths())
        for (int64_t r = 0; r < 2; ++r)
          ASSERT_EQ(int64_t(int_dot(p, ab, w, r, a.data(), 0, cols)), naive_dot(a.data(), codes, r, cols, wb, 0, cols))
              << int_path_name(p) << " a" << ab << " w" << wb;
    }
}

TEST(IntGemm, GemmEqualsDequantizedProductAndIsIdenticalAcrossPaths) {
  // Weight groups (per channel, 32, a partial last group of 50, 128) against per-token and
  // per-head (64) activation groups, on odd shapes.
  struct Case {
    int ab, wb;
    int64_t tokens, rows, cols, wgroup, agroup;
  };
  const Case cases[] = {{8, 8, 5, 7, 576, 0, 0},     {8, 4, 3, 9, 172, 50, 0},    {4, 4, 33, 5, 576, 128, 64},
                        {4, 8, 2, 3, 11008, 128, 0}, {8, 3, 4, 6, 172, 32, 64},  {6, 7, 3, 4, 64, 0, 0},
                        {8, 7, 2, 5, 576, 0, 64},     {2, 2, 3, 3, 172, 50, 64}, {8, 8, 1, 4, 11008, 0, 0}};
  for (const Case& k : cases) {
    const auto codes = random_codes(k.rows * k.cols, k.wb, uint64_t(k.cols + k.wb));
    const IntWeights w = pack(codes, k.rows, k.cols, k.wb, k.wgroup, k.agroup, 11);
    IntActs a;
    a.rows = k.tokens;
    a.cols = k.cols;
    a.bits = k.ab;
    a.group = k.agroup > 0 ? k.agroup : k.cols;
    a.codes = random_codes(k.tokens * k.cols, k.ab, 5);
    const Params ap = random_params(k.tokens * a.groups(), k.ab, 9);
    a.scales = ap.scales;
    for (float z : ap.zeros) a.zeros.push_back(int32_t(z));
    const int64_t wg = k.wgroup > 0 ? k.wgroup : k.cols, nwg = (k.cols + wg - 1) / wg;
    const Params wp = random_params(k.rows * nwg, k.wb, 11);
    Matrix first;
    for (IntPath p : supported_int_paths()) {
      Matrix y;
      int_gemm(a, w, p, y);
      ASSERT_EQ(y.rows, k.tokens);
      ASSERT_EQ(y.cols, k.rows);
      for (int64_t t = 0; t < k.tokens; ++t)
        for (int64_t r = 0; r < k.rows; ++r) {
          double ref = 0, mag = 0;
          for (int64_t c = 0; c < k.cols; ++c) {
            const int64_t ai = t * a.groups() + c / a.group, wi = r * nwg + c / wg;
            const double av = double(a.scales[size_t(ai)]) * (a.codes[size_t(t * k.cols + c)] - a.zeros[size_t(ai)]);
            const double wv = double(wp.scales[size_t(wi)]) * (double(codes[size_t(r * k.cols + c)]) - wp.zeros[size_t(wi)]);
            ref += av * wv;
            mag += std::fabs(av * wv);
          }
          // The epilogue works in double: y is the exact value rounded once to f32 (ref's own
          // double rounding is the 1e-12 term).
          const float fr = float(ref);
          const double half_ulp = 0.5 * (std::nextafter(std::fabs(fr), INFINITY) - std::fabs(fr));
          ASSERT_LE(std::fabs(y(t, r) - ref), half_ulp + 1e-12 * mag) << int_path_name(p) << " a" << k.ab << " w" << k.wb;
        }
      if (first.empty())
        first = y;
      else
        EXPECT_EQ(y.data, first.data) << int_path_name(p) << " differs from scalar";
    }
  }
}

TEST(IntGemm, KernelsUsedAreNamed) {
  const auto codes = random_codes(2 * 64, 8, 1);
  const IntWeights w = pack(codes, 2, 64, 8, 0, 0, 1);
  const IntActs a = one_token(random_codes(64, 8, 2), 8, 64, 3);
  Matrix y;
  int_gemm(a, w, IntPath::Scalar, y);
  const std::vector<std::string> used = int_kernels_used();
  EXPECT_NE(std::find(used.begin(), used.end(), "scalar"), used.end());
  if (supported_int_paths().size() > 1) {
    int_gemm(a, w, IntPath::Avx2, y);  // 8-bit activations x 8-bit weights: maddubs would saturate
    const std::vector<std::string> now = int_kernels_used();
    EXPECT_NE(std::find(now.begin(), now.end(), "avx2-madd16"), now.end());
  }
}

TEST(IntGemm, RejectsMismatchedGroupsAndWidths) {
  const auto codes = random_codes(2 * 64, 4, 1);
  const IntWeights w = pack(codes, 2, 64, 4, 0, 32, 1);
  const IntActs a = one_token(std::vector<uint8_t>(64, 1), 4, 64, 0);  // blocks were made for groups of 32
  Matrix y;
  EXPECT_THROW(int_gemm(a, w, IntPath::Scalar, y), Error);
  std::vector<uint8_t> wide(size_t(65537), 0);
  std::vector<float> s{1.f}, z{8.f};
  EXPECT_THROW(IntWeights::pack(wide.data(), 1, 65537, 4, 0, s.data(), z.data(), 0), Error);
}

namespace {

// tokens x cols activation codes with random per-group scales and zeros (or all codes at `fill`).
IntActs random_acts(int64_t tokens, int64_t cols, int bits, int64_t group, uint64_t seed, int fill = -1) {
  IntActs a;
  a.rows = tokens;
  a.cols = cols;
  a.bits = bits;
  a.group = group > 0 ? group : cols;
  a.codes = fill < 0 ? random_codes(tokens * cols, bits, seed) : std::vector<uint8_t>(size_t(tokens * cols), uint8_t(fill));
  const Params p = random_params(tokens * a.groups(), bits, seed + 1);
  a.scales = p.scales;
  for (float z : p.zeros) a.zeros.push_back(int32_t(z));
  return a;
}

// int_gemm on every path, tiled and row by row, gives exactly the scalar path's output; also when
// the activations come with their group sums (as the runtime's quantizer makes them).
void expect_scalar_bits(const IntActs& a, const IntWeights& w, const std::string& what) {
  Matrix ref;
  int_gemm(a, w, IntPath::Scalar, ref);
  IntActs with_sums = a;
  for (int64_t t = 0; t < a.rows; ++t)
    for (int64_t g = 0; g < a.groups(); ++g) {
      int32_t s = 0;
      for (int64_t c = g * a.group; c < std::min(a.cols, (g + 1) * a.group); ++c) s += a.codes[size_t(t * a.cols + c)];
      with_sums.sums.push_back(s);
    }
  const IntActs& summed = with_sums;
  for (const IntActs* in : {&a, &summed})
    for (IntPath p : supported_int_paths())
      for (IntTiling tiling : {IntTiling::Tiles, IntTiling::Slices, IntTiling::Rows}) {
        Matrix y;
        int_gemm(*in, w, p, y, tiling);
        const char* how = tiling == IntTiling::Tiles ? " tiles " : tiling == IntTiling::Slices ? " slices " : " rows ";
        ASSERT_EQ(y.data, ref.data) << int_path_name(p) << how
                                    << (in == &a ? "" : "with sums ") << what;
      }
}

}  // namespace

TEST(IntGemm, TilesGiveTheScalarBitsForEveryWidthSizeGroupTailAndOddCounts) {
  // 9 tokens x 9 rows: a whole tile and a smaller one for the last tokens (4 + 4 + 1 on AVX2, 6 + 3
  // on AVX-512), whole row tiles (2 or 4 rows) and a leftover row. Weight groups per channel and of 50 (a partial last group), activations
  // per token and per head of 64; group boundaries inside 32-column runs included.
  for (int64_t cols : kSizes)
    for (int wb = 2; wb <= 8; ++wb)
      for (int ab = 2; ab <= 8; ++ab) {
        const bool grouped = (wb + ab + cols) % 2 == 0;  // alternate to keep the test fast at 11008
        const int64_t wgroup = grouped ? 50 : 0, agroup = grouped && cols % 64 == 0 ? 64 : 0;
        const int64_t rows = 9, tokens = 9;
        const auto codes = random_codes(rows * cols, wb, uint64_t(cols * 100 + wb * 10 + ab));
        const IntWeights w = pack(codes, rows, cols, wb, wgroup, agroup, 3);
        expect_scalar_bits(random_acts(tokens, cols, ab, agroup, uint64_t(ab + cols)), w,
                           "a" + std::to_string(ab) + " w" + std::to_string(wb) + " cols " + std::to_string(cols));
      }
  // Token counts against every tile height (4 tokens on AVX2, 6 on AVX-512, and each smaller tile
  // for a chunk's last tokens) and across token chunks (128 / 192 tokens), row counts against the row
  // tiles (2, 4) with leftovers, and the other grouping at 576.
  for (int64_t tokens : {1, 2, 3, 4, 5, 6, 7, 11, 13, 32, 37, 131, 197})
    for (int wb : {4, 8}) {
      const int64_t rows = tokens % 2 ? 7 : 8;
      const auto codes = random_codes(rows * 576, wb, uint64_t(tokens + wb));
      const IntWeights w = pack(codes, rows, 576, wb, 50, 64, 5);
      expect_scalar_bits(random_acts(tokens, 576, 8, 64, uint64_t(tokens)), w, "tokens " + std::to_string(tokens));
      const IntWeights per_channel = pack(codes, rows, 576, wb, 0, 0, 7);
      expect_scalar_bits(random_acts(tokens, 576, 8, 0, uint64_t(tokens + 1)), per_channel,
                         "per channel, tokens " + std::to_string(tokens));
    }
}

// Column slices (AVX-512, AVX2) take blocks in whole groups of 4 columns: weight groups of 32 with
// per-head activation groups, and per channel (172 columns: 43 quads, past the 8 quads that AVX2
// adds in int16 for 8-bit activations); AVX2 through maddubs, and through madd16 for 8-bit weights
// with 8-bit activations; row counts below, at and past one 16-row slice (a partial last slice of
// fewer and of more than AVX2's 8-row halves), token counts against the 8-token (AVX-512), 3-token
// (AVX2 maddubs) and 1-token (madd16) tiles and their 256-, 96- and 32-token chunks.
TEST(IntGemm, SlicesGiveTheScalarBits) {
  for (int64_t cols : {64, 172, 576})
    for (int wb : {2, 4, 8})
      for (int ab : {4, 8})
        for (int64_t rows : {5, 16, 27, 37})
          for (int64_t tokens : {3, 8, 13, 261}) {
            if (tokens == 261 && (rows != 37 || cols != 576)) continue;  // the long case once per width pair
            const bool grouped = cols % 64 == 0;
            const auto codes = random_codes(rows * cols, wb, uint64_t(cols + rows * 10 + wb));
            const IntWeights w = pack(codes, rows, cols, wb, grouped ? 32 : 0, grouped ? 64 : 0, 3);
            expect_scalar_bits(random_acts(tokens, cols, ab, grouped ? 64 : 0, uint64_t(ab + tokens)), w,
                               "a" + std::to_string(ab) + " w" + std::to_string(wb) + " cols " + std::to_string(cols) +
                                   " rows " + std::to_string(rows) + " tokens " + std::to_string(tokens));
          }
}

TEST(IntGemm, TilesAtWorstCaseMagnitudesGiveTheScalarBits) {
  // The largest activation codes against the most negative and the largest weight values, where a
  // wrongly chosen maddubs would saturate (8-bit activations x 8-bit weights).
  const int64_t cols = 11008;
  for (int wb = 2; wb <= 8; ++wb)
    for (int ab = 2; ab <= 8; ++ab) {
      std::vector<uint8_t> codes(size_t(4 * cols));
      for (int64_t c = 0; c < 4 * cols; ++c) codes[size_t(c)] = (c / cols) % 2 ? uint8_t((1 << wb) - 1) : 0;
      const IntWeights w = pack(codes, 4, cols, wb, 0, 0, 3);
      expect_scalar_bits(random_acts(4, cols, ab, 0, 1, (1 << ab) - 1), w, "a" + std::to_string(ab) + " w" + std::to_string(wb));
    }
}
