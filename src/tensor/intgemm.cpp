#include "tensor/intgemm.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>

#include "tensor/kernels.h"

namespace dq {

const char* int_path_name(IntPath p) {
  switch (p) {
    case IntPath::Scalar: return "scalar";
    case IntPath::Avx2: return "avx2";
    case IntPath::AvxVnni: return "avx-vnni";
    case IntPath::Avx512Vnni: return "avx512-vnni";
  }
  return "?";
}

static bool cpu_has_avx_vnni() {
  // CPUID leaf 7 subleaf 1, EAX bit 4 (GCC 12's __builtin_cpu_supports does not report it).
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 4) & 1;
}

std::vector<IntPath> supported_int_paths() {
  __builtin_cpu_init();
  std::vector<IntPath> p{IntPath::Scalar};
  if (!__builtin_cpu_supports("avx2")) return p;
  p.push_back(IntPath::Avx2);
  if (cpu_has_avx_vnni()) p.push_back(IntPath::AvxVnni);
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    p.push_back(IntPath::Avx512Vnni);
  return p;
}

IntPath best_int_path() {
  static const IntPath best = supported_int_paths().back();
  return best;
}

// ---- stored weight values ----

static int nibble_value(const uint8_t* row, int64_t c) {
  const uint8_t* run = row + (c / 32) * 16;
  const int64_t j = c % 32;
  return (j < 16 ? run[j] & 15 : run[j - 16] >> 4) - 8;
}

int IntWeights::value(int64_t r, int64_t c) const {
  const uint8_t* row = values.data() + r * row_bytes;
  return nibbles ? nibble_value(row, c) : int(int8_t(row[c]));
}

std::vector<int64_t> column_blocks(int64_t cols, int64_t group, int64_t act_group) {
  if (group <= 0) group = cols;
  if (act_group <= 0) act_group = cols;
  std::vector<int64_t> bounds;
  for (int64_t c = 0; c < cols; ++c)
    if (c % group == 0 || c % act_group == 0) bounds.push_back(c);
  bounds.push_back(cols);
  return bounds;
}

IntWeights IntWeights::pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int64_t group,
                            const float* scales, const float* zeros, int64_t act_group) {
  if (bits < 2 || bits > 8) throw Error("integer weights: bits must be 2..8, got " + std::to_string(bits));
  if (cols > 65536) throw Error("integer weights: more than 65536 columns would overflow int32 sums");
  IntWeights w;
  w.rows = rows;
  w.cols = cols;
  w.bits = bits;
  w.nibbles = bits <= 4;
  w.group = group > 0 ? std::min(group, cols) : cols;
  w.act_group = act_group > 0 ? std::min(act_group, cols) : cols;
  w.row_bytes = w.nibbles ? (cols + 31) / 32 * 16 : cols;
  const int offset = w.nibbles ? 8 : 1 << (bits - 1);
  w.values.assign(size_t(rows * w.row_bytes), w.nibbles ? 0x88 : 0);  // padding: value 0
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = w.values.data() + r * w.row_bytes;
    for (int64_t c = 0; c < cols; ++c) {
      const int code = codes[r * cols + c];
      if (code >= (1 << bits)) throw Error("integer weights: code out of range");
      if (!w.nibbles) {
        row[c] = uint8_t(int8_t(code - offset));
        continue;
      }
      uint8_t& byte = row[(c / 32) * 16 + (c % 32) % 16];
      byte = (c % 32) < 16 ? uint8_t((byte & 0xF0) | code) : uint8_t((byte & 0x0F) | (code << 4));
    }
  }
  const int64_t ng = w.weight_groups();
  w.scales.assign(scales, scales + rows * ng);
  w.zeros.resize(size_t(rows * ng));
  for (size_t i = 0; i < w.zeros.size(); ++i) w.zeros[i] = int32_t(zeros[i]) - offset;
  w.bounds = column_blocks(cols, w.group, w.act_group);
  const int64_t nb = w.blocks();
  w.block_sums.assign(size_t(rows * nb), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s = 0;
      for (int64_t c = w.bounds[size_t(b)]; c < w.bounds[size_t(b) + 1]; ++c) s += w.value(r, c);
      w.block_sums[size_t(r * nb + b)] = s;
    }
  return w;
}

size_t IntWeights::bytes() const {
  return values.size() + scales.size() * 4 + zeros.size() * 4 + block_sums.size() * 4 + bounds.size() * 8;
}

// ---- kernels: byte weights (a, w at the first column), nibble runs (whole 32-column runs) ----

