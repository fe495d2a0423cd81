// Calibration windows carried through the model one decoder layer at a time, as capture and GPTQ
// need them: the hidden states of every window stay between layers (stored bf16, 2 bytes a value,
// so 128 windows of 2048 tokens of a 2048-wide model take 1 GiB) while only one layer's weights
// are ever in memory.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/forward.h"

namespace dq {

class LayerActivations {
 public:
  LayerActivations() = default;
  // The embeddings of windows x len tokens.
  LayerActivations(const Model& m, const std::vector<int32_t>& tokens, int windows, int len);

  // Runs decoder layer `layer` over every window with `hooks`, a few windows at a time; the stored
  // states become the layer's output when `advance` (a statistics pass leaves them as they are).
  void run(const ModelConfig& c, const LayerWeights& w, int layer, const Hooks& hooks, bool advance);
  // Applies f to every stored row, a chunk (a few whole windows) at a time, e.g. x <- x·R1.
  void transform(const std::function<void(Matrix& chunk)>& f);

  // Checkpoints: the raw state, restored bit for bit. load() checks the shape against this object's.
  void save(const std::string& path) const;
  void load(const std::string& path);
  bool empty() const { return x_.empty(); }

 private:
  template <class F>
  void for_chunks(bool store_back, F f);
  int windows_ = 0, len_ = 0;
  int64_t cols_ = 0;
  std::vector<uint16_t> x_;  // bf16, windows * len rows of cols_
};

}  // namespace dq
