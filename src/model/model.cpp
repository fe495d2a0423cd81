#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "io/file.h"
#include "io/gguf.h"
#include "io/report.h"
#include "io/llama2c.h"

namespace dq {
namespace fs = std::filesystem;
using json = nlohmann::json;

static std::string find_tokenizer_beside(const fs::path& dir) {
  for (const char* name : {"tokenizer.json", "tokenizer.bin"})
    if (fs::exists(dir / name)) return (dir / name).string();
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("tok", 0) == 0 && e.path().extension() == ".bin") return e.path().string();
  }
  return "";
}

static Model load_llama2c_model(const std::string& path) {
  Llama2cCheckpoint ck = read_llama2c(path);
  Model m;
  ModelConfig& c = m.config;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = ck.vocab_size;
  c.hidden_size = ck.dim;
  c.intermediate_size = ck.hidden_dim;
  c.num_layers = ck.n_layers;
  c.num_heads = ck.n_heads;
  c.num_kv_heads = ck.n_kv_heads;
  c.head_dim = ck.dim / ck.n_heads;
  c.max_seq = ck.seq_len;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.f;
  c.tie_embeddings = ck.shared_classifier;
  c.rope_interleaved = true;
  c.extra = c.to_json();
  for (auto& [name, t] : ck.tensors) m.weights.set(name, std::move(t));
  return m;
}

static Model load_hf_model(const fs::path& dir) {
  Model m;
  m.config = load_config((dir / "config.json").string());
  fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  if (fs::exists(single)) {
    m.weights.add_file(std::make_shared<SafetensorsFile>(single.string()));
  } else if (fs::exists(index)) {
    const json j = read_json(index.string());
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error(index.string() + ": missing 'weight_map'");
    std::map<std::string, std::string> shard_of;  // tensor -> shard file, as the index says
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw Error(index.string() + ": weight_map entry '" + name + "' is not a file name");
      std::string f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw Error(index.string() + ": shard name '" + f + "' leaves the model directory");
      shard_of[name] = f;
    }
    std::set<std::string> shards;
    for (const auto& [name, f] : shard_of) shards.insert(f);
    for (const std::string& f : shards) {
      auto shard = std::make_shared<SafetensorsFile>((dir / f).string());
      for (const auto& [name, info] : shard->tensors()) {
        auto it = shard_of.find(name);
        if (it == shard_of.end() || it->second != f)
          throw Error(shard->file().path() + ": tensor '" + name + "' is not where " + index.string() +
                      " says (" + (it == shard_of.end() ? std::string("not listed") : it->second) + ")");
      }
      m.weights.add_file(shard);
    }
    for (const auto& [name, f] : shard_of)
      if (!m.weights.has(name)) throw Error((dir / f).string() + ": missing tensor '" + name + "' (listed in " +
                                            index.string() + ")");
  } else {
    throw Error(dir.string() + ": no model.safetensors or model.safetensors.index.json");
  }
  const json& extra = m.config.extra;
  if (extra.contains("dartquant_quantization")) m.quantization = extra["dartquant_quantization"];
  return m;
}

Model load_model(const std::string& path, const std::string& tokenizer_path, bool with_tokenizer) {
  fs::path p(path);
  std::error_code ec;  // the throwing overload's text ("filesystem error: status: ...") is not ours
  if (!fs::exists(p, ec)) throw Error(path + ": " + (ec ? ec.message() : "no such file or directory"));
  Model m;
  std::string tok = tokenizer_path;
  if (fs::is_directory(p)) {
    m = load_hf_model(p);
    if (tok.empty()) tok = find_tokenizer_beside(p);
  } else if (has_gguf_magic(path)) {  // by content: the extension may be .GGUF, or none
    m = load_gguf_model(path);
  } else {
    m = load_llama2c_model(path);
    if (tok.empty()) tok = find_tokenizer_beside(p.has_parent_path() ? p.parent_path() : fs::path("."));
  }
  m.source = path;
  if (!with_tokenizer) {
    m.tokenizer.reset();  // a GGUF file's own
    tok.clear();
  }
  if (!tok.empty() && (!m.tokenizer || !tokenizer_path.empty())) {  // an explicit --tokenizer wins
    m.tokenizer = load_tokenizer(tok);
    m.tokenizer_path = tok;
    if (m.tokenizer->vocab_size() > size_t(m.config.vocab_size))
      throw Error(tok + ": tokenizer has " + std::to_string(m.tokenizer->vocab_size()) +
                  " tokens, more than the model's vocab_size " + std::to_string(m.config.vocab_size));
  }
  validate_weights(m);
  return m;
}

std::string lm_head_name(const Model& m) {
  return m.weights.has("lm_head.weight") ? "lm_head.weight" : "model.embed_tokens.weight";
}

