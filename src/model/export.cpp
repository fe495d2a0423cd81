#include "model/export.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

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
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
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
    case GgmlType::Q4_1: return 3;
    case GgmlType::Q8_0: return 7;
    case GgmlType::BF16: return 32;
  }
  return 0;
}

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

}  // namespace

// ---- tokenizer metadata ----

namespace {

// The pre-tokenizer regexes of the byte-level BPE families llama.cpp knows by name, as their
// tokenizer.json files write them (llama.cpp's own spellings differ only in case-folding syntax).
const char* kLlama3Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// A tokenizer.json component as a flat list of steps (Sequence unrolled; null is no step).
std::vector<json> steps(const json& j, const char* list_key) {
  std::vector<json> out;
  if (j.is_null()) return out;
  if (j.value("type", "") == "Sequence") {
    for (const json& part : j.value(list_key, json::array())) {
      std::vector<json> sub = steps(part, list_key);
      out.insert(out.end(), sub.begin(), sub.end());
    }
    return out;
  }
  out.push_back(j);
  return out;
}

bool is_split(const json& s, const char* regex) {
  return s.value("type", "") == "Split" && s.contains("pattern") && s["pattern"].is_object() &&
         s["pattern"].value("Regex", "") == regex && s.value("behavior", "") == "Isolated" && !s.value("invert", false);
}

// Byte-level BPE: which of llama.cpp's pre-tokenizers splits text as this tokenizer.json does.
std::string bpe_pre_name(const json& tok, const std::string& file) {
  auto refuse = [&](const std::string& why) -> std::string {
    throw Error(file + ": cannot export the tokenizer to GGUF: " + why +
                "; llama.cpp would split text differently from this tokenizer (recognised: GPT-2's ByteLevel "
                "regex 'gpt-2', SmolLM's digits + ByteLevel 'smollm', Llama-3's split 'llama-bpe'/'smaug-bpe', "
                "Qwen2's split 'qwen2')");
  };
  if (!steps(tok.value("normalizer", json()), "normalizers").empty()) refuse("it has a normalizer");
  std::vector<json> pre = steps(tok.value("pre_tokenizer", json()), "pretokenizers");
  if (pre.empty() || pre.back().value("type", "") != "ByteLevel") refuse("its pre-tokenizer does not end in ByteLevel");
  const json& byte_level = pre.back();
  if (byte_level.value("add_prefix_space", true)) refuse("its ByteLevel step adds a prefix space");
  const bool regex = byte_level.value("use_regex", true);
  const bool ignore_merges = tok["model"].value("ignore_merges", false);
  std::string name;
  if (pre.size() == 1 && regex) name = "gpt-2";
  else if (pre.size() == 2 && regex && pre[0].value("type", "") == "Digits" && pre[0].value("individual_digits", false))
    name = "smollm";
  else if (pre.size() == 2 && !regex && is_split(pre[0], kLlama3Split))
    name = ignore_merges ? "llama-bpe" : "smaug-bpe";  // llama.cpp ignores merges for the first only
  else if (pre.size() == 2 && !regex && is_split(pre[0], kQwen2Split)) name = "qwen2";
  else refuse("its pre-tokenizer matches none of llama.cpp's");
  if (ignore_merges && name != "llama-bpe") refuse("it ignores merges with a pre-tokenizer ('" + name + "') for which llama.cpp does not");
  return name;
}

// SentencePiece-style BPE: llama.cpp's "llama" vocabulary splits nothing and prepends one space
// (add_space_prefix) to the text. Returns that flag, refusing splits it cannot reproduce.
bool spm_space_prefix(const json& tok, const std::string& file, std::vector<std::string>& notes) {
  auto refuse = [&](const std::string& why) -> bool {
    throw Error(file + ": cannot export the tokenizer to GGUF: " + why + ", which llama.cpp's SentencePiece "
                "tokenizer does not do");
  };
  std::vector<json> norm = steps(tok.value("normalizer", json()), "normalizers");
  std::vector<json> pre = steps(tok.value("pre_tokenizer", json()), "pretokenizers");
  const std::string space = "\xE2\x96\x81";
  bool prefix = false, spaces_marked = false;
  for (const json& n : norm) {
    const std::string type = n.value("type", "");
    if (type == "Prepend" && n.value("prepend", "") == space) prefix = true;
    else if (type == "Replace" && n.value("content", "") == space && n.contains("pattern") &&
             n["pattern"].value("String", "") == " ")
      spaces_marked = true;
    else
      refuse("its normalizer step '" + type + "' is not Llama's (prepend '\u2581', spaces to '\u2581')");
  }
  for (const json& p : pre) {
    if (p.value("type", "") != "Metaspace" || p.value("replacement", "") != space)
      refuse("its pre-tokenizer step '" + p.value("type", std::string()) + "' splits the text");
    if (p.value("split", true)) refuse("its Metaspace pre-tokenizer splits words at spaces");
    std::string scheme = p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    prefix = scheme != "never";
    spaces_marked = true;
    if (prefix)
      notes.push_back(file + ": its Metaspace pre-tokenizer adds no '\u2581' to text that starts with a space, "
                      "llama.cpp adds one to all text: ids differ on such text (as with llama.cpp's own conversion)");
  }
  if (!spaces_marked) refuse("it keeps spaces as they are instead of spelling them '\u2581'");
  return prefix;
}

// Reads tokenizer_config.json beside a tokenizer file; null when absent or not JSON.
json tokenizer_config(const std::string& tokenizer_path) {
  fs::path p = fs::path(tokenizer_path).parent_path() / "tokenizer_config.json";
  if (tokenizer_path.empty() || !fs::exists(p)) return nullptr;
  return json::parse(read_file(p.string()), nullptr, false);
}

// llama.cpp puts bos_token_id first when add_bos_token is set (and eos_token_id last with
// add_eos_token), so BOS/EOS are the tokens encode() itself adds around a text, whatever id
// config.json gives (a checkpoint may name ids of another vocabulary). Ids outside the vocabulary
// are not written: llama.cpp would replace them with defaults of its own.
void special_tokens_as_encoded(const Tokenizer& t, const std::string& file, GgufTokenizerKeys& k) {
  VocabInfo& v = k.vocab;
  const std::vector<int32_t> plain = t.encode("a", false), wrapped = t.encode("a", true);
  auto at = std::search(wrapped.begin(), wrapped.end(), plain.begin(), plain.end());
  if (at == wrapped.end())
    throw Error(file + ": cannot export the tokenizer to GGUF: its special tokens change how the text itself is split");
  const std::vector<int32_t> prefix(wrapped.begin(), at), suffix(at + std::ptrdiff_t(plain.size()), wrapped.end());
  auto place = [&](const std::vector<int32_t>& added, int32_t& id, bool& add, const std::string& name,
                   const std::string& where) {
    add = added.size() == 1;
    if (add) id = added[0];
    if (added.size() > 1)
      k.notes.push_back(file + ": the tokenizer adds " + std::to_string(added.size()) + " tokens " + where +
                        " a text, llama.cpp adds at most one: ids differ when special tokens are added");
    if (id >= int32_t(v.tokens.size())) {
      k.notes.push_back(file + ": " + name + " id " + std::to_string(id) + " is outside the vocabulary (" +
                        std::to_string(v.tokens.size()) + " tokens): not written");
      id = -1;
    }
  };
  place(prefix, v.bos, v.add_bos, "BOS", "before");
  place(suffix, v.eos, v.add_eos, "EOS", "after");
}

}  // namespace

