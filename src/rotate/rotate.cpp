#include "rotate/rotate.h"

#include <cmath>

#include "io/output.h"
#include "tensor/kernels.h"

namespace dq {

void scale_columns(Matrix& w, const Matrix& gain) {
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) w(r, c) *= gain.data[size_t(c)];
}

static void fuse_gain(Model& m, const std::string& norm, const std::vector<std::string>& readers) {
  Matrix gain = m.weights.get(norm);
  for (const std::string& name : readers) {
    Matrix w = m.weights.get(name);
    scale_columns(w, gain);
    m.weights.set(name, std::move(w));
  }
  m.weights.set(norm, Matrix(1, gain.cols, 1.f));
}

// Every linear that reads the MLP norm's output: the router and each expert's gate/up.
static std::vector<std::string> mlp_readers(const ModelConfig& c, int l) {
  std::vector<std::string> r;
  if (c.is_moe_layer(l)) r.push_back(router_name(c, l));
  for (const ExpertSpec& e : mlp_experts(c, l)) {
    r.push_back(e.gate);
    r.push_back(e.up);
  }
  return r;
}

void fuse_layer_norms(Model& m, int l) {
  fuse_gain(m, layer_name(l, "input_layernorm.weight"),
            {layer_name(l, "self_attn.q_proj.weight"), layer_name(l, "self_attn.k_proj.weight"),
             layer_name(l, "self_attn.v_proj.weight")});
  fuse_gain(m, layer_name(l, "post_attention_layernorm.weight"), mlp_readers(m.config, l));
}

static void untie_classifier(Model& m) {
  if (m.weights.has("lm_head.weight")) return;
  m.weights.set("lm_head.weight", m.weights.get("model.embed_tokens.weight"));
  m.config.tie_embeddings = false;
  m.config.extra = m.config.to_json();
}

void fuse_norms(Model& m) {
  untie_classifier(m);
  for (int l = 0; l < m.config.num_layers; ++l) fuse_layer_norms(m, l);
  fuse_gain(m, "model.norm.weight", {"lm_head.weight"});
}

