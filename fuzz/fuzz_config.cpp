// config.json and model.safetensors.index.json. The input is CONFIG '\0' INDEX: CONFIG goes through
// parse_config directly (what it accepts must be in the domain the forward pass implements), then both files (with a small valid shard beside them) through
// load_model, which parses the index, opens the shards it names and validates the weight shapes
// against the config.
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "fuzz_common.h"
#include "io/json_limits.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const uint8_t* sep = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const size_t config_len = sep ? size_t(sep - data) : size;
  const std::string config(reinterpret_cast<const char*>(data), config_len);
  const std::string index = sep ? std::string(reinterpret_cast<const char*>(sep + 1), size - config_len - 1) : "";

  nlohmann::json j = nlohmann::json::parse(config, nullptr, false);
  if (!j.is_discarded()) {
    try {
      dq::ModelConfig c = dq::parse_config(j, "config.json");
      if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 ||
          c.head_dim <= 0 || c.num_layers <= 0)
        dqfuzz::finding("parse_config accepted a non-positive dimension");
      if (!(c.rms_eps > 0) || !std::isfinite(c.rms_eps) || !(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
        dqfuzz::finding("parse_config accepted rms_norm_eps or rope_theta out of their domain");
      if (c.rope_factor != 0 && !(c.rope_factor > 0 && c.rope_low_freq > 0 && c.rope_high_freq > c.rope_low_freq))
        dqfuzz::finding("parse_config accepted llama3 rope scaling out of its domain");
      if (j.contains("hidden_act") && j["hidden_act"] != "silu" && j["hidden_act"] != "swish" && !j["hidden_act"].is_null())
        dqfuzz::finding("parse_config accepted a hidden_act other than silu");
      (void)c.to_json().dump();
    } catch (const dq::Error&) {
    }
  }

  static const std::string dir = [] {
    std::string d = dqfuzz::work_dir() + "/model";
    std::filesystem::create_directories(d);
    // A shard an index may name: two tiny tensors with names a real index uses.
    dq::Matrix m(2, 4, 0.5f);
    dq::write_safetensors(d + "/shard.safetensors",
                          {dq::blob_from_matrix("model.embed_tokens.weight", m, dq::DType::F32),
                           dq::blob_from_matrix("model.norm.weight", dq::Matrix(1, 4, 1.f), dq::DType::F32, {4})});
    return d;
  }();
  dqfuzz::write_input("model/config.json", config);
  std::filesystem::remove(dir + "/model.safetensors.index.json");
  if (sep) dqfuzz::write_input("model/model.safetensors.index.json", index);
  bool strict_ok = true;  // what load_model reads config.json with: duplicate keys refused
  try {
    (void)dq::parse_json_strict(config, "config.json");
  } catch (const dq::Error&) {
    strict_ok = false;
  }
  try {
    dq::Model m = dq::load_model(dir);
    if (!strict_ok) dqfuzz::finding("load_model accepted a config.json the strict parser refuses");
  } catch (const dq::Error&) {
  }
  return 0;
}