GgufTokenizerKeys gguf_tokenizer_keys(const Tokenizer& t, const std::string& tokenizer_path) {
  GgufTokenizerKeys k;
  k.vocab = t.vocab_info();
  std::string text = tokenizer_path.empty() ? std::string() : read_file(tokenizer_path);
  json tok = json::parse(text, nullptr, false);
  if (tok.is_object()) {
    k.hf_json = std::move(text);
    if (k.vocab.model == "gpt2") k.pre = bpe_pre_name(tok, tokenizer_path);
    else k.add_space_prefix = spm_space_prefix(tok, tokenizer_path, k.notes);
  } else if (k.vocab.model == "gpt2") {  // e.g. rebuilt from a GGUF: the pre-tokenizer is unknown
    throw Error((tokenizer_path.empty() ? std::string("the tokenizer") : tokenizer_path) +
                ": cannot name its pre-tokenizer for llama.cpp without its tokenizer.json; pass --tokenizer");
  }  // else a llama2.c tokenizer.bin: SentencePiece with the dummy prefix
  special_tokens_as_encoded(t, tokenizer_path.empty() ? std::string("the tokenizer") : tokenizer_path, k);
  json cfg = tokenizer_config(tokenizer_path);
  if (cfg.is_object()) {
    // transformers' own flags override what the post-processor template shows.
    if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean()) k.vocab.add_bos = cfg["add_bos_token"];
    if (cfg.contains("add_eos_token") && cfg["add_eos_token"].is_boolean()) k.vocab.add_eos = cfg["add_eos_token"];
    const json& pad = cfg.value("pad_token", json());
    std::string pad_text = pad.is_string() ? pad.get<std::string>()
                         : pad.is_object() ? pad.value("content", std::string()) : std::string();
    for (size_t i = 0; i < k.vocab.tokens.size() && !pad_text.empty(); ++i)
      if (k.vocab.tokens[i] == pad_text) {
        k.pad = int32_t(i);
        break;
      }
    const json& tmpl = cfg.value("chat_template", json());
    if (tmpl.is_string()) k.chat_templates[""] = tmpl.get<std::string>();
    if (tmpl.is_array())  // [{"name": ..., "template": ...}]: "default" is the plain key
      for (const json& e : tmpl)
        if (e.is_object() && e.value("name", json()).is_string() && e.value("template", json()).is_string())
          k.chat_templates[e["name"] == "default" ? "" : e["name"].get<std::string>()] = e["template"];
  }
  return k;
}

