// llama.cpp's CPU matrix products do not multiply a weight by f32 activations: ggml first converts
// the activations to the weight type's dot-product type (ggml-cpu's vec_dot_type): f16 for f16
// weights, bf16 for bf16, q8_0 blocks of 32 for q8_0 and q4_0, q8_1 blocks for q4_1. The hook here
// rounds the forward's activations the same way at the inputs of each GGUF weight, so
// `eval --protocol llama.cpp` of a quantized GGUF scores what llama.cpp computes.
#pragma once
#include <memory>

#include "io/gguf.h"
#include "model/forward.h"

namespace dq {

// Rounds each row of x in place as ggml-cpu rounds activations for weights of type t. For q8_0,
// q4_0 and q4_1 (whose q8_1 blocks hold the same values as q8_0's): each block of 32 becomes
// round(x * 127 / amax) * f16(amax / 127), rounding halves to even as ggml's x86 kernels do.
// x.cols must be a multiple of 32 for those types.
void round_activations_like_ggml(GgmlType t, Matrix& x);

// A hook rounding the inputs of q/k/v, o, gate/up, down and the classifier as llama.cpp does
// for the types the GGUF file `m.source` stores them in; nullptr when m was not loaded from a
// GGUF file or every such weight is f32.
std::unique_ptr<Hook> llama_cpp_activation_rounding(const Model& m);

}  // namespace dq
