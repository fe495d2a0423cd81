// config.json and model.safetensors.index.json. The input is CONFIG '\0' INDEX: CONFIG goes through
// parse_config directly, then both files (with a small valid shard beside them) through
// load_model, which parses the index, opens the shards it names and validates the weight shapes
// against the config.
#include <cstring>
#include <nlohmann/json.hpp>

#include "fuzz_common.h"
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
  try {
    dq::Model m = dq::load_model(dir);
  } catch (const dq::Error&) {
  }
  return 0;
}
