// Writes the fuzzers' seed corpus: small valid files made with the project's own writers,
// hand-made edge cases, and small files or prefixes from the shared data directory.
//   dq_seed_corpus DATA_DIR SOURCE_DIR OUT_DIR   ->  OUT_DIR/<fuzzer>/<seed>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "io/file.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/export.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "../tests/fixtures/tokenizer/variant.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace dq;

static std::string out_dir;
static int written = 0;

static void seed(const std::string& fuzzer, const std::string& name, const std::string& bytes) {
  fs::create_directories(out_dir + "/" + fuzzer);
  std::ofstream f(out_dir + "/" + fuzzer + "/" + name, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  ++written;
}
static std::string slurp(const std::string& path, size_t max = std::string::npos) {
  std::string s = read_file(path);
  return s.substr(0, std::min(max, s.size()));
}
template <class T>
static void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// ---- safetensors
static std::string raw_safetensors(const std::string& header, size_t data_bytes, uint64_t claimed = 0) {
  std::string s;
  put<uint64_t>(s, claimed ? claimed : header.size());
  s += header;
  s.append(data_bytes, '\x01');
  return s;
}
static void safetensors_seeds() {
  std::string tmp = out_dir + "/.tmp.safetensors";
  Matrix m(3, 4);
  for (size_t i = 0; i < m.size(); ++i) m.data[i] = float(i) - 5.5f;
  write_safetensors(tmp, {blob_from_matrix("w", m, DType::F32), blob_from_matrix("b", m, DType::BF16),
                          blob_from_matrix("h", m, DType::F16, {12})},
                    {{"format", "pt"}});
  seed("safetensors", "valid_three", slurp(tmp));
  write_safetensors(tmp, {});
  seed("safetensors", "valid_empty", slurp(tmp));
  fs::remove(tmp);
  seed("safetensors", "scalar", raw_safetensors(R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}})", 8));
  seed("safetensors", "zero_dim", raw_safetensors(R"({"z":{"dtype":"I8","shape":[0,7],"data_offsets":[0,0]}})", 0));
  seed("safetensors", "ints", raw_safetensors(R"({"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"k":"v","n":1}})", 11));
  seed("safetensors", "huge_dims", raw_safetensors(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4));
  seed("safetensors", "reversed_offsets", raw_safetensors(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4));
  seed("safetensors", "negative_dim", raw_safetensors(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4));
  seed("safetensors", "unknown_dtype", raw_safetensors(R"({"x":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})", 4));
  seed("safetensors", "header_too_long", raw_safetensors("{}", 0, uint64_t(1) << 62));
  seed("safetensors", "not_object", raw_safetensors("[1,2]", 0));
  seed("safetensors", "short", std::string("\x02\0\0\0", 4));
  // The tiling rule (issue 16): duplicate names, overlapping, gapped, misaligned ranges, trailing bytes.
  seed("safetensors", "duplicate_name", raw_safetensors(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  seed("safetensors", "overlap", raw_safetensors(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8));
  seed("safetensors", "gap", raw_safetensors(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12));
  seed("safetensors", "misaligned", raw_safetensors(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}   )", 5));
  seed("safetensors", "trailing", raw_safetensors(R"({"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", 9));
}

// ---- config.json + index
static void config_seeds(const std::string& data) {
  const std::string index = R"({"metadata":{"total_size":40},"weight_map":{"model.embed_tokens.weight":"shard.safetensors","model.norm.weight":"shard.safetensors"}})";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(data + "/hf", ec)) {
    fs::path c = e.path() / "config.json";
    if (fs::exists(c)) seed("config", e.path().filename().string(), slurp(c.string()) + std::string(1, '\0') + index);
  }
  const std::string tiny = R"({"architectures":["LlamaForCausalLM"],"vocab_size":2,"hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"tie_word_embeddings":true,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})";
  seed("config", "tiny_with_index", tiny + std::string(1, '\0') + index);
  seed("config", "tiny_single_file", tiny);
  seed("config", "qwen_sliding", R"({"architectures":["Qwen2ForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"head_dim":4,"use_sliding_window":true,"sliding_window":4,"attention_bias":true})" + std::string(1, '\0') + R"({"weight_map":{"a":"../x.safetensors"}})");
  seed("config", "mistral", R"({"model_type":"MistralForCausalLM","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":2,"sliding_window":4096,"rms_norm_eps":1e-5,"rope_theta":1e6})" + std::string(1, '\0') + R"({"weight_map":{}})");
  // Refused (issue 16): duplicate keys, unimplemented fields, values out of their domain.
  seed("config", "duplicate_key", R"({"architectures":["LlamaForCausalLM"],"vocab_size":2,"hidden_size":4,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2})");
  seed("config", "gelu", R"({"architectures":["LlamaForCausalLM"],"vocab_size":2,"hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"hidden_act":"gelu","mlp_bias":true})");
  seed("config", "domain", R"({"architectures":["LlamaForCausalLM"],"vocab_size":2,"hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":0,"rope_theta":-1,"rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4}})");
}