Rotations random_hadamard_rotations(const ModelConfig& c, uint64_t seed) {
  Rotations r;
  r.r1 = random_hadamard(c.hidden_size, seed);
  r.r2.resize(size_t(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l)
    for (int h = 0; h < c.num_kv_heads; ++h)
      r.r2[size_t(l)].push_back(random_hadamard(c.head_dim, seed + 1 + uint64_t(l) * 1000 + uint64_t(h)));
  return r;
}

// W ← W·R (input side: the layer reads x·R).
static void rotate_input(Model& m, const std::string& name, const Matrix& R) {
  m.weights.set(name, matmul(m.weights.get(name), R));
}

// W ← Rᵀ·W (output side: the layer's output joins a stream rotated by R).
static void rotate_output(Model& m, const std::string& name, const Matrix& R) {
  Matrix w = m.weights.get(name), out;
  gemm(R, true, w, false, out);
  m.weights.set(name, std::move(out));
}

static void check_r1(const ModelConfig& c, const Rotations& r) {
  if (r.r1.rows != c.hidden_size || r.r1.cols != c.hidden_size)
    throw Error("R1 must be " + std::to_string(c.hidden_size) + " x " + std::to_string(c.hidden_size));
}

void apply_rotations(Model& m, const Rotations& r) {
  check_r1(m.config, r);
  rotate_input(m, "model.embed_tokens.weight", r.r1);
  rotate_input(m, "lm_head.weight", r.r1);
  for (int l = 0; l < m.config.num_layers; ++l) rotate_layer(m, r, l);
}

void rotate_layer(Model& m, const Rotations& r, int l) {
  const ModelConfig& c = m.config;
  const int hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  check_r1(c, r);
  for (const char* s : {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"})
    rotate_input(m, layer_name(l, s), r.r1);
  for (const std::string& name : mlp_readers(c, l)) rotate_input(m, name, r.r1);
  rotate_output(m, layer_name(l, "self_attn.o_proj.weight"), r.r1);
  for (const ExpertSpec& e : mlp_experts(c, l)) rotate_output(m, e.down, r.r1);
  if (r.r2.empty()) return;
  if (r.r2.size() != size_t(c.num_layers) || r.r2[size_t(l)].size() != size_t(c.num_kv_heads))
    throw Error("R2 must hold one matrix per layer and KV head");
  // Value head h: rows of v_proj (and its bias) ← R2ᵀ·rows; o_proj columns of every query head
  // in h's group ← columns·R2.
  Matrix wv = m.weights.get(layer_name(l, "self_attn.v_proj.weight"));
  Matrix wo = m.weights.get(layer_name(l, "self_attn.o_proj.weight"));
  std::string bias_name = layer_name(l, "self_attn.v_proj.bias");
  Matrix bv = m.weights.has(bias_name) ? m.weights.get(bias_name) : Matrix();
  for (int h = 0; h < c.num_kv_heads; ++h) {
    const Matrix& R = r.r2[size_t(l)][size_t(h)];
    if (R.rows != hd || R.cols != hd) throw Error("R2 must be head_dim x head_dim");
    Matrix rows(hd, wv.cols);
    sgemm(true, false, hd, wv.cols, hd, 1.f, R.data.data(), hd, wv.row(int64_t(h) * hd), wv.cols, 0.f,
          rows.data.data(), wv.cols);
    std::copy(rows.data.begin(), rows.data.end(), wv.row(int64_t(h) * hd));
    if (!bv.empty()) {
      std::vector<float> b(bv.data.begin() + h * hd, bv.data.begin() + (h + 1) * hd);
      for (int i = 0; i < hd; ++i) {
        float s = 0;
        for (int k = 0; k < hd; ++k) s += R(k, i) * b[size_t(k)];
        bv.data[size_t(h * hd + i)] = s;
      }
    }
    for (int q = h * group; q < (h + 1) * group; ++q) {
      Matrix cols(wo.rows, hd);
      sgemm(false, false, wo.rows, hd, hd, 1.f, wo.row(0) + int64_t(q) * hd, wo.cols, R.data.data(), hd,
            0.f, cols.data.data(), hd);
      for (int64_t i = 0; i < wo.rows; ++i) std::copy_n(cols.row(i), hd, wo.row(i) + int64_t(q) * hd);
    }
  }
  m.weights.set(layer_name(l, "self_attn.v_proj.weight"), std::move(wv));
  m.weights.set(layer_name(l, "self_attn.o_proj.weight"), std::move(wo));
  if (!bv.empty()) m.weights.set(bias_name, std::move(bv));
}

// One Hadamard per distinct expert intermediate size (DeepSeek: dense, routed and shared differ).
static std::map<int64_t, Hadamard> down_hadamards(const ModelConfig& c) {
  std::map<int64_t, Hadamard> h;
  for (int l = 0; l < c.num_layers; ++l)
    for (const ExpertSpec& e : mlp_experts(c, l)) h.try_emplace(e.intermediate, e.intermediate);
  return h;
}

void fold_r4(Model& m) {
  for (int l = 0; l < m.config.num_layers; ++l) fold_r4_layer(m, l);
}

void fold_r4_layer(Model& m, int l) {
  std::map<int64_t, Hadamard> h;
  for (const ExpertSpec& e : mlp_experts(m.config, l)) {
    Matrix w = m.weights.get(e.down);
    h.try_emplace(e.intermediate, e.intermediate).first->second.apply(w);
    m.weights.set(e.down, std::move(w));
  }
}

OnlineHadamard::OnlineHadamard(const ModelConfig& c, bool r3, bool r4)
    : r3_(r3), r4_(r4), head_(c.head_dim), inter_(down_hadamards(c)) {}

bool OnlineHadamard::genuine() const {
  bool ok = !r3_ || head_.genuine();
  if (r4_)
    for (const auto& [n, h] : inter_) ok = ok && h.genuine();
  return ok;
}

void OnlineHadamard::at(Site site, int layer, Matrix& x) {
  if (r3_ && (site == Site::Q || site == Site::K)) {
    head_.apply(x.data.data(), x.rows * (x.cols / head_.size()));  // each head slice is a row
  } else if (r4_ && site == Site::DownIn) {
    auto it = inter_.find(x.cols);
    if (it == inter_.end()) throw Error("R4: no Hadamard of size " + std::to_string(x.cols));
    it->second.apply(x);
  }
}

}  // namespace dq

namespace dq {

static std::string r2_name(int l, int h) { return "R2." + std::to_string(l) + "." + std::to_string(h); }

void save_rotations(const std::string& path, const Rotations& r) {
  std::vector<TensorBlob> blobs{blob_from_matrix("R1", r.r1, DType::F32)};
  for (size_t l = 0; l < r.r2.size(); ++l)
    for (size_t h = 0; h < r.r2[l].size(); ++h)
      blobs.push_back(blob_from_matrix(r2_name(int(l), int(h)), r.r2[l][h], DType::F32));
  write_safetensors(path, blobs, {{"format", "dartquant-rotations"}, {"written_by", kWrittenBy}});
}

// Every matrix loaded must be square of its size, finite and orthogonal to within this (max |RᵀR - I|;
// f32 rounding of a true rotation stays far below it).
constexpr double kOrthogonalityTolerance = 1e-3;

Rotations load_rotations(const std::string& path, const ModelConfig& c, int r2_layers) {
  SafetensorsFile f(path);
  // A rotation folded into the weights must be one: shape, finiteness and RᵀR = I are checked, so a
  // file for another model or a corrupted one cannot silently change what the model computes.
  auto get = [&](const std::string& name, int64_t n) {
    const TensorInfo& t = f.at(name);
    if (t.shape != std::vector<int64_t>{n, n})
      throw Error(path + ": '" + name + "' must be " + std::to_string(n) + " x " + std::to_string(n));
    Matrix m(n, n);
    if (!convert_to_f32(t.dtype, t.data, m.size(), m.data.data()))
      throw Error(path + ": '" + name + "' has non-finite values");
    Matrix gram;
    gemm(m, true, m, false, gram);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) worst = std::max(worst, std::abs(double(gram(i, j)) - (i == j)));
    if (worst > kOrthogonalityTolerance)
      throw Error(path + ": '" + name + "' is not orthogonal (max |RᵀR - I| = " + std::to_string(worst) + ")");
    return m;
  };
  Rotations r;
  r.r1 = get("R1", c.hidden_size);
  r.r2.resize(size_t(r2_layers < 0 ? c.num_layers : r2_layers));
  for (size_t l = 0; l < r.r2.size(); ++l)
    for (int h = 0; h < c.num_kv_heads; ++h) r.r2[l].push_back(get(r2_name(int(l), h), c.head_dim));
  if (r2_layers < 0) {
    const size_t expected = 1 + size_t(c.num_layers) * size_t(c.num_kv_heads);
    if (f.tensors().size() != expected)
      throw Error(path + ": holds " + std::to_string(f.tensors().size()) + " matrices, the model needs " +
                  std::to_string(expected) + " (R1 and one R2 per layer and KV head): made for another model?");
  }
  return r;
}

}  // namespace dq
