#include "model/config.h"

#include <cmath>

#include "io/file.h"
#include "io/report.h"
#include "io/json_limits.h"
#include "model/weights.h"
#include "tensor/tensor.h"

namespace dq {

using json = nlohmann::json;

static int get_int(const json& j, const char* key, const std::string& src, int fallback = -1) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback >= 0) return fallback;
    throw Error(src + ": missing '" + key + "'");
  }
  if (!j[key].is_number_integer()) throw Error(src + ": '" + key + "' is not an integer");
  int64_t v = j[key].get<int64_t>();
  if (v <= 0 || v > (int64_t(1) << 24)) throw Error(src + ": '" + key + "' out of range (" + std::to_string(v) + ")");
  return int(v);
}

static float get_float(const json& j, const char* key, const std::string& src, float fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) throw Error(src + ": '" + key + "' is not a number");
  const float v = j[key].get<float>();
  if (!std::isfinite(v)) throw Error(src + ": '" + key + "' is not a finite float");
  return v;
}

static ModelConfig parse_config_fields(const json& j, const std::string& src);

ModelConfig parse_config(const json& j, const std::string& src) {
  try {
    return parse_config_fields(j, src);
  } catch (const json::exception& e) {  // j.value(...) on a field of the wrong type
    throw Error(src + ": malformed config: " + e.what());
  }
}

static ModelConfig parse_config_fields(const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": config is not a JSON object");
  ModelConfig c;
  c.extra = j;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    c.architecture = j["architectures"][0].get<std::string>();
  else if (j.contains("model_type") && j["model_type"].is_string())
    c.architecture = j["model_type"].get<std::string>();
  else
    throw Error(src + ": missing 'architectures'");
  const bool mixtral = c.architecture == "MixtralForCausalLM", deepseek = c.architecture == "DeepseekForCausalLM";
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM" &&
      c.architecture != "Qwen2ForCausalLM" && !mixtral && !deepseek)
    throw Error(src + ": unsupported architecture '" + c.architecture +
                "' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, "
                "DeepseekForCausalLM)");
  c.vocab_size = get_int(j, "vocab_size", src);
  c.hidden_size = get_int(j, "hidden_size", src);
  c.intermediate_size = get_int(j, "intermediate_size", src);
  c.num_layers = get_int(j, "num_hidden_layers", src);
  c.num_heads = get_int(j, "num_attention_heads", src);
  c.num_kv_heads = get_int(j, "num_key_value_heads", src, c.num_heads);
  if (c.hidden_size % c.num_heads != 0) throw Error(src + ": hidden_size not divisible by num_attention_heads");
  c.head_dim = get_int(j, "head_dim", src, c.hidden_size / c.num_heads);
  if (c.num_heads % c.num_kv_heads != 0)
    throw Error(src + ": num_attention_heads not divisible by num_key_value_heads");
  if (c.head_dim % 2 != 0) throw Error(src + ": head_dim must be even for RoPE");
  // q_dim()/kv_dim() are int products: keep them (and every size derived from them) in range.
  if (int64_t(c.num_heads) * c.head_dim > (int64_t(1) << 24))
    throw Error(src + ": num_attention_heads * head_dim out of range");
  if (mixtral) {
    c.num_experts = get_int(j, "num_local_experts", src);
    c.moe_intermediate = c.intermediate_size;
    c.norm_topk_prob = true;  // Mixtral always renormalises among the top-k
  } else if (deepseek && j.contains("n_routed_experts") && !j["n_routed_experts"].is_null()) {
    c.num_experts = get_int(j, "n_routed_experts", src);
    c.moe_intermediate = get_int(j, "moe_intermediate_size", src);
    if (j.contains("n_shared_experts") && !j["n_shared_experts"].is_null())
      c.shared_experts = get_int(j, "n_shared_experts", src);
    if (j.contains("first_k_dense_replace") && j["first_k_dense_replace"].is_number_integer())
      c.first_dense_layers = std::max(0, j["first_k_dense_replace"].get<int>());
    c.moe_layer_freq = get_int(j, "moe_layer_freq", src, 1);
    if (j.contains("norm_topk_prob") && !j["norm_topk_prob"].is_boolean())
      throw Error(src + ": 'norm_topk_prob' is not a boolean");
    c.norm_topk_prob = j.value("norm_topk_prob", false);
    if (j.contains("scoring_func") && j["scoring_func"] != "softmax")
      throw Error(src + ": unsupported scoring_func " + j["scoring_func"].dump() + " (softmax only)");
  }
  if (c.num_experts > 0) {
    // Bounded before anything is built per expert (names, weights): real models have <= 256.
    if (c.num_experts > 4096 || c.shared_experts > 4096 ||
        int64_t(c.shared_experts) * c.moe_intermediate > (int64_t(1) << 24))
      throw Error(src + ": expert counts out of range");
    c.experts_per_tok = get_int(j, "num_experts_per_tok", src);
    if (c.experts_per_tok > c.num_experts)
      throw Error(src + ": num_experts_per_tok exceeds the number of experts");
  }
  c.max_seq = get_int(j, "max_position_embeddings", src, 2048);
  c.rms_eps = get_float(j, "rms_norm_eps", src, 1e-6f);
  c.rope_theta = get_float(j, "rope_theta", src, 10000.f);
  c.tie_embeddings = j.value("tie_word_embeddings", false);
  c.qkv_bias = c.architecture == "Qwen2ForCausalLM" || j.value("attention_bias", false);
  c.rope_interleaved = j.value("dq_rope_interleaved", false);
  if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
      j.value("use_sliding_window", c.architecture == "MistralForCausalLM"))
    c.sliding_window = get_int(j, "sliding_window", src);
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    const json& rs = j["rope_scaling"];
    std::string type = rs.value("rope_type", rs.value("type", std::string("")));
    if (type == "llama3") {
      c.rope_factor = get_float(rs, "factor", src, 8.f);
      c.rope_low_freq = get_float(rs, "low_freq_factor", src, 1.f);
      c.rope_high_freq = get_float(rs, "high_freq_factor", src, 4.f);
      c.rope_original_max = get_int(rs, "original_max_position_embeddings", src, 8192);
    } else if (type != "default" && !type.empty()) {
      throw Error(src + ": unsupported rope_scaling type '" + type + "'");
    }
  }
  return c;
}

