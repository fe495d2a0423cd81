// llama2.c legacy (v0) checkpoints: 7 int32 header fields, then fp32 tensors in a fixed order.
#pragma once
#include <map>
#include <string>

#include "tensor/tensor.h"

namespace dq {

struct Llama2cCheckpoint {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;
  // HF-named f32 tensors in llama2.c's row order (q/k rows still in interleaved-RoPE order).
  std::map<std::string, Matrix> tensors;
};

Llama2cCheckpoint read_llama2c(const std::string& path);  // throws Error("PATH: ...")

}  // namespace dq
