#include "tensor/tensor.h"

#include <sys/mman.h>

#include <cmath>
#include <cstring>

#include "tensor/kernels.h"

namespace dq {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I8: case DType::U8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
  }
  return "?";
}

DType dtype_from_name(const std::string& s) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32, DType::I8, DType::U8})
    if (s == dtype_name(t)) return t;
  throw Error("unsupported dtype '" + s + "'");
}

float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000 | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  int32_t exp = int32_t((u >> 23) & 0xFF) - 127 + 15;
  uint32_t man = u & 0x7FFFFF;
  if (((u >> 23) & 0xFF) == 0xFF) return uint16_t(sign | 0x7C00 | (man ? 0x200 : 0));
  if (exp >= 31) return uint16_t(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1);
    uint32_t r = man >> shift;
    if (rest > half || (rest == half && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = (uint32_t(exp) << 10) | (man >> 13), rest = man & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) ++r;  // may carry into the exponent: correct
  return uint16_t(sign | r);
}

namespace {

// Writes out[i] = conv(i) for i < n on the thread pool; returns false if any value is NaN or Inf.
template <class Conv>
bool convert_each(size_t n, float* out, Conv conv) {
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (n > size_t(kParallelMinWork))
  for (int64_t i = 0; i < int64_t(n); ++i) {
    out[i] = conv(size_t(i));
    bad |= !std::isfinite(out[i]);
  }
  return !bad;
}

}  // namespace

bool convert_to_f32(DType src, const void* data, size_t n, float* out) {
  switch (src) {
    case DType::F32: {
      const float* f = static_cast<const float*>(data);
      return convert_each(n, out, [f](size_t i) { return f[i]; });
    }
    case DType::F64: {
      const double* d = static_cast<const double*>(data);
      return convert_each(n, out, [d](size_t i) { return float(d[i]); });
    }
    case DType::BF16: {
      const uint16_t* h = static_cast<const uint16_t*>(data);
      return convert_each(n, out, [h](size_t i) { return bf16_to_f32(h[i]); });
    }
    case DType::F16: {
      const uint16_t* h = static_cast<const uint16_t*>(data);
      return convert_each(n, out, [h](size_t i) { return f16_to_f32(h[i]); });
    }
    default: throw Error(std::string("cannot convert ") + dtype_name(src) + " to f32");
  }
}

namespace {

// Reserves n floats in an empty vector and, for large ones, asks the kernel for transparent huge
// pages before anything touches them (pages are faulted in on first write, 512x fewer faults).
void reserve_huge(std::vector<float>& v, size_t n) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  v.reserve(n);
#ifdef MADV_HUGEPAGE
  if (n * sizeof(float) < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(v.data());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + n * sizeof(float)) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: errors are harmless
#endif
}

}  // namespace

Matrix::Matrix(int64_t r, int64_t c, float fill) : rows(r), cols(c) {
  reserve_huge(data, size_t(r * c));
  data.assign(size_t(r * c), fill);
}

Matrix::Matrix(const Matrix& o) : rows(o.rows), cols(o.cols) {
  reserve_huge(data, o.size());
  data.assign(o.data.begin(), o.data.end());
}

void Matrix::reshape_for_overwrite(int64_t r, int64_t c) {
  const size_t n = size_t(r * c);
  if (data.capacity() < n) {
    *this = Matrix(r, c);
    return;
  }
  rows = r;
  cols = c;
  data.resize(n);
}

Matrix Matrix::identity(int64_t n) {
  Matrix m(n, n);
  for (int64_t i = 0; i < n; ++i) m(i, i) = 1.f;
  return m;
}

Matrix Matrix::transposed() const {
  Matrix t(cols, rows);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t(j, i) = (*this)(i, j);
  return t;
}

}  // namespace dq