namespace {

int32_t bytes_scalar(const uint8_t* a, const int8_t* w, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += int32_t(a[i]) * int32_t(w[i]);
  return s;
}

int32_t runs_scalar(const uint8_t* a, const uint8_t* w, int64_t runs) {
  int32_t s = 0;
  for (int64_t k = 0; k < runs; ++k, a += 32, w += 16)
    for (int j = 0; j < 16; ++j) s += int32_t(a[j]) * ((w[j] & 15) - 8) + int32_t(a[j + 16]) * ((w[j] >> 4) - 8);
  return s;
}

int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// A 16-byte nibble run as 32 int8 values in column order (low nibbles, then high nibbles).
inline __m256i expand_run(const uint8_t* w) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

int32_t bytes_avx2_maddubs(const uint8_t* a, const int8_t* w, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(load32(a + i), load32(w + i)), ones));
  return hsum(acc) + bytes_scalar(a + i, w + i, n - i);
}

int32_t bytes_avx2_madd16(const uint8_t* a, const int8_t* w, int64_t n) {
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a16, w16));
  }
  return hsum(acc) + bytes_scalar(a + i, w + i, n - i);
}

int32_t runs_avx2(const uint8_t* a, const uint8_t* w, int64_t runs) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  for (int64_t k = 0; k < runs; ++k, a += 32, w += 16)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(load32(a), expand_run(w)), ones));
  return hsum(acc);
}

__attribute__((target("avxvnni"))) int32_t bytes_avx_vnni(const uint8_t* a, const int8_t* w, int64_t n) {
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) acc = _mm256_dpbusd_avx_epi32(acc, load32(a + i), load32(w + i));
  return hsum(acc) + bytes_scalar(a + i, w + i, n - i);
}

__attribute__((target("avxvnni"))) int32_t runs_avx_vnni(const uint8_t* a, const uint8_t* w, int64_t runs) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t k = 0; k < runs; ++k, a += 32, w += 16) acc = _mm256_dpbusd_avx_epi32(acc, load32(a), expand_run(w));
  return hsum(acc);
}

#define DQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

DQ_AVX512 int32_t bytes_avx512_vnni(const uint8_t* a, const int8_t* w, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a + i), _mm512_loadu_si512(w + i));
  return _mm512_reduce_add_epi32(acc) + bytes_scalar(a + i, w + i, n - i);
}

// ---- register-blocked tiles: kTileTokens tokens x NR weight rows over the same columns ----
// out[i * NR + j] = Σ_{c < n} a_i[c] · w_j[c] with a_i = a + i·a_stride and int8 weights
// w_j = w + j·w_stride (nibble rows are expanded to int8 once per token chunk before, see int_gemm).
// Each weight vector is loaded once per step and reused for every token, each token vector once for
// every row; the accumulators stay in registers (AVX2/AVX-VNNI: 8 of the 16 ymm registers,
// AVX-512: 16 of the 32 zmm). Integer sums are exact in any order, so a tile gives the same int32
// results as the per-row kernels above.

constexpr int kTileTokens = 4, kMaxTileRows = 4;

void bytes_tail(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int nr, int64_t i0, int64_t n,
                int32_t* out) {
  for (int i = 0; i < kTileTokens; ++i)
    for (int j = 0; j < nr; ++j)
      out[i * nr + j] += bytes_scalar(a + i * as + i0, reinterpret_cast<const int8_t*>(w + j * ws) + i0, n - i0);
}

// out[i * 2 + j] = the lane sum of acc[i][j], two at a time through horizontal adds.
void store_sums(__m256i (&acc)[kTileTokens][2], int32_t* out) {
  for (int i = 0; i < kTileTokens; ++i) {
    __m256i h = _mm256_hadd_epi32(acc[i][0], acc[i][1]);  // per 128-bit lane: 2 partials of each
    h = _mm256_hadd_epi32(h, h);
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    out[i * 2] = _mm_cvtsi128_si32(s);
    out[i * 2 + 1] = _mm_extract_epi32(s, 1);
  }
}

void bytes_avx2_maddubs_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kTileTokens][2] = {};
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m256i w0 = load32(w + c), w1 = load32(w + ws + c);
#pragma GCC unroll 4
    for (int i = 0; i < kTileTokens; ++i) {
      const __m256i x = load32(a + i * as + c);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones));
    }
  }
  store_sums(acc, out);
  bytes_tail(a, as, w, ws, 2, c, n, out);
}

