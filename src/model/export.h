// Exporting a model for other runtimes: a plain HF checkpoint (transformers' LlamaForCausalLM) or a
// GGUF v3 file as llama.cpp reads it. Both hold only weights, so a model whose quantization section
// asks for run-time transforms (online Hadamards, activation or KV quantization) is refused rather
// than exported without them.
#pragma once
#include <string>
#include <vector>

#include "io/gguf.h"
#include "model/model.h"

namespace dq {

// What a plain checkpoint cannot express in m's quantization section, e.g. {"online R4 Hadamard",
// "4-bit activation quantization"}; empty when m can be exported.
std::vector<std::string> runtime_only_features(const Model& m);

// An HF directory: config.json without dartquant's section, model.safetensors (dtype F32, F16 or
// BF16; weight-quantized models as their dequantized values), the tokenizer file copied. Throws
// Error naming the model when runtime_only_features is not empty.
void export_hf(const Model& m, const std::string& dir, DType dtype = DType::F32);

struct GgufExportOptions {
  GgmlType type = GgmlType::F32;  // of the 2-D weights; norms and rope_freqs stay F32
  // quantized.safetensors of a weight-quantized model (empty: none). With type Q4_0 / Q8_0 and
  // symmetric group-32 codes of 4 / 8 bits, blocks carry those codes instead of re-rounding.
  std::string codes_path;
};

struct GgufExportStats {
  int from_codes = 0;  // tensors written from the model's own integer codes
  int requantized = 0; // tensors rounded by llama.cpp's reference quantizer
  int kept_float = 0;  // 2-D tensors kept F32 (rows not a multiple of 32, or embedding/classifier)
  std::vector<std::string> notes;  // why codes could not be used, per tensor
};

// Throws Error naming the model when runtime_only_features is not empty, when it has no
// tokenizer, or when its architecture has no llama.cpp "llama" equivalent (biases, sliding window).
GgufExportStats export_gguf(const Model& m, const std::string& path, const GgufExportOptions& o = {});

// llama.cpp's q/k row order: within each head, HF's rotate-halves rows (i, i + d/2) become the
// adjacent pair (2i, 2i + 1). inverse = true maps back.
Matrix gguf_permute_qk(const Matrix& w, int heads, bool inverse);

// The name of the GGUF tensor holding HF tensor `hf_name` (e.g. blk.0.attn_q.weight), "" if none.
std::string gguf_tensor_name(const std::string& hf_name);

}  // namespace dq
