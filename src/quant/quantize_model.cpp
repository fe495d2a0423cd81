#include "quant/quantize_model.h"

#include <algorithm>
#include <random>

#include "tensor/kernels.h"

namespace dq {

QuantSpec ActQuantConfig::input(const ModelConfig& c, Site site) const {
  QuantSpec s;
  s.bits = bits;
  s.symmetric = false;
  s.clip_ratio = clip_ratio;
  if (site == Site::OprojIn) s.group = c.head_dim;
  return s;
}

QuantSpec ActQuantConfig::kv(const ModelConfig& c) const {
  QuantSpec s;
  s.bits = kv_bits;
  s.symmetric = false;
  s.clip_ratio = kv_clip_ratio;
  s.group = c.head_dim;
  return s;
}

void exact_linear(const Matrix& x, const Matrix& w, const std::vector<int64_t>& bounds, Matrix& y) {
  if (x.cols != w.cols || bounds.size() < 2 || bounds.front() != 0 || bounds.back() != w.cols)
    throw Error("exact_linear: shapes and blocks do not match");
  const int64_t T = x.rows, R = w.rows, K = w.cols;
  // Buffers kept between calls (fresh ones were page-faulted in on every linear of every forward
  // pass), the calling thread's: the parallel loops below reach them through these references.
  struct Buffers {
    std::vector<double> x, w, acc, part;
  };
  static thread_local Buffers buffers;
  std::vector<double>& xd = buffers.x;
  std::vector<double>& wd = buffers.w;
  std::vector<double>& acc = buffers.acc;
  std::vector<double>& part = buffers.part;
  xd.resize(x.size());
  wd.resize(w.size());
  acc.resize(size_t(T * R));
#pragma omp parallel for schedule(static) if (int64_t(x.size()) > kParallelMinWork)
  for (int64_t i = 0; i < int64_t(x.size()); ++i) xd[size_t(i)] = x.data[size_t(i)];
#pragma omp parallel for schedule(static) if (int64_t(w.size()) > kParallelMinWork)
  for (int64_t i = 0; i < int64_t(w.size()); ++i) wd[size_t(i)] = w.data[size_t(i)];
  // Block 0 straight into acc, each later one into part and then added: a block's own sum is exact,
  // adding part in pieces (dgemm with beta 1 splits long blocks into panels) would round.
  dgemm(false, true, T, R, bounds[1], 1.0, xd.data(), K, wd.data(), K, 0.0, acc.data(), R);
  if (bounds.size() > 2) part.resize(acc.size());
  for (size_t b = 1; b + 1 < bounds.size(); ++b) {
    const int64_t c0 = bounds[b];
    dgemm(false, true, T, R, bounds[b + 1] - c0, 1.0, xd.data() + c0, K, wd.data() + c0, K, 0.0, part.data(), R);
    for (size_t i = 0; i < acc.size(); ++i) acc[i] += part[i];
  }
  // + 0.0: a zero is +0 as in int_gemm, whose sums start from +0.
  y.reshape_for_overwrite(T, R);
  for (size_t i = 0; i < acc.size(); ++i) y.data[i] = float(acc[i] + 0.0);
}

ActQuantHook::ActQuantHook(const ModelConfig& c, const ActQuantConfig& q)
    : token_(q.input(c, Site::AttnIn)),
      head_(q.input(c, Site::OprojIn)),
      kv_(q.kv(c)),
      fp_sites_(q.fp_sites),
      exact_products_(q.bits < 16 && q.weight_bits < 16),
      weight_group_(q.weight_group) {}

void ActQuantHook::at(Site site, int layer, Matrix& x) {
  if (std::find(fp_sites_.begin(), fp_sites_.end(), site) != fp_sites_.end()) return;
  switch (site) {
    case Site::AttnIn: case Site::MlpIn: case Site::DownIn: fake_quantize(x, token_); break;
    case Site::OprojIn: fake_quantize(x, head_); break;
    case Site::K: case Site::V: fake_quantize(x, kv_); break;
    default: break;
  }
}

bool ActQuantHook::linear(Site input, const Matrix& x, const Matrix& w, Matrix& y) {
  if (!exact_products_) return false;
  exact_linear(x, w, column_blocks(w.cols, weight_group_, input == Site::OprojIn ? head_.group : 0), y);
  return true;
}

int64_t ActQuantHook::row_bytes(int64_t cols) const { return encoded_row_bytes(cols, kv_); }

void ActQuantHook::encode(Matrix& x, std::vector<uint8_t>& out) const {
  const size_t first = out.size();
  encode_rows(quantize(x, kv_), out);
  decode(out.data() + first, x.rows, x.cols, x.data.data());
}

void ActQuantHook::decode(const uint8_t* rows, int64_t n, int64_t cols, float* out) const {
  decode_rows(rows, n, cols, kv_, out);
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

HessianHook::HessianHook(const ModelConfig& c, int layer, bool attention, int first, int last) {
  if (attention) {
    acc_[{Site::AttnIn, 0}] = std::make_unique<HessianAccumulator>(c.hidden_size);
    acc_[{Site::OprojIn, 0}] = std::make_unique<HessianAccumulator>(c.q_dim());
  }
  const std::vector<ExpertSpec> experts = mlp_experts(c, layer);
  for (int e = first; e < last; ++e) {
    acc_[{Site::ExpertIn, e}] = std::make_unique<HessianAccumulator>(c.hidden_size);
    acc_[{Site::DownIn, e}] = std::make_unique<HessianAccumulator>(experts[size_t(e)].intermediate);
  }
}

void HessianHook::at(Site site, int, Matrix& x) {
  if (HessianAccumulator* h = of(site)) h->add(x);
}

void HessianHook::at_expert(Site site, int, int expert, Matrix& x) {
  if (HessianAccumulator* h = of(site, expert)) h->add(x);
}

HessianAccumulator* HessianHook::of(Site site, int expert) {
  auto it = acc_.find({site, site == Site::ExpertIn || site == Site::DownIn ? expert : 0});
  return it == acc_.end() ? nullptr : it->second.get();
}

namespace {

void store(std::vector<TensorBlob>& codes, const std::string& name, const QuantizedMatrix& q) {
  codes.push_back({name + ".codes", DType::U8, {q.rows, packed_row_bytes(q.cols, q.spec.bits)},
                   pack_codes(q.codes, q.rows, q.cols, q.spec.bits)});
  codes.push_back(blob_from_matrix(name + ".scales", q.scales, DType::F32));
  codes.push_back(blob_from_matrix(name + ".zeros", q.zeros, DType::F32));
}

}  // namespace

std::vector<std::string> quantized_linears(const ModelConfig& c, int l) {
  std::vector<std::string> names;
  for (const char* s : {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                        "self_attn.o_proj.weight"})
    names.push_back(layer_name(l, s));
  for (const ExpertSpec& e : mlp_experts(c, l))
    for (const std::string* n : {&e.gate, &e.up, &e.down}) names.push_back(*n);
  return names;
}

std::vector<TensorLayout> code_layout(const std::string& name, const std::vector<int64_t>& shape, const QuantSpec& spec) {
  const int64_t rows = shape.at(0), cols = shape.at(1), groups = spec.num_groups(cols);
  const size_t scale_bytes = size_t(rows * groups) * sizeof(float);
  return {{name + ".codes", DType::U8, {rows, packed_row_bytes(cols, spec.bits)}, size_t(rows * packed_row_bytes(cols, spec.bits))},
          {name + ".scales", DType::F32, {rows, groups}, scale_bytes},
          {name + ".zeros", DType::F32, {rows, groups}, scale_bytes}};
}

void check_weight_quant(const WeightQuantOptions& o) {
  o.spec.validate();
  if (o.method != "gptq" && o.method != "rtn") throw Error("unknown weight method '" + o.method + "' (rtn or gptq)");
}

LayerQuantResult quantize_layer(Model& m, int l, const WeightQuantOptions& o, LayerActivations* x,
                                const Hooks& runtime) {
  LayerQuantResult r;
  r.report = {{"layer", l}};
  if (!o.spec.enabled()) return r;
  check_weight_quant(o);
  const ModelConfig& c = m.config;
  const bool gptq_mode = o.method == "gptq";
  if (gptq_mode && (!x || x->empty())) throw Error("GPTQ needs calibration activations");
  const std::string prefix = layer_name(l, "");
  // A Hessian in f32, made from its (f64) accumulator once the layer's statistics pass is over.
  struct Stats {
    Matrix hessian;
    int64_t tokens = 0;
  };
  // GPTQ with the Hessian of its input, or RTN without one (or with too few routed tokens). The
  // Hessian's last user moves it into GPTQ, which frees it once converted.
  auto quantize_linear = [&](const std::string& name, Stats* st, bool expert, bool last_use) {
    Matrix W = m.weights.get(name);
    nlohmann::json& entry = r.report[name.substr(prefix.size())];
    if (st && expert) entry["tokens"] = st->tokens;
    if (st && (!expert || st->tokens >= o.min_expert_tokens)) {
      GptqResult g = gptq(W, last_use ? std::move(st->hessian) : st->hessian, o.spec, o.gptq);
      entry.update({{"error", g.error}, {"damp", g.damp}, {"retries", g.retries}, {"dead_columns", g.dead_columns}});
      store(r.codes, name, g.q);
      m.weights.set(name, std::move(g.weight));
    } else {
      if (st) entry["method"] = "rtn";
      QuantizedMatrix q = quantize(W, o.spec);
      store(r.codes, name, q);
      m.weights.set(name, q.dequantize());
    }
  };
  const std::vector<ExpertSpec> experts = mlp_experts(c, l);
  const int n = int(experts.size()), per_pass = o.experts_per_pass > 0 ? o.experts_per_pass : n;
  LayerWeights w;
  if (gptq_mode) w = load_layer(m, l);
  for (int e0 = 0; e0 < n; e0 += per_pass) {
    const int e1 = std::min(n, e0 + per_pass);
    std::map<std::pair<Site, int>, Stats> stats;
    if (gptq_mode) {
      HessianHook hh(c, l, e0 == 0, e0, e1);
      Hooks hooks = runtime;
      hooks.push_back(&hh);
      x->run(c, w, l, hooks, false);
      if (e1 == n) w = LayerWeights();  // the last statistics pass; the f64 accumulators go next
      std::vector<std::pair<Site, int>> sites;
      if (e0 == 0) sites = {{Site::AttnIn, 0}, {Site::OprojIn, 0}};
      for (int e = e0; e < e1; ++e) sites.insert(sites.end(), {{Site::ExpertIn, e}, {Site::DownIn, e}});
      for (const auto& [site, e] : sites) stats[{site, e}] = {hh.of(site, e)->hessian(), hh.of(site, e)->tokens()};
    }
    auto of = [&](Site s, int e) { return gptq_mode ? &stats.at({s, e}) : nullptr; };
    if (e0 == 0) {
      quantize_linear(layer_name(l, "self_attn.q_proj.weight"), of(Site::AttnIn, 0), false, false);
      quantize_linear(layer_name(l, "self_attn.k_proj.weight"), of(Site::AttnIn, 0), false, false);
      quantize_linear(layer_name(l, "self_attn.v_proj.weight"), of(Site::AttnIn, 0), false, true);
      quantize_linear(layer_name(l, "self_attn.o_proj.weight"), of(Site::OprojIn, 0), false, true);
    }
    for (int e = e0; e < e1; ++e) {
      const ExpertSpec& ex = experts[size_t(e)];
      quantize_linear(ex.gate, of(Site::ExpertIn, e), ex.routed, false);
      quantize_linear(ex.up, of(Site::ExpertIn, e), ex.routed, true);
      quantize_linear(ex.down, of(Site::DownIn, e), ex.routed, true);
      if (gptq_mode && ex.routed && of(Site::DownIn, e)->tokens < o.min_expert_tokens) ++r.rtn_fallbacks;
    }
  }
  // The next layer calibrates on what this quantized layer produces.
  if (gptq_mode) x->run(c, load_layer(m, l), l, runtime, true);
  return r;
}

}  // namespace dq
