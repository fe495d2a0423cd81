// GGUF: header, metadata, tensor infos, every tensor decoded to f32, the typed getters, and the
// model loader (config from llama.* keys, weights, tokenizer rebuilt from metadata; no tensor left
// unused, values in their domain).
#include "fuzz_common.h"
#include "io/gguf.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("model.gguf", data, size);
  try {
    dq::GgufFile g(path);
    for (const auto& t : g.tensors()) {
      dq::Matrix m = g.read_matrix(t.name);
      if (m.size() != t.elems()) dqfuzz::finding("decoded size differs from the element count");
    }
    for (const auto& [key, v] : g.metadata()) {
      // Each getter either returns or throws Error for the wrong type.
      try { (void)g.get_string(key); } catch (const dq::Error&) {}
      try { (void)g.get_i64(key); } catch (const dq::Error&) {}
      try { (void)g.get_u32(key); } catch (const dq::Error&) {}
      try { (void)g.get_f32(key); } catch (const dq::Error&) {}
      try { (void)g.get_bool(key); } catch (const dq::Error&) {}
      try { (void)g.get_strings(key); } catch (const dq::Error&) {}
      try { (void)g.get_i32s(key); } catch (const dq::Error&) {}
      try { (void)g.get_f32s(key); } catch (const dq::Error&) {}
    }
  } catch (const dq::Error&) {
  }
  try {
    dq::Model m = dq::load_gguf_model(path);
    dq::validate_weights(m);
    // Every tensor of the file is one the model uses (rope_freqs.weight: the Llama-3 factors).
    dq::GgufFile g(path);
    const size_t rope = g.find_tensor("rope_freqs.weight") ? 1 : 0;
    if (m.weights.names().size() + rope != g.tensors().size()) dqfuzz::finding("a GGUF tensor was dropped");
    if (!(m.config.rms_eps > 0) || !(m.config.rope_theta > 0)) dqfuzz::finding("GGUF norm eps or rope base <= 0");
    if (m.tokenizer) {
      std::vector<int32_t> ids = m.tokenizer->encode("Hello world, once upon a time", true);
      for (int32_t id : ids)
        if (id < 0 || size_t(id) >= m.tokenizer->vocab_size()) dqfuzz::finding("encode id outside the vocabulary");
      (void)m.tokenizer->decode(ids);
    }
  } catch (const dq::Error&) {
  }
  return 0;
}
