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
  for (int64_t c = 0; c < cols; ++c)
    if (c % w.group == 0 || c % w.act_group == 0) w.bounds.push_back(c);
  w.bounds.push_back(cols);
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

DQ_AVX512 int32_t runs_avx512_vnni(const uint8_t* a, const uint8_t* w, int64_t runs) {
  // Two runs per step: their low and high nibbles rearranged into column order per 128-bit lane.
  const __m512i idx = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m256i m = _mm256_set1_epi8(15);
  const __m512i eight = _mm512_set1_epi8(8);
  __m512i acc = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 2 <= runs; k += 2, a += 64, w += 32) {
    const __m256i b = load32(w);
    const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    const __m512i v = _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), idx, _mm512_castsi256_si512(hi));
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a), _mm512_sub_epi8(v, eight));
  }
  int32_t s = _mm512_reduce_add_epi32(acc);
  if (k < runs) s += hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), load32(a), expand_run(w)));
  return s;
}

using BytesDot = int32_t (*)(const uint8_t*, const int8_t*, int64_t);
using RunsDot = int32_t (*)(const uint8_t*, const uint8_t*, int64_t);

// maddubs is exact for these widths (see intgemm.h: (2^a − 1)·2^b ≤ 32767).
bool maddubs_exact(int act_bits, int weight_bits) { return ((1 << act_bits) - 1) * (1 << weight_bits) <= 32767; }

struct Kernel {
  const char* name;
  BytesDot bytes;
  RunsDot runs;
};

Kernel select(IntPath p, int act_bits, const IntWeights& w) {
  if (act_bits < 2 || act_bits > 8) throw Error("integer kernels: activation bits must be 2..8");
  switch (p) {
    case IntPath::Scalar: return {"scalar", bytes_scalar, runs_scalar};
    case IntPath::Avx2:
      if (w.nibbles || maddubs_exact(act_bits, w.bits)) return {"avx2-maddubs", bytes_avx2_maddubs, runs_avx2};
      return {"avx2-madd16", bytes_avx2_madd16, runs_avx2};
    case IntPath::AvxVnni: return {"avx-vnni", bytes_avx_vnni, runs_avx_vnni};
    case IntPath::Avx512Vnni: return {"avx512-vnni", bytes_avx512_vnni, runs_avx512_vnni};
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

void int_gemm(const IntActs& a, const IntWeights& w, IntPath p, Matrix& y) {
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
      int32_t s = 0;
      for (int64_t c = w.bounds[size_t(b)]; c < w.bounds[size_t(b) + 1]; ++c) s += a.codes[size_t(t * a.cols + c)];
      asum[size_t(t * nb + b)] = s;
    }
  // Tokens in chunks small enough that their codes stay in cache while the weight rows pass; one
  // parallel region over (chunk, row), and none for small products (waking threads costs more).
  constexpr int64_t kTokenChunk = 32;
  const int64_t chunks = (T + kTokenChunk - 1) / kTokenChunk;
#pragma omp parallel for collapse(2) schedule(static) if (T * R * w.cols > (int64_t(1) << 22))
  for (int64_t tc = 0; tc < chunks; ++tc) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t t = tc * kTokenChunk; t < std::min(T, (tc + 1) * kTokenChunk); ++t) {
        const uint8_t* at = a.codes.data() + t * a.cols;
        double acc = 0;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c0 = w.bounds[size_t(b)], c1 = w.bounds[size_t(b) + 1];
          const int64_t wi = r * nwg + c0 / w.group, ai = t * nag + c0 / a.group;
          const int64_t zw = w.zeros[size_t(wi)], za = a.zeros[size_t(ai)];
          const int64_t exact = int64_t(dot(k, w, r, at, c0, c1)) - zw * asum[size_t(t * nb + b)] -
                                za * w.block_sums[size_t(r * nb + b)] + (c1 - c0) * za * zw;
          acc += double(a.scales[size_t(ai)]) * double(w.scales[size_t(wi)]) * double(exact);
        }
        y(t, r) = float(acc);
      }
    }
  }
}

}  // namespace dq