// ---- llama2.c checkpoint and vocabulary
static std::string tiny_llama2c(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq, bool shared) {
  std::string s;
  for (int v : {dim, hidden, layers, heads, kv_heads, shared ? vocab : -vocab, seq}) put<int32_t>(s, v);
  const int hd = dim / heads, kv = hd * kv_heads;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.1f);
  auto floats = [&](int64_t n, bool ones = false) {
    for (int64_t i = 0; i < n; ++i) put<float>(s, ones ? 1.f : nd(rng));
  };
  floats(int64_t(vocab) * dim);
  floats(int64_t(layers) * dim, true);
  floats(int64_t(layers) * dim * dim);
  floats(int64_t(layers) * kv * dim);
  floats(int64_t(layers) * kv * dim);
  floats(int64_t(layers) * dim * dim);
  floats(int64_t(layers) * dim, true);
  floats(int64_t(layers) * hidden * dim);
  floats(int64_t(layers) * dim * hidden);
  floats(int64_t(layers) * hidden * dim);
  floats(dim, true);
  floats(int64_t(seq) * hd);
  if (!shared) floats(int64_t(vocab) * dim);
  return s;
}
static std::string tiny_vocab() {  // llama2.c layout: unk, bos, eos, 256 byte tokens, then pieces
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    pieces.push_back(name);
  }
  for (const char* p : {" ", "a", "b", " a", "ab", " ab", "\xC3\xA9", " on", "on", "ce"}) pieces.push_back(p);
  std::string s;
  put<int32_t>(s, 8);
  for (size_t i = 0; i < pieces.size(); ++i) {
    put<float>(s, i < 259 ? 0.f : -float(i));
    put<int32_t>(s, int32_t(pieces[i].size()));
    s += pieces[i];
  }
  return s;
}
static void llama2c_seeds(const std::string& data) {
  const std::string ck = data + "/stories260K/stories260K.bin", tok = data + "/stories260K/tok512.bin";
  if (fs::exists(ck)) {
    seed("llama2c", "stories260K", slurp(ck));
    seed("llama2c", "stories260K_prefix", slurp(ck, 4096));
  }
  seed("llama2c", "tiny_shared", tiny_llama2c(8, 16, 1, 2, 1, 6, 4, true));
  seed("llama2c", "tiny_unshared", tiny_llama2c(8, 12, 2, 4, 2, 5, 2, false));
  seed("llama2c", "header_only", tiny_llama2c(8, 16, 1, 2, 1, 6, 4, true).substr(0, 28));
  if (fs::exists(tok)) {
    seed("llama2c_vocab", "tok512", slurp(tok));
    seed("llama2c_vocab", "tok512_prefix", slurp(tok, 1024));
  }
  seed("llama2c_vocab", "tiny", tiny_vocab());
  std::string no_space = tiny_vocab();
  seed("llama2c_vocab", "bad_len", no_space.substr(0, 4) + std::string("\0\0\0\0\xff\xff\xff\x7f", 8));
}

