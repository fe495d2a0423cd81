// llama.cpp's CPU matrix products do not multiply a weight by f32 activations: ggml first converts
// the activations to the weight type's dot-product type (ggml-cpu's vec_dot_type): f16 for f16
// weights, bf16 for bf16, q8_0 blocks of 32 for q8_0 and q4_0, q8_1 blocks for q4_1. The hook here
// rounds the forward's activations the same way at the inputs of each GGUF weight, so
// `eval --protocol llama.cpp` of a quantized GGUF scores what llama.cpp computes. For q4_1 it also
// computes the products: ggml's q4_1 x q8_1 dot product takes the weight block's offset m times
// the block sum the q8_1 block stores, which is not the sum of its rounded values.
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

// The sum a q8_1 block stores beside its codes (ggml's quantize_row_q8_1): s = f16(d * sum(codes))
// with d = amax / 127 before its f16 rounding, so s is not f16(d) * sum(codes), the sum of the
// block's rounded values. One per block of 32 of each row of x (activations before rounding):
// [x.rows, x.cols / 32].
Matrix q8_1_block_sums(const Matrix& x);

// A hook rounding the inputs of q/k/v, o, gate/up, down and the classifier as llama.cpp does
// for the types the GGUF file `m.source` stores them in; nullptr when m was not loaded from a
// GGUF file or every such weight is f32. The products of a dense model's q4_1 weights it computes
// as ggml does: x Wᵀ of the rounded x plus, per block, m * (s - sum of the rounded values), with m
// read from the file's blocks. (The classifier's product is not a hook site: a q4_1 classifier
// misses that term, as do a MoE model's q4_1 experts.)
std::unique_ptr<Hook> llama_cpp_activation_rounding(const Model& m);

}  // namespace dq
