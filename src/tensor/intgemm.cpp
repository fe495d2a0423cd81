#include "tensor/intgemm.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <span>
#include <utility>

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

IntPath int_path_named(const std::string& name) {
  for (IntPath p : {IntPath::Scalar, IntPath::Avx2, IntPath::AvxVnni, IntPath::Avx512Vnni})
    if (name == int_path_name(p)) return p;
  throw Error("no integer kernel path named '" + name + "' (scalar, avx2, avx-vnni, avx512-vnni)");
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

// ---- register-blocked tiles: TT tokens x NR weight rows over the same columns ----
// out[i * NR + j] = Σ_{c < n} a_i[c] · w_j[c] with a_i = a + i·a_stride and int8 weights
// w_j = w + j·w_stride (nibble rows are expanded to int8 once per token chunk before, see int_gemm).
// Each weight vector is loaded once per step and reused for every token, each token vector once for
// every row; the accumulators stay in registers (AVX2/AVX-VNNI: up to 4 x 2 of the 16 ymm
// registers; AVX-512: up to 6 x 4 of the 32 zmm). Every loop over the accumulators is unrolled at
// compile time: an accumulator array indexed at run time lives in memory, not in registers. TT is a
// template parameter so the last tokens of a chunk run as a smaller tile. Integer sums are exact in
// any order, so a tile gives the same int32 results as the per-row kernels above.

constexpr int kMaxTileTokens = 6, kMaxTileRows = 4;

template <int TT, int NR>
inline void bytes_tail(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t i0, int64_t n, int32_t* out) {
  if (i0 == n) return;
  for (int i = 0; i < TT; ++i)
    for (int j = 0; j < NR; ++j)
      out[i * NR + j] += bytes_scalar(a + i * as + i0, reinterpret_cast<const int8_t*>(w + j * ws) + i0, n - i0);
}

// out[i * 2 + j] = the lane sum of acc[i][j], two at a time through horizontal adds.
template <int TT>
inline void store_sums(const __m256i (&acc)[TT][2], int32_t* out) {
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) {
    __m256i h = _mm256_hadd_epi32(acc[i][0], acc[i][1]);  // per 128-bit lane: 2 partials of each
    h = _mm256_hadd_epi32(h, h);
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    out[i * 2] = _mm_cvtsi128_si32(s);
    out[i * 2 + 1] = _mm_extract_epi32(s, 1);
  }
}

template <int TT>
void bytes_avx2_maddubs_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[TT][2];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m256i w0 = load32(w + c), w1 = load32(w + ws + c);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      const __m256i x = load32(a + i * as + c);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones));
    }
  }
  store_sums<TT>(acc, out);
  bytes_tail<TT, 2>(a, as, w, ws, c, n, out);
}

// Sums carried through a loop are kept in types of their own lane width (GCC's vector extension:
// `+=` on Int16x16 is vpaddw) rather than __m256i / __m512i: with those (64-bit lanes) GCC's partial
// redundancy elimination also carries their 16- or 32-bit view around the loop, and every add or
// vpdpbusd into a sum then costs a register move too (6 moves per 12 ALU operations in the AVX2
// 3-token slice loop, which is front-end bound; 15 per 8 vpdpbusd in the AVX-512 one).
using Int16x16 = int16_t __attribute__((vector_size(32)));
using Int32x8 = int32_t __attribute__((vector_size(32)));
using Int32x16 = int32_t __attribute__((vector_size(64)));

// acc[i][j] += s16[i][j]'s int16 lanes added in pairs to int32 (madd by 1).
template <int TT>
inline void add_int16_sums(__m256i (&acc)[TT][2], const Int16x16 (&s16)[TT][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) {
    acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(__m256i(s16[i][0]), ones));
    acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(__m256i(s16[i][1]), ones));
  }
}

// The same for nibble weights (|s| ≤ 8): a maddubs pair sum is at most 2·255·8 = 4080 in
// magnitude, so eight of them add exactly in int16 (8·4080 = 32640 ≤ 32767) before one madd by 1
// widens them to int32: one madd per eight maddubs instead of one each.
template <int TT>
void bytes_avx2_nibble_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n, int32_t* out) {
  constexpr int64_t kInt16Steps = 8;
  __m256i acc[TT][2];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  int64_t c = 0;
  while (c + 32 <= n) {
    const int64_t steps = std::min(kInt16Steps, (n - c) / 32);
    Int16x16 s16[TT][2];
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) s16[i][0] = s16[i][1] = Int16x16{};
    for (int64_t s = 0; s < steps; ++s, c += 32) {
      const __m256i w0 = load32(w + c), w1 = load32(w + ws + c);
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) {
        const __m256i x = load32(a + i * as + c);
        s16[i][0] += Int16x16(_mm256_maddubs_epi16(x, w0));
        s16[i][1] += Int16x16(_mm256_maddubs_epi16(x, w1));
      }
    }
    add_int16_sums<TT>(acc, s16);
  }
  store_sums<TT>(acc, out);
  bytes_tail<TT, 2>(a, as, w, ws, c, n, out);
}

