// Synthetic checkpoints: seeded random weights with a real model's exact shapes, for tests and
// benchmarks at sizes whose trained weights cannot be brought onto these machines.
//
// Scales follow a trained model so activations stay O(1) through the residual stream: embedding
// N(0, initializer_range), linear weights N(0, 1/in_features) with o_proj/down_proj further divided
// by sqrt(2 * layers) (the residual stream sums 2 * layers branch outputs), norm gains near 1.
// Optional "massive activations": K residual channels carry a large constant in every token's
// embedding, so the attention/MLP norm outputs (the q/k/v and gate/up inputs) show outlier channels,
// the structure rotations are meant to remove.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace dq {

struct SynthOptions {
  uint64_t seed = 0;
  DType dtype = DType::BF16;  // of model.safetensors: F32, F16 or BF16
  int outliers = 0;           // residual channels with massive activations
  int layers = 0;             // overrides num_hidden_layers when > 0
};

// The value massive-activation channels carry in the embedding: ~100x a typical residual entry.
constexpr float kSynthOutlierMagnitude = 40.f;

// Writes DIR (atomically): config.json (the given one, num_hidden_layers overridden if asked),
// model.safetensors generated tensor by tensor in the requested dtype (memory stays small at any
// model size), and tokenizer.json when one sits beside the config. Same options -> same bytes.
void synth_model(const std::string& config_path, const std::string& out_dir, const SynthOptions& opts);

// The residual channels synth_model makes massive for these options and hidden size, ascending.
std::vector<int> synth_outlier_channels(uint64_t seed, int outliers, int hidden_size);

}  // namespace dq
