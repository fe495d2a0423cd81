// Loading a llama.cpp "llama" or "qwen2" GGUF (what export_gguf writes): config from the ARCH.*
// keys, weights decoded to f32 under their HF names with q/k rows back in HF order (Mixtral's
// stacked experts split), and a tokenizer rebuilt from the metadata when it can be done exactly.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "io/gguf.h"
#include "io/printable.h"
#include "model/export.h"
#include "model/model.h"

namespace dq {
namespace fs = std::filesystem;

namespace {

// A tokenizer loader takes a path, so metadata is written to a private temporary file first.
class TempFile {
 public:
  TempFile(const std::string& suffix, const std::string& bytes) {
    static std::atomic<int> counter{0};
    path_ = (fs::temp_directory_path() /
             ("dq_gguf_tok_" + std::to_string(getpid()) + "_" + std::to_string(counter++) + suffix)).string();
    std::ofstream f(path_, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    if (!f) throw Error(path_ + ": cannot write temporary tokenizer file");
  }
  ~TempFile() {
    std::error_code ec;
    fs::remove(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

template <class T>
void append(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// A "llama" vocabulary laid out as llama2.c's (unk 0, bos 1, eos 2, byte tokens 3..258, scores)
// is exactly a llama2.c tokenizer.bin: rebuild that file, with llama.cpp's U+2581 back to spaces.
// Throws Error saying what keeps any other vocabulary from being rebuilt exactly.
std::unique_ptr<Tokenizer> llama2c_from_metadata(const GgufFile& g) {
  const std::string model = g.get_string("tokenizer.ggml.model");
  if (model != "llama") throw Error("tokenizer.ggml.model '" + printable(model) + "' is not supported (only 'llama')");
  if (!g.has("tokenizer.ggml.scores")) throw Error("no tokenizer.ggml.scores");
  std::vector<std::string> tokens = g.get_strings("tokenizer.ggml.tokens");
  std::vector<float> scores = g.get_f32s("tokenizer.ggml.scores");
  std::vector<int32_t> types = g.has("tokenizer.ggml.token_type") ? g.get_i32s("tokenizer.ggml.token_type")
                                                                   : std::vector<int32_t>(tokens.size(), 1);
  if (scores.size() != tokens.size() || types.size() != tokens.size())
    throw Error("tokenizer.ggml.tokens, scores and token_type differ in length");
  if (tokens.size() < 259) throw Error("fewer than 259 tokens (unk, bos, eos and 256 byte tokens)");
  auto id = [&](const char* key) { return g.has(key) ? g.get_i64(key) : -1; };
  if (id("tokenizer.ggml.unknown_token_id") != 0 || id("tokenizer.ggml.bos_token_id") != 1 ||
      id("tokenizer.ggml.eos_token_id") != 2)
    throw Error("unknown/bos/eos token ids are not 0/1/2");
  for (size_t i = 3; i < 259; ++i)
    if (types[i] != 6) throw Error("token " + std::to_string(i) + " is not a byte token (ids 3..258 must be)");
  size_t n = tokens.size();
  while (n > 259 && types[n - 1] == 5) --n;  // padding added for a larger embedding
  std::string body;
  int32_t max_len = 1;
  const std::string space_mark = "\xE2\x96\x81";
  for (size_t i = 0; i < n; ++i) {
    std::string piece = tokens[i];
    if (i == 1 && piece == "<s>") piece = "\n<s>\n";  // llama2.c's spelling of its control pieces
    if (i == 2 && piece == "</s>") piece = "\n</s>\n";
    if (types[i] == 1)
      for (size_t p = 0; (p = piece.find(space_mark, p)) != std::string::npos;) piece.replace(p, space_mark.size(), " ");
    max_len = std::max(max_len, int32_t(piece.size()));
    append(body, scores[i]);
    append(body, int32_t(piece.size()));
    body += piece;
  }
  std::string file;
  append(file, max_len);
  TempFile tmp(".bin", file + body);
  return load_llama2c_tokenizer(tmp.path());
}

// Stands for a tokenizer the metadata holds but that cannot be rebuilt: every use says why, so the
// user is told what is wrong with it (not "no tokenizer"), and an explicit --tokenizer replaces it.
class UnusableTokenizer : public Tokenizer {
 public:
  explicit UnusableTokenizer(std::string why) : why_(std::move(why)) {}
  std::vector<int32_t> encode(std::string_view, bool) const override { throw Error(why_); }
  std::string decode(const std::vector<int32_t>&) const override { throw Error(why_); }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  size_t vocab_size() const override { return 0; }
  VocabInfo vocab_info() const override { throw Error(why_); }

 private:
  std::string why_;
};

std::unique_ptr<Tokenizer> tokenizer_from_metadata(const GgufFile& g) {
  const bool hf = g.has("tokenizer.huggingface.json");
  if (!hf && !g.has("tokenizer.ggml.model") && !g.has("tokenizer.ggml.tokens")) return nullptr;
  try {
    if (!hf) return llama2c_from_metadata(g);
    TempFile tmp(".json", g.get_string("tokenizer.huggingface.json"));
    try {
      return load_hf_tokenizer(tmp.path());
    } catch (const Error& e) {  // names the temporary file: say which key instead
      std::string what = e.what();
      if (what.rfind(tmp.path(), 0) == 0) what = "tokenizer.huggingface.json" + what.substr(tmp.path().size());
      throw Error(what);
    }
  } catch (const Error& e) {
    return std::make_unique<UnusableTokenizer>(g.path() + ": the tokenizer in its metadata cannot be used (" +
                                               e.what() + "); pass --tokenizer");
  }
}

}  // namespace

Model load_gguf_model(const std::string& path) {
  GgufFile g(path);
  const std::string arch = g.get_string("general.architecture");
  if (arch != "llama" && arch != "qwen2")
    throw Error(path + ": GGUF architecture '" + arch + "' is not supported (only 'llama' and 'qwen2')");
  const bool qwen2 = arch == "qwen2";  // q/k/v biases; RoPE on rotate-halves pairs, rows as in HF
  auto key = [&](const std::string& k) { return arch + "." + k; };
  if (g.has(key("rope.scaling.type")) && g.get_string(key("rope.scaling.type")) != "none")
    throw Error(path + ": rope scaling type '" + g.get_string(key("rope.scaling.type")) + "' is not supported");
  Model m;
  m.source = path;
  ModelConfig& c = m.config;
  auto dim = [&](const std::string& key) {
    int64_t v = g.get_i64(key);
    if (v <= 0 || v > (int64_t(1) << 24)) throw Error(path + ": '" + key + "' out of range");
    return int(v);
  };
  c.architecture = qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM";
  c.qkv_bias = qwen2;
  c.hidden_size = dim(key("embedding_length"));
  c.intermediate_size = dim(key("feed_forward_length"));
  c.num_layers = dim(key("block_count"));
  c.num_heads = dim(key("attention.head_count"));
  c.num_kv_heads = g.has(key("attention.head_count_kv")) ? dim(key("attention.head_count_kv")) : c.num_heads;
  if (c.num_heads % c.num_kv_heads != 0) throw Error(path + ": head_count not divisible by head_count_kv");
  c.head_dim = g.has(key("attention.key_length")) ? dim(key("attention.key_length")) : c.hidden_size / c.num_heads;
  if (c.head_dim % 2 != 0) throw Error(path + ": head dimension must be even for RoPE");
  if (g.has(key("rope.dimension_count")) && dim(key("rope.dimension_count")) != c.head_dim)
    throw Error(path + ": partial rotary embeddings (rope.dimension_count != head dimension) are not supported");
  c.max_seq = g.has(key("context_length")) ? dim(key("context_length")) : 2048;
  c.rms_eps = g.get_f32(key("attention.layer_norm_rms_epsilon"));
  c.rope_theta = g.has(key("rope.freq_base")) ? g.get_f32(key("rope.freq_base")) : 10000.f;
  if (!(c.rms_eps > 0) || !std::isfinite(c.rms_eps))
    throw Error(path + ": '" + key("attention.layer_norm_rms_epsilon") + "' must be a finite number > 0");
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    throw Error(path + ": '" + key("rope.freq_base") + "' must be a finite number > 0");
  const GgufTensorInfo& embd = g.tensor("token_embd.weight");
  if (embd.shape.size() != 2) throw Error(path + ": token_embd.weight is not 2-D");
  c.vocab_size = g.has(key("vocab_size")) ? dim(key("vocab_size")) : int(embd.shape[1]);
  if (g.has(key("expert_count"))) {  // Mixtral (llama.cpp's "llama" with experts)
    c.architecture = "MixtralForCausalLM";
    c.num_experts = dim(key("expert_count"));
    c.experts_per_tok = dim(key("expert_used_count"));
    if (c.num_experts > 4096 || c.experts_per_tok > c.num_experts) throw Error(path + ": expert counts out of range");
    c.moe_intermediate = c.intermediate_size;
    c.norm_topk_prob = true;
  }
  c.tie_embeddings = g.find_tensor("output.weight") == nullptr;
  if (g.find_tensor("rope_freqs.weight")) {
    if (!g.has("dartquant.rope_scaling.factor"))
      throw Error(path + ": rope_freqs.weight without its Llama-3 parameters is not supported");
    c.rope_factor = g.get_f32("dartquant.rope_scaling.factor");
    c.rope_low_freq = g.get_f32("dartquant.rope_scaling.low_freq_factor");
    c.rope_high_freq = g.get_f32("dartquant.rope_scaling.high_freq_factor");
    c.rope_original_max = dim("dartquant.rope_scaling.original_context_length");
    if (!(c.rope_factor > 0) || !(c.rope_low_freq > 0) || !(c.rope_high_freq > c.rope_low_freq) ||
        !std::isfinite(c.rope_factor) || !std::isfinite(c.rope_high_freq))
      throw Error(path + ": dartquant.rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor");
  }

  // Each layer has 9 tensors (12 in qwen2): bound the claimed count by the file before building names for it.
  if (uint64_t(c.num_layers) * 9 > g.tensors().size())
    throw Error(path + ": block_count " + std::to_string(c.num_layers) + " needs more tensors than the file has");
  if (int64_t(c.num_heads) * c.head_dim > (int64_t(1) << 24))
    throw Error(path + ": head_count * head dimension out of range");
  std::vector<std::string> names = {"model.embed_tokens.weight", "model.norm.weight"};
  if (!c.tie_embeddings) names.push_back("lm_head.weight");
  for (int l = 0; l < c.num_layers; ++l)
    for (const char* s : {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                          "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"})
      names.push_back(layer_name(l, s));
  for (int l = 0; l < c.num_layers && c.num_experts == 0; ++l)
    for (const char* s : {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"})
      names.push_back(layer_name(l, s));
  if (qwen2)
    for (int l = 0; l < c.num_layers; ++l)
      for (const char* s : {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"})
        names.push_back(layer_name(l, s));
  for (const std::string& n : names) m.weights.set(n, g.read_matrix(gguf_tensor_name(n)));
  // Mixtral: each stacked expert tensor (experts outermost) splits into the experts' matrices.
  for (int l = 0; l < c.num_layers && c.num_experts > 0; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    m.weights.set(router_name(c, l), g.read_matrix(blk + "ffn_gate_inp.weight"));
    const std::vector<ExpertSpec> experts = mlp_experts(c, l);
    for (auto [gname, pick] : {std::pair{"ffn_gate_exps.weight", &ExpertSpec::gate},
                               std::pair{"ffn_up_exps.weight", &ExpertSpec::up},
                               std::pair{"ffn_down_exps.weight", &ExpertSpec::down}}) {
      const GgufTensorInfo& t = g.tensor(blk + gname);
      if (t.shape.size() != 3 || t.shape[2] != uint64_t(c.num_experts))
        throw Error(path + ": " + blk + gname + " is not one matrix per expert");
      Matrix all = g.read_matrix(blk + gname);
      const int64_t rows = all.rows / c.num_experts;
      for (int e = 0; e < c.num_experts; ++e) {
        Matrix x(rows, all.cols);
        std::copy_n(all.row(e * rows), size_t(rows * all.cols), x.data.data());
        m.weights.set(experts[size_t(e)].*pick, std::move(x));
      }
    }
  }
  // A tensor left over (a block beyond block_count, a bias) would be dropped silently.
  std::set<std::string> used;
  for (const std::string& n : names) used.insert(gguf_tensor_name(n));
  if (c.rope_factor > 0) used.insert("rope_freqs.weight");
  for (int l = 0; l < c.num_layers && c.num_experts > 0; ++l)
    for (const char* t : {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"})
      used.insert("blk." + std::to_string(l) + "." + t);
  for (const GgufTensorInfo& t : g.tensors())
    if (!used.count(t.name))
      throw Error(path + ": tensor '" + printable(t.name) + "' is not used by the model its metadata describes (" +
                  std::to_string(c.num_layers) + " blocks)");
  // "llama" GGUF keeps q/k rows in the interleaved order llama2.c uses; the shared conversion
  // restores HF's.
  c.rope_interleaved = !qwen2;
  rope_to_halves(m);
  c.extra = c.to_json();
  if (c.num_experts > 0) {
    c.extra["num_local_experts"] = c.num_experts;
    c.extra["num_experts_per_tok"] = c.experts_per_tok;
  }
  if (c.rope_factor > 0)
    c.extra["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", c.rope_factor},
                               {"low_freq_factor", c.rope_low_freq}, {"high_freq_factor", c.rope_high_freq},
                               {"original_max_position_embeddings", c.rope_original_max}};
  m.tokenizer = tokenizer_from_metadata(g);
  return m;
}

}  // namespace dq