namespace {

// Returns notes on where llama.cpp's tokenizer will differ.
std::vector<std::string> add_tokenizer(GgufWriter& w, const Model& m) {
  GgufTokenizerKeys k = gguf_tokenizer_keys(*m.tokenizer, m.tokenizer_path);
  VocabInfo& v = k.vocab;
  // llama.cpp sizes token_embd by the token list, so a padded embedding gets padding tokens.
  const size_t n = size_t(m.config.vocab_size);
  for (size_t i = v.tokens.size(); i < n; ++i) {
    v.tokens.push_back("[PAD" + std::to_string(i) + "]");
    v.token_types.push_back(5);  // unused
    if (!v.scores.empty()) v.scores.push_back(-1000.f);
  }
  w.set("tokenizer.ggml.model", GgufValue::string(v.model));
  w.set("tokenizer.ggml.pre", GgufValue::string(k.pre));
  w.set("tokenizer.ggml.tokens", GgufValue::strings_array(v.tokens));
  if (!v.scores.empty()) w.set("tokenizer.ggml.scores", GgufValue::f32_array(v.scores));
  w.set("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
  if (!v.merges.empty()) w.set("tokenizer.ggml.merges", GgufValue::strings_array(v.merges));
  if (v.bos >= 0) w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(v.bos)));
  if (v.eos >= 0) w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(v.eos)));
  if (v.unk >= 0) w.set("tokenizer.ggml.unknown_token_id", GgufValue::u32(uint32_t(v.unk)));
  if (k.pad >= 0) w.set("tokenizer.ggml.padding_token_id", GgufValue::u32(uint32_t(k.pad)));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(v.add_eos));
  if (v.model == "llama") w.set("tokenizer.ggml.add_space_prefix", GgufValue::boolean(k.add_space_prefix));
  for (const auto& [name, tmpl] : k.chat_templates)
    w.set(name.empty() ? "tokenizer.chat_template" : "tokenizer.chat_template." + name, GgufValue::string(tmpl));
  // The GGUF spec's key for the whole tokenizer.json: our reader rebuilds the exact tokenizer from it.
  if (!k.hf_json.empty()) w.set("tokenizer.huggingface.json", GgufValue::string(std::move(k.hf_json)));
  return k.notes;
}