template <int TT>
void bytes_avx2_madd16_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n, int32_t* out) {
  auto widen_u = [](const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  auto widen_s = [](const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  __m256i acc[TT][2];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256i w0 = widen_s(w + c), w1 = widen_s(w + ws + c);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      const __m256i x = widen_u(a + i * as + c);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, w0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, w1));
    }
  }
  store_sums<TT>(acc, out);
  bytes_tail<TT, 2>(a, as, w, ws, c, n, out);
}

template <int TT>
__attribute__((target("avxvnni"))) void bytes_avx_vnni_tile(const uint8_t* a, int64_t as, const uint8_t* w,
                                                            int64_t ws, int64_t n, int32_t* out) {
  __m256i acc[TT][2];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m256i w0 = load32(w + c), w1 = load32(w + ws + c);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      const __m256i x = load32(a + i * as + c);
      acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], x, w0);
      acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], x, w1);
    }
  }
  store_sums<TT>(acc, out);
  bytes_tail<TT, 2>(a, as, w, ws, c, n, out);
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

// One step of the AVX-512 tile over 64 columns (or the masked last few: bytes past n load as zeros,
// which add nothing).
template <int TT>
DQ_AVX512 inline void avx512_step(__m512i (&acc)[TT][4], const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws,
                                  __mmask64 m) {
  __m512i wv[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_epi8(m, w + j * ws);
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) {
    const __m512i x = _mm512_maskz_loadu_epi8(m, a + i * as);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x, wv[j]);
  }
}

template <int TT>
DQ_AVX512 void bytes_avx512_vnni_tile(const uint8_t* a, int64_t as, const uint8_t* w, int64_t ws, int64_t n,
                                      int32_t* out) {
  __m512i acc[TT][4];
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) avx512_step<TT>(acc, a + c, as, w + c, ws, ~__mmask64(0));
  if (c < n) avx512_step<TT>(acc, a + c, as, w + c, ws, _bzhi_u64(~uint64_t(0), unsigned(n - c)));
  // Four lane sums at a time: fold each to 256 bits, then horizontal adds.
