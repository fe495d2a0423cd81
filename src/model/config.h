// The architecture of a LLaMA-family model, read from an HF config.json (or a llama2.c header).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dq {

struct ModelConfig {
  // also MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, DeepseekForCausalLM
  std::string architecture = "LlamaForCausalLM";
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
  // Mixture of experts; num_experts 0 = every MLP dense. A MoE layer routes each token to the
  // experts_per_tok highest softmax probabilities of its router, plus always-on shared experts.
  int num_experts = 0, experts_per_tok = 0;
  int moe_intermediate = 0;    // a routed expert's intermediate size
  int shared_experts = 0;      // DeepSeek: run as one SwiGLU of shared_experts * moe_intermediate
  int first_dense_layers = 0;  // DeepSeek first_k_dense_replace
  int moe_layer_freq = 1;      // DeepSeek: layers l >= first_dense_layers with l % freq == 0 are MoE
  bool norm_topk_prob = false; // renormalise the top-k probabilities to sum 1 (Mixtral: always)
  nlohmann::json extra;        // the original config.json, kept for round trips

  bool is_moe_layer(int l) const {
    return num_experts > 0 && l >= first_dense_layers && l % moe_layer_freq == 0;
  }
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  nlohmann::json to_json() const;  // an HF config.json
};

// One SwiGLU of a layer's MLP: the HF names of its linears and its intermediate size.
struct ExpertSpec {
  std::string gate, up, down;
  int intermediate = 0;
  bool routed = false;  // false: always on, with weight 1
};
// A layer's MLP as experts: the routed ones first (index = router row), then the always-on one
// (DeepSeek's shared experts). A dense MLP is a single always-on expert.
std::vector<ExpertSpec> mlp_experts(const ModelConfig& c, int layer);
// The router's weight name ([num_experts, hidden]); "" for a dense layer.
std::string router_name(const ModelConfig& c, int layer);

// Parses and validates config.json; `source` names the file in error messages.
ModelConfig parse_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_config(const std::string& path);

}  // namespace dq