// A weight's integer codes from quantized.safetensors (FORMAT.md): code q stands for
// scale * (q - zero), scales and zeros per group of `group` columns of each row.
struct Codes {
  int bits = 0;
  int64_t group = 0;
  std::vector<uint8_t> q;            // rows x cols, unpacked
  std::vector<float> scales, zeros;  // rows x cols / group
};

// Why the codes of `name` (rows x cols) cannot be stored as blocks of type t without re-rounding,
// judged from their layout and zero points ("" when they can; "no codes" when there are none):
// Q8_0 and Q4_0 hold symmetric codes (zero 2^(bits-1)) of up to 8 / 4 bits, Q4_1 any codes of up
// to 4 bits with an integer zero point; every block of 32 must lie in one group. Fills bits/group.
std::string codes_layout(const SafetensorsFile& f, const std::string& name, int64_t rows, int64_t cols, GgmlType t,
                         Codes& out) {
  auto find = [&](const std::string& n) -> const TensorInfo* {
    auto it = f.tensors().find(n);
    return it == f.tensors().end() ? nullptr : &it->second;
  };
  const TensorInfo *codes = find(name + ".codes"), *scales = find(name + ".scales"), *zeros = find(name + ".zeros");
  if (!codes || !scales || !zeros) return "no codes";
  int bits = 0;
  for (int b : {2, 3, 4, 8})
    if (codes->dtype == DType::U8 && codes->shape == std::vector<int64_t>{rows, (cols * b + 7) / 8}) bits = b;
  if (bits == 0 || scales->dtype != DType::F32 || zeros->dtype != DType::F32 || scales->shape.size() != 2 ||
      scales->shape[0] != rows || zeros->shape != scales->shape)
    return "codes of another layout";
  const int64_t groups = scales->shape[1];
  if (groups <= 0 || cols % groups != 0 || (cols / groups) % 32 != 0)
    return "groups of " + std::to_string(groups > 0 ? cols / groups : 0) + " columns do not hold whole blocks of 32";
  out.bits = bits;
  out.group = cols / groups;
  const int max_bits = t == GgmlType::Q8_0 ? 8 : 4;
  if (bits > max_bits) return std::to_string(bits) + "-bit codes do not fit " + ggml_type_name(t);
  std::vector<float> z(size_t(rows * groups));
  convert_to_f32(DType::F32, zeros->data, z.size(), z.data());
  const float symmetric_zero = float(1 << (bits - 1));
  for (float v : z) {
    if (t == GgmlType::Q4_1 && v != std::nearbyint(v)) return "zero point " + std::to_string(v) + " is not an integer";
    if (t != GgmlType::Q4_1 && v != symmetric_zero)
      return "asymmetric codes (zero point " + std::to_string(v) + ") need q4_1";
  }
  return "";
}