void validate_weights(const Model& m) {
  const ModelConfig& c = m.config;
  std::set<std::string> used;
  auto expect = [&](const std::string& name, std::vector<int64_t> shape) {
    if (!m.weights.has(name)) throw Error(m.source + ": missing weight '" + name + "'");
    used.insert(name);
    std::vector<int64_t> got = m.weights.shape(name);
    if (got != shape) {
      std::string g, e;
      for (auto d : got) g += (g.empty() ? "" : "x") + std::to_string(d);
      for (auto d : shape) e += (e.empty() ? "" : "x") + std::to_string(d);
      throw Error(m.source + ": tensor '" + name + "' has shape " + g + ", expected " + e);
    }
  };
  const int64_t D = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), V = c.vocab_size;
  expect("model.embed_tokens.weight", {V, D});
  expect("model.norm.weight", {D});
  if (!c.tie_embeddings || m.weights.has("lm_head.weight")) expect("lm_head.weight", {V, D});
  for (int l = 0; l < c.num_layers; ++l) {
    expect(layer_name(l, "input_layernorm.weight"), {D});
    expect(layer_name(l, "post_attention_layernorm.weight"), {D});
    expect(layer_name(l, "self_attn.q_proj.weight"), {Q, D});
    expect(layer_name(l, "self_attn.k_proj.weight"), {KV, D});
    expect(layer_name(l, "self_attn.v_proj.weight"), {KV, D});
    expect(layer_name(l, "self_attn.o_proj.weight"), {D, Q});
    for (const ExpertSpec& e : mlp_experts(c, l)) {
      expect(e.gate, {e.intermediate, D});
      expect(e.up, {e.intermediate, D});
      expect(e.down, {D, e.intermediate});
    }
    if (c.is_moe_layer(l)) expect(router_name(c, l), {c.num_experts, D});
    if (c.qkv_bias) {
      expect(layer_name(l, "self_attn.q_proj.bias"), {Q});
      expect(layer_name(l, "self_attn.k_proj.bias"), {KV});
      expect(layer_name(l, "self_attn.v_proj.bias"), {KV});
    }
  }
  // tie_word_embeddings makes HF use the embedding as the classifier, whatever lm_head.weight holds;
  // the forward pass here uses lm_head.weight when present, so the two must agree.
  if (c.tie_embeddings && m.weights.has("lm_head.weight"))
    for (int64_t r0 = 0; r0 < V; r0 += 1024) {
      const int64_t n = std::min<int64_t>(1024, V - r0);
      if (m.weights.get_rows("lm_head.weight", r0, n).data != m.weights.get_rows("model.embed_tokens.weight", r0, n).data)
        throw Error(m.source + ": tie_word_embeddings is true but lm_head.weight differs from the embedding "
                    "(HF would use the embedding)");
    }
  // A tensor the config does not use (a bias, a layer beyond num_hidden_layers) would be dropped
  // silently and the model would compute something other than what its files say.
  for (const std::string& name : m.weights.names())
    if (!used.count(name) && !name.ends_with(".self_attn.rotary_emb.inv_freq"))  // a cache HF ignores too
      throw Error(m.source + ": tensor '" + name + "' is not used by the model its config describes (" +
                  std::to_string(c.num_layers) + " layers" + (c.qkv_bias ? "" : ", no biases") + ")");
}

void rope_to_halves(Model& m) {
  ModelConfig& c = m.config;
  if (!c.rope_interleaved) return;
  const int hd = c.head_dim;
  // Row 2j of a head becomes row j, row 2j+1 becomes row j + hd/2.
  auto permute = [&](const std::string& name, int heads) {
    if (!m.weights.has(name)) return;
    Matrix w = m.weights.get(name);
    const bool bias = w.rows == 1;  // a bias (1 x n) is permuted as a column
    if (bias) w = w.transposed();
    if (w.rows != int64_t(heads) * hd)  // a file's shapes are not trusted before validate_weights
      throw Error(m.source + ": tensor '" + name + "' has " + std::to_string(w.rows) + " rows, expected " +
                  std::to_string(int64_t(heads) * hd));
    Matrix out(w.rows, w.cols);
    for (int h = 0; h < heads; ++h)
      for (int j = 0; j < hd / 2; ++j)
        for (int odd = 0; odd < 2; ++odd)
          std::copy_n(w.row(h * hd + 2 * j + odd), w.cols, out.row(h * hd + j + odd * hd / 2));
    if (bias) out = out.transposed();
    m.weights.set(name, std::move(out));
  };
  for (int l = 0; l < c.num_layers; ++l) {
    permute(layer_name(l, "self_attn.q_proj.weight"), c.num_heads);
    permute(layer_name(l, "self_attn.k_proj.weight"), c.num_kv_heads);
    permute(layer_name(l, "self_attn.q_proj.bias"), c.num_heads);
    permute(layer_name(l, "self_attn.k_proj.bias"), c.num_kv_heads);
  }
  c.rope_interleaved = false;
  c.extra = c.to_json();
}

}  // namespace dq
