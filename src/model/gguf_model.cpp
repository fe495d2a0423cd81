#include "model/model.h"

namespace dq {

Model load_gguf_model(const std::string& path) {
  throw Error(path + ": GGUF models cannot be loaded yet");
}

}  // namespace dq