void bytes_avx2_madd16_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n, int32_t* out) {
  auto widen_u = [](const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  auto widen_s = [](const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  __m256i acc[kTileTokens][2] = {};
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256i w0 = widen_s(w + c), w1 = widen_s(w + ws + c);
#pragma GCC unroll 4
    for (int i = 0; i < kTileTokens; ++i) {
      const __m256i x = widen_u(a + i * as + c);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, w0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, w1));
    }
  }
  store_sums(acc, out);
  bytes_tail(a, as, w, ws, 2, c, n, out);
}

__attribute__((target("avxvnni"))) void bytes_avx_vnni_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws,
                                                            int64_t n, int32_t* out) {
  __m256i acc[kTileTokens][2] = {};
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m256i w0 = load32(w + c), w1 = load32(w + ws + c);
#pragma GCC unroll 4
    for (int i = 0; i < kTileTokens; ++i) {
      const __m256i x = load32(a + i * as + c);
      acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], x, w0);
      acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], x, w1);
    }
  }
  store_sums(acc, out);
  bytes_tail(a, as, w, ws, 2, c, n, out);
}

// Two nibble runs (32 bytes) as 64 int8 values in column order: their low and high nibbles
// rearranged per 128-bit lane.
DQ_AVX512 inline __m512i expand_two_runs(const uint8_t* w) {
  const __m512i idx = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m256i m = _mm256_set1_epi8(15);
  const __m256i b = load32(w);
  const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  const __m512i v = _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), idx, _mm512_castsi256_si512(hi));
  return _mm512_sub_epi8(v, _mm512_set1_epi8(8));
}

DQ_AVX512 int32_t runs_avx512_vnni(const uint8_t* a, const uint8_t* w, int64_t runs) {
  // Two runs per step: their low and high nibbles rearranged into column order per 128-bit lane.
  __m512i acc = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 2 <= runs; k += 2, a += 64, w += 32) acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a), expand_two_runs(w));
  int32_t s = _mm512_reduce_add_epi32(acc);
  if (k < runs) s += hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), load32(a), expand_run(w)));
  return s;
}

DQ_AVX512 void bytes_avx512_vnni_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n,
                                      int32_t* out) {
  __m512i acc[kTileTokens][4] = {};
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    __m512i wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(w + j * ws + c);
#pragma GCC unroll 4
    for (int i = 0; i < kTileTokens; ++i) {
      const __m512i x = _mm512_loadu_si512(a + i * as + c);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x, wv[j]);
    }
  }
  // Four lane sums at a time: fold each to 256 bits, then horizontal adds.
  for (int i = 0; i < kTileTokens; ++i) {
    __m256i y[4];
    for (int j = 0; j < 4; ++j)
      y[j] = _mm256_add_epi32(_mm512_castsi512_si256(acc[i][j]), _mm512_extracti64x4_epi64(acc[i][j], 1));
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(y[0], y[1]), _mm256_hadd_epi32(y[2], y[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * 4),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  bytes_tail(a, as, w, ws, 4, c, n, out);
}

using BytesDot = int32_t (*)(const uint8_t*, const int8_t*, int64_t);
using RunsDot = int32_t (*)(const uint8_t*, const uint8_t*, int64_t);
using TileDot = void (*)(const uint8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);

// maddubs is exact for these widths (see intgemm.h: (2^a − 1)·2^b ≤ 32767).
bool maddubs_exact(int act_bits, int weight_bits) { return ((1 << act_bits) - 1) * (1 << weight_bits) <= 32767; }

struct Kernel {
  const char* name;
  BytesDot bytes;
  RunsDot runs;
  // Tiles of kTileTokens tokens x tile_rows int8 weight rows; none on the scalar path, which stays
  // the row-by-row reference.
  TileDot tile = nullptr;
  int tile_rows = 1;
};

Kernel select(IntPath p, int act_bits, const IntWeights& w) {
  if (act_bits < 2 || act_bits > 8) throw Error("integer kernels: activation bits must be 2..8");
  switch (p) {
    case IntPath::Scalar: return {"scalar", bytes_scalar, runs_scalar};
    case IntPath::Avx2:
      if (w.nibbles || maddubs_exact(act_bits, w.bits))
        return {"avx2-maddubs", bytes_avx2_maddubs, runs_avx2, bytes_avx2_maddubs_tile, 2};
      return {"avx2-madd16", bytes_avx2_madd16, runs_avx2, bytes_avx2_madd16_tile, 2};
    case IntPath::AvxVnni:
      return {"avx-vnni", bytes_avx_vnni, runs_avx_vnni, bytes_avx_vnni_tile, 2};
    case IntPath::Avx512Vnni:
      return {"avx512-vnni", bytes_avx512_vnni, runs_avx512_vnni, bytes_avx512_vnni_tile, 4};
  }
  throw Error("integer kernels: unknown path");
}

int32_t dot(const Kernel& k, const IntWeights& w, int64_t row, const uint8_t* a, int64_t c0, int64_t c1) {
  const uint8_t* wr = w.values.data() + row * w.row_bytes;
  if (!w.nibbles) return k.bytes(a + c0, reinterpret_cast<const int8_t*>(wr) + c0, c1 - c0);
  // Columns before the first whole 32-column run and after the last go one by one.
  const int64_t r0 = (c0 + 31) / 32, r1 = c1 / 32;
  if (r0 >= r1) {
    int32_t s = 0;
    for (int64_t c = c0; c < c1; ++c) s += int32_t(a[c]) * nibble_value(wr, c);
    return s;
  }
  int32_t s = k.runs(a + r0 * 32, wr + r0 * 16, r1 - r0);
  for (int64_t c = c0; c < r0 * 32; ++c) s += int32_t(a[c]) * nibble_value(wr, c);
  for (int64_t c = r1 * 32; c < c1; ++c) s += int32_t(a[c]) * nibble_value(wr, c);
  return s;
}

// A packed nibble row as int8 values in column order (row_bytes * 2 of them, padding included).
void expand_row(const uint8_t* row, int64_t row_bytes, uint8_t* out) {
  for (int64_t q = 0; q < row_bytes / 16; ++q)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 32), expand_run(row + q * 16));
}

