// Small models and files for the CLI error tests (test_cli_errors.cpp, test_strict_inputs.cpp).
#pragma once
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/synth.h"
#include "test_helpers.h"

namespace dq::test {

using json = nlohmann::json;

inline CliResult eval(const std::string& model, const ScratchDir& dir, const std::string& extra = "") {
  return run_cli("eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid +
                     " --seqlen 32 --max-windows 1 " + extra,
                 dir);
}

inline json tiny_config() {
  return {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64},       {"intermediate_size", 128},
          {"num_hidden_layers", 2},                {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"vocab_size", 512},                     {"tie_word_embeddings", true}};
}

// DIR/NAME/ with a config.json and, when given, model.safetensors holding `tensors` bytes.
inline std::string hf_dir(const ScratchDir& dir, const std::string& name, const json& config,
                   const std::string* tensors = nullptr) {
  fs::create_directories(dir.path() / name);
  spit(dir / (name + "/config.json"), config.dump());
  if (tensors) spit(dir / (name + "/model.safetensors"), *tensors);
  return dir / name;
}

inline std::string safetensors_bytes(const std::string& header, const std::string& data, uint64_t header_len = 0) {
  if (header_len == 0) header_len = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &header_len, 8);
  return out + header + data;
}

// A valid synthetic tiny model (f32) in DIR/NAME.
inline std::string synth_tiny(const ScratchDir& dir, const std::string& name) {
  spit(dir / "tiny.json", tiny_config().dump());
  SynthOptions o;
  o.dtype = DType::F32;
  synth_model(dir / "tiny.json", dir / name, o);
  return dir / name;
}

// Overwrites one f32 element of a tensor in a safetensors file.
inline void poke_f32(const std::string& safetensors, const std::string& tensor, size_t element, float value) {
  size_t offset;
  {
    SafetensorsFile f(safetensors);
    offset = f.at(tensor).offset + element * 4;
  }
  std::string bytes = slurp(safetensors);
  std::memcpy(bytes.data() + offset, &value, 4);
  spit(safetensors, bytes);
}

inline void poke_nan(const std::string& safetensors, const std::string& tensor, size_t element) {
  poke_f32(safetensors, tensor, element, std::nanf(""));
}

}  // namespace dq::test
