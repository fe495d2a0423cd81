// The integer runtime's linear layers: a quantized model's weight codes repacked once at load into
// the kernels' layout (tensor/intgemm.h, docs/FORMAT.md), and activations quantized on the fly to
// the same codes the fake-quant reference rounds them to (quantize() of quantizer.h).
#pragma once
#include <memory>
#include <string>

#include "model/model.h"
#include "quant/quantize_model.h"
#include "quant/quantizer.h"
#include "tensor/intgemm.h"

namespace dq {

class IntLinear : public PackedLinear {
 public:
  // Linears given the same `act` object read their inputs the same way and share one quantization
  // of an input they all multiply (shares_input).
  IntLinear(IntWeights w, std::shared_ptr<const QuantSpec> act, IntPath path);
  std::unique_ptr<PackedInput> prepare(const Matrix& x) const override;
  bool shares_input(const PackedLinear& other) const override;
  void apply(const PackedInput& x, Matrix& y) const override;
  using PackedLinear::apply;
  size_t bytes() const override { return w_.bytes(); }
  const IntWeights& weights() const { return w_; }

 private:
  IntWeights w_;
  std::shared_ptr<const QuantSpec> act_;
  IntPath path_;
};

// Activation codes of x under spec (per token, per spec.group columns when set): the codes and
// parameters quantize() gives, each group's scale and zero from find_params, the codes rounded
// 8 at a time.
IntActs quantize_activations(const Matrix& x, const QuantSpec& spec);

// Replaces every quantized linear of m (quantized_linears()) by an IntLinear built from
// `codes_path` (a model directory's quantized.safetensors), weights of q's weight bits and group,
// inputs quantized as q says (ActQuantConfig::input), running on `path`. The f32 weights are then
// never read. Returns the packed bytes resident. Malformed codes are an Error naming the file and
// tensor.
size_t load_integer_weights(Model& m, const std::string& codes_path, const ActQuantConfig& q, IntPath path);

}  // namespace dq
