// Text <-> token ids. Two implementations: llama2.c vocab files (llama2c_tokenizer.cpp) and
// Hugging Face tokenizer.json (hf_tokenizer.cpp). load_tokenizer picks by file content.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dq {

// What a GGUF writer needs to describe a vocabulary (llama.cpp's tokenizer.ggml.* keys).
struct VocabInfo {
  std::string model;                // "llama" (SentencePiece-style / llama2.c) or "gpt2" (byte-level BPE)
  std::vector<std::string> tokens;  // piece text as the tokenizer stores it ('▁' for spaces in "llama")
  std::vector<float> scores;        // empty when the model has none
  std::vector<int32_t> token_types; // 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
  std::vector<std::string> merges;  // "a b", byte-level BPE only
  int32_t bos = -1, eos = -1, unk = -1;
  bool add_bos = false, add_eos = false;  // what encode(text, add_special = true) adds
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // add_special: add what the tokenizer adds around a sequence (BOS for llama2.c and Llama-2).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when there is none
  virtual int32_t eos_id() const = 0;  // -1 when there is none
  virtual size_t vocab_size() const = 0;
  virtual VocabInfo vocab_info() const = 0;
};

// A tokenizer.json (HF) or a llama2.c tokenizer.bin; throws Error naming the file on failure.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);
std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path);
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);

}  // namespace dq