// ---- tokenizer.json: real tokenizers cut down to a few hundred tokens, and the test variants
static json shrink_tokenizer(json t, size_t keep) {
  json& model = t["model"];
  json vocab = json::object();
  for (auto& [k, v] : model["vocab"].items())
    if (v.is_number_integer() && v.get<int64_t>() < int64_t(keep)) vocab[k] = v;
  json merges = json::array();
  for (const json& m : model["merges"]) {
    std::string a, b;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos) continue;
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2) {
      a = m[0].get<std::string>(), b = m[1].get<std::string>();
    }
    if (vocab.contains(a) && vocab.contains(b) && vocab.contains(a + b)) merges.push_back(m);
  }
  model["vocab"] = vocab;
  model["merges"] = merges;
  return t;
}
static void tokenizer_seeds(const std::string& data, const std::string& src) {
  std::map<std::string, json> bases;
  std::set<std::string> seen;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(data + "/hf", ec)) {
    fs::path p = e.path() / "tokenizer.json";
    if (!fs::exists(p)) continue;
    std::string text = slurp(p.string());
    json t = json::parse(text, nullptr, false);
    if (t.is_discarded()) continue;
    bases[e.path().filename().string()] = shrink_tokenizer(t, 400);
    if (seen.insert(text).second) seed("hf_tokenizer", e.path().filename().string(), bases[e.path().filename().string()].dump(1));
  }
  json variants = json::parse(slurp(src + "/tests/fixtures/tokenizer/variants.json"), nullptr, false);
  if (variants.is_object())
    for (const json& v : variants["variants"]) {
      std::string base = v.value("base", "");
      if (!bases.count(base)) continue;
      seed("hf_tokenizer", "variant_" + v.value("name", "x"), dq::test::apply_tokenizer_variant(bases[base], v).dump(1));
    }
  // Hand-made: every decoder and normalizer kind, Bert post-processing, empty strings.
  seed("hf_tokenizer", "handmade_all_components", R"({"version":"1.0","truncation":null,"padding":null,
 "added_tokens":[{"id":5,"content":"[CLS]","single_word":false,"lstrip":true,"rstrip":true,"normalized":false,"special":true},
                 {"id":6,"content":"ab","single_word":true,"lstrip":false,"rstrip":false,"normalized":true,"special":false}],
 "normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"_"},{"type":"Replace","pattern":{"String":" "},"content":"_"}]},
 "pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},{"type":"Metaspace","replacement":"_","prepend_scheme":"first","split":true},{"type":"Split","pattern":{"Regex":"\\w+|\\s"},"behavior":"MergedWithPrevious","invert":true}]},
 "post_processor":{"type":"BertProcessing","cls":["[CLS]",5],"sep":["[SEP]",4]},
 "decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"_"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0},{"type":"Metaspace","replacement":"_","prepend_scheme":"always"}]},
 "model":{"type":"BPE","dropout":null,"unk_token":"<unk>","continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":true,"byte_fallback":true,"ignore_merges":false,
   "vocab":{"<unk>":0,"a":1,"b":2,"ab":3,"_":4,"<0x41>":7,"_ab":8},"merges":["a b",["_","ab"]]}})");
  seed("hf_tokenizer", "handmade_bytelevel", R"({"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"use_regex":true},
 "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],"special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]},"</s>":{"id":"</s>","ids":[1],"tokens":["</s>"]}}},
 "decoder":{"type":"ByteLevel"},"model":{"type":"BPE","vocab":{"<s>":0,"</s>":1,"H":2,"e":3,"He":4,"\u0120":5,"\u0120w":6,"w":7},"merges":["H e","\u0120 w"]}})");
  seed("hf_tokenizer", "shared_id_and_bad_added_id", R"({"model":{"type":"BPE","vocab":{"a":0,"b":0,"c":1},"merges":[]},"added_tokens":[{"id":-3,"content":"<s>"}]})");
  seed("hf_tokenizer", "duplicate_key", R"({"model":{"type":"BPE","vocab":{"a":0,"a":1},"merges":[]},"model":null})");
}

// ---- GGUF
static void gguf_seeds(const std::string& data) {
  const std::string dir = out_dir + "/.tmp-gguf";
  fs::create_directories(dir);
  // Hand-made: every metadata type, every tensor type, a llama model small enough to load whole.
  {
    GgufWriter w(dir + "/a.gguf");
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("general.alignment", GgufValue::u32(32));
    w.set("llama.embedding_length", GgufValue::u32(32));
    w.set("llama.feed_forward_length", GgufValue::u32(32));
    w.set("llama.block_count", GgufValue::u32(1));
    w.set("llama.attention.head_count", GgufValue::u32(2));
    w.set("llama.attention.head_count_kv", GgufValue::u32(1));
    w.set("llama.context_length", GgufValue::u64(64));
    w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(1e-5f));
    w.set("llama.rope.freq_base", GgufValue::f64(10000.0));
    w.set("x.u8", GgufValue::u8(1));
    w.set("x.i8", GgufValue::i8(-1));
    w.set("x.u16", GgufValue::u16(2));
    w.set("x.i16", GgufValue::i16(-2));
    w.set("x.i32", GgufValue::i32(-3));
    w.set("x.i64", GgufValue::i64(-4));
    w.set("x.bool", GgufValue::boolean(true));
    w.set("x.strs", GgufValue::strings_array({"a", "", "bc"}));
    w.set("x.i32s", GgufValue::i32_array({1, -2, 3}));
    w.set("x.f32s", GgufValue::f32_array({1.5f, -2.f}));
    w.set("tokenizer.huggingface.json", GgufValue::string(R"({"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}})"));
    auto mat = [](int64_t r, int64_t c) {
      Matrix m(r, c);
      for (size_t i = 0; i < m.size(); ++i) m.data[i] = float(int(i % 17) - 8) / 16.f;
      return m;
    };
    const std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> shapes = {
        {"token_embd.weight", {3, 32}},      {"output_norm.weight", {1, 32}},   {"blk.0.attn_norm.weight", {1, 32}},
        {"blk.0.ffn_norm.weight", {1, 32}},  {"blk.0.attn_q.weight", {32, 32}}, {"blk.0.attn_k.weight", {16, 32}},
        {"blk.0.attn_v.weight", {16, 32}},   {"blk.0.attn_output.weight", {32, 32}},
        {"blk.0.ffn_gate.weight", {32, 32}}, {"blk.0.ffn_up.weight", {32, 32}}, {"blk.0.ffn_down.weight", {32, 32}}};
    const GgmlType types[] = {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0};
    int k = 0;
    for (const auto& [name, rc] : shapes) {
      GgmlType t = rc.first == 1 ? GgmlType::F32 : types[k++ % 5];
      std::vector<uint64_t> shape = rc.first == 1 ? std::vector<uint64_t>{uint64_t(rc.second)}
                                                  : std::vector<uint64_t>{uint64_t(rc.second), uint64_t(rc.first)};
      w.add_tensor(name, shape, t, mat(rc.first, rc.second));
    }
    w.write();
    seed("gguf", "handmade_llama", slurp(dir + "/a.gguf"));
  }
  // Exported from a tiny llama2.c model with the stories260K vocabulary (llama2.c tokenizer rebuilt
  // from metadata on load), as F32 and Q4_0.
  const std::string tok = data + "/stories260K/tok512.bin";
  if (fs::exists(tok)) {
    std::string ck = dir + "/tiny.bin";
    std::ofstream(ck, std::ios::binary) << tiny_llama2c(32, 32, 1, 2, 1, 512, 4, true);
    Model m = load_model(ck, tok);
    rope_to_halves(m);
    for (GgmlType t : {GgmlType::F32, GgmlType::Q4_0}) {
      GgufExportOptions o;
      o.type = t;
      export_gguf(m, dir + "/t.gguf", o);
      seed("gguf", std::string("export_tiny_") + ggml_type_name(t), slurp(dir + "/t.gguf"));
    }
  }
  fs::remove_all(dir);
  std::string bad = "GGUF";
  put<uint32_t>(bad, 3);
  put<uint64_t>(bad, uint64_t(1) << 60);
  put<uint64_t>(bad, 0);
  seed("gguf", "huge_tensor_count", bad);
}

