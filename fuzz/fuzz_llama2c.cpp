// llama2.c checkpoints: the 7-field header and the tensor layout it implies; accepted files are
// loaded as a model (shape validation) and converted to HF's RoPE row order.
#include "fuzz_common.h"
#include "io/llama2c.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A directory of its own: load_model looks for tok*.bin beside the checkpoint.
  static const bool made = std::filesystem::create_directories(dqfuzz::work_dir() + "/ckpt") || true;
  (void)made;
  const std::string path = dqfuzz::write_input("ckpt/model.bin", data, size);
  try {
    dq::Llama2cCheckpoint c = dq::read_llama2c(path);
    if (c.tensors.empty()) dqfuzz::finding("checkpoint accepted without tensors");
    dq::Model m = dq::load_model(path);
    dq::rope_to_halves(m);
  } catch (const dq::Error&) {
  }
  return 0;
}
