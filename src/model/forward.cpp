#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tensor/kernels.h"

namespace dq {

const char* site_name(Site s) {
  switch (s) {
    case Site::AttnIn: return "attn_in";
    case Site::Q: return "q";
    case Site::K: return "k";
    case Site::V: return "v";
    case Site::OprojIn: return "o_proj_in";
    case Site::MlpIn: return "mlp_in";
    case Site::ExpertIn: return "expert_in";
    case Site::DownIn: return "down_in";
    case Site::FinalNorm: return "final_norm";
  }
  return "?";
}

Site site_from_name(const std::string& name) {
  for (Site s : {Site::AttnIn, Site::Q, Site::K, Site::V, Site::OprojIn, Site::MlpIn, Site::ExpertIn,
                 Site::DownIn, Site::FinalNorm})
    if (name == site_name(s)) return s;
  throw Error("unknown site '" + name + "'");
}

static void run_hooks(const Hooks& hooks, Site s, int layer, Matrix& x) {
  for (Hook* h : hooks) h->at(s, layer, x);
}

static void run_expert_hooks(const Hooks& hooks, Site s, int layer, int expert, Matrix& x) {
  for (Hook* h : hooks) h->at_expert(s, layer, expert, x);
}

static const char* kLayerTensors[] = {
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.bias", "self_attn.v_proj.bias", "post_attention_layernorm.weight"};

static void check_finite(const Model& m, const std::string& name, const Matrix& w) {
  for (float v : w.data)
    if (!std::isfinite(v)) throw Error(m.source + ": tensor '" + name + "' contains NaN or Inf");
}

LayerWeights load_layer(const Model& m, int layer) {
  // Weights::get converts in parallel and checks finiteness while converting.
  auto get = [&](const std::string& name) {
    if (!m.weights.has(name)) throw Error(m.source + ": missing tensor '" + name + "'");
    bool finite = true;
    Matrix t = m.weights.get(name, &finite);
    if (!finite) throw Error(m.source + ": tensor '" + name + "' contains NaN or Inf");
    return t;
  };
  // A packed linear leaves its f32 matrix empty.
  auto load = [&](const std::string& name, Matrix& f32, PackedPtr* packed) {
    if (packed && (*packed = m.weights.packed(name))) return;
    f32 = get(name);
  };
  LayerWeights w;
  Matrix* slots[] = {&w.attn_norm, &w.q, &w.k, &w.v, &w.o, &w.q_bias, &w.k_bias, &w.v_bias,
                     &w.mlp_norm};
  PackedPtr* packed[] = {nullptr, &w.q_packed, &w.k_packed, &w.v_packed, &w.o_packed, nullptr, nullptr, nullptr,
                         nullptr};
  for (size_t i = 0; i < std::size(kLayerTensors); ++i) {
    std::string name = layer_name(layer, kLayerTensors[i]);
    if (!m.weights.has(name) && std::strstr(kLayerTensors[i], "bias")) continue;
    load(name, *slots[i], packed[i]);
  }
  const std::string router = router_name(m.config, layer);
  if (!router.empty()) w.router = get(router);
  for (const ExpertSpec& e : mlp_experts(m.config, layer)) {
    ExpertWeights& x = w.experts.emplace_back();
    load(e.gate, x.gate, &x.gate_packed);
    load(e.up, x.up, &x.up_packed);
    load(e.down, x.down, &x.down_packed);
  }
  return w;
}

void release_layer(const Model& m, int layer) {
  for (const std::string& name : layer_tensor_names(m, layer)) m.weights.release(name);
}

std::vector<std::string> layer_tensor_names(const Model& m, int layer) {
  std::vector<std::string> names;
  for (const char* s : {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                        "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight"})
    if (m.weights.has(layer_name(layer, s))) names.push_back(layer_name(layer, s));
  const std::string router = router_name(m.config, layer);
  if (!router.empty()) names.push_back(router);
  for (const ExpertSpec& e : mlp_experts(m.config, layer))
    for (const std::string* n : {&e.gate, &e.up, &e.down}) names.push_back(*n);
  return names;
}

Matrix embed(const Model& m, const std::vector<int32_t>& tokens) {
  const int64_t D = m.config.hidden_size;
  const std::string name = "model.embed_tokens.weight";
  Matrix x(int64_t(tokens.size()), D);
  const bool release = lm_head_name(m) != name;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= m.config.vocab_size)
      throw Error("token id " + std::to_string(tokens[i]) + " outside the vocabulary");
    Matrix row = m.weights.get_rows(name, tokens[i], 1);  // only the rows used are converted
    check_finite(m, name, row);
    std::memcpy(x.row(int64_t(i)), row.data.data(), size_t(D) * 4);
    // A page fault on a mapped file maps up to 64 KiB of cached neighbours with the page, so
    // lookups would leave most of a large table resident; each row is copied and the pages go
    // back. Not when the table is also the classifier, which every token reads whole.
    if (release) m.weights.release(name);
  }
  return x;
}