#pragma GCC unroll 8
  for (int i = 0; i < TT; ++i) {
    __m256i y[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      y[j] = _mm256_add_epi32(_mm512_castsi512_si256(acc[i][j]), _mm512_maskz_extracti64x4_epi64(0xF, acc[i][j], 1));
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(y[0], y[1]), _mm256_hadd_epi32(y[2], y[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * 4),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
}

using BytesDot = int32_t (*)(const uint8_t*, const int8_t*, int64_t);
using RunsDot = int32_t (*)(const uint8_t*, const uint8_t*, int64_t);
using TileDot = void (*)(const uint8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);
using TileSet = std::array<TileDot, kMaxTileTokens + 1>;  // [tt]: the tile of tt tokens

// A kernel's tiles of 1..N tokens, as a table indexed by the token count.
template <int TT>
struct Avx2MaddubsTile { static constexpr TileDot fn = bytes_avx2_maddubs_tile<TT>; };
template <int TT>
struct Avx2NibbleTile { static constexpr TileDot fn = bytes_avx2_nibble_tile<TT>; };
template <int TT>
struct Avx2Madd16Tile { static constexpr TileDot fn = bytes_avx2_madd16_tile<TT>; };
template <int TT>
struct AvxVnniTile { static constexpr TileDot fn = bytes_avx_vnni_tile<TT>; };
template <int TT>
struct Avx512VnniTile { static constexpr TileDot fn = bytes_avx512_vnni_tile<TT>; };

template <template <int> class K, int... TT>
constexpr TileSet tile_set(std::integer_sequence<int, TT...>) {
  return TileSet{nullptr, K<TT + 1>::fn...};
}
template <template <int> class K, int N>
constexpr TileSet tiles_up_to() {
  return tile_set<K>(std::make_integer_sequence<int, N>{});
}

// maddubs is exact for these widths (see intgemm.h: (2^a − 1)·2^b ≤ 32767).
bool maddubs_exact(int act_bits, int weight_bits) { return ((1 << act_bits) - 1) * (1 << weight_bits) <= 32767; }

// How many maddubs results (pair sums of magnitude ≤ (2^a − 1)·2^b, b = 4 for nibbles) add exactly
// in int16 before they must be widened: 8 for nibbles at a = 8, 1 where maddubs_exact holds
// just so, 0 where maddubs itself could saturate.
int64_t maddubs_int16_steps(int act_bits, const IntWeights& w) {
  return 32767 / (((1 << act_bits) - 1) * (1 << (w.nibbles ? 4 : w.bits)));
}

// Which column-slice tiles a path has (see column_slice).
enum class SliceKernel { None, Avx2Maddubs, Avx2Madd16, Avx512Vnni };

struct Kernel {
  const char* name;
  BytesDot bytes;
  RunsDot runs;
  // tiles[tt]: tt tokens (1..tile_tokens) x tile_rows int8 weight rows; none on the scalar path,
  // which stays the row-by-row reference.
  TileSet tiles{};
  int tile_rows = 1, tile_tokens = 0;
  SliceKernel slices = SliceKernel::None;
  int64_t int16_steps = 0;  // Avx2Maddubs slices: maddubs_int16_steps
};

Kernel select(IntPath p, int act_bits, const IntWeights& w) {
  if (act_bits < 2 || act_bits > 8) throw Error("integer kernels: activation bits must be 2..8");
  switch (p) {
    case IntPath::Scalar: return {"scalar", bytes_scalar, runs_scalar};
    case IntPath::Avx2: {
      const int64_t steps = maddubs_int16_steps(act_bits, w);
      if (w.nibbles)
        return {"avx2-maddubs", bytes_avx2_maddubs, runs_avx2, tiles_up_to<Avx2NibbleTile, 4>(), 2, 4,
                SliceKernel::Avx2Maddubs, steps};
      if (maddubs_exact(act_bits, w.bits))
        return {"avx2-maddubs", bytes_avx2_maddubs, runs_avx2, tiles_up_to<Avx2MaddubsTile, 4>(), 2, 4,
                SliceKernel::Avx2Maddubs, steps};
      return {"avx2-madd16", bytes_avx2_madd16, runs_avx2, tiles_up_to<Avx2Madd16Tile, 4>(), 2, 4,
              SliceKernel::Avx2Madd16};
    }
    case IntPath::AvxVnni:
      return {"avx-vnni", bytes_avx_vnni, runs_avx_vnni, tiles_up_to<AvxVnniTile, 4>(), 2, 4};
    case IntPath::Avx512Vnni:
      return {"avx512-vnni", bytes_avx512_vnni, runs_avx512_vnni, tiles_up_to<Avx512VnniTile, 6>(), 4, 6,
              SliceKernel::Avx512Vnni};
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

// ---- column slices (AVX-512 VNNI; AVX2 in two registers): 16 weight rows in the lanes of one register ----
// The weights rearranged slice by slice as the products reach them: slice s, quad q (columns
// 4q..4q+3) is 64 bytes whose lane j holds row 16s + j's four int8 values, so one vpdpbusd with a
// token's four codes broadcast adds four columns to 16 rows' dots in place. The register tiles above end every block with horizontal sums;
// for short blocks (o_proj's input is quantized per head: 64 columns) those cost more than the
// products, and here there are none. Rows past the last are zero. Needs columns and block bounds in
// whole quads (slices_fit).
constexpr int64_t kSliceRows = 16;

bool slices_fit(const IntWeights& w) {
  return std::all_of(w.bounds.begin(), w.bounds.end(), [](int64_t c) { return c % 4 == 0; });
}

// The 4-byte words q0..q0+7 of eight rows (src[j] + 4 * q0), transposed: the 32 bytes at dst + k * 64
// hold word q0 + k of rows 0..7 in that order.
inline void transpose_words_8x8(const uint8_t* const* src, int64_t q0, uint8_t* dst) {
  __m256i r[8];
  for (int j = 0; j < 8; ++j) r[j] = load32(src[j] + 4 * q0);
  // Pairs of rows interleaved by word, then by pairs of words: each 128-bit lane holds one word of
  // four rows (words k and k + 4 in the low and high lanes).
  __m256i t[8], u[8];
  for (int j = 0; j < 4; ++j) {
    t[2 * j] = _mm256_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
    t[2 * j + 1] = _mm256_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0..3, rows 4..7
    __m256i* o = u + 4 * h;
    const __m256i* i = t + 4 * h;
    o[0] = _mm256_unpacklo_epi64(i[0], i[2]);  // words 0 | 4
    o[1] = _mm256_unpackhi_epi64(i[0], i[2]);  // words 1 | 5
    o[2] = _mm256_unpacklo_epi64(i[1], i[3]);  // words 2 | 6
    o[3] = _mm256_unpackhi_epi64(i[1], i[3]);  // words 3 | 7
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k * 64), _mm256_permute2x128_si256(u[k], u[4 + k], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (k + 4) * 64), _mm256_permute2x128_si256(u[k], u[4 + k], 0x31));
  }
}

// Slice s into dst (cols / 4 quads of 64 bytes, 9 KiB at 576 columns: it stays in L1 while a token
// chunk passes over it, and no rearranged copy of the whole matrix is written per call: prefill
// chunks call every linear once per chunk). `expanded` is scratch for the slice's int8 rows.
void column_slice(const IntWeights& w, int64_t s, uint8_t* dst, std::vector<uint8_t>& expanded) {
  const int64_t nq = w.cols / 4;
  const int64_t span = w.nibbles ? 2 * w.row_bytes : w.row_bytes;  // a row's int8 values, padding included
  expanded.resize(size_t(kSliceRows * span));
  const uint8_t* src[kSliceRows];
  for (int64_t j = 0; j < kSliceRows; ++j) {
    const int64_t r = s * kSliceRows + j;
    uint8_t* row = expanded.data() + j * span;
    if (r >= w.rows) {
      std::fill(row, row + span, uint8_t(0));
      src[j] = row;
    } else if (w.nibbles) {
      expand_row(w.values.data() + r * w.row_bytes, w.row_bytes, row);
      src[j] = row;
    } else {
      src[j] = w.values.data() + r * w.row_bytes;
    }
  }
  int64_t q = 0;
  for (; q + 8 <= nq; q += 8) {
    transpose_words_8x8(src, q, dst + q * 64);
    transpose_words_8x8(src + 8, q, dst + q * 64 + 32);
  }
  for (; q < nq; ++q)
    for (int64_t j = 0; j < kSliceRows; ++j) std::memcpy(dst + q * 64 + j * 4, src[j] + 4 * q, 4);
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

namespace {

// One int_gemm call: the blocks' layout, each token's code sums, and the epilogue that turns a
// (token, row) pair's exact block dots into its f32 output.
struct Gemm {
  const IntActs& a;
  const IntWeights& w;
  const Kernel& k;
  Matrix& y;
  int64_t nb, nwg, nag;
  std::vector<int32_t> asum;  // [token][block]: each token's sum of codes (the zero-point correction's other half)
  // Per block: its weight group, activation group and width (divisions kept out of the loops).
  std::vector<int64_t> block_wg, block_ag, block_len;

  Gemm(const IntActs& a_, const IntWeights& w_, const Kernel& k_, Matrix& y_)
      : a(a_), w(w_), k(k_), y(y_), nb(w_.blocks()), nwg(w_.weight_groups()), nag(a_.groups()) {
    if (!a.sums.empty() && nb == a.groups()) {  // blocks refine the activation groups: here they are them
      asum = a.sums;
    } else {
      asum.resize(size_t(a.rows * nb));
      for (int64_t t = 0; t < a.rows; ++t)
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c0 = w.bounds[size_t(b)];
          asum[size_t(t * nb + b)] = code_sum(a.codes.data() + t * a.cols + c0, w.bounds[size_t(b) + 1] - c0);
        }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = w.bounds[size_t(b)];
      block_wg.push_back(c0 / w.group);
      block_ag.push_back(c0 / a.group);
      block_len.push_back(w.bounds[size_t(b) + 1] - c0);
    }
  }

  // f32 result of one (token, row) pair from its blocks' exact dots, in block order: each block's
  // exact integer sum (dot − zw·Σq − za·Σs + n·za·zw) times sa·sw (exact in double: two floats)
  // added with one fused multiply-add, and the total rounded once to f32. The tiles' vector epilogue
  // does the same operations, so every path gives the same bits.
  void finish(int64_t t, int64_t r, const int32_t* dots) const {
    double acc = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t wi = r * nwg + block_wg[size_t(b)], ai = t * nag + block_ag[size_t(b)];
      const int64_t zw = w.zeros[size_t(wi)], za = a.zeros[size_t(ai)];
      const int64_t exact = int64_t(dots[b]) - zw * asum[size_t(t * nb + b)] - za * w.block_sums[size_t(r * nb + b)] +
                            block_len[size_t(b)] * za * zw;
      acc = std::fma(double(a.scales[size_t(ai)]) * double(w.scales[size_t(wi)]), double(exact), acc);
    }
    y(t, r) = float(acc);
  }

  // Tokens [t0, t1) x rows [r0, r1) one (token, row) dot at a time.
  void rows(int64_t t0, int64_t t1, int64_t r0, int64_t r1, std::vector<int32_t>& dots) const {
    dots.resize(size_t(nb));
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* at = a.codes.data() + t * a.cols;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < nb; ++b) dots[size_t(b)] = dot(k, w, r, at, w.bounds[size_t(b)], w.bounds[size_t(b) + 1]);
        finish(t, r, dots.data());
      }
    }
  }

  // Tokens [t0, t1) x rows [r0, r0 + NR) in tiles of k.tile_tokens tokens (fewer for the last).
  // The epilogue runs on 4 double lanes = 4 (token, row) pairs: one token's 4 rows (NR = 4) or two
  // tokens' 2 rows (NR = 2). Per block and lane: e = dot − zw·Σq − za·(Σs − n·zw), exact in double
  // (integers far below 2^53, so fused or not every step is exact), then acc = fma(sa·sw, e, acc):
  // the operations of finish() in the same block order.
  template <int NR>
  void tiles(int64_t t0, int64_t t1, int64_t r0, std::vector<uint8_t>& expanded, std::vector<double>& row_params) const {
    static_assert(NR == 2 || NR == 4);
    // Nibble rows are expanded to int8 once here, for every token tile of the chunk.
    const uint8_t* wt = w.values.data() + r0 * w.row_bytes;
    int64_t ws = w.row_bytes;
    if (w.nibbles) {
      ws = 2 * w.row_bytes;
      expanded.resize(size_t(NR * ws));
      for (int64_t j = 0; j < NR; ++j) expand_row(wt + j * w.row_bytes, w.row_bytes, expanded.data() + j * ws);
      wt = expanded.data();
    }
    // Per block, the 4 lanes' row parameters: sw, zw, Σs − n·zw.
    row_params.resize(size_t(nb * 12));
    for (int64_t b = 0; b < nb; ++b)
      for (int l = 0; l < 4; ++l) {
        const int64_t r = r0 + l % NR, wi = r * nwg + block_wg[size_t(b)];
        double* p = row_params.data() + b * 12;
        p[l] = w.scales[size_t(wi)];
        p[4 + l] = w.zeros[size_t(wi)];
        p[8 + l] = double(int64_t(w.block_sums[size_t(r * nb + b)]) - block_len[size_t(b)] * w.zeros[size_t(wi)]);
      }
    alignas(16) int32_t dots[kMaxTileTokens * kMaxTileRows + 4] = {};
    for (int64_t t = t0; t < t1; t += k.tile_tokens) {
      const int tt = int(std::min<int64_t>(k.tile_tokens, t1 - t)), lanes = (tt * NR + 3) / 4;
      const uint8_t* at = a.codes.data() + t * a.cols;
      __m256d acc[kMaxTileTokens];
      for (int v = 0; v < lanes; ++v) acc[v] = _mm256_setzero_pd();
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c0 = w.bounds[size_t(b)];
        k.tiles[size_t(tt)](at + c0, a.cols, wt + c0, ws, block_len[size_t(b)], dots);
        const double* p = row_params.data() + b * 12;
        const __m256d sw = _mm256_loadu_pd(p), zw = _mm256_loadu_pd(p + 4), bz = _mm256_loadu_pd(p + 8);
        // A token's parameters for this block.
        auto sa = [&](int i) { return double(a.scales[size_t((t + i) * nag + block_ag[size_t(b)])]); };
        auto za = [&](int i) { return double(a.zeros[size_t((t + i) * nag + block_ag[size_t(b)])]); };
        auto as = [&](int i) { return double(asum[size_t((t + i) * nb + b)]); };
        for (int v = 0; v < lanes; ++v) {
          __m256d vsa, vza, vas;
          if constexpr (NR == 4) {
            vsa = _mm256_set1_pd(sa(v)), vza = _mm256_set1_pd(za(v)), vas = _mm256_set1_pd(as(v));
          } else {  // tokens 2v and 2v + 1 (the last token twice when tt is odd; its copy is not stored)
            const int i0 = 2 * v, i1 = std::min(2 * v + 1, tt - 1);
            vsa = _mm256_set_pd(sa(i1), sa(i1), sa(i0), sa(i0));
            vza = _mm256_set_pd(za(i1), za(i1), za(i0), za(i0));
            vas = _mm256_set_pd(as(i1), as(i1), as(i0), as(i0));
          }
          const __m256d d = _mm256_cvtepi32_pd(_mm_load_si128(reinterpret_cast<const __m128i*>(dots + 4 * v)));
          const __m256d e = _mm256_fnmadd_pd(vza, bz, _mm256_fnmadd_pd(zw, vas, d));
          acc[v] = _mm256_fmadd_pd(_mm256_mul_pd(vsa, sw), e, acc[v]);
        }
      }
      for (int v = 0; v < lanes; ++v) {
        const __m128 f = _mm256_cvtpd_ps(acc[v]);
        if constexpr (NR == 4) {
          _mm_storeu_ps(y.row(t + v) + r0, f);
        } else {
          _mm_storel_pi(reinterpret_cast<__m64*>(y.row(t + 2 * v) + r0), f);
          if (2 * v + 1 < tt) _mm_storeh_pi(reinterpret_cast<__m64*>(y.row(t + 2 * v + 1) + r0), f);
        }
      }
    }
  }

  // Every token x slice `slice`: the slice rearranged into `v` (column_slice) and its rows' block
  // parameters gathered once, then slice_tokens() tokens at a time. Per block and row lane the
  // epilogue of tiles(), on 8 (AVX-512) or 4 (AVX2) double lanes.
  void slices(int64_t slice, std::vector<uint8_t>& v, std::vector<uint8_t>& expanded,
              std::vector<double>& row_params) const {
    v.resize(size_t(w.cols / 4 * 64));
    column_slice(w, slice, v.data(), expanded);
    // The next slice's packed rows are fetched into L2 while this one's tokens run: rearranging a
    // slice otherwise waits on memory for them (half of column_slice's time in integer prefill).
    const int64_t next_end = std::min(w.rows, (slice + 2) * kSliceRows) * w.row_bytes;
    for (int64_t b = (slice + 1) * kSliceRows * w.row_bytes; b < next_end; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w.values.data() + b), _MM_HINT_T1);
    // Per block, the 16 rows' sw, zw, Σs − n·zw (rows past the last: zeros, never stored).
    row_params.assign(size_t(nb * 3 * kSliceRows), 0.0);
    const int64_t r0 = slice * kSliceRows, rows = std::min(kSliceRows, w.rows - r0);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t l = 0; l < rows; ++l) {
        const int64_t r = r0 + l, wi = r * nwg + block_wg[size_t(b)];
        double* p = row_params.data() + b * 3 * kSliceRows;
        p[l] = w.scales[size_t(wi)];
        p[kSliceRows + l] = w.zeros[size_t(wi)];
        p[2 * kSliceRows + l] = double(int64_t(w.block_sums[size_t(r * nb + b)]) - block_len[size_t(b)] * w.zeros[size_t(wi)]);
      }
    const uint8_t* ws = v.data();
    const std::span<const SliceTile> tile = slice_tiles(k);
    const int64_t tokens = slice_tokens(k);
    for (int64_t t = 0; t < a.rows; t += tokens)
      (this->*tile[size_t(std::min(tokens, a.rows - t))])(ws, t, r0, rows, row_params.data());
  }

  // A kernel's slice tiles by token count (entry i handles i tokens; entry 0 unused): as many
  // tokens as keep the accumulators in registers (AVX2 maddubs: 3 x 2 int32 and 3 x 2 int16;
  // madd16: 4 int32 next to 4 weight registers; with 2 tokens GCC spilled one sum, and a sum carried
  // through memory cost a quarter of the speed).
  using SliceTile = void (Gemm::*)(const uint8_t*, int64_t, int64_t, int64_t, const double*) const;
  static std::span<const SliceTile> slice_tiles(const Kernel& k) {
    static constexpr SliceTile avx512[] = {nullptr,
        &Gemm::slice_tile<1>, &Gemm::slice_tile<2>, &Gemm::slice_tile<3>, &Gemm::slice_tile<4>,
        &Gemm::slice_tile<5>, &Gemm::slice_tile<6>, &Gemm::slice_tile<7>, &Gemm::slice_tile<8>};
    static constexpr SliceTile avx2[] = {nullptr,
        &Gemm::slice_tile_avx2<1, false>, &Gemm::slice_tile_avx2<2, false>, &Gemm::slice_tile_avx2<3, false>};
    static constexpr SliceTile avx2_madd16[] = {nullptr, &Gemm::slice_tile_avx2<1, true>};
    if (k.slices == SliceKernel::Avx512Vnni) return avx512;
    if (k.slices == SliceKernel::Avx2Madd16) return avx2_madd16;
    return avx2;
  }
  static int64_t slice_tokens(const Kernel& k) { return int64_t(slice_tiles(k).size()) - 1; }

  // AVX2 block dots, d[i][h] = token i's dots with rows 8h..8h + 7 over quads [q0, q1) of a slice.
  // maddubs: a slice quad's 64 bytes as two registers of 8 rows each. A broadcast token quad
  // times each gives 8 rows' two pair sums; these add up in int16 over k.int16_steps quads (exact:
  // maddubs_int16_steps) before one madd by 1 widens them to the 8 rows' int32 dots, in place as in
  // slice_tile: no horizontal sums.
  template <int TT>
  void maddubs_dots(__m256i (&d)[TT][2], const uint8_t* ws, const uint8_t* at, int64_t q0, int64_t q1) const {
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) d[i][0] = d[i][1] = _mm256_setzero_si256();
    for (int64_t q = q0; q < q1;) {
      const int64_t qe = std::min(q1, q + k.int16_steps);
      Int16x16 s16[TT][2];
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) s16[i][0] = s16[i][1] = Int16x16{};
      for (; q < qe; ++q) {
        const __m256i w0 = load32(ws + q * 64), w1 = load32(ws + q * 64 + 32);
#pragma GCC unroll 8
        for (int i = 0; i < TT; ++i) {
          int32_t x;
          std::memcpy(&x, at + i * a.cols + 4 * q, 4);
          const __m256i xb = _mm256_set1_epi32(x);
          s16[i][0] += Int16x16(_mm256_maddubs_epi16(xb, w0));
          s16[i][1] += Int16x16(_mm256_maddubs_epi16(xb, w1));
        }
      }
      add_int16_sums<TT>(d, s16);
    }
  }

  // madd16 (8-bit activations with 8-bit weights, where maddubs could saturate): each 16 bytes of
  // a slice quad (4 rows' quads) widened to int16, times the token quad widened and broadcast,
  // through madd gives each row's two pair sums in int32; these add up over the block, and one
  // horizontal add per 8 rows and block (not per row) joins each row's two.
  template <int TT>
  void madd16_dots(__m256i (&d)[TT][2], const uint8_t* ws, const uint8_t* at, int64_t q0, int64_t q1) const {
    Int32x8 s32[TT][4];
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i)
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) s32[i][g] = Int32x8{};
    for (int64_t q = q0; q < q1; ++q) {
      __m256i wv[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) wv[g] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + q * 64 + 16 * g)));
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) {
        // The quad broadcast by a load (vbroadcastss) and widened: the quad as int16, four times.
        const __m128i x4 = _mm_castps_si128(_mm_broadcast_ss(reinterpret_cast<const float*>(at + i * a.cols + 4 * q)));
        const __m256i xb = _mm256_cvtepu8_epi16(x4);
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) s32[i][g] += Int32x8(_mm256_madd_epi16(xb, wv[g]));
      }
    }
    // s32[i][g] lanes: rows 4g, 4g + 1 | 4g + 2, 4g + 3, two partial sums each; hadd joins them as
    // rows (0, 1, 4, 5 | 2, 3, 6, 7) of the pair g = 2h, 2h + 1, and the 64-bit permute orders them.
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        d[i][h] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(__m256i(s32[i][2 * h]), __m256i(s32[i][2 * h + 1])), 0xD8);
  }

  // AVX2 slices: block dots as above, then slice_tile's epilogue on 4 double lanes.
  template <int TT, bool Madd16>
  void slice_tile_avx2(const uint8_t* ws, int64_t t, int64_t r0, int64_t rows, const double* row_params) const {
    __m256d acc[TT][4];
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i)
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) acc[i][h] = _mm256_setzero_pd();
    const uint8_t* at = a.codes.data() + t * a.cols;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i d[TT][2];
      if constexpr (Madd16)
        madd16_dots<TT>(d, ws, at, w.bounds[size_t(b)] / 4, w.bounds[size_t(b) + 1] / 4);
      else
        maddubs_dots<TT>(d, ws, at, w.bounds[size_t(b)] / 4, w.bounds[size_t(b) + 1] / 4);
      const double* p = row_params + b * 3 * kSliceRows;
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) {
        const int64_t ai = (t + i) * nag + block_ag[size_t(b)];
        const __m256d sa = _mm256_set1_pd(a.scales[size_t(ai)]), za = _mm256_set1_pd(a.zeros[size_t(ai)]);
        const __m256d as = _mm256_set1_pd(asum[size_t((t + i) * nb + b)]);
#pragma GCC unroll 4
        for (int h = 0; h < 4; ++h) {
          const __m128i dh = h % 2 ? _mm256_extracti128_si256(d[i][h / 2], 1) : _mm256_castsi256_si128(d[i][h / 2]);
          const __m256d sw = _mm256_loadu_pd(p + 4 * h), zw = _mm256_loadu_pd(p + kSliceRows + 4 * h);
          const __m256d bz = _mm256_loadu_pd(p + 2 * kSliceRows + 4 * h);
          const __m256d e = _mm256_fnmadd_pd(za, bz, _mm256_fnmadd_pd(zw, as, _mm256_cvtepi32_pd(dh)));
          acc[i][h] = _mm256_fmadd_pd(_mm256_mul_pd(sa, sw), e, acc[i][h]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      float* out = y.row(t + i) + r0;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(acc[i][2 * h + 1]), _mm256_cvtpd_ps(acc[i][2 * h]));
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(rows - 8 * h)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(out + 8 * h, keep, f);
      }
    }
  }

  template <int TT>
  DQ_AVX512 void slice_tile(const uint8_t* ws, int64_t t, int64_t r0, int64_t rows, const double* row_params) const {
    __m512d acc[TT][2];
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_pd();
    const uint8_t* at = a.codes.data() + t * a.cols;
    for (int64_t b = 0; b < nb; ++b) {
      Int32x16 d[TT];
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) d[i] = Int32x16{};
      for (int64_t q = w.bounds[size_t(b)] / 4; q < w.bounds[size_t(b) + 1] / 4; ++q) {
        const __m512i wv = _mm512_loadu_si512(ws + q * 64);
#pragma GCC unroll 8
        for (int i = 0; i < TT; ++i) {
          int32_t x;
          std::memcpy(&x, at + i * a.cols + 4 * q, 4);
          d[i] = Int32x16(_mm512_dpbusd_epi32(__m512i(d[i]), _mm512_set1_epi32(x), wv));
        }
      }
      const double* p = row_params + b * 3 * kSliceRows;
      const __m512d sw[2] = {_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)};
      const __m512d zw[2] = {_mm512_loadu_pd(p + 16), _mm512_loadu_pd(p + 24)};
      const __m512d bz[2] = {_mm512_loadu_pd(p + 32), _mm512_loadu_pd(p + 40)};
