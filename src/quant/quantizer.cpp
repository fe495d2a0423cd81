#include "quant/quantizer.h"

#include <immintrin.h>

#include <atomic>
#include <cfloat>
#include <cstring>
#include <limits>
#include <string>

#include "tensor/kernels.h"

namespace dq {

float round_up_significand(float s, int bits) {
  int e;
  const float f = std::frexp(s, &e);  // s = f * 2^e, f in [0.5, 1)
  return std::ldexp(std::ceil(std::ldexp(f, bits)), e - bits);
}

int64_t QuantSpec::num_groups(int64_t cols) const {
  if (per_tensor || group <= 0) return 1;
  return (cols + group - 1) / group;
}

void QuantSpec::validate() const {
  if (bits != 16 && (bits < 2 || bits > 8))
    throw Error("quant spec: bits must be 2..8 or 16, got " + std::to_string(bits));
  if (group < 0) throw Error("quant spec: group must be >= 0, got " + std::to_string(group));
  if (per_tensor && group != 0) throw Error("quant spec: per_tensor excludes a group size");
  if (!(clip_ratio > 0.f && clip_ratio <= 1.f))
    throw Error("quant spec: clip_ratio must be in (0, 1], got " + std::to_string(clip_ratio));
  if (mse_clip &&
      (mse_grid < 1 || !(mse_max_shrink > 0.f && mse_max_shrink < 1.f) || !(mse_norm > 0.f)))
    throw Error("quant spec: MSE clip needs grid >= 1, max shrink in (0, 1) and norm > 0");
}

namespace {

// Code c of a row of `row_bytes` packed bytes (pack_codes' layout): a code spans at most two bytes.
uint32_t packed_code(const uint8_t* row, int64_t row_bytes, int64_t c, int bits) {
  const int64_t bit = c * bits;
  uint32_t v = row[bit / 8];
  if (bit / 8 + 1 < row_bytes) v |= uint32_t(row[bit / 8 + 1]) << 8;
  return (v >> (bit % 8)) & ((1u << bits) - 1);
}

// The scale as stored: an f16 when asked, else rounded up to scale_bits significant bits. One below
// FLT_MIN is left for range_params' fallback; one that would round past FLT_MAX keeps its bits.
float stored_scale(float s, const QuantSpec& spec) {
  if (spec.f16_scales) return f16_to_f32(f32_to_f16(s));
  if (!(s >= FLT_MIN && s <= FLT_MAX)) return s;
  const float r = round_up_significand(s, scale_bits(spec.bits));
  return std::isfinite(r) ? r : s;
}

// Scale/zero for the range [lo, hi] (lo <= 0 <= hi, clip already applied).
QuantParams range_params(float lo, float hi, const QuantSpec& spec) {
  QuantParams p;
  const float half = float(1 << (spec.bits - 1));
  if (spec.symmetric) {
    p.scale = stored_scale(std::max(-lo, hi) / (half - 1.f), spec);
    p.zero = half;
  } else {
    p.scale = stored_scale((hi - lo) / float(spec.maxq()), spec);
    p.zero = std::nearbyint(-lo / p.scale);
  }
  if (!(p.scale >= FLT_MIN)) p = {1.f, spec.symmetric ? half : 0.f};
  return p;
}

template <class T>
double shrink_error(const T* x, int64_t n, QuantParams p, int maxq, float norm) {
  double err = 0;
  for (int64_t i = 0; i < n; ++i) {
    T d = std::abs(x[i] - dequant_code(quant_code(x[i], p, maxq), p));
    err += std::pow(double(d), double(norm));
  }
  return err;
}

// min(0, x[0, n)) and max(0, x[0, n)) in one vectorised pass (the integer runtime runs it on every
// token): minimum and maximum are exact in any order, and the poison stays NaN in any order.
// Returns false on a non-finite value.
template <class T>
bool range(const T* x, int64_t n, T& lo, T& hi) {
  lo = 0, hi = 0;
  T poison = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : poison)
  for (int64_t i = 0; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    poison += x[i] * T(0);  // NaN as soon as one value is NaN or infinite
  }
  return poison == poison;
}

// The same for floats with four registers of partial results, so that the pass does not wait on
// one chain of min/max latencies (the loop above, one register each, ran at a quarter of the rate).
// A lane leaves 0 only for a value strictly below (above) it, so no lane holds −0: the same result.
template <>
bool range(const float* x, int64_t n, float& lo, float& hi) {
  __m256 l[4], h[4], p[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) l[k] = h[k] = p[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * k);
      l[k] = _mm256_min_ps(v, l[k]);  // v < l ? v : l
      h[k] = _mm256_max_ps(v, h[k]);
      p[k] = _mm256_add_ps(p[k], _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
  alignas(32) float lv[8], hv[8], pv[8];
  _mm256_store_ps(lv, _mm256_min_ps(_mm256_min_ps(l[0], l[1]), _mm256_min_ps(l[2], l[3])));
  _mm256_store_ps(hv, _mm256_max_ps(_mm256_max_ps(h[0], h[1]), _mm256_max_ps(h[2], h[3])));
  _mm256_store_ps(pv, _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])));
  float poison = 0;
  lo = 0, hi = 0;
  for (int j = 0; j < 8; ++j) {
    lo = lv[j] < lo ? lv[j] : lo;
    hi = hv[j] > hi ? hv[j] : hi;
    poison += pv[j];
  }
  for (; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    poison += x[i] * 0.f;
  }
  return poison == poison;
}

