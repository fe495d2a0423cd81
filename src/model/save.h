// Writing a model as an HF directory: config.json (with the quantization section when there is
// one), model.safetensors, the tokenizer file copied beside them, and optionally
// quantized.safetensors holding integer codes. The directory appears atomically.
#pragma once
#include <functional>
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

// Copies a model's tokenizer file (a llama2.c vocabulary as tokenizer.bin) and the
// tokenizer_config.json beside it, when there is one (BOS/EOS, add_bos_token, the chat template),
// to dest(name). Throws Error naming the file that cannot be copied.
void copy_tokenizer(const std::string& tokenizer_path, const std::function<std::string(const std::string&)>& dest);

}  // namespace dq