#pragma GCC unroll 8
      for (int i = 0; i < TT; ++i) {
        const int64_t ai = (t + i) * nag + block_ag[size_t(b)];
        const __m512d sa = _mm512_set1_pd(a.scales[size_t(ai)]), za = _mm512_set1_pd(a.zeros[size_t(ai)]);
        const __m512d as = _mm512_set1_pd(asum[size_t((t + i) * nb + b)]);
        const __m512d dd[2] = {_mm512_cvtepi32_pd(_mm512_castsi512_si256(__m512i(d[i]))),
                               _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(__m512i(d[i]), 1))};
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m512d e = _mm512_fnmadd_pd(za, bz[h], _mm512_fnmadd_pd(zw[h], as, dd[h]));
          acc[i][h] = _mm512_fmadd_pd(_mm512_mul_pd(sa, sw[h]), e, acc[i][h]);
        }
      }
    }
    const __mmask8 m0 = __mmask8(rows >= 8 ? 0xFF : (1u << rows) - 1), m1 = __mmask8(rows >= 16 ? 0xFF : rows <= 8 ? 0 : (1u << (rows - 8)) - 1);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      float* out = y.row(t + i) + r0;
      _mm256_mask_storeu_ps(out, m0, _mm512_cvtpd_ps(acc[i][0]));
      _mm256_mask_storeu_ps(out + 8, m1, _mm512_cvtpd_ps(acc[i][1]));
    }
  }
};

}  // namespace