// find_params without throwing (usable inside OpenMP regions); false on a non-finite input.
template <class T>
bool try_find_params(const T* x, int64_t n, const QuantSpec& spec, QuantParams& out) {
  T lo, hi;
  if (!range(x, n, lo, hi)) return false;
  float flo = float(lo) * spec.clip_ratio, fhi = float(hi) * spec.clip_ratio;
  out = range_params(flo, fhi, spec);
  if (!spec.mse_clip) return true;
  double best = std::numeric_limits<double>::infinity();
  const int steps = int(spec.mse_max_shrink * float(spec.mse_grid));
  for (int i = 0; i < steps; ++i) {
    float shrink = 1.f - float(i) / float(spec.mse_grid);
    QuantParams p = range_params(shrink * flo, shrink * fhi, spec);
    double err = shrink_error(x, n, p, spec.maxq(), spec.mse_norm);
    if (err < best) {
      best = err;
      out = p;
    }
  }
  return true;
}

template <class T>
QuantParams find_params_impl(const T* x, int64_t n, const QuantSpec& spec) {
  QuantParams p;
  if (!try_find_params(x, n, spec, p)) throw Error("quantize: non-finite input value");
  return p;
}

void check_quantizable(const QuantSpec& spec) {
  spec.validate();
  if (!spec.enabled()) throw Error("quantize: 16 bits means not quantized; nothing to encode");
}

// Visits every row-group of a rows x cols block with its parameters: fn(r, g, c0, c1, params).
// Row-groups are independent, so rows run in parallel; a non-finite input throws after the loop.
template <class Fn>
void for_each_group(const float* x, int64_t rows, int64_t cols, const QuantSpec& spec, Fn&& fn) {
  if (spec.per_tensor) {
    QuantParams p = find_params_impl(x, rows * cols, spec);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) fn(r, int64_t(0), int64_t(0), cols, p);
    return;
  }
  const int64_t gs = spec.group > 0 ? spec.group : cols, ng = spec.num_groups(cols);
  std::atomic<bool> bad{false};
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16) || spec.mse_clip)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs);
      QuantParams p;
      if (!try_find_params(x + r * cols + c0, c1 - c0, spec, p)) {
        bad = true;
        break;
      }
      fn(r, g, c0, c1, p);
    }
  }
  if (bad) throw Error("quantize: non-finite input value");
}

}  // namespace

