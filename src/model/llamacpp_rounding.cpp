#include "model/llamacpp_rounding.h"

#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>

#include "tensor/kernels.h"
#include "tensor/tensor.h"

namespace dq {

namespace {

// One block of 32 as ggml's quantize_row_q8_0 / q8_1 round it: codes round(x * 127 / amax), halves
// to even as its x86 kernels do, and the scale d = amax / 127 before its f16 rounding (the codes use
// the exact 127 / amax).
struct Q8Block {
  float codes[32];
  float d;
};

Q8Block q8_block(const float* v) {
  Q8Block q;
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
  q.d = amax / 127.f;
  const float inv = amax != 0.f ? 127.f / amax : 0.f;
  for (int i = 0; i < 32; ++i) q.codes[i] = std::nearbyint(v[i] * inv);
  return q;
}

void check_whole_blocks(const Matrix& x) {
  if (x.cols % 32 != 0) throw Error("activation rows of " + std::to_string(x.cols) + " are not whole blocks of 32");
}

}  // namespace

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
  check_whole_blocks(x);
  for (size_t b = 0; b < x.data.size(); b += 32) {
    float* v = x.data.data() + b;
    const Q8Block q = q8_block(v);
    const float d = f16_to_f32(f32_to_f16(q.d));  // the block stores d in f16
    for (int i = 0; i < 32; ++i) v[i] = q.codes[i] * d;
  }
}

Matrix q8_1_block_sums(const Matrix& x) {
  check_whole_blocks(x);
  Matrix s(x.rows, x.cols / 32);
  for (size_t b = 0; b < s.data.size(); ++b) {
    const Q8Block q = q8_block(x.data.data() + 32 * b);
    float codes = 0.f;  // an integer of at most 32 * 127: exact
    for (float c : q.codes) codes += c;
    s.data[b] = f16_to_f32(f32_to_f16(q.d * codes));
  }
  return s;
}

namespace {

class LlamaCppRounding : public Hook {
 public:
  struct LayerTypes {
    GgmlType qkv, o, gate_up, down;
  };
  // dense: no MoE layers (only then are the MLP input and the q4_1 products handled).
  LlamaCppRounding(std::unique_ptr<GgufFile> file, int head_dim, std::vector<LayerTypes> layers, GgmlType classifier,
                   bool dense)
      : file_(std::move(file)), head_dim_(head_dim), layers_(std::move(layers)), classifier_(classifier), dense_(dense) {}

  void at(Site site, int layer, Matrix& x) override {
    if (layer >= 0) layer_ = layer;
    switch (site) {
      case Site::AttnIn: return round(site, layers_.at(size_t(layer)).qkv, x);
      case Site::OprojIn: return round(site, layers_.at(size_t(layer)).o, x);
      // A MoE layer's MlpIn also feeds the router, which llama.cpp multiplies in f32: left as it is.
      case Site::MlpIn:
        if (dense_) round(site, layers_.at(size_t(layer)).gate_up, x);
        return;
      case Site::DownIn: return round(site, layers_.at(size_t(layer)).down, x);
      case Site::FinalNorm: return round_activations_like_ggml(classifier_, x);
      default: return;
    }
  }

  bool linear(Site input, const Matrix& x, const Matrix& w, Matrix& y) override {
    const Site rounded_at = input == Site::ExpertIn ? Site::MlpIn : input;  // a dense MLP's gate/up read MlpIn's rows
    if (sums_.data.empty() || rounded_at != sums_site_) return false;
    const std::vector<int64_t> rows = file_rows(input, w);
    dq::linear(x, w, y);
    // y holds sum((d q + m) x) over each block's rounded x; ggml's q4_1 x q8_1 dot product has
    // m * s where this has m * sum(x): add m * (s - sum(x)) per block.
    const int64_t nb = x.cols / 32;
    Matrix diff(x.rows, nb);
    for (int64_t t = 0; t < x.rows; ++t)
      for (int64_t b = 0; b < nb; ++b) {
        float sum = 0.f;  // f16(d) times an integer of at most 32 * 127: exact in any order
        for (int i = 0; i < 32; ++i) sum += x(t, 32 * b + i);
        diff(t, b) = sums_(t, b) - sum;
      }
    Matrix offsets(w.rows, nb);
    const uint8_t* data = file_->tensor_data(*tensor_);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        uint16_t m;
        std::memcpy(&m, data + size_t(rows[size_t(r)] * nb + b) * sizeof(BlockQ4_1) + offsetof(BlockQ4_1, m), sizeof m);
        offsets(r, b) = f16_to_f32(m);
      }
    sgemm(false, true, x.rows, w.rows, nb, 1.f, diff.data.data(), nb, offsets.data.data(), nb, 1.f, y.data.data(),
          w.rows);
    return true;
  }

