// The hooks a model's quantization section asks for at run time: online Hadamards (R3 on Q/K,
// R4 on the down_proj input) and activation / KV-cache fake quantization; and the switch of a
// quantized model directory onto the integer runtime.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/forward.h"
#include "quant/quantize_model.h"
#include "tensor/intgemm.h"

namespace dq {

// The run-time quantization of a quantized model (m.quantization non-null), every field of the
// section checked (an Error names the file and field).
ActQuantConfig quant_config(const Model& m);

// Loads the packed weights of a quantized model directory (m.source) so its linears run on the
// integer kernels (quant/intlinear.h) on `path`. Returns "" on success, or why the model cannot
// run there (then m is unchanged): it needs weights and activations of 2..8 bits, a dense MLP and
// the directory's quantized.safetensors.
std::string use_integer_runtime(Model& m, IntPath path = best_int_path());

class RuntimeHooks {
 public:
  // For a model with packed weights (use_integer_runtime) the linears quantize their own inputs,
  // so activation fake quantization is left out; K/V are still quantized per head by a hook.
  // fp_sites: linear inputs left unquantized (ActQuantConfig::fp_sites; fake-quant path only).
  explicit RuntimeHooks(const Model& m, const std::vector<Site>& fp_sites = {});
  ~RuntimeHooks();
  const Hooks& hooks() const { return hooks_; }
  // A KV cache for decoding with these hooks: K and V kept as their codes (packed, per token and
  // head, with scale and zero point) when the model quantizes its KV cache, else in f32.
  KvCache kv_cache() const { return KvCache(kv_quantizer_); }
  // "integer", "fake-quant" (quantized model on the f32 reference path) or "fp".
  const char* path() const { return path_; }

 private:
  std::vector<std::unique_ptr<Hook>> owned_;
  Hooks hooks_;
  const KvQuantizer* kv_quantizer_ = nullptr;
  const char* path_ = "fp";
};

}  // namespace dq