QuantParams find_params(const float* x, int64_t n, const QuantSpec& spec) {
  check_quantizable(spec);
  return find_params_impl(x, n, spec);
}
QuantParams find_params(const double* x, int64_t n, const QuantSpec& spec) {
  check_quantizable(spec);
  return find_params_impl(x, n, spec);
}

void fake_quantize(float* x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  spec.validate();
  if (!spec.enabled()) return;
  const int maxq = spec.maxq();
  for_each_group(x, rows, cols, spec,
                 [&](int64_t r, int64_t, int64_t c0, int64_t c1, QuantParams p) {
                   float* row = x + r * cols;
                   for (int64_t c = c0; c < c1; ++c)
                     row[c] = dequant_code(quant_code(row[c], p, maxq), p);
                 });
}

QuantParams QuantizedMatrix::params(int64_t r, int64_t c) const {
  if (spec.per_tensor) return {scales.data[0], zeros.data[0]};
  int64_t g = spec.group > 0 ? c / spec.group : 0;
  return {scales(r, g), zeros(r, g)};
}

Matrix QuantizedMatrix::dequantize() const {
  Matrix out(rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out(r, c) = dequant_code(float(codes[size_t(r * cols + c)]), params(r, c));
  return out;
}

// 8 values at a time: the same division, rounding in the current mode (nearbyint), zero point and
// clamp as quant_code, so the same codes.
int32_t quant_codes(const float* x, int64_t n, QuantParams p, int maxq, uint8_t* out) {
  const __m256 scale = _mm256_set1_ps(p.scale), zero = _mm256_set1_ps(p.zero), hi = _mm256_set1_ps(float(maxq));
  __m256i sum = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), scale), _MM_FROUND_CUR_DIRECTION);
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zero), _mm256_setzero_ps()), hi));
    sum = _mm256_add_epi32(sum, q);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));  // 0..255
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  int32_t total = _mm_cvtsi128_si32(s);
  for (; i < n; ++i) total += out[i] = uint8_t(quant_code(x[i], p, maxq));
  return total;
}

QuantizedMatrix quantize(const Matrix& x, const QuantSpec& spec) {
  check_quantizable(spec);
  QuantizedMatrix q;
  q.rows = x.rows;
  q.cols = x.cols;
  q.spec = spec;
  q.codes.resize(x.size());
  const int64_t ng = spec.num_groups(x.cols);
  q.scales = spec.per_tensor ? Matrix(1, 1) : Matrix(x.rows, ng);
  q.zeros = q.scales;
  const int maxq = spec.maxq();
  for_each_group(x.data.data(), x.rows, x.cols, spec,
                 [&](int64_t r, int64_t g, int64_t c0, int64_t c1, QuantParams p) {
                   if (!spec.per_tensor || r == 0) {
                     q.scales(spec.per_tensor ? 0 : r, g) = p.scale;
                     q.zeros(spec.per_tensor ? 0 : r, g) = p.zero;
                   }
                   quant_codes(x.row(r) + c0, c1 - c0, p, maxq, q.codes.data() + r * x.cols + c0);
                 });
  return q;
}

int64_t packed_row_bytes(int64_t cols, int bits) { return (cols * bits + 7) / 8; }

std::vector<uint8_t> pack_codes(const std::vector<uint8_t>& codes, int64_t rows, int64_t cols,
                                int bits) {
  if (int64_t(codes.size()) != rows * cols) throw Error("pack_codes: size mismatch");
  if (bits < 1 || bits > 8) throw Error("pack_codes: bits must be 1..8");
  const int64_t rb = packed_row_bytes(cols, bits);
  std::vector<uint8_t> out(size_t(rows * rb), 0);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = out.data() + r * rb;
    for (int64_t c = 0; c < cols; ++c) {
      uint32_t v = codes[size_t(r * cols + c)] & ((1u << bits) - 1);
      int64_t bit = c * bits;
      // A code spans at most two bytes because bits <= 8.
      uint32_t shifted = v << (bit % 8);
      dst[bit / 8] |= uint8_t(shifted);
      if (shifted >> 8) dst[bit / 8 + 1] |= uint8_t(shifted >> 8);
    }
  }
  return out;
}