// ---- task files
static void jsonl_seeds(const std::string& data) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(data + "/zeroshot", ec)) {
    std::ifstream f(e.path());
    std::string line, text;
    for (int i = 0; i < 3 && std::getline(f, line); ++i) text += line + "\n";
    seed("jsonl", e.path().stem().string(), text);
  }
  seed("jsonl", "mc", "{\"query\":\"q, because\",\"choices\":[\"a\",\"b\"],\"gold\":1}\n");
  seed("jsonl", "schema", "{\"context_options\":[\"x\",\"y\"],\"continuation\":\"z\",\"gold\":0}\n");
  seed("jsonl", "lm", "{\"context\":\"c\",\"continuation\":\"d\"}\n{\"context\":\"e\",\"continuation\":\"f\"}");
  seed("jsonl", "bad_gold", "{\"query\":\"q\",\"choices\":[\"a\"],\"gold\":-9223372036854775808}\n");
  seed("jsonl", "blank_line", "{\"context\":\"c\",\"continuation\":\"d\"}\n\n");
}

// ---- dartquant_quantization sections (as quantize writes them, and edge cases)
static void runtime_seeds() {
  seed("runtime", "w4a4kv4_r3r4",
       R"({"weights": {"bits": 4, "method": "gptq"}, "activations": {"bits": 4, "symmetric": false, "clip_ratio": 0.9},)"
       R"( "kv_cache": {"bits": 4, "symmetric": false, "clip_ratio": 1.0}, "online": {"r3": true, "r4": true}})");
  seed("runtime", "a8_only", R"({"activations": {"bits": 8}})");
  seed("runtime", "kv16", R"({"kv_cache": {"bits": 16, "clip_ratio": 0.5}, "online": {"r4": true}})");
  seed("runtime", "bad_bits", R"({"activations": {"bits": 1e30}})");
  seed("runtime", "bad_clip", R"({"kv_cache": {"bits": 4, "clip_ratio": -1}})");
  seed("runtime", "bad_online", R"({"online": {"r3": 1}})");
  seed("runtime", "not_object", R"([1, 2])");
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: dq_seed_corpus DATA_DIR SOURCE_DIR OUT_DIR\n";
    return 2;
  }
  const std::string data = argv[1], src = argv[2];
  out_dir = argv[3];
  fs::create_directories(out_dir);
  try {
    safetensors_seeds();
    config_seeds(data);
    llama2c_seeds(data);
    tokenizer_seeds(data, src);
    gguf_seeds(data);
    jsonl_seeds(data);
    runtime_seeds();
  } catch (const std::exception& e) {
    std::cerr << "dq_seed_corpus: " << e.what() << "\n";
    return 1;
  }
  std::cout << "wrote " << written << " seeds to " << out_dir << "\n";
  return 0;
}
