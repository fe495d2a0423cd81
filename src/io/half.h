// f32 to the 16-bit float types, for every writer (safetensors, GGUF, synth): a value the type
// cannot hold is an error, never an Inf (or a NaN) in the output file.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tensor/tensor.h"

namespace dq {

// dtype is F16 or BF16. Throws Error("value V at element I is outside the range of f16 (|x| <= 65504)")
// or "... non-finite value at element I"; callers add the tensor's name.
void encode_16bit(DType dtype, const float* in, size_t n, uint16_t* out);

}  // namespace dq
