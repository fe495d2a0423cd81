// Dense tensors: the storage dtypes of checkpoints and the f32 matrix every kernel works on.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace dq {

// Every user-facing failure is an Error whose message is one line naming the file and the problem.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { F32, F16, BF16, F64, I32, I8, U8 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);        // safetensors spelling: "F32", "BF16", ...
DType dtype_from_name(const std::string& s);  // throws Error on an unknown name

float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);   // round to nearest even

// Converts n elements of a stored dtype (F32/F16/BF16/F64) to f32, in parallel for large n.
// Returns false when a converted value is NaN or Inf (checked while converting: no second pass).
bool convert_to_f32(DType src, const void* data, size_t n, float* out);

// A row-major f32 matrix (a vector is a 1 x n matrix). Owns its data.
// Large storage is backed by transparent huge pages where the kernel allows: a fresh 64 MB
// activation or weight otherwise costs 16k page faults, which under this project's hypervisor took
// longer than the bf16 conversion or the zero fill itself.
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;

  Matrix() = default;
  Matrix(int64_t r, int64_t c, float fill = 0.f);
  Matrix(const Matrix& o);
  Matrix(Matrix&&) = default;
  Matrix& operator=(const Matrix&) = default;  // reuses this matrix's storage when large enough
  Matrix& operator=(Matrix&&) = default;
  static Matrix identity(int64_t n);

  // Makes this an r x c matrix whose contents the caller overwrites: keeps the storage when its
  // capacity suffices (no allocation; only elements past the old size are zeroed).
  void reshape_for_overwrite(int64_t r, int64_t c);

  float* row(int64_t i) { return data.data() + i * cols; }
  const float* row(int64_t i) const { return data.data() + i * cols; }
  float& operator()(int64_t i, int64_t j) { return data[size_t(i * cols + j)]; }
  float operator()(int64_t i, int64_t j) const { return data[size_t(i * cols + j)]; }
  size_t size() const { return data.size(); }
  bool empty() const { return data.empty(); }
  Matrix transposed() const;
};

}  // namespace dq