// Reads the codes whose layout codes_layout accepted into `out`; "" when they reproduce the
// model's weights w exactly (so carrying them changes nothing but the f16 rounding of the block
// scales), else why not.
std::string read_codes(const SafetensorsFile& f, const std::string& name, const Matrix& w, Codes& out) {
  const TensorInfo& codes = f.tensors().at(name + ".codes");
  const int64_t rows = w.rows, cols = w.cols, groups = cols / out.group, bits = out.bits;
  out.scales.resize(size_t(rows * groups));
  out.zeros.resize(out.scales.size());
  convert_to_f32(DType::F32, f.tensors().at(name + ".scales").data, out.scales.size(), out.scales.data());
  convert_to_f32(DType::F32, f.tensors().at(name + ".zeros").data, out.zeros.size(), out.zeros.data());
  out.q.resize(size_t(rows * cols));
  const int64_t row_bytes = codes.shape[1];
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = codes.data + r * row_bytes;
    for (int64_t c = 0; c < cols; ++c) {
      // each row a little-endian bit stream, low bits first
      const int64_t bit = c * bits;
      uint32_t word = row[bit / 8];
      if (bit / 8 + 1 < row_bytes) word |= uint32_t(row[bit / 8 + 1]) << 8;
      const uint8_t code = uint8_t((word >> (bit % 8)) & ((1u << bits) - 1));
      const size_t g = size_t(r * groups + c / out.group);
      if (out.scales[g] * (float(code) - out.zeros[g]) != w(r, c)) return "codes do not reproduce the model's weights";
      out.q[size_t(r * cols + c)] = code;
    }
  }
  return "";
}

std::vector<uint8_t> blocks_from_codes(const Codes& k, const std::vector<int64_t>& rows_order, int64_t cols,
                                       GgmlType t) {
  const int64_t blocks = cols / 32, rows = int64_t(rows_order.size()), groups = cols / k.group;
  std::vector<uint8_t> out(ggml_nbytes(t, uint64_t(rows * cols)));
  const size_t bb = ggml_block_bytes(t);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = rows_order[size_t(r)];
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* q = k.q.data() + src * cols + b * 32;
      const size_t g = size_t(src * groups + b * 32 / k.group);
      const float scale = k.scales[g], zero = k.zeros[g];
      uint8_t* dst = out.data() + size_t(r * blocks + b) * bb;
      if (t == GgmlType::Q4_1) {
        BlockQ4_1 blk = q4_1_from_codes(q, scale, -scale * zero);
        std::memcpy(dst, &blk, bb);
        continue;
      }
      int8_t sq[32];
      for (int j = 0; j < 32; ++j) sq[j] = int8_t(int(q[j]) - int(zero));
      if (t == GgmlType::Q4_0) {
        BlockQ4_0 blk = q4_0_from_codes(sq, scale);
        std::memcpy(dst, &blk, bb);
      } else {
        BlockQ8_0 blk = q8_0_from_codes(sq, scale);
        std::memcpy(dst, &blk, bb);
      }
    }
  }
  return out;
}

// The type llama.cpp's quantize tool gives token_embd / output in a file of type `file`: the file's
// type, except the classifier (output, or token_embd when tied to it) of a q4_0/q4_1 file, which
// gets q6_K; q6_K is not implemented here, so it gets q8_0, llama.cpp's own fallback for q6_K when
// rows are not a multiple of 256.
GgmlType edge_type(GgmlType file, bool classifier) {
  if (classifier && (file == GgmlType::Q4_0 || file == GgmlType::Q4_1)) return GgmlType::Q8_0;
  return file;
}

// The error encodings add to the values they encode: max |difference| and RMS difference over RMS
// value, accumulated over the parts of a tensor.
struct ErrorSum {
  double err2 = 0, val2 = 0, max = 0;
  void add(const Matrix& v, GgmlType t, const std::vector<uint8_t>& bytes) {
    std::vector<float> back(v.data.size());
    ggml_decode(t, bytes.data(), back.size(), back.data());
    for (size_t i = 0; i < back.size(); ++i) {
      const double d = double(back[i]) - double(v.data[i]);
      err2 += d * d;
      val2 += double(v.data[i]) * double(v.data[i]);
      max = std::max(max, std::fabs(d));
    }
  }
  void finish(GgufTensorReport& r) const {
    r.max_abs_error = max;
    r.rel_rms_error = val2 > 0 ? std::sqrt(err2 / val2) : std::sqrt(err2);
  }
};

