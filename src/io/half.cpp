#include "io/half.h"

#include <cmath>
#include <string>

namespace dq {

void encode_16bit(DType dtype, const float* in, size_t n, uint16_t* out) {
  if (dtype != DType::F16 && dtype != DType::BF16) throw Error(std::string("not a 16-bit float type: ") + dtype_name(dtype));
  const bool f16 = dtype == DType::F16;
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = f16 ? f32_to_f16(in[i]) : f32_to_bf16(in[i]);
    // The exponent all ones after rounding: Inf or NaN, from a non-finite or too large input.
    if (((f16 ? h >> 10 : h >> 7) & (f16 ? 0x1F : 0xFF)) == (f16 ? 0x1F : 0xFF)) {
      char v[32];
      std::snprintf(v, sizeof v, "%g", double(in[i]));
      if (!std::isfinite(in[i])) throw Error("non-finite value at element " + std::to_string(i));
      throw Error("value " + std::string(v) + " at element " + std::to_string(i) + " is outside the range of " +
                  (f16 ? "f16 (|x| <= 65504)" : "bf16 (|x| <= 3.39e38)"));
    }
    out[i] = h;
  }
}

}  // namespace dq
