#include "quant/intlinear.h"

#include <cmath>

namespace dq {

IntLinear::IntLinear(IntWeights w, const QuantSpec& act, IntPath path) : w_(std::move(w)), act_(act), path_(path) {}

void IntLinear::apply(const Matrix& x, Matrix& y) const { int_gemm(quantize_activations(x, act_), w_, path_, y); }

IntActs quantize_activations(const Matrix& x, const QuantSpec& spec) {
  QuantizedMatrix q = quantize(x, spec);
  IntActs a;
  a.rows = x.rows;
  a.cols = x.cols;
  a.bits = spec.bits;
  a.group = spec.group > 0 ? std::min<int64_t>(spec.group, x.cols) : x.cols;
  a.codes = std::move(q.codes);
  a.scales = std::move(q.scales.data);
  a.zeros.assign(q.zeros.data.begin(), q.zeros.data.end());  // integer-valued floats
  return a;
}

size_t load_integer_weights(Model& m, const std::string& codes_path, const QuantSpec& weights,
                            const ActQuantConfig& acts, IntPath path) {
  SafetensorsFile f(codes_path);
  const ModelConfig& c = m.config;
  size_t total = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (const std::string& name : quantized_linears(c, l)) {
      auto fail = [&](const std::string& what) -> Error { return Error(codes_path + ": '" + name + "': " + what); };
      const std::vector<int64_t> shape = m.weights.shape(name);
      const int64_t rows = shape.at(0), cols = shape.at(1), groups = weights.num_groups(cols);
      auto find = [&](const std::string& suffix, DType dtype, std::vector<int64_t> want) -> const TensorInfo& {
        auto it = f.tensors().find(name + suffix);
        if (it == f.tensors().end()) throw fail("missing " + suffix.substr(1));
        if (it->second.dtype != dtype || it->second.shape != want)
          throw fail(suffix.substr(1) + " has the wrong dtype or shape");
        return it->second;
      };
      const TensorInfo& codes = find(".codes", DType::U8, {rows, packed_row_bytes(cols, weights.bits)});
      const TensorInfo& scales = find(".scales", DType::F32, {rows, groups});
      const TensorInfo& zeros = find(".zeros", DType::F32, {rows, groups});
      std::vector<float> s(size_t(rows * groups)), z(s.size());
      convert_to_f32(DType::F32, scales.data, s.size(), s.data());
      convert_to_f32(DType::F32, zeros.data, z.size(), z.data());
      for (size_t i = 0; i < s.size(); ++i) {
        if (!std::isfinite(s[i]) || s[i] <= 0) throw fail("a scale is not a finite positive number");
        if (!(z[i] >= 0 && z[i] <= float(weights.maxq()) && z[i] == std::nearbyint(z[i])))
          throw fail("a zero point is not a code");
      }
      const std::vector<uint8_t> unpacked =
          unpack_codes(std::vector<uint8_t>(codes.data, codes.data + codes.nbytes), rows, cols, weights.bits);
      const bool o_proj = name.find("o_proj") != std::string::npos;
      const QuantSpec act = acts.input(c, o_proj ? Site::OprojIn : Site::AttnIn);
      IntWeights w = IntWeights::pack(unpacked.data(), rows, cols, weights.bits, weights.group, s.data(), z.data(),
                                      act.group);
      auto lin = std::make_shared<IntLinear>(std::move(w), act, path);
      total += lin->bytes();
      m.weights.set_packed(name, std::move(lin));
    }
  }
  return total;
}

}  // namespace dq
