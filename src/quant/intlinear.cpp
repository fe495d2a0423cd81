#include "quant/intlinear.h"

#include <atomic>
#include <cmath>

#include "tensor/kernels.h"

namespace dq {

namespace {

struct ActCodes : PackedInput {
  IntActs a;
};

}  // namespace

IntLinear::IntLinear(IntWeights w, std::shared_ptr<const QuantSpec> act, IntPath path)
    : w_(std::move(w)), act_(std::move(act)), path_(path) {}

std::unique_ptr<PackedInput> IntLinear::prepare(const Matrix& x) const {
  auto in = std::make_unique<ActCodes>();
  in->a = quantize_activations(x, *act_);
  return in;
}

bool IntLinear::shares_input(const PackedLinear& other) const {
  const auto* o = dynamic_cast<const IntLinear*>(&other);
  return o && o->act_ == act_;
}

void IntLinear::apply(const PackedInput& x, Matrix& y) const {
  int_gemm(static_cast<const ActCodes&>(x).a, w_, path_, y);
}

IntActs quantize_activations(const Matrix& x, const QuantSpec& spec) {
  if (!spec.enabled() || spec.per_tensor) throw Error("integer activations: per-token quantization expected");
  IntActs a;
  a.rows = x.rows;
  a.cols = x.cols;
  a.bits = spec.bits;
  a.group = spec.group > 0 ? std::min<int64_t>(spec.group, x.cols) : x.cols;
  const int64_t ng = a.groups();
  a.codes.resize(x.size());
  a.scales.resize(size_t(x.rows * ng));
  a.zeros.resize(a.scales.size());
  a.sums.resize(a.scales.size());
  const int maxq = spec.maxq();
  std::atomic<bool> bad{false};
#pragma omp parallel for schedule(static) if (int64_t(x.size()) > kParallelMinWork)
  for (int64_t r = 0; r < x.rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * a.group, n = std::min(x.cols, c0 + a.group) - c0;
      QuantParams p;
      try {
        p = find_params(x.row(r) + c0, n, spec);
      } catch (const Error&) {  // a non-finite value: thrown below, outside the parallel loop
        bad = true;
        break;
      }
      a.scales[size_t(r * ng + g)] = p.scale;
      a.zeros[size_t(r * ng + g)] = int32_t(p.zero);  // an integer-valued float
      a.sums[size_t(r * ng + g)] = quant_codes(x.row(r) + c0, n, p, maxq, a.codes.data() + r * x.cols + c0);
    }
  }
  if (bad) throw Error("quantize: non-finite input value");
  return a;
}

size_t load_integer_weights(Model& m, const std::string& codes_path, const ActQuantConfig& q, IntPath path) {
  SafetensorsFile f(codes_path);
  const ModelConfig& c = m.config;
  QuantSpec weights;  // the stored zero points make symmetry irrelevant here
  weights.bits = q.weight_bits;
  weights.group = q.weight_group;
  // One spec object per kind of input: linears that share an input share its codes (shares_input).
  const auto per_token = std::make_shared<const QuantSpec>(q.input(c, Site::AttnIn));
  const auto per_head = std::make_shared<const QuantSpec>(q.input(c, Site::OprojIn));
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
          unpack_codes({codes.data, codes.nbytes}, rows, cols, weights.bits);
      // The file's pages are read once: handed back now, they do not sit beside the packed copy
      // until the whole model is loaded (a W8 model's codes are as large as its packed weights).
      f.file().release(codes.offset, codes.nbytes);
      const bool o_proj = name.find("o_proj") != std::string::npos;
      std::shared_ptr<const QuantSpec> act = o_proj ? per_head : per_token;
      IntWeights w = IntWeights::pack(unpacked.data(), rows, cols, weights.bits, weights.group, s.data(), z.data(),
                                      act->group);
      auto lin = std::make_shared<IntLinear>(std::move(w), act, path);
      total += lin->bytes();
      m.weights.set_packed(name, std::move(lin));
    }
  }
  return total;
}

}  // namespace dq
