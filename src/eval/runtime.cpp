#include "eval/runtime.h"

namespace dq {

RuntimeHooks::RuntimeHooks(const Model& m) {
  if (!m.quantization.is_null()) throw Error(m.source + ": quantized models are not supported yet");
}

RuntimeHooks::~RuntimeHooks() = default;

}  // namespace dq
