// safetensors: the header JSON and every size/offset claim in it, then every tensor read as f32.
#include "fuzz_common.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("model.safetensors", data, size);
  try {
    dq::SafetensorsFile f(path);
    for (const auto& [name, t] : f.tensors()) {
      if (t.offset + t.nbytes > f.file().size() || t.offset < 8) dqfuzz::finding("tensor outside the file");
      if (uint64_t(t.numel()) * dq::dtype_size(t.dtype) != t.nbytes) dqfuzz::finding("size mismatch accepted");
      volatile uint8_t sink = 0;  // touch the first and last byte the reader vouched for
      if (t.nbytes) sink = uint8_t(t.data[0] ^ t.data[t.nbytes - 1]);
      (void)sink;
    }
  } catch (const dq::Error&) {
  }
  return 0;
}