// llama.cpp's architecture for a model: "llama" (Llama, Mistral, Mixtral) or "qwen2" (q/k/v
// biases, rotate-halves RoPE, so q/k rows are not permuted).
std::string gguf_arch(const ModelConfig& c) { return c.qkv_bias ? "qwen2" : "llama"; }

}  // namespace

nlohmann::json GgufExportStats::to_json() const {
  json t = json::array();
  for (const GgufTensorReport& r : tensors)
    t.push_back({{"name", r.name}, {"type", r.type}, {"how", r.how}, {"note", r.note},
                 {"max_abs_error", r.max_abs_error}, {"rel_rms_error", r.rel_rms_error}});
  return {{"from_codes", from_codes}, {"requantized", requantized}, {"converted", converted},
          {"notes", notes}, {"tensors", t}};
}

GgufExportStats export_gguf(const Model& src, const std::string& path, const GgufExportOptions& o) {
  require_plain(src, "GGUF");
  const ModelConfig& sc = src.config;
  const bool moe = sc.num_experts > 0;
  if (moe && (sc.architecture != "MixtralForCausalLM" || sc.shared_experts > 0 || sc.first_dense_layers > 0 ||
              sc.moe_layer_freq != 1))
    throw Error(src.source + ": cannot export as GGUF: llama.cpp's 'llama' holds Mixtral's experts only (every "
                "layer routed, no shared experts), not " + sc.architecture + "'s; use the HF export");
  if (!src.tokenizer) throw Error(src.source + ": cannot export as GGUF without a tokenizer; pass --tokenizer");
  if (sc.qkv_bias && sc.rope_factor > 0)
    throw Error(src.source + ": cannot export as GGUF: llama.cpp's 'qwen2' has no Llama-3 rope scaling");
  const Model m = plain_copy(src);
  const ModelConfig& c = m.config;
  const GgmlType type = o.type;
  const std::string arch = gguf_arch(c);
  const bool permute_qk = arch == "llama";  // llama.cpp's "llama" rotates adjacent pairs

  GgufExportStats stats;
  if (c.sliding_window > 0 && c.sliding_window < c.max_seq)
    stats.notes.push_back("llama.cpp's 'llama' attends over the whole context, not a sliding window of " +
                          std::to_string(c.sliding_window) + " tokens: outputs agree with the model on sequences of up to " +
                          std::to_string(c.sliding_window) + " tokens (as with llama.cpp's own conversion)");

  std::shared_ptr<SafetensorsFile> codes_file;
  if (ggml_is_quantized(type) && !o.codes_path.empty()) codes_file = std::make_shared<SafetensorsFile>(o.codes_path);

  GgufWriter w(path);
  auto key = [&](const std::string& k) { return arch + "." + k; };
  w.set("general.architecture", GgufValue::string(arch));
  w.set("general.name", GgufValue::string(fs::path(src.source).filename().replace_extension().string()));
  w.set("general.file_type", GgufValue::u32(file_type(type)));
  w.set("dartquant.written_by", GgufValue::string(kWrittenBy));  // lets --force tell its own outputs
  if (ggml_is_quantized(type)) w.set("general.quantization_version", GgufValue::u32(2));
  w.set(key("vocab_size"), GgufValue::u32(uint32_t(c.vocab_size)));
  w.set(key("context_length"), GgufValue::u32(uint32_t(c.max_seq)));
  w.set(key("embedding_length"), GgufValue::u32(uint32_t(c.hidden_size)));
  w.set(key("block_count"), GgufValue::u32(uint32_t(c.num_layers)));
  w.set(key("feed_forward_length"), GgufValue::u32(uint32_t(c.intermediate_size)));
  w.set(key("attention.head_count"), GgufValue::u32(uint32_t(c.num_heads)));
  w.set(key("attention.head_count_kv"), GgufValue::u32(uint32_t(c.num_kv_heads)));
  w.set(key("attention.key_length"), GgufValue::u32(uint32_t(c.head_dim)));
  w.set(key("attention.value_length"), GgufValue::u32(uint32_t(c.head_dim)));
  w.set(key("attention.layer_norm_rms_epsilon"), GgufValue::f32(c.rms_eps));
  w.set(key("rope.freq_base"), GgufValue::f32(c.rope_theta));
  w.set(key("rope.dimension_count"), GgufValue::u32(uint32_t(c.head_dim)));
  if (moe) {
    w.set(key("expert_count"), GgufValue::u32(uint32_t(c.num_experts)));
    w.set(key("expert_used_count"), GgufValue::u32(uint32_t(c.experts_per_tok)));
  }
  if (c.rope_factor > 0) {
    // llama.cpp reads only rope_freqs.weight; these let our reader restore the exact HF parameters.
    w.set("dartquant.rope_scaling.factor", GgufValue::f32(c.rope_factor));
    w.set("dartquant.rope_scaling.low_freq_factor", GgufValue::f32(c.rope_low_freq));
    w.set("dartquant.rope_scaling.high_freq_factor", GgufValue::f32(c.rope_high_freq));
    w.set("dartquant.rope_scaling.original_context_length", GgufValue::u32(uint32_t(c.rope_original_max)));
  }
  for (const std::string& n : add_tokenizer(w, m)) stats.notes.push_back(n);

  // Each GGUF tensor and the HF tensors it is made of: one, or a MoE layer's experts stacked.
  struct Out {
    std::string gname;
    std::vector<std::string> parts;
  };
  std::vector<Out> outs = {{"token_embd.weight", {"model.embed_tokens.weight"}}};
  std::set<std::string> covered;
  auto add = [&](const std::string& hf) {
    if (!m.weights.has(hf)) return;
    outs.push_back({gguf_tensor_name(hf), {hf}});
  };
  for (int l = 0; l < c.num_layers; ++l) {
    for (const char* s : {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                          "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                          "self_attn.v_proj.bias", "self_attn.o_proj.weight", "post_attention_layernorm.weight"})
      add(layer_name(l, s));
    if (!moe) {
      for (const char* s : {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}) add(layer_name(l, s));
      continue;
    }
    const std::string blk = "blk." + std::to_string(l) + ".";
    outs.push_back({blk + "ffn_gate_inp.weight", {router_name(c, l)}});
    Out gate{blk + "ffn_gate_exps.weight", {}}, up{blk + "ffn_up_exps.weight", {}}, down{blk + "ffn_down_exps.weight", {}};
    for (const ExpertSpec& e : mlp_experts(c, l)) {
      gate.parts.push_back(e.gate);
      up.parts.push_back(e.up);
      down.parts.push_back(e.down);
    }
    outs.insert(outs.end(), {gate, up, down});
  }
  add("model.norm.weight");
  add("lm_head.weight");
  for (const Out& out : outs) covered.insert(out.parts.begin(), out.parts.end());
  for (const std::string& n : m.weights.names())
    if (!covered.count(n))
      throw Error(src.source + ": cannot export tensor '" + n + "' to GGUF: llama.cpp's '" + arch + "' has no such tensor");

  if (c.rope_factor > 0) {
    std::vector<float> f = llama3_rope_factors(c);
    Matrix fm(1, int64_t(f.size()));
    fm.data = f;
    w.add_tensor("rope_freqs.weight", {uint64_t(f.size())}, GgmlType::F32, fm);
  }
  const bool tied = !m.weights.has("lm_head.weight");
  for (const Out& out : outs) {
    const std::string& first = out.parts[0];
    std::vector<int64_t> shape = m.weights.shape(first);
    if (shape.size() == 1) {  // norms and biases: llama.cpp keeps 1-D tensors F32
      w.add_tensor_lazy(out.gname, {uint64_t(shape[0])}, GgmlType::F32, [&m, first] {
        Matrix v = m.weights.get(first);
        return ggml_encode(GgmlType::F32, v.data.data(), v.data.size());
      });
      continue;
    }
    const int64_t rows = shape[0], cols = shape[1];
    int heads = 0;
    if (permute_qk) heads = first.ends_with("q_proj.weight") ? c.num_heads : first.ends_with("k_proj.weight") ? c.num_kv_heads : 0;
    std::vector<int64_t> rows_order(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) rows_order[size_t(r)] = r;
    if (heads) rows_order = qk_source_rows(rows, heads);

    GgmlType t = type;
    if (first == "lm_head.weight") t = o.edge_type.value_or(edge_type(type, true));
    if (first == "model.embed_tokens.weight") t = o.edge_type.value_or(edge_type(type, tied));
    if (out.gname.ends_with("ffn_gate_inp.weight")) t = GgmlType::F32;  // llama.cpp never quantizes the router
    GgufTensorReport rep;
    rep.name = out.gname;
    if (ggml_is_quantized(t) && cols % 32 != 0) {
      t = GgmlType::F32;  // rows that are not whole blocks (no llama.cpp quantize fallback for them)
      rep.note = "rows of " + std::to_string(cols) + " are not whole blocks of 32";
    }
    // Codes are carried when every part has codes that fit; read_codes confirms they reproduce the
    // weights while the file is written, else the tensor is requantized after all.
    std::vector<Codes> layouts(out.parts.size());
    bool carry = ggml_is_quantized(t) && codes_file;
    for (size_t i = 0; carry && i < out.parts.size(); ++i) {
      std::string why = codes_layout(*codes_file, out.parts[i], rows, cols, t, layouts[i]);
      if (!why.empty()) {
        carry = false;
        if (why != "no codes") rep.note = why;
      }
    }
    rep.type = ggml_type_name(t);
    rep.how = carry ? "codes" : ggml_is_quantized(t) ? "requantized" : "converted";
    ++(carry ? stats.from_codes : ggml_is_quantized(t) ? stats.requantized : stats.converted);
    const size_t slot = stats.tensors.size();
    stats.tensors.push_back(rep);

    std::vector<uint64_t> gshape = {uint64_t(cols), uint64_t(rows)};
    if (out.parts.size() > 1) gshape.push_back(out.parts.size());  // experts: the outermost dimension
    // Runs during w.write(), before this function returns: stats and codes_file outlive it.
    w.add_tensor_lazy(out.gname, gshape, t, [&m, &stats, &codes_file, slot, out, heads, t, layouts, rows_order, cols] {
      GgufTensorReport& r = stats.tensors[slot];
      const bool carry = r.how == "codes";
      std::vector<uint8_t> bytes;
      ErrorSum err;
      for (size_t i = 0; i < out.parts.size(); ++i) {
        Matrix v = m.weights.get(out.parts[i]);
        if (heads) v = gguf_permute_qk(v, heads, false);
        std::vector<uint8_t> b;
        if (carry) {
          Codes k = layouts[i];
          std::string why = read_codes(*codes_file, out.parts[i], m.weights.get(out.parts[i]), k);
          if (why.empty()) {
            b = blocks_from_codes(k, rows_order, cols, t);
          } else {  // this part (an expert, or the whole tensor) is requantized after all
            r.how = out.parts.size() > 1 ? "codes, some parts requantized" : "requantized";
            r.note += (r.note.empty() ? "" : "; ") + (out.parts.size() > 1 ? out.parts[i] + ": " : "") + why;
          }
        }
        if (b.empty()) b = ggml_encode(t, v.data.data(), v.data.size());
        err.add(v, t, b);
        bytes.insert(bytes.end(), b.begin(), b.end());
      }
      if (carry && r.how != "codes") {
        --stats.from_codes;
        ++stats.requantized;
      }
      err.finish(r);
      return bytes;
    });
  }
  w.write();
  return stats;
}

}  // namespace dq
