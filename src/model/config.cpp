#include "model/config.h"

#include "io/file.h"
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
  return j[key].get<float>();
}

ModelConfig parse_config(const json& j, const std::string& src) {
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
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM" &&
      c.architecture != "Qwen2ForCausalLM")
    throw Error(src + ": unsupported architecture '" + c.architecture +
                "' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
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
  c.max_seq = get_int(j, "max_position_embeddings", src, 2048);
  c.rms_eps = get_float(j, "rms_norm_eps", src, 1e-6f);
  c.rope_theta = get_float(j, "rope_theta", src, 10000.f);
  c.tie_embeddings = j.value("tie_word_embeddings", false);
  c.qkv_bias = c.architecture == "Qwen2ForCausalLM" || j.value("attention_bias", false);
  c.rope_interleaved = j.value("dq_rope_interleaved", false);
  if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
      j.value("use_sliding_window", c.architecture == "MistralForCausalLM"))
    c.sliding_window = j["sliding_window"].get<int>();
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

ModelConfig load_config(const std::string& path) {
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw Error(path + ": invalid JSON");
  }
  return parse_config(j, path);
}

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
