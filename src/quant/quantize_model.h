// Model-level quantization: activation/KV fake quantization as a forward-pass hook, calibration
// windows, and weight quantization of one decoder layer (RTN, or GPTQ on the outputs of the
// already-quantized layers before it).
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/forward.h"
#include "model/layerwise.h"
#include "quant/gptq.h"
#include "quant/quantizer.h"

namespace dq {

// A quantized model's run-time quantization: activations per token (asymmetric, clipped) at every
// linear input but lm_head's, the o_proj input one group per head; K (after RoPE and R3) and V per
// head; and the weights' bits and group, which fix how the products are summed.
struct ActQuantConfig {
  int bits = 16;
  float clip_ratio = 0.9f;
  int kv_bits = 16;
  float kv_clip_ratio = 1.f;
  int weight_bits = 16;
  int weight_group = 0;
  // A diagnostic (eval --fp-sites): the linear inputs at these sites stay unquantized, to measure
  // what each site's activation quantization costs.
  std::vector<Site> fp_sites;

  // The quantizer of the input of the linears that read `site` (AttnIn, OprojIn, MlpIn, ExpertIn,
  // DownIn), and of K and V: the one place the fake-quant hooks and the integer runtime take them.
  QuantSpec input(const ModelConfig& c, Site site) const;
  QuantSpec kv(const ModelConfig& c) const;
};

// Y = X Wᵀ as the integer runtime sums a quantized linear (tensor/intgemm.h): each column block's
// products accumulated in double, the blocks (`bounds`, column_blocks) added in order to 0 in
// double, rounded once to f32. When X and W hold fake-quantized values (scales of scale_bits,
// quantizer.h) every block's products and partial sums are exact in double, so each output is the
// exact block-wise sum rounded once, whatever order the double product runs in: the integer
// runtime's result, bit for bit.
void exact_linear(const Matrix& x, const Matrix& w, const std::vector<int64_t>& bounds, Matrix& y);

// Fake quantization: rounds each site's activations to the codes of its quantizer and, when weights
// and activations are both quantized, computes the linears' products with exact_linear (the
// reference the integer runtime reproduces). It is also the KV cache's quantizer (forward.h) when
// kv_bits < 16: the cache then keeps K and V as these codes, encoded by encode_rows (quantizer.h).
class ActQuantHook : public KvQuantizer {
 public:
  ActQuantHook(const ModelConfig& c, const ActQuantConfig& q);
  void at(Site site, int layer, Matrix& x) override;
  bool linear(Site input, const Matrix& x, const Matrix& w, Matrix& y) override;
  int64_t row_bytes(int64_t cols) const override;
  void encode(Matrix& x, std::vector<uint8_t>& out) const override;
  void decode(const uint8_t* rows, int64_t n, int64_t cols, float* out) const override;

 private:
  QuantSpec token_, head_, kv_;
  std::vector<Site> fp_sites_;
  bool exact_products_ = false;
  int weight_group_ = 0;
};

// n windows of len tokens at seeded uniform random offsets (GPTQ's calibration sampling).
std::vector<int32_t> sample_windows(const std::vector<int32_t>& ids, int n, int len, uint64_t seed);

// The GPTQ Hessians of one layer's linear inputs: the attention inputs (when asked) over all
// tokens, and for experts [first, last) the gate/up and down_proj inputs over only the tokens
// routed to each (all tokens for an always-on expert or a dense MLP).
class HessianHook : public Hook {
 public:
  HessianHook(const ModelConfig& c, int layer, bool attention, int first_expert, int last_expert);
  void at(Site site, int layer, Matrix& x) override;
  void at_expert(Site site, int layer, int expert, Matrix& x) override;
  // ExpertIn/DownIn take the expert; null for a site or expert not collected.
  HessianAccumulator* of(Site site, int expert = 0);

 private:
  std::map<std::pair<Site, int>, std::unique_ptr<HessianAccumulator>> acc_;
};

struct WeightQuantOptions {
  QuantSpec spec;              // bits 16 = leave the weights alone
  std::string method = "rtn";  // or "gptq"
  GptqOptions gptq;
  // MoE: an expert whose Hessian saw fewer routed calibration tokens than this is quantized with
  // RTN (a Hessian of a handful of tokens would fit the weights to them; none would zero them).
  int64_t min_expert_tokens = 128;
  // Experts whose Hessians are collected per calibration pass over a layer (0 = all in one pass):
  // bounds Hessian memory at the cost of re-running the layer.
  int experts_per_pass = 0;
};

// Throws Error naming a bad bit width, group, clip or method.
void check_weight_quant(const WeightQuantOptions& o);

// The linears of layer l that are quantized (attention, then each expert's gate/up/down); the
// embedding, norms, router and lm_head stay 16-bit.
std::vector<std::string> quantized_linears(const ModelConfig& c, int l);
// The tensors a quantized weight of this shape stores: NAME.codes (packed, u8), .scales, .zeros.
std::vector<TensorLayout> code_layout(const std::string& name, const std::vector<int64_t>& shape,
                                      const QuantSpec& spec);

struct LayerQuantResult {
  std::vector<TensorBlob> codes;  // code_layout of each quantized_linears entry, in that order
  nlohmann::json report;          // GPTQ error, damping and retries per linear; experts' tokens
  int rtn_fallbacks = 0;          // experts quantized with RTN for lack of routed tokens
};

// Quantizes layer l's linear weights in place (dequantized values). GPTQ takes the calibration
// windows' inputs to layer l in x (left holding the quantized layer's outputs, the next layer's
// inputs) and the run-time hooks the quantized model will run with (online Hadamards).
LayerQuantResult quantize_layer(Model& m, int l, const WeightQuantOptions& o, LayerActivations* x,
                                const Hooks& runtime);

}  // namespace dq
