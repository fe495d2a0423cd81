#include "model/export.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "io/file.h"
#include "io/output.h"
#include "io/safetensors.h"
#include "model/save.h"

namespace dq {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::vector<std::string> runtime_only_features(const Model& m) {
  std::vector<std::string> out;
  const json& q = m.quantization;
  if (!q.is_object()) return out;
  auto section = [&](const char* key) { return q.contains(key) && q[key].is_object() ? q[key] : json::object(); };
  auto bits = [](const json& s) { return s.contains("bits") && s["bits"].is_number_integer() ? s["bits"].get<int>() : 16; };
  json online = section("online");
  auto flag = [&](const char* key) {  // read from a file: json's own bool conversion would throw its text
    if (!online.contains(key)) return false;
    if (!online[key].is_boolean())
      throw Error(m.source + ": dartquant_quantization: 'online." + key + "' is not true/false");
    return online[key].get<bool>();
  };
  if (flag("r3")) out.push_back("online R3 Hadamard on Q/K");
  if (flag("r4")) out.push_back("online R4 Hadamard on the down_proj input");
  if (int b = bits(section("activations")); b < 16) out.push_back(std::to_string(b) + "-bit activation quantization");
  if (int b = bits(section("kv_cache")); b < 16) out.push_back(std::to_string(b) + "-bit KV-cache quantization");
  return out;
}

static void require_plain(const Model& m, const std::string& format) {
  std::vector<std::string> f = runtime_only_features(m);
  if (f.empty()) return;
  std::string list;
  for (const std::string& s : f) list += (list.empty() ? "" : ", ") + s;
  throw Error(m.source + ": cannot export as " + format + ": the model needs " + list +
              " at run time, which a plain LLaMA checkpoint cannot express (they would be silently "
              "lost); quantize with --no-online-hadamard and 16-bit activations/KV to export");
}

// A copy whose q/k rows are in HF's rotate-halves order and whose classifier is either tied (no
// lm_head.weight) or an explicit lm_head.weight with tie_word_embeddings false.
static Model plain_copy(const Model& m) {
  Model c = m;
  rope_to_halves(c);
  c.quantization = json();
  if (c.config.tie_embeddings && c.weights.has("lm_head.weight")) {
    if (c.weights.get("lm_head.weight").data == c.weights.get("model.embed_tokens.weight").data)
      c.weights.erase("lm_head.weight");
    else
      c.config.tie_embeddings = false;  // the forward pass uses lm_head.weight when present
  }
  c.config.extra = c.config.to_json();
  c.config.extra.erase("dartquant_quantization");
  return c;
}

void export_hf(const Model& m, const std::string& dir, DType dtype) {
  require_plain(m, "an HF checkpoint");
  SaveOptions opts;
  opts.dtype = dtype;
  save_model(plain_copy(m), dir, opts);
}

// ---- GGUF ----

// For each GGUF row, the HF row it comes from: llama.cpp's convert reshapes each head's rows as
// (2, d/2), swaps to (d/2, 2) and flattens, so GGUF row h*d + 2i + s is HF row h*d + s*d/2 + i.
static std::vector<int64_t> qk_source_rows(int64_t rows, int heads) {
  const int64_t d = rows / heads;
  std::vector<int64_t> src(static_cast<size_t>(rows));
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d / 2; ++i)
      for (int64_t s = 0; s < 2; ++s) src[size_t(h * d + 2 * i + s)] = h * d + s * d / 2 + i;
  return src;
}

Matrix gguf_permute_qk(const Matrix& w, int heads, bool inverse) {
  if (heads <= 0 || w.rows % (2 * heads) != 0)
    throw Error("q/k permutation: " + std::to_string(w.rows) + " rows do not split into " +
                std::to_string(heads) + " heads of even size");
  std::vector<int64_t> src = qk_source_rows(w.rows, heads);
  Matrix out(w.rows, w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    int64_t from = inverse ? r : src[size_t(r)], to = inverse ? src[size_t(r)] : r;
    std::memcpy(out.row(to), w.row(from), size_t(w.cols) * sizeof(float));
  }
  return out;
}

std::string gguf_tensor_name(const std::string& hf) {
  static const std::map<std::string, std::string> top = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  static const std::map<std::string, std::string> layer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  if (auto it = top.find(hf); it != top.end()) return it->second;
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  size_t dot = hf.find('.', prefix.size());
  if (dot == std::string::npos) return "";
  std::string idx = hf.substr(prefix.size(), dot - prefix.size());
  if (idx.empty() || idx.find_first_not_of("0123456789") != std::string::npos) return "";
  auto it = layer.find(hf.substr(dot + 1));
  return it == layer.end() ? "" : "blk." + idx + "." + it->second;
}

