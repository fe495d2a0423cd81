// A loaded model: its architecture, named weights, tokenizer, and (for a quantized model directory)
// the quantization section that tells the forward pass which online transforms and activation/KV
// quantizers to apply.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "model/config.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace dq {

struct Model {
  ModelConfig config;
  Weights weights;
  std::shared_ptr<const Tokenizer> tokenizer;  // null when none was found
  nlohmann::json quantization;                 // null for a plain model
  std::string source;                          // the path it was loaded from
  std::string tokenizer_path;                  // the file the tokenizer came from
};

// An HF directory (config.json + model.safetensors or a sharded index), a llama2.c .bin
// checkpoint, or a .gguf file. tokenizer_path overrides the tokenizer found beside the model.
// Commands that run on token ids alone pass with_tokenizer = false: none is loaded (a 49k-entry
// vocabulary is ~8 MiB parsed, and its JSON's freed pages stay resident between its pieces).
Model load_model(const std::string& path, const std::string& tokenizer_path = "", bool with_tokenizer = true);

// llama2.c rotates interleaved pairs; HF rotates halves. Reorders q/k rows (and biases) of every
// layer from one convention to the other so the model computes the same function.
void rope_to_halves(Model& m);

// The input-side name of the classifier: lm_head.weight, or the embedding when tied.
std::string lm_head_name(const Model& m);

// Where a model's weights are checked before running: shapes match the config, all values finite.
void validate_weights(const Model& m);

// Defined with the GGUF reader.
Model load_gguf_model(const std::string& path);

}  // namespace dq
