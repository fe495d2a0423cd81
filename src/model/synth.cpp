#include "model/synth.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "io/file.h"
#include "io/half.h"
#include "io/report.h"
#include "model/config.h"
#include "model/save.h"
#include "model/weights.h"
#include "tensor/kernels.h"

namespace dq {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t key_of(uint64_t seed, const std::string& name) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a of the name, then mixed with the seed
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001B3ull;
  return mix64(h ^ mix64(seed + 0x9E3779B97F4A7C15ull));
}

// Counter-based: the i-th value of a stream depends only on (key, i), so a tensor can be generated
// in any chunking and on any number of threads and still come out bit-identical.
double uniform(uint64_t key, uint64_t i) {
  return (double(mix64(key + (i + 1) * 0x9E3779B97F4A7C15ull) >> 11) + 0.5) * 0x1.0p-53;
}

// Standard normals by Box-Muller: values 2p and 2p+1 of a stream come from one pair of uniforms.
void normals(uint64_t key, uint64_t first, int64_t n, float* out) {
  for (int64_t j = 0; j < n;) {
    const uint64_t i = first + uint64_t(j), p = i / 2;
    const double r = std::sqrt(-2.0 * std::log(uniform(key, 2 * p))), a = 2 * M_PI * uniform(key, 2 * p + 1);
    if (i % 2 == 0) out[j++] = float(r * std::cos(a));
    if (j < n) out[j++] = float(r * std::sin(a));
  }
}

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::function<void(int64_t row, float* out)> fill;  // one row of cols values
  int64_t rows() const { return shape.size() == 1 ? 1 : shape[0]; }
  int64_t cols() const { return shape.back(); }
};

// A normal(0, std) matrix (or vector), plus `add` (row, values) applied after.
TensorSpec gaussian(uint64_t seed, const std::string& name, std::vector<int64_t> shape, float mean,
                    float std, std::function<void(int64_t, float*)> add = nullptr) {
  const uint64_t key = key_of(seed, name);
  const int64_t cols = shape.back();
  return {name, std::move(shape), [=](int64_t row, float* out) {
            normals(key, uint64_t(row * cols), cols, out);
            for (int64_t j = 0; j < cols; ++j) out[j] = mean + std * out[j];
            if (add) add(row, out);
          }};
}

void store(DType dtype, const float* in, size_t n, uint8_t* out) {
  if (dtype == DType::F32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  encode_16bit(dtype, in, n, reinterpret_cast<uint16_t*>(out));
}

// The safetensors layout write_safetensors produces, but each tensor is generated in row chunks
// while it is written, so memory stays a few MB however large the model.
void write_streamed(const std::string& path, const std::vector<TensorSpec>& specs, DType dtype) {
  std::vector<TensorLayout> layout;
  for (const auto& t : specs)
    layout.push_back({t.name, dtype, t.shape, size_t(t.rows() * t.cols()) * dtype_size(dtype)});
  const std::string prefix = safetensors_prefix(layout, {{"format", "pt"}});
  check_free_space(path, safetensors_size(prefix, layout));
  write_file_atomic(path, [&](OutStream& out) {
    out.write(prefix);
    std::vector<float> f32;
    std::vector<uint8_t> bytes;
    for (const auto& t : specs) {
      const int64_t rows = t.rows(), cols = t.cols(), chunk = std::max<int64_t>(1, (1 << 20) / cols);
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t nr = std::min(chunk, rows - r0);
        f32.resize(size_t(nr * cols));
        bytes.resize(f32.size() * dtype_size(dtype));
#pragma omp parallel for schedule(static) if (nr * cols > kParallelMinWork)
        for (int64_t r = 0; r < nr; ++r) t.fill(r0 + r, f32.data() + r * cols);
        try {  // outside the parallel loop: an exception must not cross an OpenMP region
          store(dtype, f32.data(), f32.size(), bytes.data());
        } catch (const Error& e) {
          throw Error(path + ": tensor '" + t.name + "': " + e.what());
        }
        out.write(bytes.data(), bytes.size());
      }
    }
  });
}

}  // namespace

std::vector<int> synth_outlier_channels(uint64_t seed, int outliers, int hidden_size) {
  // A seeded partial Fisher-Yates shuffle picks distinct channels.
  std::vector<int> all(static_cast<size_t>(hidden_size));
  for (int i = 0; i < hidden_size; ++i) all[size_t(i)] = i;
  const uint64_t key = key_of(seed, "massive_activation_channels");
  const int k = std::min(outliers, hidden_size);
  for (int i = 0; i < k; ++i) {
    int j = i + int(uniform(key, uint64_t(i)) * (hidden_size - i));
    std::swap(all[size_t(i)], all[size_t(j)]);
  }
  std::vector<int> out(all.begin(), all.begin() + k);
  std::sort(out.begin(), out.end());
  return out;
}