 private:
  void round(Site site, GgmlType t, Matrix& x) {
    sums_ = t == GgmlType::Q4_1 && dense_ ? q8_1_block_sums(x) : Matrix();
    sums_site_ = site;
    round_activations_like_ggml(t, x);
  }

  // The file tensor (tensor_) holding w, one of the layer's weights that read `input`, and the file
  // row of each of w's rows: the same, or, for q/k of a "llama" GGUF, llama.cpp's interleaved order
  // within each head (rows 2j, 2j + 1 are HF's j, j + head_dim / 2). Told apart by the first block
  // of every row, which the loader decoded from the same bytes.
  std::vector<int64_t> file_rows(Site input, const Matrix& w) {
    std::vector<const char*> names;
    if (input == Site::AttnIn) names = {"attn_q", "attn_k", "attn_v"};
    if (input == Site::OprojIn) names = {"attn_output"};
    if (input == Site::ExpertIn) names = {"ffn_gate", "ffn_up"};
    if (input == Site::DownIn) names = {"ffn_down"};
    std::vector<int64_t> same(size_t(w.rows)), interleaved(size_t(w.rows));
    const int64_t hd = head_dim_;
    for (int64_t r = 0; r < w.rows; ++r) {
      same[size_t(r)] = r;
      interleaved[size_t(r)] = r - r % hd + 2 * (r % hd % (hd / 2)) + r % hd / (hd / 2);
    }
    const int64_t nb = w.cols / 32;
    for (const char* name : names) {
      const GgufTensorInfo* t = file_->find_tensor("blk." + std::to_string(layer_) + "." + name + ".weight");
      if (!t || t->type != GgmlType::Q4_1 || t->shape != std::vector<uint64_t>{uint64_t(w.cols), uint64_t(w.rows)})
        continue;
      const uint8_t* data = file_->tensor_data(*t);
      for (const std::vector<int64_t>* rows : {&same, &interleaved}) {
        if (rows == &interleaved && (hd < 2 || w.rows % hd != 0)) continue;
        bool match = true;
        for (int64_t r = 0; r < w.rows && match; ++r) {
          BlockQ4_1 block;
          std::memcpy(&block, data + size_t((*rows)[size_t(r)] * nb) * sizeof(BlockQ4_1), sizeof block);
          float first[32];
          dequantize_q4_1(block, first);
          match = std::memcmp(first, w.row(r), sizeof first) == 0;
        }
        if (match) {
          tensor_ = t;
          return *rows;
        }
      }
    }
    throw Error(file_->path() + ": no q4_1 tensor of layer " + std::to_string(layer_) + " holds the weight read at " +
                site_name(input));
  }

  std::unique_ptr<GgufFile> file_;
  int head_dim_;
  std::vector<LayerTypes> layers_;
  GgmlType classifier_;
  bool dense_;
  int layer_ = 0;                    // of the last site seen
  Matrix sums_;                      // q8_1 block sums of the last rounded input, when its weights are q4_1
  Site sums_site_ = Site::AttnIn;    // where that input was rounded
  const GgufTensorInfo* tensor_ = nullptr;  // set by file_rows
};

}  // namespace

std::unique_ptr<Hook> llama_cpp_activation_rounding(const Model& m) {
  std::error_code ec;  // an HF directory or a llama2.c file: nothing to round
  if (!std::filesystem::is_regular_file(m.source, ec) || !has_gguf_magic(m.source)) return nullptr;
  auto g = std::make_unique<GgufFile>(m.source);
  bool any = false;
  auto type = [&](const std::string& name) {
    GgmlType t = g->tensor(name).type;
    any |= t != GgmlType::F32;
    return t;
  };
  const bool moe = g->find_tensor("blk.0.ffn_gate_inp.weight") != nullptr;
  std::vector<LlamaCppRounding::LayerTypes> layers;
  for (int l = 0; l < m.config.num_layers; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::string ffn = moe ? "_exps.weight" : ".weight";
    layers.push_back({type(blk + "attn_q.weight"), type(blk + "attn_output.weight"), type(blk + "ffn_gate" + ffn),
                      type(blk + "ffn_down" + ffn)});
  }
  const GgmlType classifier = type(g->find_tensor("output.weight") ? "output.weight" : "token_embd.weight");
  if (!any) return nullptr;
  return std::make_unique<LlamaCppRounding>(std::move(g), m.config.head_dim, std::move(layers), classifier, !moe);
}

}  // namespace dq