// Σ p[0..n) (sums of absolute differences against zero, 32 bytes at a time).
int32_t code_sum(const uint8_t* p, int64_t n) {
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) acc = _mm256_add_epi64(acc, _mm256_sad_epu8(load32(p + i), _mm256_setzero_si256()));
  int32_t s = hsum(acc);  // four 64-bit lane sums below 2^31 (n ≤ 65536 columns): their low halves
  for (; i < n; ++i) s += p[i];
  return s;
}

constexpr const char* kKernelNames[] = {"scalar", "avx2-maddubs", "avx2-madd16", "avx-vnni", "avx512-vnni"};
std::atomic<unsigned> g_used{0};

void mark_used(const char* name) {
  for (size_t i = 0; i < std::size(kKernelNames); ++i)
    if (std::string(kKernelNames[i]) == name) g_used |= 1u << i;
}

}  // namespace

int32_t int_dot(IntPath p, int act_bits, const IntWeights& w, int64_t row, const uint8_t* a, int64_t c0,
                int64_t c1) {
  return dot(select(p, act_bits, w), w, row, a, c0, c1);
}

std::vector<std::string> int_kernels_used() {
  std::vector<std::string> names;
  for (size_t i = 0; i < std::size(kKernelNames); ++i)
    if (g_used & (1u << i)) names.push_back(kKernelNames[i]);
  return names;
}

void int_gemm(const IntActs& a, const IntWeights& w, IntPath p, Matrix& y, IntTiling tiling) {
  if (a.cols != w.cols) throw Error("int_gemm: activation and weight widths differ");
  if (a.group != w.act_group) throw Error("int_gemm: activation groups differ from the weight's blocks");
  const Kernel k = select(p, a.bits, w);
  mark_used(k.name);
  const int64_t T = a.rows, R = w.rows, nb = w.blocks(), nwg = w.weight_groups(), nag = a.groups();
  y.reshape_for_overwrite(T, R);
  // Each token's sum of codes per block (the zero-point correction's other half).
  std::vector<int32_t> asum(size_t(T * nb));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = w.bounds[size_t(b)];
      asum[size_t(t * nb + b)] = code_sum(a.codes.data() + t * a.cols + c0, w.bounds[size_t(b) + 1] - c0);
    }
  // Per block: its weight group, activation group and width (divisions kept out of the loops).
  std::vector<int64_t> block_wg(static_cast<size_t>(nb)), block_ag(block_wg), block_len(block_wg);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = w.bounds[size_t(b)];
    block_wg[size_t(b)] = c0 / w.group;
    block_ag[size_t(b)] = c0 / a.group;
    block_len[size_t(b)] = w.bounds[size_t(b) + 1] - c0;
  }
  // f32 result of one (token, row) pair from its blocks' exact dots, in block order on every path,
  // summed in double and rounded once (see the header).
  auto finish = [&](int64_t t, int64_t r, const int32_t* dots, int64_t dot_stride) {
    double acc = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t wi = r * nwg + block_wg[size_t(b)], ai = t * nag + block_ag[size_t(b)];
      const int64_t zw = w.zeros[size_t(wi)], za = a.zeros[size_t(ai)];
      const int64_t exact = int64_t(dots[b * dot_stride]) - zw * asum[size_t(t * nb + b)] -
                            za * w.block_sums[size_t(r * nb + b)] + block_len[size_t(b)] * za * zw;
      acc += double(a.scales[size_t(ai)]) * double(w.scales[size_t(wi)]) * double(exact);
    }
    y(t, r) = float(acc);
  };
  // Tokens in chunks small enough that their codes stay in cache while the weight rows pass; within
  // a chunk, tiles of kTileTokens tokens x tile_rows rows, and row by row where a tile does not fit
  // (the last tokens or rows, single-token decoding, the scalar path). One parallel region over
  // (chunk, row tile), and none for small products (waking threads costs more).
  constexpr int64_t kTokenChunk = 32;
  const int64_t chunks = (T + kTokenChunk - 1) / kTokenChunk;
  const bool tiles = k.tile && tiling == IntTiling::Tiles;
  const int64_t nr = tiles ? k.tile_rows : 1, row_tiles = (R + nr - 1) / nr;