namespace {

// llama.cpp's general.file_type (llama_ftype) for a file whose weights are mostly `t`.
uint32_t file_type(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q4_0: return 2;
    case GgmlType::Q8_0: return 7;
    case GgmlType::BF16: return 32;
  }
  return 0;
}

bool is_quantized(GgmlType t) { return t == GgmlType::Q4_0 || t == GgmlType::Q8_0; }

// Llama-3's rope scaling as llama.cpp's convert script expresses it: a per-frequency divisor
// (rope_freqs.weight), 1 for short wavelengths, `factor` for long ones, interpolated in between.
std::vector<float> llama3_rope_factors(const ModelConfig& c) {
  std::vector<float> f(size_t(c.head_dim / 2));
  const double low_wavelen = c.rope_original_max / c.rope_low_freq;
  const double high_wavelen = c.rope_original_max / c.rope_high_freq;
  for (size_t i = 0; i < f.size(); ++i) {
    double freq = 1.0 / std::pow(double(c.rope_theta), 2.0 * double(i) / double(c.head_dim));
    double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      f[i] = 1.f;
    } else if (wavelen > low_wavelen) {
      f[i] = c.rope_factor;
    } else {
      double smooth = (c.rope_original_max / wavelen - c.rope_low_freq) / (c.rope_high_freq - c.rope_low_freq);
      f[i] = float(1.0 / ((1 - smooth) / c.rope_factor + smooth));
    }
  }
  return f;
}

// llama.cpp picks its pre-tokenizer regex by name; only Llama-3's is recognised here, others get
// llama.cpp's default (GPT-2's).
std::string bpe_pre_name(const std::string& hf_json) {
  if (hf_json.find("(?i:'s|'t|'re|'ve|'m|'ll|'d)") != std::string::npos &&
      hf_json.find("\\\\p{N}{1,3}") != std::string::npos)
    return "llama-bpe";
  return "default";
}

void add_tokenizer(GgufWriter& w, const Model& m) {
  VocabInfo v = m.tokenizer->vocab_info();
  // llama.cpp sizes token_embd by the token list, so a padded embedding gets padding tokens.
  const size_t n = size_t(m.config.vocab_size);
  for (size_t i = v.tokens.size(); i < n; ++i) {
    v.tokens.push_back("[PAD" + std::to_string(i) + "]");
    v.token_types.push_back(5);  // unused
    if (!v.scores.empty()) v.scores.push_back(-1000.f);
  }
  w.set("tokenizer.ggml.model", GgufValue::string(v.model));
  std::string hf_json;
  if (!m.tokenizer_path.empty()) {
    std::string text = read_file(m.tokenizer_path);
    if (json::accept(text)) hf_json = std::move(text);  // else a llama2.c tokenizer.bin
  }
  if (v.model == "gpt2") w.set("tokenizer.ggml.pre", GgufValue::string(bpe_pre_name(hf_json)));
  w.set("tokenizer.ggml.tokens", GgufValue::strings_array(v.tokens));
  if (!v.scores.empty()) w.set("tokenizer.ggml.scores", GgufValue::f32_array(v.scores));
  w.set("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
  if (!v.merges.empty()) w.set("tokenizer.ggml.merges", GgufValue::strings_array(v.merges));
  if (v.bos >= 0) w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(v.bos)));
  if (v.eos >= 0) w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(v.eos)));
  if (v.unk >= 0) w.set("tokenizer.ggml.unknown_token_id", GgufValue::u32(uint32_t(v.unk)));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
  // The GGUF spec's key for the whole tokenizer.json: our reader rebuilds the exact tokenizer from it.
  if (!hf_json.empty()) w.set("tokenizer.huggingface.json", GgufValue::string(std::move(hf_json)));
}

// A weight's symmetric group-32 integer codes from quantized.safetensors, when they reproduce the
// model's values exactly (so carrying them changes nothing but the f16 rounding of the scales).
struct Codes {
  std::vector<int8_t> q;  // rows x cols signed codes (code - zero)
  std::vector<float> scales;  // rows x cols / 32
};