// RoPE inverse frequencies, with Llama-3's long-context rescaling when configured.
static std::vector<double> rope_inv_freq(const ModelConfig& c) {
  std::vector<double> f(size_t(c.head_dim / 2));
  for (size_t i = 0; i < f.size(); ++i) {
    f[i] = 1.0 / std::pow(double(c.rope_theta), 2.0 * double(i) / double(c.head_dim));
    if (c.rope_factor > 0) {
      double wavelen = 2 * M_PI / f[i];
      double low = c.rope_original_max / c.rope_low_freq, high = c.rope_original_max / c.rope_high_freq;
      if (wavelen > low) {
        f[i] /= c.rope_factor;
      } else if (wavelen >= high) {
        double smooth = (c.rope_original_max / wavelen - c.rope_low_freq) / (c.rope_high_freq - c.rope_low_freq);
        f[i] = (1 - smooth) * f[i] / c.rope_factor + smooth * f[i];
      }
    }
  }
  return f;
}

// The rotation angles' cosines and sines for positions past .. past + seq − 1 (seq x head_dim/2),
// kept in `t` while the positions stay the same (every layer of a pass rotates the same ones).
static void rope_table(const ModelConfig& c, int seq, int64_t past, RopeTable& t) {
  if (t.seq == seq && t.past == past) return;
  const int half = c.head_dim / 2;
  std::vector<double> inv = rope_inv_freq(c);
  t.cos.resize(size_t(seq) * half);
  t.sin.resize(t.cos.size());
  for (int p = 0; p < seq; ++p)
    for (int i = 0; i < half; ++i) {
      t.cos[size_t(p) * half + i] = float(std::cos(double(past + p) * inv[size_t(i)]));
      t.sin[size_t(p) * half + i] = float(std::sin(double(past + p) * inv[size_t(i)]));
    }
  t.seq = seq;
  t.past = past;
}

// Row r holds the token at table position r % seq.
static void apply_rope(const ModelConfig& c, Matrix& x, int heads, int seq, const RopeTable& t) {
  const int hd = c.head_dim, half = hd / 2;
#pragma omp parallel for schedule(static) if (int64_t(x.size()) > kParallelMinWork)
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* co = t.cos.data() + (r % seq) * half;
    const float* si = t.sin.data() + (r % seq) * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x.row(r) + int64_t(h) * hd;
      // Pair i is (v[step·i], v[step·i + apart]); each layout its own loop, vectorised (omp simd:
      // GCC -O2 leaves loops with a remainder scalar).
      auto rotate = [&](int64_t step, int64_t apart) {
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          float& a = v[step * i];
          float& b = v[step * i + apart];
          const float x0 = a, x1 = b;
          a = x0 * co[i] - x1 * si[i];
          b = x0 * si[i] + x1 * co[i];
        }
      };
      if (c.rope_interleaved)
        rotate(2, 1);
      else
        rotate(1, half);
    }
  }
}

static void add_bias(Matrix& x, const Matrix& b) {
  if (b.empty()) return;
  for (int64_t r = 0; r < x.rows; ++r) {
    float* row = x.row(r);
#pragma omp simd
    for (int64_t j = 0; j < x.cols; ++j) row[j] += b.data[size_t(j)];
  }
}

