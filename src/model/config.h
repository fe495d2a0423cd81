// The architecture of a LLaMA-family model, read from an HF config.json (or a llama2.c header).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dq {

struct ModelConfig {
  std::string architecture = "LlamaForCausalLM";  // also MistralForCausalLM, Qwen2ForCausalLM
  int vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0, max_seq = 2048;
  float rms_eps = 1e-5f, rope_theta = 10000.f;
  // rope_scaling type "llama3" (Llama-3.1/3.2); factor 0 = none.
  float rope_factor = 0.f, rope_low_freq = 1.f, rope_high_freq = 4.f;
  int rope_original_max = 8192;
  bool tie_embeddings = false;
  bool qkv_bias = false;          // Qwen2
  bool rope_interleaved = false;  // llama2.c rotates (2i, 2i+1) pairs; HF rotates (i, i + d/2)
  int sliding_window = 0;         // Mistral; 0 = full causal attention
  nlohmann::json extra;           // the original config.json, kept for round trips

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  nlohmann::json to_json() const;  // an HF config.json
};

// Parses and validates config.json; `source` names the file in error messages.
ModelConfig parse_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_config(const std::string& path);

}  // namespace dq
