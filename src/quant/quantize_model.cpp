#include "quant/quantize_model.h"

#include <random>

namespace dq {

ActQuantHook::ActQuantHook(const ModelConfig& c, const ActQuantConfig& q) {
  token_.bits = q.bits;
  token_.symmetric = false;
  token_.clip_ratio = q.clip_ratio;
  head_ = token_;
  head_.group = c.head_dim;
  kv_.bits = q.kv_bits;
  kv_.symmetric = false;
  kv_.clip_ratio = q.kv_clip_ratio;
  kv_.group = c.head_dim;
}

void ActQuantHook::at(Site site, int layer, Matrix& x) {
  switch (site) {
    case Site::AttnIn: case Site::MlpIn: case Site::DownIn: fake_quantize(x, token_); break;
    case Site::OprojIn: fake_quantize(x, head_); break;
    case Site::K: case Site::V: fake_quantize(x, kv_); break;
    default: break;
  }
}

std::vector<int32_t> sample_windows(const std::vector<int32_t>& ids, int n, int len, uint64_t seed) {
  if (ids.size() <= size_t(len))
    throw Error("calibration text has " + std::to_string(ids.size()) + " tokens, need more than " +
                std::to_string(len));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> start(0, ids.size() - size_t(len) - 1);
  std::vector<int32_t> out;
  out.reserve(size_t(n) * size_t(len));
  for (int i = 0; i < n; ++i) {
    size_t s = start(rng);
    out.insert(out.end(), ids.begin() + std::ptrdiff_t(s), ids.begin() + std::ptrdiff_t(s + size_t(len)));
  }
  return out;
}

namespace {

const char* kLinears[] = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "self_attn.o_proj.weight", "mlp.gate_proj.weight",    "mlp.up_proj.weight",
                          "mlp.down_proj.weight"};

// The site whose activations are the input of each linear in kLinears.
Site input_site(int linear) {
  static const Site s[] = {Site::AttnIn, Site::AttnIn, Site::AttnIn, Site::OprojIn,
                           Site::MlpIn, Site::MlpIn, Site::DownIn};
  return s[linear];
}

// Accumulates the GPTQ Hessian of every linear input site of one layer.
class HessianHook : public Hook {
 public:
  explicit HessianHook(const ModelConfig& c)
      : attn_(c.hidden_size), oproj_(c.q_dim()), mlp_(c.hidden_size), down_(c.intermediate_size) {}
  void at(Site site, int, Matrix& x) override {
    if (HessianAccumulator* h = of(site)) h->add(x);
  }
  HessianAccumulator* of(Site s) {
    switch (s) {
      case Site::AttnIn: return &attn_;
      case Site::OprojIn: return &oproj_;
      case Site::MlpIn: return &mlp_;
      case Site::DownIn: return &down_;
      default: return nullptr;
    }
  }

 private:
  HessianAccumulator attn_, oproj_, mlp_, down_;
};

void store(WeightQuantResult& r, const std::string& name, const QuantizedMatrix& q) {
  r.codes.push_back({name + ".codes", DType::U8, {q.rows, packed_row_bytes(q.cols, q.spec.bits)},
                     pack_codes(q.codes, q.rows, q.cols, q.spec.bits)});
  r.codes.push_back(blob_from_matrix(name + ".scales", q.scales, DType::F32));
  r.codes.push_back(blob_from_matrix(name + ".zeros", q.zeros, DType::F32));
}

// Runs one layer over all calibration windows, a few windows at a time to bound memory.
void run_layer(const ModelConfig& c, const LayerWeights& w, int layer, Matrix& x, int windows, int len,
               const Hooks& hooks) {
  const int per = std::max(1, 8192 / len);
  for (int w0 = 0; w0 < windows; w0 += per) {
    int b = std::min(per, windows - w0);
    Matrix part(int64_t(b) * len, x.cols);
    std::copy_n(x.row(int64_t(w0) * len), part.size(), part.data.data());
    layer_forward(c, w, layer, part, b, len, hooks);
    std::copy_n(part.data.data(), part.size(), x.row(int64_t(w0) * len));
  }
}

}  // namespace

WeightQuantResult quantize_weights(Model& m, const WeightQuantOptions& o, const std::vector<int32_t>& calib,
                                   int windows, int len, const Hooks& runtime, const LayerProgress& progress) {
  WeightQuantResult r;
  r.report = nlohmann::json::array();
  if (!o.spec.enabled()) return r;
  o.spec.validate();
  const ModelConfig& c = m.config;
  const bool gptq_mode = o.method == "gptq";
  if (!gptq_mode && o.method != "rtn") throw Error("unknown weight method '" + o.method + "' (rtn or gptq)");
  Matrix x;
  if (gptq_mode) x = embed(m, calib);
  for (int l = 0; l < c.num_layers; ++l) {
    nlohmann::json layer = {{"layer", l}};
    std::vector<Matrix> hessians(std::size(kLinears));
    if (gptq_mode) {
      LayerWeights w = load_layer(m, l);
      HessianHook hh(c);
      Hooks hooks = runtime;
      hooks.push_back(&hh);
      Matrix copy = x;
      run_layer(c, w, l, copy, windows, len, hooks);
      for (size_t i = 0; i < std::size(kLinears); ++i) hessians[i] = hh.of(input_site(int(i)))->hessian();
    }
    for (size_t i = 0; i < std::size(kLinears); ++i) {
      std::string name = layer_name(l, kLinears[i]);
      Matrix W = m.weights.get(name);
      if (gptq_mode) {
        GptqResult g = gptq(W, hessians[i], o.spec, o.gptq);
        layer[kLinears[i]] = {{"error", g.error}, {"damp", g.damp}, {"retries", g.retries},
                              {"dead_columns", g.dead_columns}};
        store(r, name, g.q);
        m.weights.set(name, std::move(g.weight));
      } else {
        QuantizedMatrix q = quantize(W, o.spec);
        store(r, name, q);
        m.weights.set(name, q.dequantize());
      }
    }
    if (gptq_mode) {
      // The next layer calibrates on what this quantized layer produces.
      LayerWeights w = load_layer(m, l);
      run_layer(c, w, l, x, windows, len, runtime);
      r.report.push_back(layer);
    }
    release_layer(m, l);
    if (progress) progress(l + 1, c.num_layers);
  }
  if (o.lm_head) {
    QuantizedMatrix q = quantize(m.weights.get("lm_head.weight"), o.spec);
    store(r, "lm_head.weight", q);
    m.weights.set("lm_head.weight", q.dequantize());
  }
  return r;
}

}  // namespace dq