// Causal softmax attention for every (sequence, head); a GQA group's query heads share a KV head.
// (query block, sequence, head) items run in parallel (sgemm does not split inside a parallel
// region: per-head products are too small to split well). Queries go in blocks of kAttnBlock rows, each
// against only the keys it can see (up to its last row, from its first row's sliding-window start):
// the masked upper triangle is neither multiplied nor exponentiated, and the scores stay cache-sized.
// `out` is reshaped to [tokens, q_dim], reusing its storage; every element is overwritten.
// With `past` > 0 (one sequence, decoding with a KV cache) k and v hold past + seq rows and query
// row t is the token at position past + t.
static void attention(const ModelConfig& c, const Matrix& q, const Matrix& k, const Matrix& v,
                      int batch, int seq, int64_t past, Matrix& out) {
  constexpr int kAttnBlock = 64;
  const int hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const int64_t qd = c.q_dim(), kvd = c.kv_dim();
  const float scale = 1.f / std::sqrt(float(hd));
  out.reshape_for_overwrite(q.rows, qd);
#pragma omp parallel
  {
    std::vector<float> scores(size_t(std::min(seq, kAttnBlock)) * size_t(past + seq));
    // One work item per (query block, sequence, head), the last blocks (the most keys) first, so
    // that threads stay balanced when there are fewer heads than a multiple of the thread count.
    const int blocks = (seq + kAttnBlock - 1) / kAttnBlock, heads = batch * c.num_heads;
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < blocks * heads; ++item) {
      const int bh = item % heads, t0 = (blocks - 1 - item / heads) * kAttnBlock;
      const int b = bh / c.num_heads, h = bh % c.num_heads;
      const int64_t r0 = int64_t(b) * seq, k0 = int64_t(b) * (past + seq), kvh = h / group;
      const int nt = std::min(kAttnBlock, seq - t0);
      const int64_t p0 = past + t0;  // position of the block's first query
      const int64_t lo = c.sliding_window > 0 ? std::max<int64_t>(0, p0 - c.sliding_window + 1) : 0;
      const int64_t nk = p0 + nt - lo;  // keys [lo, p0 + nt)
      float* sc = scores.data();
      sgemm(false, true, nt, nk, hd, scale, q.row(r0 + t0) + h * hd, qd, k.row(k0 + lo) + kvh * hd, kvd,
            0.f, sc, nk);
      for (int i = 0; i < nt; ++i) {
        const int64_t t = p0 + i;
        float* s = sc + int64_t(i) * nk;
        const int64_t first = (c.sliding_window > 0 ? std::max<int64_t>(0, t - c.sliding_window + 1) : 0) - lo;
        std::fill(s, s + first, 0.f);
        softmax(s + first, t + 1 - lo - first);
        std::fill(s + (t + 1 - lo), s + nk, 0.f);
      }
      sgemm(false, false, nt, hd, nk, 1.f, sc, nk, v.row(k0 + lo) + kvh * hd, kvd, 0.f,
            out.row(r0 + t0) + h * hd, qd);
    }
  }
}

// Y = X Wᵀ for a linear reading `input`: through the packed form when the layer has one, else by
// the first hook that computes such products, else in f32.
static void project(const Hooks& hooks, Site input, const Matrix& x, const Matrix& w, const PackedPtr& packed,
                    Matrix& y) {
  if (packed) return packed->apply(x, y);
  for (Hook* h : hooks)
    if (h->linear(input, x, w, y)) return;
  linear(x, w, y);
}

struct Projection {
  const Matrix& w;
  const PackedPtr& packed;
  Matrix& y;
};

// project() for several linears of one input (q/k/v, gate/up): packed linears that read it the same
// way convert it once (the integer runtime quantizes the activations once).
static void project_all(const Hooks& hooks, Site input, const Matrix& x, std::initializer_list<Projection> ps) {
  std::unique_ptr<PackedInput> in;
  const PackedLinear* converted_by = nullptr;
  for (const Projection& p : ps) {
    if (!p.packed) {
      project(hooks, input, x, p.w, nullptr, p.y);
      continue;
    }
    if (!converted_by || !converted_by->shares_input(*p.packed)) {
      in = p.packed->prepare(x);
      converted_by = p.packed.get();
    }
    p.packed->apply(*in, p.y);
  }
}