#pragma omp parallel for collapse(2) schedule(static) if (T * R * w.cols > (int64_t(1) << 22))
  for (int64_t tc = 0; tc < chunks; ++tc) {
    for (int64_t rt = 0; rt < row_tiles; ++rt) {
      const int64_t r0 = rt * nr, r1 = std::min(R, r0 + nr), t1 = std::min(T, (tc + 1) * kTokenChunk);
      int64_t t = tc * kTokenChunk;
      if (tiles && r1 - r0 == nr && t1 - t >= kTileTokens) {
        // Nibble rows are expanded to int8 once here, for every token tile of the chunk.
        const uint8_t* wt = w.values.data() + r0 * w.row_bytes;
        int64_t ws = w.row_bytes;
        std::vector<uint8_t> expanded;
        if (w.nibbles) {
          ws = 2 * w.row_bytes;
          expanded.resize(size_t(nr * ws));
          for (int64_t j = 0; j < nr; ++j) expand_row(wt + j * w.row_bytes, w.row_bytes, expanded.data() + j * ws);
          wt = expanded.data();
        }
        std::vector<int32_t> dots(static_cast<size_t>(nb * kTileTokens * nr));
        for (; t + kTileTokens <= t1; t += kTileTokens) {
          const uint8_t* at = a.codes.data() + t * a.cols;
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t c0 = w.bounds[size_t(b)], c1 = w.bounds[size_t(b) + 1];
            k.tile(at + c0, a.cols, wt + c0, ws, c1 - c0, dots.data() + b * kTileTokens * nr);
          }
          // dots[b][i][j]: pair (t + i, r0 + j) of block b; the same sums as finish(), in the same
          // block order, with each token's and row's parameters read once per block.
          double acc[kTileTokens][kMaxTileRows] = {};
          for (int64_t b = 0; b < nb; ++b) {
            const int32_t* d = dots.data() + b * kTileTokens * nr;
            for (int i = 0; i < kTileTokens; ++i) {
              const int64_t ai = (t + i) * nag + block_ag[size_t(b)];
              const int64_t za = a.zeros[size_t(ai)], as = asum[size_t((t + i) * nb + b)];
              const double sa = a.scales[size_t(ai)];
              for (int64_t j = 0; j < nr; ++j) {
                const int64_t r = r0 + j, wi = r * nwg + block_wg[size_t(b)], zw = w.zeros[size_t(wi)];
                const int64_t exact = int64_t(d[i * nr + j]) - zw * as - za * w.block_sums[size_t(r * nb + b)] +
                                      block_len[size_t(b)] * za * zw;
                acc[i][j] += sa * double(w.scales[size_t(wi)]) * double(exact);
              }
            }
          }
          for (int i = 0; i < kTileTokens; ++i)
            for (int64_t j = 0; j < nr; ++j) y(t + i, r0 + j) = float(acc[i][j]);
        }
      }
      std::vector<int32_t> row_dots(static_cast<size_t>(nb));
      for (; t < t1; ++t) {
        const uint8_t* at = a.codes.data() + t * a.cols;
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t b = 0; b < nb; ++b) row_dots[size_t(b)] = dot(k, w, r, at, w.bounds[size_t(b)], w.bounds[size_t(b) + 1]);
          finish(t, r, row_dots.data(), 1);
        }
      }
    }
  }
}

}  // namespace dq