void synth_model(const std::string& config_path, const std::string& out_dir, const SynthOptions& o) {
  if (o.dtype != DType::F32 && o.dtype != DType::F16 && o.dtype != DType::BF16)
    throw Error(out_dir + ": synth writes f32, f16 or bf16 only");
  json j = read_json(config_path);
  if (o.layers > 0 && j.is_object()) j["num_hidden_layers"] = o.layers;
  const ModelConfig c = parse_config(j, config_path);
  if (o.outliers < 0 || o.outliers > c.hidden_size)
    throw Error(config_path + ": --outliers must be between 0 and hidden_size (" + std::to_string(c.hidden_size) + ")");
  j["torch_dtype"] = o.dtype == DType::BF16 ? "bfloat16" : o.dtype == DType::F16 ? "float16" : "float32";

  const int64_t D = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), V = c.vocab_size;
  const double init = j.contains("initializer_range") && j["initializer_range"].is_number()
                          ? j["initializer_range"].get<double>()
                          : 0.02;
  if (!(init > 0 && init <= 1e3)) throw Error(config_path + ": 'initializer_range' must be a number in (0, 1000]");
  const float emb_std = float(init);
  const float branch = 1.f / std::sqrt(2.f * float(c.num_layers));  // o_proj / down_proj extra scale
  const uint64_t seed = o.seed;
  const std::vector<int> massive = synth_outlier_channels(seed, o.outliers, c.hidden_size);
  std::vector<float> massive_sign;
  for (size_t i = 0; i < massive.size(); ++i)
    massive_sign.push_back(uniform(key_of(seed, "massive_activation_signs"), i) < 0.5 ? -1.f : 1.f);

  std::vector<TensorSpec> specs;
  auto lin = [&](const std::string& name, int64_t out, int64_t in, float scale = 1.f) {
    specs.push_back(gaussian(seed, name, {out, in}, 0.f, scale / std::sqrt(float(in))));
  };
  auto gain = [&](const std::string& name, std::function<void(int64_t, float*)> add = nullptr) {
    specs.push_back(gaussian(seed, name, {D}, 1.f, 0.05f, std::move(add)));
  };
  // Every token carries the massive channels, so every norm output (q/k/v and gate/up inputs) does.
  specs.push_back(gaussian(seed, "model.embed_tokens.weight", {V, D}, 0.f, emb_std, [=](int64_t, float* row) {
    for (size_t i = 0; i < massive.size(); ++i) row[massive[i]] += massive_sign[i] * kSynthOutlierMagnitude;
  }));
  // Trained models damp the massive channels in the final norm: they carry no token information.
  gain("model.norm.weight", [=](int64_t, float* row) {
    for (int ch : massive) row[ch] *= 0.05f;
  });
  if (!c.tie_embeddings) lin("lm_head.weight", V, D);
  for (int l = 0; l < c.num_layers; ++l) {
    gain(layer_name(l, "input_layernorm.weight"));
    gain(layer_name(l, "post_attention_layernorm.weight"));
    lin(layer_name(l, "self_attn.q_proj.weight"), Q, D);
    lin(layer_name(l, "self_attn.k_proj.weight"), KV, D);
    lin(layer_name(l, "self_attn.v_proj.weight"), KV, D);
    lin(layer_name(l, "self_attn.o_proj.weight"), D, Q, branch);
    if (c.is_moe_layer(l)) lin(router_name(c, l), c.num_experts, D);
    for (const ExpertSpec& e : mlp_experts(c, l)) {
      lin(e.gate, e.intermediate, D);
      lin(e.up, e.intermediate, D);
      lin(e.down, D, e.intermediate, branch);
    }
    if (c.qkv_bias)
      for (auto [p, n] : {std::pair{"q", Q}, {"k", KV}, {"v", KV}})
        specs.push_back(gaussian(seed, layer_name(l, std::string("self_attn.") + p + "_proj.bias"), {n}, 0.f, 0.1f));
  }
  std::sort(specs.begin(), specs.end(), [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });

  AtomicDir out(out_dir);
  write_file_atomic(out.file("config.json"), [&](OutStream& s) { s.write(j.dump(2) + "\n"); });
  write_streamed(out.file("model.safetensors"), specs, o.dtype);
  fs::path tok = fs::path(config_path).parent_path() / "tokenizer.json";
  if (fs::exists(tok)) copy_tokenizer(tok.string(), [&](const std::string& n) { return out.file(n); });
  out.commit();
}

}  // namespace dq