// Returns "" and fills `out`, or why the codes cannot be used.
std::string read_codes(const SafetensorsFile& f, const std::string& name, const Matrix& w, int bits,
                       Codes& out) {
  auto find = [&](const std::string& n) -> const TensorInfo* {
    auto it = f.tensors().find(n);
    return it == f.tensors().end() ? nullptr : &it->second;
  };
  const TensorInfo *codes = find(name + ".codes"), *scales = find(name + ".scales"), *zeros = find(name + ".zeros");
  if (!codes || !scales || !zeros) return "no codes";
  const int64_t rows = w.rows, cols = w.cols, groups = cols / 32;
  if (codes->dtype != DType::U8 || codes->shape != std::vector<int64_t>{rows, cols * bits / 8})
    return "codes are not " + std::to_string(bits) + "-bit";
  if (scales->dtype != DType::F32 || zeros->dtype != DType::F32 ||
      scales->shape != std::vector<int64_t>{rows, groups} || zeros->shape != scales->shape)
    return "not quantized in groups of 32";
  std::vector<float> s(size_t(rows * groups)), z(s.size());
  convert_to_f32(DType::F32, scales->data, s.size(), s.data());
  convert_to_f32(DType::F32, zeros->data, z.size(), z.data());
  const float zero = float(1 << (bits - 1));
  for (float v : z)
    if (v != zero) return "asymmetric (zero point " + std::to_string(v) + ")";
  out.q.resize(size_t(rows * cols));
  out.scales = std::move(s);
  const int64_t row_bytes = cols * bits / 8;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      // FORMAT.md: each row a little-endian bit stream, low bits first
      uint8_t byte = codes->data[r * row_bytes + c * bits / 8];
      int code = bits == 8 ? byte : (c % 2 == 0 ? byte & 0xF : byte >> 4);
      float scale = out.scales[size_t(r * groups + c / 32)];
      if (scale * (float(code) - zero) != w(r, c)) return "codes do not reproduce the model's weights";
      out.q[size_t(r * cols + c)] = int8_t(code - int(zero));
    }
  return "";
}

std::vector<uint8_t> blocks_from_codes(const Codes& k, const std::vector<int64_t>& rows_order, int64_t cols,
                                       GgmlType t) {
  const int64_t groups = cols / 32, rows = int64_t(rows_order.size());
  std::vector<uint8_t> out(ggml_nbytes(t, uint64_t(rows * cols)));
  const size_t bb = ggml_block_bytes(t);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = rows_order[size_t(r)];
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* q = k.q.data() + src * cols + g * 32;
      float scale = k.scales[size_t(src * groups + g)];
      uint8_t* dst = out.data() + size_t(r * groups + g) * bb;
      if (t == GgmlType::Q4_0) {
        BlockQ4_0 b = q4_0_from_codes(q, scale);
        std::memcpy(dst, &b, bb);
      } else {
        BlockQ8_0 b = q8_0_from_codes(q, scale);
        std::memcpy(dst, &b, bb);
      }
    }
  }
  return out;
}

}  // namespace

