// Exporting a model for other runtimes: a plain HF checkpoint (transformers' LlamaForCausalLM) or a
// GGUF v3 file as llama.cpp reads it. Both hold only weights, so a model whose quantization section
// asks for run-time transforms (online Hadamards, activation or KV quantization) is refused rather
// than exported without them.
#pragma once
#include <map>
#include <optional>
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

// The tokenizer keys llama.cpp reads, for tokenizer t loaded from tokenizer_path (a tokenizer.json,
// with tokenizer_config.json beside it when present, or a llama2.c tokenizer.bin).
struct GgufTokenizerKeys {
  VocabInfo vocab;  // add_bos / add_eos as tokenizer_config.json sets them when it does
  // tokenizer.ggml.pre: llama.cpp's name for the pre-tokenizer that splits text as this one does
  // (byte-level BPE: "gpt-2", "smollm", "llama-bpe", "smaug-bpe", "qwen2"; SentencePiece: "default").
  std::string pre = "default";
  bool add_space_prefix = true;  // SentencePiece: one space is prepended to the text
  int32_t pad = -1;
  std::map<std::string, std::string> chat_templates;  // "" = tokenizer.chat_template, else .NAME
  std::string hf_json;                                // the tokenizer.json text, "" for llama2.c
  std::vector<std::string> notes;                     // where llama.cpp's tokenization will differ
};
// Throws Error naming the tokenizer file when llama.cpp cannot split text as the tokenizer does.
GgufTokenizerKeys gguf_tokenizer_keys(const Tokenizer& t, const std::string& tokenizer_path);

struct GgufExportOptions {
  GgmlType type = GgmlType::F32;  // of the 2-D weights; norms, biases and rope_freqs stay F32
  // quantized.safetensors of a weight-quantized model (empty: none). With a quantized type, codes
  // the blocks can hold exactly (see codes_fit in export.cpp) are carried instead of re-rounded.
  std::string codes_path;
  // The type of token_embd and output; unset: what llama.cpp's quantize tool gives them in a file
  // of `type` (see edge_type in export.cpp).
  std::optional<GgmlType> edge_type;
};

// What happened to one 2-D tensor, and the error it added against the model's weights.
struct GgufTensorReport {
  std::string name, type;  // GGUF name, ggml type written
  // "codes" (carried), "requantized", "converted" (f32/f16/bf16), or for stacked experts
  // "codes, some parts requantized"
  std::string how;
  std::string note;        // why codes were not carried, or why the type differs from the file's
  double max_abs_error = 0, rel_rms_error = 0;
};

struct GgufExportStats {
  int from_codes = 0, requantized = 0, converted = 0;
  std::vector<std::string> notes;  // about the whole file (e.g. sliding window)
  std::vector<GgufTensorReport> tensors;
  nlohmann::json to_json() const;
};

// llama.cpp's "llama" (Llama, Mistral without its sliding window, Mixtral's experts stacked in
// blk.N.ffn_{gate,up,down}_exps) or "qwen2" (q/k/v biases). Throws Error naming the model when
// runtime_only_features is not empty, when it has no tokenizer, or when those cannot express it.
GgufExportStats export_gguf(const Model& m, const std::string& path, const GgufExportOptions& o = {});

// llama.cpp's q/k row order: within each head, HF's rotate-halves rows (i, i + d/2) become the
// adjacent pair (2i, 2i + 1). inverse = true maps back.
Matrix gguf_permute_qk(const Matrix& w, int heads, bool inverse);

// The name of the GGUF tensor holding HF tensor `hf_name` (e.g. blk.0.attn_q.weight), "" if none.
std::string gguf_tensor_name(const std::string& hf_name);

}  // namespace dq