void int_gemm(const IntActs& a, const IntWeights& w, IntPath p, Matrix& y, IntTiling tiling) {
  if (a.cols != w.cols) throw Error("int_gemm: activation and weight widths differ");
  if (a.group != w.act_group) throw Error("int_gemm: activation groups differ from the weight's blocks");
  const Kernel k = select(p, a.bits, w);
  mark_used(k.name);
  const int64_t T = a.rows, R = w.rows;
  y.reshape_for_overwrite(T, R);
  const Gemm g(a, w, k, y);
  // Tokens in chunks small enough that their codes stay in cache while the weight rows pass; within
  // a chunk, tiles of tile_tokens tokens (fewer for the last) x tile_rows rows, and row by row where
  // a row tile does not fit (the last rows), for single-token decoding (which then reads each packed
  // byte once instead of expanding nibble rows first) and on the scalar path. One parallel region
  // over (chunk, row tile), and none for small products (waking threads costs more).
  const bool tiles = k.tile_tokens > 0 && tiling != IntTiling::Rows && T > 1;
  // Best (bench_gemm, IntGemmTilesVsRows): on AVX-512, slices where blocks are short (2.2x the
  // tiles at 64 columns, 1.2x at 576; at 1536 and 2048, 0.93–1.03x, where rearranging the weights
  // per call costs what the horizontal sums do); on AVX2 with maddubs, slices wherever they fit
  // (about 3x the tiles at 64 columns, 1.1–1.4x on whole rows of 576 to 2048: they also save the
  // tiles' nibble expansion per token chunk); on AVX2 with madd16, where blocks average at most 128
  // columns (1.6x the tiles at 64, 0.8–0.9x on whole rows of 576 to 2048: widening the token in
  // the inner loop costs more than the tiles' horizontal sums there).
  const int64_t block_cols = k.slices == SliceKernel::Avx2Madd16 ? 128 : 1024;
  const bool slices_pay = k.slices == SliceKernel::Avx2Maddubs || w.cols <= block_cols * w.blocks();
  if (tiles && k.slices != SliceKernel::None && slices_fit(w) &&
      (tiling == IntTiling::Slices || (tiling == IntTiling::Best && slices_pay))) {
    const int64_t nslices = (R + kSliceRows - 1) / kSliceRows;
#pragma omp parallel if (T * R * w.cols > kParallelMinProduct)
    {
      std::vector<uint8_t> slice, expanded;
      std::vector<double> row_params;
#pragma omp for schedule(static)
      for (int64_t s = 0; s < nslices; ++s) g.slices(s, slice, expanded, row_params);  // each rearranged once per call
    }
    return;
  }
  const int64_t chunk = tiles ? 32 * k.tile_tokens : 32, chunks = (T + chunk - 1) / chunk;
  const int64_t nr = tiles ? k.tile_rows : 1, row_tiles = (R + nr - 1) / nr;
#pragma omp parallel if (T * R * w.cols > kParallelMinProduct)
  {
    std::vector<uint8_t> expanded;
    std::vector<double> row_params;
    std::vector<int32_t> dots;
#pragma omp for collapse(2) schedule(static)
    for (int64_t tc = 0; tc < chunks; ++tc) {
      for (int64_t rt = 0; rt < row_tiles; ++rt) {
        const int64_t r0 = rt * nr, r1 = std::min(R, r0 + nr), t0 = tc * chunk, t1 = std::min(T, t0 + chunk);
        if (!tiles || r1 - r0 < nr)
          g.rows(t0, t1, r0, r1, dots);
        else if (nr == 4)
          g.tiles<4>(t0, t1, r0, expanded, row_params);
        else
          g.tiles<2>(t0, t1, r0, expanded, row_params);
      }
    }
  }
}

}  // namespace dq