std::vector<uint8_t> unpack_codes(std::span<const uint8_t> packed, int64_t rows, int64_t cols, int bits) {
  if (bits < 1 || bits > 8) throw Error("unpack_codes: bits must be 1..8");
  const int64_t rb = packed_row_bytes(cols, bits);
  if (int64_t(packed.size()) != rows * rb) throw Error("unpack_codes: size mismatch");
  std::vector<uint8_t> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = packed.data() + r * rb;
    for (int64_t c = 0; c < cols; ++c) out[size_t(r * cols + c)] = uint8_t(packed_code(src, rb, c, bits));
  }
  return out;
}

int64_t encoded_row_bytes(int64_t cols, const QuantSpec& spec) {
  return packed_row_bytes(cols, spec.bits) + spec.num_groups(cols) * int64_t(sizeof(float) + 1);
}

void encode_rows(const QuantizedMatrix& q, std::vector<uint8_t>& out) {
  if (q.spec.per_tensor) throw Error("encode_rows: per-tensor codes have no per-row parameters");
  const int64_t ng = q.spec.num_groups(q.cols), code_bytes = packed_row_bytes(q.cols, q.spec.bits);
  const std::vector<uint8_t> packed = pack_codes(q.codes, q.rows, q.cols, q.spec.bits);
  size_t at = out.size();
  out.resize(at + size_t(q.rows * encoded_row_bytes(q.cols, q.spec)));
  for (int64_t r = 0; r < q.rows; ++r) {
    std::memcpy(out.data() + at, packed.data() + r * code_bytes, size_t(code_bytes));
    at += size_t(code_bytes);
    std::memcpy(out.data() + at, q.scales.row(r), size_t(ng) * sizeof(float));
    at += size_t(ng) * sizeof(float);
    for (int64_t g = 0; g < ng; ++g) out[at++] = uint8_t(q.zeros(r, g));  // a code: 0..maxq
  }
}

void decode_rows(const uint8_t* in, int64_t n, int64_t cols, const QuantSpec& spec, float* out) {
  const int bits = spec.bits;
  const int64_t ng = spec.num_groups(cols), gs = spec.group > 0 ? spec.group : cols;
  const int64_t code_bytes = packed_row_bytes(cols, bits), row_bytes = encoded_row_bytes(cols, spec);
#pragma omp parallel for schedule(static) if (n * cols > kParallelMinWork)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = in + r * row_bytes;
    const uint8_t* zeros = row + code_bytes + ng * int64_t(sizeof(float));
    float* dst = out + r * cols;
    for (int64_t g = 0; g < ng; ++g) {
      QuantParams p;
      std::memcpy(&p.scale, row + code_bytes + g * int64_t(sizeof(float)), sizeof(float));
      p.zero = float(zeros[g]);
      const int64_t c0 = g * gs, c1 = std::min(cols, (g + 1) * gs);
      if (bits == 4 && c0 % 2 == 0 && c1 % 2 == 0) {
        // Two codes per byte, low nibble first: a loop to vectorise (attention decodes the whole
        // cache for every token and every prefill chunk; omp simd: GCC -O2 leaves it scalar).
#pragma omp simd
        for (int64_t i = c0 / 2; i < c1 / 2; ++i) {
          dst[2 * i] = dequant_code(float(row[i] & 15), p);
          dst[2 * i + 1] = dequant_code(float(row[i] >> 4), p);
        }
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) dst[c] = dequant_code(float(packed_code(row, code_bytes, c, bits)), p);
    }
  }
}

}  // namespace dq
