// Model-level quantization: activation/KV fake quantization as a forward-pass hook, calibration
// windows, and weight quantization (RTN, or GPTQ run layer by layer on the outputs of the
// already-quantized layers before it).
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/forward.h"
#include "quant/gptq.h"
#include "quant/quantizer.h"

namespace dq {

// Activations per token (asymmetric, clipped) at every linear input but lm_head's; the o_proj input
// one group per head. K (after RoPE and R3) and V per head.
struct ActQuantConfig {
  int bits = 16;
  float clip_ratio = 0.9f;
  int kv_bits = 16;
  float kv_clip_ratio = 1.f;
};

class ActQuantHook : public Hook {
 public:
  ActQuantHook(const ModelConfig& c, const ActQuantConfig& q);
  void at(Site site, int layer, Matrix& x) override;

 private:
  QuantSpec token_, head_, kv_;
};

// n windows of len tokens at seeded uniform random offsets (GPTQ's calibration sampling).
std::vector<int32_t> sample_windows(const std::vector<int32_t>& ids, int n, int len, uint64_t seed);

struct WeightQuantOptions {
  QuantSpec spec;              // bits 16 = leave the weights alone
  std::string method = "rtn";  // or "gptq"
  GptqOptions gptq;
  bool lm_head = false;        // lm_head (and the embedding) stay 16-bit unless asked
};

struct WeightQuantResult {
  std::vector<TensorBlob> codes;  // NAME.codes / .scales / .zeros for quantized.safetensors
  nlohmann::json report;          // per-layer GPTQ error, damping and retries
};

using LayerProgress = std::function<void(int layer, int layers)>;

// Quantizes m's linear weights in place (dequantized values). GPTQ needs calibration tokens
// (windows x len) and the run-time hooks the quantized model will run with (online Hadamards).
WeightQuantResult quantize_weights(Model& m, const WeightQuantOptions& o, const std::vector<int32_t>& calib,
                                   int windows, int len, const Hooks& runtime,
                                   const LayerProgress& progress = nullptr);

}  // namespace dq