std::vector<ExpertSpec> mlp_experts(const ModelConfig& c, int l) {
  auto swiglu = [&](const std::string& prefix, const char* g, const char* u, const char* d, int inter, bool routed) {
    return ExpertSpec{layer_name(l, prefix + g + ".weight"), layer_name(l, prefix + u + ".weight"),
                      layer_name(l, prefix + d + ".weight"), inter, routed};
  };
  if (!c.is_moe_layer(l)) return {swiglu("mlp.", "gate_proj", "up_proj", "down_proj", c.intermediate_size, false)};
  std::vector<ExpertSpec> e;
  const bool mixtral = c.architecture == "MixtralForCausalLM";
  for (int i = 0; i < c.num_experts; ++i) {
    const std::string p = (mixtral ? "block_sparse_moe.experts." : "mlp.experts.") + std::to_string(i) + ".";
    e.push_back(mixtral ? swiglu(p, "w1", "w3", "w2", c.moe_intermediate, true)
                        : swiglu(p, "gate_proj", "up_proj", "down_proj", c.moe_intermediate, true));
  }
  if (c.shared_experts > 0)
    e.push_back(swiglu("mlp.shared_experts.", "gate_proj", "up_proj", "down_proj",
                       c.shared_experts * c.moe_intermediate, false));
  return e;
}

std::string router_name(const ModelConfig& c, int l) {
  if (!c.is_moe_layer(l)) return "";
  return layer_name(l, c.architecture == "MixtralForCausalLM" ? "block_sparse_moe.gate.weight" : "mlp.gate.weight");
}

ModelConfig load_config(const std::string& path) { return parse_config(read_json(path), path); }

json ModelConfig::to_json() const {
  json j = extra.is_object() ? extra : json::object();
  j["architectures"] = {architecture};
  if (!j.contains("model_type"))
    j["model_type"] = architecture == "Qwen2ForCausalLM" ? "qwen2" : architecture == "MistralForCausalLM" ? "mistral" : "llama";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_layers;
  j["num_attention_heads"] = num_heads;
  j["num_key_value_heads"] = num_kv_heads;
  j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_seq;
  j["rms_norm_eps"] = rms_eps;
  j["rope_theta"] = rope_theta;
  j["tie_word_embeddings"] = tie_embeddings;
  j["hidden_act"] = "silu";
  if (rope_interleaved) j["dq_rope_interleaved"] = true;
  else j.erase("dq_rope_interleaved");
  return j;
}

}  // namespace dq
