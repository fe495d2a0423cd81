#include "model/config.h"

#include <cmath>

#include "io/file.h"
#include "io/report.h"
#include "io/json_limits.h"
#include "model/weights.h"
#include "tensor/tensor.h"

namespace dq {

using json = nlohmann::json;

// An integer in [lo, 2^24] (sizes and counts); fallback < 0 makes the key required.
static int get_int(const json& j, const char* key, const std::string& src, int fallback = -1, int lo = 1) {
  if (!j.contains(key) || j[key].is_null()) {
    if (fallback >= 0) return fallback;
    throw Error(src + ": missing '" + key + "'");
  }
  if (!j[key].is_number_integer()) throw Error(src + ": '" + key + "' is not an integer");
  const bool big = j[key].is_number_unsigned() && j[key].get<uint64_t>() > uint64_t(INT64_MAX);
  const int64_t v = big ? INT64_MAX : j[key].get<int64_t>();
  if (v < lo || v > (int64_t(1) << 24))
    throw Error(src + ": '" + key + "' out of range (must be " + std::to_string(lo) + ".." +
                std::to_string(1 << 24) + ")");
  return int(v);
}

static bool get_bool(const json& j, const char* key, const std::string& src, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) throw Error(src + ": '" + key + "' is not true/false");
  return j[key].get<bool>();
}

static float get_float(const json& j, const char* key, const std::string& src, float fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) throw Error(src + ": '" + key + "' is not a number");
  const float v = j[key].get<float>();
  if (!std::isfinite(v)) throw Error(src + ": '" + key + "' is not a finite float");
  return v;
}

static float get_positive_float(const json& j, const char* key, const std::string& src, float fallback) {
  const float v = get_float(j, key, src, fallback);
  if (!(v > 0)) throw Error(src + ": '" + key + "' must be > 0");
  return v;
}

static std::string get_string(const json& j, const char* key, const std::string& src, const std::string& fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_string()) throw Error(src + ": '" + key + "' is not a string");
  return j[key].get<std::string>();
}

// What the forward pass does not implement is refused rather than ignored: a model whose config asks
// for another activation, biases or a different attention would load and compute something else.
static void refuse_unimplemented(const json& j, const std::string& src) {
  const std::string act = get_string(j, "hidden_act", src, "silu");
  if (act != "silu" && act != "swish")
    throw Error(src + ": unsupported hidden_act '" + act + "' (only silu)");
  if (get_bool(j, "mlp_bias", src, false)) throw Error(src + ": unsupported mlp_bias true (MLP biases)");
  for (const char* key : {"attn_logit_softcapping", "final_logit_softcapping", "qk_layernorm", "use_qk_norm"})
    if (j.contains(key) && !j[key].is_null() && j[key] != false)
      throw Error(src + ": unsupported '" + key + "' " + j[key].dump());
  if (j.contains("partial_rotary_factor") && !j["partial_rotary_factor"].is_null() &&
      j["partial_rotary_factor"] != 1 && j["partial_rotary_factor"] != 1.0)
    throw Error(src + ": unsupported partial_rotary_factor (only 1: RoPE on the whole head)");
}

static ModelConfig parse_config_fields(const json& j, const std::string& src);

static void check_llama3_rope(const ModelConfig& c, const std::string& src) {
  // The smoothing between the two wavelength bounds divides by high_freq_factor - low_freq_factor.
  if (!(c.rope_factor > 0) || !(c.rope_low_freq > 0) || !(c.rope_high_freq > c.rope_low_freq))
    throw Error(src + ": llama3 rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor");
}

ModelConfig parse_config(const json& j, const std::string& src) {
  try {
    return parse_config_fields(j, src);
  } catch (const json::exception& e) {  // j.value(...) on a field of the wrong type
    throw Error(src + ": malformed config: " + json_error_text(e));
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
  refuse_unimplemented(j, src);
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
    c.first_dense_layers = get_int(j, "first_k_dense_replace", src, 0, 0);
    c.moe_layer_freq = get_int(j, "moe_layer_freq", src, 1);
    c.norm_topk_prob = get_bool(j, "norm_topk_prob", src, false);
    const std::string scoring = get_string(j, "scoring_func", src, "softmax");
    if (scoring != "softmax") throw Error(src + ": unsupported scoring_func '" + scoring + "' (softmax only)");
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
  c.rms_eps = get_positive_float(j, "rms_norm_eps", src, 1e-6f);
  c.rope_theta = get_positive_float(j, "rope_theta", src, 10000.f);
  c.tie_embeddings = get_bool(j, "tie_word_embeddings", src, false);
  c.qkv_bias = c.architecture == "Qwen2ForCausalLM" || get_bool(j, "attention_bias", src, false);
  c.rope_interleaved = get_bool(j, "dq_rope_interleaved", src, false);
  if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
      get_bool(j, "use_sliding_window", src, c.architecture == "MistralForCausalLM")) {
    c.sliding_window = get_int(j, "sliding_window", src);
    // Qwen2 slides only in layers >= max_window_layers (28 when absent, as in HF); one window for
    // every layer is all the forward pass does.
    if (c.architecture == "Qwen2ForCausalLM") {
      const int full_layers = get_int(j, "max_window_layers", src, 28, 0);
      if (full_layers >= c.num_layers) c.sliding_window = 0;
      else if (full_layers > 0)
        throw Error(src + ": unsupported sliding window in only some layers (max_window_layers " +
                    std::to_string(full_layers) + " of " + std::to_string(c.num_layers) + ")");
    }
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    const json& rs = j["rope_scaling"];
    if (!rs.is_object()) throw Error(src + ": 'rope_scaling' is not an object");
    const std::string type = get_string(rs, "rope_type", src, get_string(rs, "type", src, ""));
    if (type == "llama3") {
      c.rope_factor = get_positive_float(rs, "factor", src, 8.f);
      c.rope_low_freq = get_positive_float(rs, "low_freq_factor", src, 1.f);
      c.rope_high_freq = get_positive_float(rs, "high_freq_factor", src, 4.f);
      c.rope_original_max = get_int(rs, "original_max_position_embeddings", src, 8192);
      check_llama3_rope(c, src);
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
