// The hooks a model's quantization section asks for at run time: online Hadamards (R3 on Q/K,
// R4 on the down_proj input) and activation / KV-cache fake quantization.
#pragma once
#include <memory>
#include <vector>

#include "model/forward.h"

namespace dq {

class RuntimeHooks {
 public:
  explicit RuntimeHooks(const Model& m);
  ~RuntimeHooks();
  const Hooks& hooks() const { return hooks_; }

 private:
  std::vector<std::unique_ptr<Hook>> owned_;
  Hooks hooks_;
};

}  // namespace dq
