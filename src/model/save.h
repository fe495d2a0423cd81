// Writing a model as an HF directory: config.json (with the quantization section when there is
// one), model.safetensors, the tokenizer file copied beside them, and optionally
// quantized.safetensors holding integer codes. The directory appears atomically.
#pragma once
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/model.h"

namespace dq {

struct SaveOptions {
  DType dtype = DType::F32;          // of model.safetensors
  std::vector<TensorBlob> extra;     // written to quantized.safetensors when not empty
};

void save_model(const Model& m, const std::string& dir, const SaveOptions& opts = {});

}  // namespace dq
