#include "model/llamacpp_rounding.h"

#include <cmath>
#include <filesystem>

#include "tensor/tensor.h"

namespace dq {

void round_activations_like_ggml(GgmlType t, Matrix& x) {
  switch (t) {
    case GgmlType::F32:
      return;
    case GgmlType::F16:
      for (float& v : x.data) v = f16_to_f32(f32_to_f16(v));
      return;
    case GgmlType::BF16:
      for (float& v : x.data) v = bf16_to_f32(f32_to_bf16(v));
      return;
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
      break;
  }
  if (x.cols % 32 != 0) throw Error("activation rows of " + std::to_string(x.cols) + " are not whole blocks of 32");
  for (size_t b = 0; b < x.data.size(); b += 32) {
    float* v = x.data.data() + b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
    // The block stores d in f16 but its codes are computed with the exact 127 / amax.
    const float d = f16_to_f32(f32_to_f16(amax / 127.f));
    const float inv = amax != 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; ++i) v[i] = std::nearbyint(v[i] * inv) * d;  // halves to even
  }
}

namespace {

class LlamaCppRounding : public Hook {
 public:
  struct LayerTypes {
    GgmlType qkv, o, gate_up, down;
  };
  LlamaCppRounding(std::vector<LayerTypes> layers, GgmlType classifier, bool round_mlp_in)
      : layers_(std::move(layers)), classifier_(classifier), round_mlp_in_(round_mlp_in) {}

  void at(Site site, int layer, Matrix& x) override {
    switch (site) {
      case Site::AttnIn: return round_activations_like_ggml(layers_.at(size_t(layer)).qkv, x);
      case Site::OprojIn: return round_activations_like_ggml(layers_.at(size_t(layer)).o, x);
      case Site::MlpIn:
        if (round_mlp_in_) round_activations_like_ggml(layers_.at(size_t(layer)).gate_up, x);
        return;
      case Site::DownIn: return round_activations_like_ggml(layers_.at(size_t(layer)).down, x);
      case Site::FinalNorm: return round_activations_like_ggml(classifier_, x);
      default: return;
    }
  }

 private:
  std::vector<LayerTypes> layers_;
  GgmlType classifier_;
  bool round_mlp_in_;
};

}  // namespace

std::unique_ptr<Hook> llama_cpp_activation_rounding(const Model& m) {
  std::error_code ec;  // an HF directory or a llama2.c file: nothing to round
  if (!std::filesystem::is_regular_file(m.source, ec) || !has_gguf_magic(m.source)) return nullptr;
  GgufFile g(m.source);
  bool any = false;
  auto type = [&](const std::string& name) {
    GgmlType t = g.tensor(name).type;
    any |= t != GgmlType::F32;
    return t;
  };
  const bool moe = g.find_tensor("blk.0.ffn_gate_inp.weight") != nullptr;
  std::vector<LlamaCppRounding::LayerTypes> layers;
  for (int l = 0; l < m.config.num_layers; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::string ffn = moe ? "_exps.weight" : ".weight";
    layers.push_back({type(blk + "attn_q.weight"), type(blk + "attn_output.weight"), type(blk + "ffn_gate" + ffn),
                      type(blk + "ffn_down" + ffn)});
  }
  const GgmlType classifier = type(g.find_tensor("output.weight") ? "output.weight" : "token_embd.weight");
  if (!any) return nullptr;
  // A MoE layer's MlpIn also feeds the router, which llama.cpp multiplies in f32: left as it is.
  return std::make_unique<LlamaCppRounding>(std::move(layers), classifier, !moe);
}

}  // namespace dq