static void add_into(Matrix& x, const Matrix& y) {
  float* a = x.data.data();
  const float* b = y.data.data();
  const int64_t n = int64_t(x.size());
#pragma omp simd  // GCC -O2 leaves loops with a remainder scalar
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

Routing route(const ModelConfig& c, const Matrix& router, const Matrix& h) {
  Routing r;
  r.k = c.experts_per_tok;
  const int E = int(router.rows), k = r.k;
  r.expert.resize(size_t(h.rows) * size_t(k));
  r.weight.resize(r.expert.size());
  // DeepSeek renormalises only when k > 1 and adds 1e-20; Mixtral divides by the plain sum.
  const bool mixtral = c.architecture == "MixtralForCausalLM";
  const bool norm = c.norm_topk_prob && (k > 1 || mixtral);
  const float eps = mixtral ? 0.f : 1e-20f;
  Matrix p = linear(h, router);
#pragma omp parallel for schedule(static) if (h.rows * E > kParallelMinWork)
  for (int64_t t = 0; t < h.rows; ++t) {
    float* s = p.row(t);
    softmax(s, E);
    std::vector<int> idx(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) idx[size_t(e)] = e;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    float sum = 0;
    for (int i = 0; i < k; ++i) sum += s[idx[size_t(i)]];
    const float denom = sum + eps;
    for (int i = 0; i < k; ++i) {
      const size_t j = size_t(t * k + i);
      r.expert[j] = idx[size_t(i)];
      r.weight[j] = norm ? s[idx[size_t(i)]] / denom : s[idx[size_t(i)]];
    }
  }
  return r;
}

// Every MLP is a set of SwiGLU experts (a dense one is a single always-on expert of weight 1):
// each reads its tokens' rows of h and adds its output, times the token's routing weight, to x.
static void mlp_forward(const ModelConfig& c, const LayerWeights& w, int layer, Matrix& x, Matrix& h,
                        const Hooks& hooks, Matrix& gate, Matrix& up) {
  const int routed = int(w.router.rows);
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(routed));
  std::vector<std::vector<float>> gains(static_cast<size_t>(routed));
  if (routed > 0) {
    const Routing r = route(c, w.router, h);
    for (size_t j = 0; j < r.expert.size(); ++j) {
      rows[size_t(r.expert[j])].push_back(int64_t(j) / r.k);
      gains[size_t(r.expert[j])].push_back(r.weight[j]);
    }
  }
  // Routed experts' outputs are summed in y before x (the reference's order); a dense MLP adds its
  // one output straight into x. gate/up are reused across experts.
  Matrix y;
  if (routed > 0) y = Matrix(x.rows, x.cols);
  Matrix& acc = routed > 0 ? y : x;
  for (int e = 0; e < int(w.experts.size()); ++e) {
    const bool always = e >= routed;
    if (!always && rows[size_t(e)].empty()) continue;
    Matrix gathered;
    if (!always) {
      const auto& rs = rows[size_t(e)];
      gathered = Matrix(int64_t(rs.size()), h.cols);
      for (size_t i = 0; i < rs.size(); ++i) std::copy_n(h.row(rs[i]), h.cols, gathered.row(int64_t(i)));
    }
    Matrix& in = always ? h : gathered;
    run_expert_hooks(hooks, Site::ExpertIn, layer, e, in);
    const ExpertWeights& ew = w.experts[size_t(e)];
    project_all(hooks, Site::ExpertIn, in, {{ew.gate, ew.gate_packed, gate}, {ew.up, ew.up_packed, up}});
    swiglu(gate, up);
    run_expert_hooks(hooks, Site::DownIn, layer, e, gate);
    Matrix& out = up;  // up is spent once swiglu has read it: the down_proj output takes its storage
    project(hooks, Site::DownIn, gate, ew.down, ew.down_packed, out);
    if (always) {
      add_into(acc, out);
      continue;
    }
    const auto& rs = rows[size_t(e)];
    const auto& gs = gains[size_t(e)];
#pragma omp parallel for schedule(static) if (out.size() > size_t(kParallelMinWork))
    for (int64_t i = 0; i < int64_t(rs.size()); ++i) {
      float* dst = y.row(rs[size_t(i)]);
      const float* src = out.row(i);
      for (int64_t j = 0; j < y.cols; ++j) dst[j] += gs[size_t(i)] * src[j];
    }
  }
  if (routed > 0) add_into(x, y);
}

