// The dartquant_quantization section of a quantized model's config.json: the input is the section's
// JSON text. It is parsed into the run-time hooks (online Hadamards, activation / KV fake quant)
// of a tiny synthetic model, and whatever the section accepts is run through a forward pass,
// whose output must then be finite.
#include <cmath>
#include <nlohmann/json.hpp>

#include "eval/runtime.h"
#include "fuzz_common.h"
#include "model/model.h"
#include "model/synth.h"

static dq::Model& tiny_model() {
  static dq::Model* m = [] {
    const std::string dir = dqfuzz::work_dir() + "/tiny";
    const std::string config = dqfuzz::write_input(
        "tiny-config.json",
        R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
            "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5})");
    dq::synth_model(config, dir, dq::SynthOptions{});
    return new dq::Model(dq::load_model(dir));
  }();
  return *m;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json section = nlohmann::json::parse(data, data + size, nullptr, false);
  if (section.is_discarded()) return 0;
  dq::Model& m = tiny_model();
  m.quantization = section;
  try {
    dq::RuntimeHooks runtime(m);
    const dq::Matrix x = dq::forward(m, {1, 5, 9, 30, 2, 7}, 2, 3, runtime.hooks());
    for (size_t i = 0; i < x.size(); ++i)
      if (!std::isfinite(x.data[i])) dqfuzz::finding("an accepted section gave a non-finite forward pass");
  } catch (const dq::Error&) {
  }
  return 0;
}