GgufExportStats export_gguf(const Model& src, const std::string& path, const GgufExportOptions& o) {
  require_plain(src, "GGUF");
  const ModelConfig& sc = src.config;
  if (sc.num_experts > 0)
    throw Error(src.source + ": cannot export as GGUF: mixture-of-experts models (" + sc.architecture +
                ") are not supported by this exporter; use the HF export");
  if (sc.qkv_bias) throw Error(src.source + ": cannot export as GGUF: q/k/v biases (Qwen2) have no llama.cpp 'llama' equivalent");
  if (sc.sliding_window > 0 && sc.sliding_window < sc.max_seq)
    throw Error(src.source + ": cannot export as GGUF: llama.cpp's 'llama' architecture has no sliding-window attention");
  if (!src.tokenizer) throw Error(src.source + ": cannot export as GGUF without a tokenizer; pass --tokenizer");
  const Model m = plain_copy(src);
  const ModelConfig& c = m.config;
  const GgmlType type = o.type;

  std::shared_ptr<SafetensorsFile> codes_file;
  int code_bits = type == GgmlType::Q4_0 ? 4 : type == GgmlType::Q8_0 ? 8 : 0;
  if (code_bits && !o.codes_path.empty()) codes_file = std::make_shared<SafetensorsFile>(o.codes_path);

  GgufWriter w(path);
  w.set("general.architecture", GgufValue::string("llama"));
  w.set("general.name", GgufValue::string(fs::path(src.source).filename().replace_extension().string()));
  w.set("general.file_type", GgufValue::u32(file_type(type)));
  w.set("dartquant.written_by", GgufValue::string(kWrittenBy));  // lets --force tell its own outputs
  if (is_quantized(type)) w.set("general.quantization_version", GgufValue::u32(2));
  w.set("llama.vocab_size", GgufValue::u32(uint32_t(c.vocab_size)));
  w.set("llama.context_length", GgufValue::u32(uint32_t(c.max_seq)));
  w.set("llama.embedding_length", GgufValue::u32(uint32_t(c.hidden_size)));
  w.set("llama.block_count", GgufValue::u32(uint32_t(c.num_layers)));
  w.set("llama.feed_forward_length", GgufValue::u32(uint32_t(c.intermediate_size)));
  w.set("llama.attention.head_count", GgufValue::u32(uint32_t(c.num_heads)));
  w.set("llama.attention.head_count_kv", GgufValue::u32(uint32_t(c.num_kv_heads)));
  w.set("llama.attention.key_length", GgufValue::u32(uint32_t(c.head_dim)));
  w.set("llama.attention.value_length", GgufValue::u32(uint32_t(c.head_dim)));
  w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(c.rms_eps));
  w.set("llama.rope.freq_base", GgufValue::f32(c.rope_theta));
  w.set("llama.rope.dimension_count", GgufValue::u32(uint32_t(c.head_dim)));
  if (c.rope_factor > 0) {
    // llama.cpp reads only rope_freqs.weight; these let our reader restore the exact HF parameters.
    w.set("dartquant.rope_scaling.factor", GgufValue::f32(c.rope_factor));
    w.set("dartquant.rope_scaling.low_freq_factor", GgufValue::f32(c.rope_low_freq));
    w.set("dartquant.rope_scaling.high_freq_factor", GgufValue::f32(c.rope_high_freq));
    w.set("dartquant.rope_scaling.original_context_length", GgufValue::u32(uint32_t(c.rope_original_max)));
  }
  add_tokenizer(w, m);

  GgufExportStats stats;
  std::vector<std::string> order = {"model.embed_tokens.weight"};
  for (int l = 0; l < c.num_layers; ++l)
    for (const char* s : {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"})
      order.push_back(layer_name(l, s));
  order.push_back("model.norm.weight");
  if (m.weights.has("lm_head.weight")) order.push_back("lm_head.weight");
  for (const std::string& n : m.weights.names())
    if (gguf_tensor_name(n).empty())
      throw Error(src.source + ": cannot export tensor '" + n + "' to GGUF: llama.cpp's 'llama' has no such tensor");

  if (c.rope_factor > 0) {
    std::vector<float> f = llama3_rope_factors(c);
    Matrix fm(1, int64_t(f.size()));
    fm.data = f;
    w.add_tensor("rope_freqs.weight", {uint64_t(f.size())}, GgmlType::F32, fm);
  }
  for (const std::string& name : order) {
    std::vector<int64_t> shape = m.weights.shape(name);
    const std::string gname = gguf_tensor_name(name);
    if (shape.size() == 1) {  // norms: llama.cpp keeps 1-D tensors F32
      w.add_tensor_lazy(gname, {uint64_t(shape[0])}, GgmlType::F32, [&m, name] {
        Matrix v = m.weights.get(name);
        return ggml_encode(GgmlType::F32, v.data.data(), v.data.size());
      });
      continue;
    }
    const int64_t rows = shape[0], cols = shape[1];
    int heads = name.ends_with("q_proj.weight") ? c.num_heads : name.ends_with("k_proj.weight") ? c.num_kv_heads : 0;
    std::vector<int64_t> rows_order(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) rows_order[size_t(r)] = r;
    if (heads) rows_order = qk_source_rows(rows, heads);

    GgmlType t = type;
    const bool embed_or_head = name == "model.embed_tokens.weight" || name == "lm_head.weight";
    std::shared_ptr<Codes> codes;
    if (is_quantized(type) && cols % 32 == 0 && codes_file) {
      codes = std::make_shared<Codes>();
      std::string why = read_codes(*codes_file, name, m.weights.get(name), code_bits, *codes);
      if (!why.empty()) {
        codes.reset();
        if (why != "no codes") stats.notes.push_back(name + ": " + why + "; re-rounded");
      }
    }
    // Rows that are not whole blocks stay F32; so do the embedding and classifier of a quantized
    // export unless the model quantized them itself, since dartquant leaves them in full precision.
    if (is_quantized(type) && !codes && (cols % 32 != 0 || embed_or_head)) t = GgmlType::F32;
    if (codes) ++stats.from_codes;
    else if (is_quantized(t)) ++stats.requantized;
    else if (is_quantized(type)) ++stats.kept_float;

    std::vector<uint64_t> gshape = {uint64_t(cols), uint64_t(rows)};
    if (codes) {
      w.add_tensor_lazy(gname, gshape, t, [codes, rows_order, cols, t] {
        return blocks_from_codes(*codes, rows_order, cols, t);
      });
    } else {
      w.add_tensor_lazy(gname, gshape, t, [&m, name, heads, t] {
        Matrix v = m.weights.get(name);
        if (heads) v = gguf_permute_qk(v, heads, false);
        return ggml_encode(t, v.data.data(), v.data.size());
      });
    }
  }
  w.write();
  return stats;
}

}  // namespace dq