size_t KvCache::bytes() const {
  size_t n = 0;
  for (const std::vector<KvRows>* side : {&k, &v})
    for (const KvRows& r : *side) n += r.f32.size() * sizeof(float) + r.codes.size();
  return n;
}

void KvCache::reserve(const ModelConfig& c, int64_t tokens) {
  k.resize(size_t(c.num_layers));
  v.resize(size_t(c.num_layers));
  const int64_t kvd = c.kv_dim();
  for (std::vector<KvRows>* side : {&k, &v})
    for (KvRows& r : *side) {
      if (quantizer)
        r.codes.reserve(size_t(tokens * quantizer->row_bytes(kvd)));
      else
        r.f32.data.reserve(size_t(tokens * kvd));
    }
}

// Runs the K (or V) hooks on x. With a quantizing cache, the quantizer's turn encodes the rows into
// the cache (leaving in x what its at() would have); an f32 cache takes the rows after every hook.
static void kv_hooks(const Hooks& hooks, Site site, int layer, Matrix& x, KvCache* cache) {
  const KvQuantizer* q = cache ? cache->quantizer : nullptr;
  bool encoded = false;
  for (Hook* h : hooks) {
    if (q && h == static_cast<const Hook*>(q)) {
      KvRows& rows = (site == Site::K ? cache->k : cache->v)[size_t(layer)];
      q->encode(x, rows.codes);
      encoded = true;
    } else {
      h->at(site, layer, x);
    }
  }
  if (q && !encoded) throw Error("layer_forward: the KV cache's quantizer is not among the hooks");
  if (!cache) return;
  KvRows& rows = (site == Site::K ? cache->k : cache->v)[size_t(layer)];
  if (!q) {
    rows.f32.cols = x.cols;
    rows.f32.data.insert(rows.f32.data.end(), x.data.begin(), x.data.end());
    rows.f32.rows += x.rows;
  }
  rows.tokens += x.rows;
}

// The cached rows as attention reads them: the f32 rows themselves, or the codes decoded into
// `scratch`.
static const Matrix& cached_rows(const KvCache& cache, const KvRows& rows, int64_t cols, Matrix& scratch) {
  if (!cache.quantizer) return rows.f32;
  scratch.reshape_for_overwrite(rows.tokens, cols);
  cache.quantizer->decode(rows.codes.data(), rows.tokens, cols, scratch.data.data());
  return scratch;
}

void layer_forward(const ModelConfig& c, const LayerWeights& w, int layer, Matrix& x, int batch,
                   int seq, const Hooks& hooks, KvCache* cache, LayerBuffers* buffers) {
  if (cache && batch != 1) throw Error("layer_forward: a KV cache holds one sequence");
  if (cache && int(cache->k.size()) < c.num_layers) {
    cache->k.resize(size_t(c.num_layers));
    cache->v.resize(size_t(c.num_layers));
  }
  const int64_t past = cache ? cache->k[size_t(layer)].tokens : 0;
  LayerBuffers own;
  LayerBuffers& b = buffers ? *buffers : own;
  Matrix &h = b.h, &q = b.q, &k = b.k, &v = b.v;
  rmsnorm(x, w.attn_norm.data.data(), c.rms_eps, h);
  run_hooks(hooks, Site::AttnIn, layer, h);
  project_all(hooks, Site::AttnIn, h, {{w.q, w.q_packed, q}, {w.k, w.k_packed, k}, {w.v, w.v_packed, v}});
  add_bias(q, w.q_bias);
  add_bias(k, w.k_bias);
  add_bias(v, w.v_bias);
  rope_table(c, seq, past, b.rope);
  apply_rope(c, q, c.num_heads, seq, b.rope);
  apply_rope(c, k, c.num_kv_heads, seq, b.rope);
  run_hooks(hooks, Site::Q, layer, q);
  kv_hooks(hooks, Site::K, layer, k, cache);
  kv_hooks(hooks, Site::V, layer, v, cache);
  Matrix& att = h;  // h is spent once q, k, v exist: the attention output takes its storage
  if (cache) {
    // k and v are spent too: they take the decoded rows of a quantized cache.
    const Matrix& ck = cached_rows(*cache, cache->k[size_t(layer)], c.kv_dim(), k);
    const Matrix& cv = cached_rows(*cache, cache->v[size_t(layer)], c.kv_dim(), v);
    attention(c, q, ck, cv, 1, seq, past, att);
  } else {
    attention(c, q, k, v, batch, seq, 0, att);
  }
  // v is spent and goes back before the MLP, whose intermediate rows are the pass's widest (kept, it
  // would add to the peak; refilling the narrow v per layer costs no measurable time).
  v = Matrix();
  run_hooks(hooks, Site::OprojIn, layer, att);
  project(hooks, Site::OprojIn, att, w.o, w.o_packed, q);  // so does q's for the o_proj output
  add_into(x, q);

  rmsnorm(x, w.mlp_norm.data.data(), c.rms_eps, h);
  run_hooks(hooks, Site::MlpIn, layer, h);
  // The MLP's intermediate rows take the storage of q and k (both spent).
  mlp_forward(c, w, layer, x, h, hooks, q, k);
}

void final_norm(const Model& m, Matrix& x, const Hooks& hooks) {
  Matrix gain = m.weights.get("model.norm.weight");
  m.weights.release("model.norm.weight");  // with its fault-around neighbours (the last layer's)
  check_finite(m, "model.norm.weight", gain);
  rmsnorm(x, gain.data.data(), m.config.rms_eps);
  run_hooks(hooks, Site::FinalNorm, -1, x);
}

Matrix forward(const Model& m, const std::vector<int32_t>& tokens, int batch, int seq,
               const Hooks& hooks, KvCache* cache) {
  if (tokens.size() != size_t(batch) * size_t(seq)) throw Error("forward: token count != batch * seq");
  Matrix x = embed(m, tokens);
  LayerBuffers buffers;
  for (int l = 0; l < m.config.num_layers; ++l) {
    LayerWeights w = load_layer(m, l);
    layer_forward(m.config, w, l, x, batch, seq, hooks, cache, &buffers);
    release_layer(m, l);
  }
  final_norm(m, x, hooks);
  return x;
}

Matrix prefill(const Model& m, const std::vector<int32_t>& tokens, const Hooks& hooks, KvCache& cache, int chunk) {
  if (tokens.empty()) throw Error("prefill: no tokens");
  if (chunk < 0) throw Error("prefill: a chunk of " + std::to_string(chunk) + " tokens");
  if (chunk == 0) chunk = m.weights.has_packed() ? kPrefillChunk : int(tokens.size());
  for (size_t t0 = 0;; t0 += size_t(chunk)) {
    const size_t n = std::min(tokens.size() - t0, size_t(chunk));
    // Only the last chunk's output is kept: an earlier one is dropped before the next pass runs.
    Matrix x = forward(m, std::vector<int32_t>(tokens.begin() + int64_t(t0), tokens.begin() + int64_t(t0 + n)),
                       1, int(n), hooks, &cache);
    if (t0 + n == tokens.size()) return x;
  }
}

// The classifier is read where it is stored and never copied whole (an f32 copy of a 128k x 2048
// head is 1 GB): one row (decoding) is a GEMV over the stored dtype in place, so a 16-bit head stays
// resident at 16 bits; several rows go through f32 chunks of it and sgemm.
static Matrix logits(const Model& m, const Matrix& x, int64_t row0, int64_t n) {
  const std::string name = lm_head_name(m);
  const Weights::View head = m.weights.view(name);
  if (head.cols != x.cols) throw Error(m.source + ": tensor '" + name + "' does not match the hidden size");
  Matrix out(n, head.rows);
  if (n == 1) {
    gemv(head.dtype, head.data, head.rows, head.cols, x.row(row0), out.data.data());
    return out;
  }
  constexpr int64_t kVocabChunk = 8192;
  for (int64_t v0 = 0; v0 < head.rows; v0 += kVocabChunk) {
    const int64_t nv = std::min(kVocabChunk, head.rows - v0);
    const Matrix w = m.weights.get_rows(name, v0, nv);
    sgemm(false, true, n, nv, x.cols, 1.f, x.row(row0), x.cols, w.data.data(), w.cols, 0.f, out.data.data() + v0,
          head.rows);
  }
  return out;
}

Matrix log_probs(const Model& m, const Matrix& x, int64_t row0, int64_t n) {
  Matrix out = logits(m, x, row0, n);
#pragma omp parallel for schedule(static) if (n * out.cols > kParallelMinWork)
  for (int64_t r = 0; r < n; ++r) {
    float* z = out.row(r);
    float mx = z[0];
    for (int64_t j = 1; j < out.cols; ++j) mx = std::max(mx, z[j]);
    double s = 0;
    for (int64_t j = 0; j < out.cols; ++j) s += std::exp(double(z[j] - mx));
    float lse = mx + float(std::log(s));
    for (int64_t j = 0; j < out.cols; ++j) z[j] -= lse;
  }
  return out;
}

int32_t most_likely(const Matrix& lp) {
  int32_t best = 0;
  for (int64_t j = 1; j < lp.cols; ++j)
    if (lp(0, j) > lp(0, best)) best = int32_t(j);
  return best;
}

int32_t greedy_next(const Model& m, const Matrix& x) {
  return most_likely(log_probs(m, x, x.rows - 1, 1));
}

std::vector<double> next_token_nll(const Model& m, const std::vector<int32_t>& tokens, int batch,
                                   int seq, const Hooks& hooks) {
  Matrix x = forward(m, tokens, batch, seq, hooks);
  const std::string head_name = lm_head_name(m);
  const int64_t V = m.config.vocab_size, D = x.cols, n = int64_t(batch) * (seq - 1);
  // The classifier is converted in vocabulary chunks (an f32 copy of a 128k x 2048 head is 1 GB), and
  // each row's log-sum-exp accumulates across chunks: running max and sum of exp relative to it.
  constexpr int64_t kVocabChunk = 8192, kRowChunk = 256;
  std::vector<double> mx(size_t(n), -INFINITY), sum(size_t(n), 0.0), target(size_t(n), 0.0);
  Matrix logits(kRowChunk, kVocabChunk);
  for (int64_t v0 = 0; v0 < V; v0 += kVocabChunk) {
    const int64_t nv = std::min(kVocabChunk, V - v0);
    const Matrix w = m.weights.get_rows(head_name, v0, nv);
    check_finite(m, head_name, w);
    for (int b = 0; b < batch; ++b) {
      for (int64_t t0 = 0; t0 < seq - 1; t0 += kRowChunk) {
        const int64_t nt = std::min<int64_t>(kRowChunk, seq - 1 - t0), x0 = int64_t(b) * seq + t0;
        sgemm(false, true, nt, nv, D, 1.f, x.row(x0), D, w.data.data(), D, 0.f, logits.data.data(), nv);
#pragma omp parallel for schedule(static) if (nt * nv > kParallelMinWork)
        for (int64_t i = 0; i < nt; ++i) {
          const float* z = logits.data.data() + i * nv;
          const size_t k = size_t(int64_t(b) * (seq - 1) + t0 + i);
          const double cmx = *std::max_element(z, z + nv);
          if (cmx > mx[k]) {
            sum[k] *= std::exp(mx[k] - cmx);
            mx[k] = cmx;
          }
          double s = 0;
          for (int64_t j = 0; j < nv; ++j) s += std::exp(double(z[j]) - mx[k]);
          sum[k] += s;
          const int64_t tok = tokens[size_t(x0 + i + 1)];
          if (tok >= v0 && tok < v0 + nv) target[k] = z[tok - v0];
        }
      }
    }
  }
  m.weights.release(head_name);
  std::vector<double> nll(static_cast<size_t>(n));
  for (size_t k = 0; k < nll.size(); ++k) nll[k] = mx[k] + std::log(sum[k]) - target[k];
  return nll;
}

}  // namespace dq
