// Export to plain HF checkpoints and GGUF. The GGUF checks read the bytes with a small parser
// written here from ggml's gguf.md, independent of the project's GgufFile; the q/k order is checked
// against llama2.c's original (Meta) layout and against convert_hf_to_gguf's reshape/swapaxes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/export.h"
#include "model/forward.h"
#include "model/llamacpp_rounding.h"
#include "model/save.h"
#include "model/synth.h"
#include "tensor/kernels.h"
#include "fixtures/tokenizer/variant.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;

namespace {

constexpr int kSeq = 256, kWindows = 4;

// ---- an independent reading of the GGUF format ----

struct SpecValue {
  uint32_t type = 0, elem = 0;  // gguf_metadata_value_type codes
  uint64_t count = 0;           // array length
  std::vector<double> nums;     // numeric scalars / arrays
  std::vector<std::string> strs;
};
struct SpecTensor {
  std::vector<uint64_t> dims;
  uint32_t type = 0;
  uint64_t offset = 0;  // relative to the data section
};
struct SpecFile {
  uint32_t version = 0;
  std::vector<std::string> keys;  // in file order
  std::map<std::string, SpecValue> kv;
  std::vector<std::string> tensor_order;
  std::map<std::string, SpecTensor> tensors;
  uint64_t data_start = 0;
  std::string bytes;
};

struct Reader {
  const std::string& b;
  size_t pos = 0;
  template <class T>
  T get() {
    if (pos + sizeof(T) > b.size()) throw std::runtime_error("truncated");
    T v;
    std::memcpy(&v, b.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str() {
    uint64_t n = get<uint64_t>();
    if (pos + n > b.size()) throw std::runtime_error("truncated string");
    std::string s = b.substr(pos, n);
    pos += n;
    return s;
  }
  double num(uint32_t t) {
    switch (t) {
      case 0: return get<uint8_t>();
      case 1: return get<int8_t>();
      case 2: return get<uint16_t>();
      case 3: return get<int16_t>();
      case 4: return get<uint32_t>();
      case 5: return get<int32_t>();
      case 6: return get<float>();
      case 7: return get<uint8_t>();
      case 10: return double(get<uint64_t>());
      case 11: return double(get<int64_t>());
      case 12: return get<double>();
    }
    throw std::runtime_error("bad value type " + std::to_string(t));
  }
};

SpecFile parse_gguf(const std::string& path) {
  SpecFile f;
  f.bytes = slurp(path);
  Reader r{f.bytes};
  if (f.bytes.substr(0, 4) != "GGUF") throw std::runtime_error("bad magic");
  r.pos = 4;
  f.version = r.get<uint32_t>();
  uint64_t n_tensors = r.get<uint64_t>(), n_kv = r.get<uint64_t>();
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.str();
    SpecValue v;
    v.type = r.get<uint32_t>();
    if (v.type == 8) {
      v.strs.push_back(r.str());
    } else if (v.type == 9) {
      v.elem = r.get<uint32_t>();
      v.count = r.get<uint64_t>();
      for (uint64_t k = 0; k < v.count; ++k) {
        if (v.elem == 8) v.strs.push_back(r.str());
        else v.nums.push_back(r.num(v.elem));
      }
    } else {
      v.nums.push_back(r.num(v.type));
    }
    f.keys.push_back(key);
    f.kv[key] = v;
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    std::string name = r.str();
    SpecTensor t;
    uint32_t nd = r.get<uint32_t>();
    for (uint32_t d = 0; d < nd; ++d) t.dims.push_back(r.get<uint64_t>());
    t.type = r.get<uint32_t>();
    t.offset = r.get<uint64_t>();
    f.tensor_order.push_back(name);
    f.tensors[name] = t;
  }
  uint64_t align = f.kv.count("general.alignment") ? uint64_t(f.kv["general.alignment"].nums[0]) : 32;
  f.data_start = (r.pos + align - 1) / align * align;
  return f;
}

// ---- helpers ----

std::vector<int32_t> eval_tokens(const Model& m) {
  std::string text = slurp(kValid).substr(0, 20000);
  std::vector<int32_t> ids = m.tokenizer->encode(text, true);
  EXPECT_GE(ids.size(), size_t(kSeq * kWindows));
  ids.resize(size_t(kSeq * kWindows));
  return ids;
}

std::vector<double> nll(const Model& m, const std::vector<int32_t>& ids) {
  return next_token_nll(m, ids, kWindows, kSeq);
}

double ppl(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return std::exp(s / double(v.size()));
}

// stories260K as an HF directory (rope halves), written once for the suite.
class Export : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new ScratchDirFor("suite");
    Model m = load_model(kStories);
    rope_to_halves(m);
    save_model(m, src_dir());
    Model src = load_model(src_dir());
    ids_ = new std::vector<int32_t>(eval_tokens(src));
    ref_ = new std::vector<double>(nll(src, *ids_));
  }
  static void TearDownTestSuite() {
    delete root_;
    delete ids_;
    delete ref_;
  }
  // A scratch directory that outlives single tests.
  struct ScratchDirFor {
    explicit ScratchDirFor(const std::string& tag)
        : path(fs::temp_directory_path() / ("dq_export_" + std::to_string(getpid()) + "_" + tag)) {
      fs::remove_all(path);
      fs::create_directories(path);
    }
    ~ScratchDirFor() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
    fs::path path;
  };
  static std::string src_dir() { return (root_->path / "stories_hf").string(); }
  static ScratchDirFor* root_;
  static std::vector<int32_t>* ids_;
  static std::vector<double>* ref_;
  ScratchDir tmp_;
};
Export::ScratchDirFor* Export::root_ = nullptr;
std::vector<int32_t>* Export::ids_ = nullptr;
std::vector<double>* Export::ref_ = nullptr;

// 4-bit group-32 codes of every linear whose rows split into groups of 32, written as a quantized
// model directory (FORMAT.md). Symmetric: zero 8, f16_scales rounds each scale to f16 first.
// Asymmetric: zero points from each group's range, scales with 7 significant bits, so that both
// scale and scale * zero are exact in f16 (what q4_1 stores).
void write_group32_model(const std::string& src, const std::string& dir, bool f16_scales, bool asymmetric = false) {
  Model m = load_model(src);
  std::vector<TensorBlob> extra;
  for (const std::string& name : m.weights.names()) {
    if (name.find("_proj.weight") == std::string::npos) continue;
    Matrix w = m.weights.get(name);
    if (w.cols % 32 != 0) continue;
    const int64_t groups = w.cols / 32;
    Matrix scales(w.rows, groups), zeros(w.rows, groups, 8.f);
    std::vector<uint8_t> packed(size_t(w.rows * w.cols / 2), 0);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float mx = 0, lo = 0, hi = 0;
        for (int64_t c = g * 32; c < g * 32 + 32; ++c) {
          mx = std::max(mx, std::fabs(w(r, c)));
          lo = std::min(lo, w(r, c));
          hi = std::max(hi, w(r, c));
        }
        float s = asymmetric ? (hi - lo) / 15.f : mx / 7.f;
        if (asymmetric) {
          int e;
          float frac = std::frexp(s, &e);
          s = std::ldexp(std::nearbyint(frac * 128.f) / 128.f, e);
          zeros(r, g) = std::clamp(std::nearbyint(-lo / s), 0.f, 15.f);
        }
        if (f16_scales) s = f16_to_f32(f32_to_f16(s));
        scales(r, g) = s;
        const float z = zeros(r, g);
        for (int64_t c = g * 32; c < g * 32 + 32; ++c) {
          int q = int(std::clamp(std::nearbyint(w(r, c) / s) + z, 0.f, 15.f));
          w(r, c) = s * (float(q) - z);
          packed[size_t(r * w.cols / 2 + c / 2)] |= uint8_t(c % 2 ? q << 4 : q);
        }
      }
    extra.push_back({name + ".codes", DType::U8, {w.rows, w.cols / 2}, packed});
    extra.push_back(blob_from_matrix(name + ".scales", scales, DType::F32));
    extra.push_back(blob_from_matrix(name + ".zeros", zeros, DType::F32));
    m.weights.set(name, std::move(w));
  }
  m.quantization = {{"weights", {{"bits", 4}, {"method", "rtn"}, {"group", 32}, {"symmetric", !asymmetric}}},
                    {"online", {{"r3", false}, {"r4", false}}}};
  SaveOptions o;
  o.extra = std::move(extra);
  save_model(m, dir, o);
}

// A small Llama model with seeded random weights and the given tokenizer (vocabulary sized to it).
Model random_model(const std::string& tokenizer, int hidden = 32, int layers = 1, uint64_t seed = 7) {
  Model m;
  m.tokenizer = load_tokenizer(tokenizer);
  m.tokenizer_path = tokenizer;
  m.source = "synthetic";
  ModelConfig& c = m.config;
  c.vocab_size = int(m.tokenizer->vocab_size());
  c.hidden_size = hidden;
  c.intermediate_size = hidden + 16;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = hidden / 4;
  c.max_seq = 256;
  c.extra = c.to_json();
  std::mt19937 rng{uint32_t(seed)};
  std::normal_distribution<float> nd(0.f, 0.08f);
  auto rnd = [&](int64_t r, int64_t k, float base = 0.f) {
    Matrix x(r, k);
    for (float& v : x.data) v = base + nd(rng);
    return x;
  };
  const int D = hidden, F = c.intermediate_size, KV = c.kv_dim();
  m.weights.set("model.embed_tokens.weight", rnd(c.vocab_size, D));
  m.weights.set("lm_head.weight", rnd(c.vocab_size, D));
  m.weights.set("model.norm.weight", rnd(1, D, 1.f));
  for (int l = 0; l < layers; ++l) {
    m.weights.set(layer_name(l, "input_layernorm.weight"), rnd(1, D, 1.f));
    m.weights.set(layer_name(l, "post_attention_layernorm.weight"), rnd(1, D, 1.f));
    m.weights.set(layer_name(l, "self_attn.q_proj.weight"), rnd(D, D));
    m.weights.set(layer_name(l, "self_attn.k_proj.weight"), rnd(KV, D));
    m.weights.set(layer_name(l, "self_attn.v_proj.weight"), rnd(KV, D));
    m.weights.set(layer_name(l, "self_attn.o_proj.weight"), rnd(D, D));
    m.weights.set(layer_name(l, "mlp.gate_proj.weight"), rnd(F, D));
    m.weights.set(layer_name(l, "mlp.up_proj.weight"), rnd(F, D));
    m.weights.set(layer_name(l, "mlp.down_proj.weight"), rnd(D, F));
  }
  return m;
}

const SpecValue& need_key(SpecFile& f, const std::string& k) {
  if (!f.kv.count(k)) throw std::runtime_error("missing key " + k);
  return f.kv[k];
}

// ---- tests ----

TEST_F(Export, GgufF32GivesTheSourcePplExactly) {
  const std::string out = tmp_ / "s.gguf";
  export_gguf(load_model(src_dir()), out);
  Model g = load_model(out);  // no tokenizer beside it: rebuilt from the GGUF metadata
  ASSERT_TRUE(g.tokenizer);
  EXPECT_EQ(eval_tokens(g), *ids_);
  EXPECT_EQ(g.config.tie_embeddings, true);
  EXPECT_FALSE(g.weights.has("lm_head.weight"));
  std::vector<double> got = nll(g, *ids_);
  EXPECT_EQ(got, *ref_);
  std::printf("stories260K ppl (%d x %d tokens): source %.6f, gguf f32 %.6f\n", kWindows, kSeq, ppl(*ref_), ppl(got));
}

TEST_F(Export, GgufHeaderMetadataAndTensorTableFollowTheFormat) {
  const std::string out = tmp_ / "s.gguf";
  export_gguf(load_model(src_dir()), out);
  SpecFile f = parse_gguf(out);
  EXPECT_EQ(f.version, 3u);
  auto expect_u32 = [&](const std::string& k, double v) {
    ASSERT_TRUE(f.kv.count(k)) << k;
    EXPECT_EQ(f.kv[k].type, 4u) << k;
    EXPECT_EQ(f.kv[k].nums.at(0), v) << k;
  };
  auto expect_f32 = [&](const std::string& k, float v) {
    ASSERT_TRUE(f.kv.count(k)) << k;
    EXPECT_EQ(f.kv[k].type, 6u) << k;
    EXPECT_EQ(float(f.kv[k].nums.at(0)), v) << k;
  };
  ASSERT_TRUE(f.kv.count("general.architecture"));
  EXPECT_EQ(f.kv["general.architecture"].type, 8u);
  EXPECT_EQ(f.kv["general.architecture"].strs.at(0), "llama");
  EXPECT_EQ(f.keys.front(), "general.architecture");
  expect_u32("general.file_type", 0);  // LLAMA_FTYPE_ALL_F32
  expect_u32("llama.context_length", 512);
  expect_u32("llama.embedding_length", 64);
  expect_u32("llama.block_count", 5);
  expect_u32("llama.feed_forward_length", 172);
  expect_u32("llama.attention.head_count", 8);
  expect_u32("llama.attention.head_count_kv", 4);
  expect_u32("llama.rope.dimension_count", 8);
  expect_u32("llama.vocab_size", 512);
  expect_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  expect_f32("llama.rope.freq_base", 10000.f);
  EXPECT_EQ(f.kv["tokenizer.ggml.model"].strs.at(0), "llama");
  const SpecValue& toks = f.kv["tokenizer.ggml.tokens"];
  EXPECT_EQ(toks.type, 9u);
  EXPECT_EQ(toks.elem, 8u);
  ASSERT_EQ(toks.count, 512u);
  EXPECT_EQ(toks.strs[3], "<0x00>");
  EXPECT_EQ(toks.strs[259], "\xE2\x96\x81t");  // llama2.c's " t", spaces spelled U+2581
  EXPECT_EQ(f.kv["tokenizer.ggml.scores"].elem, 6u);
  EXPECT_EQ(f.kv["tokenizer.ggml.scores"].count, 512u);
  EXPECT_EQ(f.kv["tokenizer.ggml.token_type"].elem, 5u);
  EXPECT_EQ(f.kv["tokenizer.ggml.token_type"].nums.at(0), 2);  // unknown
  EXPECT_EQ(f.kv["tokenizer.ggml.token_type"].nums.at(1), 3);  // control
  EXPECT_EQ(f.kv["tokenizer.ggml.token_type"].nums.at(3), 6);  // byte
  expect_u32("tokenizer.ggml.bos_token_id", 1);
  expect_u32("tokenizer.ggml.eos_token_id", 2);
  expect_u32("tokenizer.ggml.unknown_token_id", 0);
  EXPECT_EQ(f.kv["tokenizer.ggml.add_bos_token"].type, 7u);
  EXPECT_EQ(f.kv["tokenizer.ggml.add_bos_token"].nums.at(0), 1);

  // Tensor table: llama.cpp's names, innermost dimension first, tied model without output.weight.
  std::map<std::string, std::vector<uint64_t>> want = {{"token_embd.weight", {64, 512}}, {"output_norm.weight", {64}}};
  for (int l = 0; l < 5; ++l) {
    std::string p = "blk." + std::to_string(l) + ".";
    want[p + "attn_norm.weight"] = {64};
    want[p + "ffn_norm.weight"] = {64};
    want[p + "attn_q.weight"] = {64, 64};
    want[p + "attn_k.weight"] = {64, 32};
    want[p + "attn_v.weight"] = {64, 32};
    want[p + "attn_output.weight"] = {64, 64};
    want[p + "ffn_gate.weight"] = {64, 172};
    want[p + "ffn_up.weight"] = {64, 172};
    want[p + "ffn_down.weight"] = {172, 64};
  }
  ASSERT_EQ(f.tensors.size(), want.size());
  uint64_t end = 0;
  for (auto& [name, dims] : want) {
    ASSERT_TRUE(f.tensors.count(name)) << name;
    const SpecTensor& t = f.tensors[name];
    EXPECT_EQ(t.dims, dims) << name;
    EXPECT_EQ(t.type, 0u) << name;
    EXPECT_EQ(t.offset % 32, 0u) << name;
    uint64_t n = 1;
    for (uint64_t d : t.dims) n *= d;
    end = std::max(end, t.offset + 4 * n);
  }
  EXPECT_LE(f.data_start + end, f.bytes.size());

  auto data = [&](const std::string& name) {
    const SpecTensor& t = f.tensors[name];
    Matrix m(int64_t(t.dims.size() == 2 ? t.dims[1] : 1), int64_t(t.dims[0]));
    std::memcpy(m.data.data(), f.bytes.data() + f.data_start + t.offset, m.data.size() * 4);
    return m;
  };
  Model hf = load_model(src_dir());
  Model meta = load_model(kStories);  // llama2.c keeps Meta's interleaved q/k rows, as GGUF does
  EXPECT_EQ(data("token_embd.weight").data, hf.weights.get("model.embed_tokens.weight").data);
  EXPECT_EQ(data("blk.3.ffn_down.weight").data, hf.weights.get(layer_name(3, "mlp.down_proj.weight")).data);
  for (int l = 0; l < 5; ++l)
    for (auto [proj, gname, heads] : {std::tuple{"self_attn.q_proj.weight", "attn_q.weight", 8},
                                      std::tuple{"self_attn.k_proj.weight", "attn_k.weight", 4}}) {
      Matrix g = data("blk." + std::to_string(l) + "." + gname);
      EXPECT_EQ(g.data, meta.weights.get(layer_name(l, proj)).data) << l << " " << gname;
      // convert_hf_to_gguf: w.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).reshape(w.shape)
      Matrix w = hf.weights.get(layer_name(l, proj));
      const int64_t half = w.rows / heads / 2;
      Matrix p(w.rows, w.cols);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t a = 0; a < 2; ++a)
          for (int64_t i = 0; i < half; ++i)  // element [h][a][i] lands at [h][i][a]
            for (int64_t c = 0; c < w.cols; ++c) p(h * 2 * half + i * 2 + a, c) = w(h * 2 * half + a * half + i, c);
      EXPECT_EQ(g.data, p.data) << l << " " << gname;
      EXPECT_EQ(gguf_permute_qk(g, heads, true).data, w.data);
    }
}

TEST_F(Export, GgufQuantizedTypesLoadWithClosePpl) {
  Model src = load_model(src_dir());
  for (auto [type, tol, name] : {std::tuple{GgmlType::F16, 1e-3, "f16"}, std::tuple{GgmlType::BF16, 1e-2, "bf16"},
                                 std::tuple{GgmlType::Q8_0, 5e-3, "q8_0"}, std::tuple{GgmlType::Q4_0, 0.1, "q4_0"},
                                 std::tuple{GgmlType::Q4_1, 0.1, "q4_1"}}) {
    const std::string out = tmp_ / (std::string(name) + ".gguf");
    GgufExportOptions o;
    o.type = type;
    GgufExportStats s = export_gguf(src, out, o);
    SpecFile f = parse_gguf(out);
    EXPECT_EQ(f.tensors["blk.0.attn_q.weight"].type, uint32_t(type)) << name;
    EXPECT_EQ(f.tensors["blk.0.attn_norm.weight"].type, 0u) << name;
    const bool q = ggml_is_quantized(type);
    // 172-wide rows are not whole blocks and stay f32. The embedding, tied to the classifier, gets
    // llama.cpp's classifier type (q6_K there, q8_0 here) in a 4-bit file, the file's type otherwise.
    EXPECT_EQ(f.tensors["blk.0.ffn_down.weight"].type, q ? 0u : uint32_t(type)) << name;
    EXPECT_EQ(f.tensors["token_embd.weight"].type, q ? uint32_t(GgmlType::Q8_0) : uint32_t(type)) << name;
    EXPECT_EQ(f.kv["general.file_type"].nums.at(0),
              type == GgmlType::Q4_1 ? 3 : type == GgmlType::Q4_0 ? 2 : type == GgmlType::Q8_0 ? 7 : type == GgmlType::F16 ? 1 : 32)
        << name;
    ASSERT_EQ(s.tensors.size(), 36u) << name;  // every 2-D tensor has its report
    for (const GgufTensorReport& r : s.tensors) {
      EXPECT_TRUE(std::isfinite(r.rel_rms_error)) << r.name;
      EXPECT_EQ(r.how, r.type == "f32" || !q ? "converted" : "requantized") << r.name;
    }
    if (q) {
      EXPECT_EQ(s.requantized, 31) << name;
      EXPECT_EQ(s.converted, 5) << name;
      EXPECT_GT(s.tensors[0].rel_rms_error, 0) << name;  // token_embd, requantized
      EXPECT_EQ(f.kv["general.quantization_version"].nums.at(0), 2);
      // Blocks are llama.cpp's reference quantization of the permuted rows.
      const SpecTensor& t = f.tensors["blk.2.attn_v.weight"];
      Matrix v = src.weights.get(layer_name(2, "self_attn.v_proj.weight"));
      std::vector<uint8_t> expect = ggml_encode(type, v.data.data(), v.data.size());
      EXPECT_EQ(0, std::memcmp(expect.data(), f.bytes.data() + f.data_start + t.offset, expect.size())) << name;
    }
    std::vector<double> got = nll(load_model(out), *ids_);
    double rel = std::fabs(ppl(got) / ppl(*ref_) - 1);
    EXPECT_LT(rel, tol) << name;
    std::printf("gguf %-5s ppl %.6f (source %.6f, rel diff %.2e)\n", name, ppl(got), ppl(*ref_), rel);
  }
}

TEST_F(Export, GgufQ4_0CarriesGroup32CodesExactly) {
  const std::string qdir = tmp_ / "q4g32";
  write_group32_model(src_dir(), qdir, /*f16_scales=*/true);
  Model qm = load_model(qdir);
  std::vector<double> want = nll(qm, *ids_);
  GgufExportOptions o;
  o.type = GgmlType::Q4_0;
  o.edge_type = GgmlType::F32;  // the embedding as the model has it, so the file is exact
  o.codes_path = qdir + "/quantized.safetensors";
  GgufExportStats s = export_gguf(qm, tmp_ / "q.gguf", o);
  EXPECT_EQ(s.from_codes, 30);  // q, k, v, o, gate, up of 5 layers; down (172) stays f32
  EXPECT_EQ(s.requantized, 0);
  for (const GgufTensorReport& r : s.tensors) {
    EXPECT_EQ(r.max_abs_error, 0) << r.name;  // carried codes with f16 scales add nothing
    EXPECT_EQ(r.how, r.type == "q4_0" ? "codes" : "converted") << r.name;
  }
  std::vector<double> got = nll(load_model(tmp_ / "q.gguf"), *ids_);
  EXPECT_EQ(got, want);
  std::printf("group-32 codes, f16 scales: dir ppl %.6f, gguf q4_0 %.6f\n", ppl(want), ppl(got));

  // Scales that f16 cannot hold are rounded once by the block format: close, not identical.
  const std::string rdir = tmp_ / "q4g32_f32scales";
  write_group32_model(src_dir(), rdir, /*f16_scales=*/false);
  Model rm = load_model(rdir);
  o.codes_path = rdir + "/quantized.safetensors";
  EXPECT_EQ(export_gguf(rm, tmp_ / "r.gguf", o).from_codes, 30);
  double a = ppl(nll(rm, *ids_)), b = ppl(nll(load_model(tmp_ / "r.gguf"), *ids_));
  EXPECT_LT(std::fabs(b / a - 1), 1e-3);
  std::printf("group-32 codes, f32 scales: dir ppl %.6f, gguf q4_0 %.6f\n", a, b);

  // 4-bit symmetric codes fit q8_0 blocks too (q in [-8, 7]): carried, and as exact.
  o.type = GgmlType::Q8_0;
  o.codes_path = qdir + "/quantized.safetensors";
  GgufExportStats s8 = export_gguf(qm, tmp_ / "q8.gguf", o);
  EXPECT_EQ(s8.from_codes, 30);
  EXPECT_EQ(nll(load_model(tmp_ / "q8.gguf"), *ids_), want);
  // q4_1 holds them as code * d + m with m = -8 d: exact as long as -8 d is (it is: a power of 2).
  o.type = GgmlType::Q4_1;
  EXPECT_EQ(export_gguf(qm, tmp_ / "q41.gguf", o).from_codes, 30);
  EXPECT_EQ(nll(load_model(tmp_ / "q41.gguf"), *ids_), want);

  // Codes that no longer match the weights are not carried, and the report says why.
  Model edited = qm;
  edited.weights.set(layer_name(0, "self_attn.q_proj.weight"), Matrix(64, 64, 0.5f));
  o.type = GgmlType::Q4_0;
  GgufExportStats se = export_gguf(edited, tmp_ / "e.gguf", o);
  EXPECT_EQ(se.from_codes, 29);
  EXPECT_EQ(se.requantized, 1);
  for (const GgufTensorReport& r : se.tensors)
    if (r.name == "blk.0.attn_q.weight") {
      EXPECT_EQ(r.how, "requantized");
      EXPECT_NE(r.note.find("do not reproduce"), std::string::npos) << r.note;
      EXPECT_EQ(r.max_abs_error, 0);  // a constant row is exact in q4_0 (d = -0.5 / -8, code 0)
    }
}

// Asymmetric group-32 codes: q4_1 carries them exactly; q4_0 cannot and re-rounds, saying why.
TEST_F(Export, GgufQ4_1CarriesAsymmetricCodes) {
  const std::string qdir = tmp_ / "asym";
  write_group32_model(src_dir(), qdir, /*f16_scales=*/true, /*asymmetric=*/true);
  Model qm = load_model(qdir);
  std::vector<double> want = nll(qm, *ids_);
  GgufExportOptions o;
  o.type = GgmlType::Q4_1;
  o.edge_type = GgmlType::F32;
  o.codes_path = qdir + "/quantized.safetensors";
  GgufExportStats s = export_gguf(qm, tmp_ / "a.gguf", o);
  EXPECT_EQ(s.from_codes, 30);
  std::vector<double> got = nll(load_model(tmp_ / "a.gguf"), *ids_);
  EXPECT_EQ(got, want);
  std::printf("asymmetric group-32 codes: dir ppl %.6f, gguf q4_1 %.6f\n", ppl(want), ppl(got));

  // The q4_1 blocks hold the codes themselves: the first block of blk.1.attn_v is its codes.
  SpecFile f = parse_gguf(tmp_ / "a.gguf");
  const SpecTensor& t = f.tensors["blk.1.attn_v.weight"];
  EXPECT_EQ(t.type, 3u);
  SafetensorsFile codes(qdir + "/quantized.safetensors");
  const TensorInfo& c = codes.tensors().at(layer_name(1, "self_attn.v_proj.weight") + ".codes");
  const uint8_t* blk = reinterpret_cast<const uint8_t*>(f.bytes.data() + f.data_start + t.offset);
  for (int j = 0; j < 16; ++j) {  // element j low nibble, j + 16 high; codes packed two per byte
    EXPECT_EQ(blk[4 + j] & 0xF, (c.data[j / 2] >> (4 * (j % 2))) & 0xF) << j;
    EXPECT_EQ(blk[4 + j] >> 4, (c.data[(j + 16) / 2] >> (4 * (j % 2))) & 0xF) << j;
  }

  o.type = GgmlType::Q4_0;
  GgufExportStats s0 = export_gguf(qm, tmp_ / "a0.gguf", o);
  EXPECT_EQ(s0.from_codes, 0);
  EXPECT_EQ(s0.requantized, 30);
  for (const GgufTensorReport& r : s0.tensors)
    if (r.type == "q4_0") {
      EXPECT_NE(r.note.find("asymmetric"), std::string::npos) << r.note;
      EXPECT_GT(r.rel_rms_error, 0) << r.name;
    }
}

// Rotated with R1/R2 only, a model is a plain checkpoint: its f32 GGUF computes the same NLLs.
TEST_F(Export, GgufF32OfRotatedModelsIsExact) {
  for (const char* rot : {"quarot", "dartquant"}) {
    const std::string dir = tmp_ / rot, out = tmp_ / (std::string(rot) + ".gguf");
    CliResult q = run_cli("quantize --model " + src_dir() + " --out " + dir + " --rotation " + rot +
                          " --no-online-hadamard --w-bits 16 --calib " + kData +
                          "/tinystories/calib.txt --nsamples 16 --calib-seqlen 256 --epochs 2", tmp_);
    ASSERT_EQ(q.exit_code, 0) << q.err;
    Model rotated = load_model(dir);
    EXPECT_NE(rotated.weights.get("model.embed_tokens.weight").data,
              load_model(src_dir()).weights.get("model.embed_tokens.weight").data) << rot;
    export_gguf(rotated, out);
    std::vector<double> want = nll(rotated, *ids_), got = nll(load_model(out), *ids_);
    EXPECT_EQ(got, want) << rot;
    std::printf("%s R1+R2: dir ppl %.6f, gguf f32 %.6f\n", rot, ppl(want), ppl(got));
  }
}

// The real pipeline: QuaRot without online Hadamards, GPTQ symmetric group 32 with f16 scales,
// exported as q4_0: the blocks carry GPTQ's codes and scales exactly, so the PPL is identical.
TEST_F(Export, GgufQ4_0FromGptqGroup32) {
  const std::string qdir = tmp_ / "gptq", out = tmp_ / "gptq.gguf";
  CliResult q = run_cli("quantize --model " + src_dir() + " --out " + qdir +
                        " --rotation quarot --no-online-hadamard --w-bits 4 --w-method gptq --w-group 32 --w-f16-scales --calib " +
                        kData + "/tinystories/calib.txt --nsamples 16 --calib-seqlen 256", tmp_);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const std::string report = tmp_ / "export.json";
  CliResult e = run_cli("export --model " + qdir + " --format gguf --gguf-type q4_0 --gguf-embed-type f32 --out " +
                        out + " --json " + report, tmp_);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_NE(e.out.find("30 tensors from the model's codes, 0 requantized"), std::string::npos) << e.out;
  EXPECT_EQ(std::count(e.out.begin(), e.out.end(), '\n'), 1) << e.out;  // one summary line
  EXPECT_EQ(e.err, "");
  json rep = json::parse(slurp(report));
  ASSERT_EQ(rep["tensors"].size(), 37u);  // rotated: the classifier is no longer the embedding
  EXPECT_EQ(rep["tensors"][1]["name"], "blk.0.attn_q.weight");
  EXPECT_EQ(rep["tensors"][1]["how"], "codes");
  EXPECT_EQ(rep["tensors"][1]["max_abs_error"], 0.0);

  // q8_0 of the same 4-bit model: the codes fit q8_0 blocks, and stdout is still one line.
  CliResult e8 = run_cli("export --model " + qdir + " --format gguf --gguf-type q8_0 --out " + (tmp_ / "q8.gguf"), tmp_);
  ASSERT_EQ(e8.exit_code, 0) << e8.err;
  EXPECT_EQ(std::count(e8.out.begin(), e8.out.end(), '\n'), 1) << e8.out;
  EXPECT_NE(e8.out.find("30 tensors from the model's codes, 2 requantized, 5 converted, token_embd q8_0, output q8_0"),
            std::string::npos) << e8.out;

  SafetensorsFile codes(qdir + "/quantized.safetensors");
  int64_t scales = 0, not_f16 = 0;
  for (const auto& [name, t] : codes.tensors()) {
    if (!name.ends_with(".scales")) continue;
    const float* s = reinterpret_cast<const float*>(t.data);
    for (int64_t i = 0; i < t.numel(); ++i, ++scales) not_f16 += f16_to_f32(f32_to_f16(s[i])) != s[i];
  }
  std::vector<double> want = nll(load_model(qdir), *ids_), got = nll(load_model(out), *ids_);
  std::printf("gptq g32: dir ppl %.6f, gguf q4_0 %.6f; %lld of %lld scales not exact in f16\n", ppl(want), ppl(got),
              (long long)not_f16, (long long)scales);
  EXPECT_GT(scales, 0);
  EXPECT_EQ(not_f16, 0);
  EXPECT_EQ(got, want);
}

TEST_F(Export, HfReloadsWithIdenticalPpl) {
  const std::string out = tmp_ / "hf";
  export_hf(load_model(kStories), out);  // from llama2.c directly: rope halves applied on the way
  EXPECT_TRUE(fs::exists(out + "/tokenizer.bin"));
  EXPECT_FALSE(fs::exists(out + "/quantized.safetensors"));
  json cfg = json::parse(slurp(out + "/config.json"));
  EXPECT_EQ(cfg["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(cfg["model_type"], "llama");
  EXPECT_EQ(cfg["tie_word_embeddings"], true);
  EXPECT_FALSE(cfg.contains("dq_rope_interleaved"));
  EXPECT_FALSE(cfg.contains("dartquant_quantization"));
  for (const char* k : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings"})
    EXPECT_TRUE(cfg.contains(k)) << k;
  SafetensorsFile st(out + "/model.safetensors");
  EXPECT_FALSE(st.tensors().count("lm_head.weight"));
  EXPECT_EQ(nll(load_model(out), *ids_), *ref_);

  // A weight-quantized directory exports its dequantized weights without the codes or the section.
  const std::string qdir = tmp_ / "q4g32", qout = tmp_ / "qhf";
  write_group32_model(src_dir(), qdir, true);
  Model qm = load_model(qdir);
  export_hf(qm, qout);
  EXPECT_FALSE(fs::exists(qout + "/quantized.safetensors"));
  EXPECT_FALSE(json::parse(slurp(qout + "/config.json")).contains("dartquant_quantization"));
  Model back = load_model(qout);
  EXPECT_TRUE(back.quantization.is_null());
  EXPECT_EQ(nll(back, *ids_), nll(qm, *ids_));
}

TEST_F(Export, RefusesModelsThatNeedRunTimeTransforms) {
  Model m = load_model(src_dir());
  m.quantization = {{"online", {{"r3", false}, {"r4", true}}}};
  for (int fmt = 0; fmt < 2; ++fmt) {
    try {
      if (fmt == 0) export_hf(m, tmp_ / "hf");
      else export_gguf(m, tmp_ / "x.gguf");
      ADD_FAILURE() << "exported a model with online R4";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find("online R4"), std::string::npos) << msg;
      EXPECT_NE(msg.find("silently lost"), std::string::npos) << msg;
    }
  }
  EXPECT_FALSE(fs::exists(tmp_ / "hf"));
  EXPECT_FALSE(fs::exists(tmp_ / "x.gguf"));
  m.quantization = {{"activations", {{"bits", 4}}}, {"kv_cache", {{"bits", 8}}}};
  EXPECT_EQ(runtime_only_features(m), (std::vector<std::string>{"4-bit activation quantization",
                                                                "8-bit KV-cache quantization"}));
  m.quantization = {{"weights", {{"bits", 4}}}, {"online", {{"r3", false}, {"r4", false}}},
                    {"activations", {{"bits", 16}}}};
  EXPECT_TRUE(runtime_only_features(m).empty());

  // Through the CLI: a non-zero exit and the reason.
  Model r3 = load_model(src_dir());
  r3.quantization = {{"online", {{"r3", true}, {"r4", false}}}};
  save_model(r3, tmp_ / "r3");
  CliResult r = run_cli("export --model " + (tmp_ / "r3") + " --format gguf --out " + (tmp_ / "r3.gguf"), tmp_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("online R3"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp_ / "r3.gguf"));
}

TEST_F(Export, CliGgufEvalMatchesSource) {
  const std::string out = tmp_ / "s.gguf";
  CliResult e = run_cli("export --model " + src_dir() + " --format gguf --out " + out, tmp_);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  auto eval = [&](const std::string& model) {
    CliResult r = run_cli("eval --model " + model + " --ppl " + kValid + " --seqlen 256 --max-windows 4", tmp_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out.substr(0, r.out.find('('));  // "ppl X.XXXX  "
  };
  std::string a = eval(src_dir()), b = eval(out);
  EXPECT_EQ(a.rfind("ppl ", 0), 0u) << a;
  EXPECT_EQ(a, b);

  // llama-perplexity's protocol on the same windows: BOS first in each window, second half scored.
  json r = cli_eval("--model " + out + " --ppl " + kValid + " --seqlen 64 --max-windows 3 --protocol llama.cpp", tmp_);
  Model g = load_model(out);
  std::vector<int32_t> ids = g.tokenizer->encode(slurp(kValid), true);  // as eval tokenizes
  ASSERT_EQ(ids[0], 1);
  std::vector<int32_t> wins(ids.begin(), ids.begin() + 3 * 64);
  for (int w = 0; w < 3; ++w) wins[size_t(w * 64)] = 1;
  std::vector<double> v = next_token_nll(g, wins, 3, 64);
  double sum = 0;
  int n = 0;
  for (int w = 0; w < 3; ++w)
    for (int p = 32; p < 63; ++p, ++n) sum += v[size_t(w * 63 + p)];  // logits at 32..62 predict tokens 33..63
  EXPECT_EQ(r["protocol"], "llama.cpp");
  EXPECT_EQ(r["tokens"], n);
  EXPECT_NEAR(r["mean_nll"].get<double>(), sum / n, 1e-6 * sum / n);  // the CLI ran with --threads 1
}

// A synthetic Llama-3-style model: untied classifier, llama3 rope scaling (rope_freqs), and an HF
// byte-level BPE tokenizer carried in tokenizer.huggingface.json.
TEST_F(Export, GgufLlama3RopeUntiedHeadAndHfTokenizer) {
  Model m = random_model(kData + "/hf/smollm2-135m-instruct/tokenizer.json", 64, 2);
  ModelConfig& c = m.config;
  c.rope_theta = 500000.f;
  c.rope_factor = 8.f;
  c.rope_low_freq = 1.f;
  c.rope_high_freq = 4.f;
  c.rope_original_max = 8192;
  c.extra = c.to_json();
  c.extra["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                             {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const std::string out = tmp_ / "l3.gguf";
  export_gguf(m, out);

  SpecFile f = parse_gguf(out);
  EXPECT_EQ(f.kv["tokenizer.ggml.model"].strs.at(0), "gpt2");
  EXPECT_GT(f.kv["tokenizer.ggml.merges"].count, 0u);
  EXPECT_TRUE(f.kv.count("tokenizer.huggingface.json"));
  EXPECT_TRUE(f.tensors.count("output.weight"));
  ASSERT_TRUE(f.tensors.count("rope_freqs.weight"));
  const SpecTensor& rf = f.tensors["rope_freqs.weight"];
  ASSERT_EQ(rf.dims, (std::vector<uint64_t>{8}));
  EXPECT_EQ(rf.type, 0u);
  std::vector<float> factors(8);
  std::memcpy(factors.data(), f.bytes.data() + f.data_start + rf.offset, 32);
  bool interpolated = false;
  for (int i = 0; i < 8; ++i) {  // Llama 3.1's divisor: 1 below 8192/4, 8 above 8192/1, smooth between
    double wavelen = 2 * M_PI * std::pow(500000.0, 2.0 * i / 16);
    double want = wavelen < 2048 ? 1 : wavelen > 8192 ? 8 : 1 / ((1 - (8192 / wavelen - 1) / 3) / 8 + (8192 / wavelen - 1) / 3);
    interpolated |= want != 1 && want != 8;
    EXPECT_NEAR(factors[size_t(i)], want, 1e-6 * want) << i;
  }
  EXPECT_TRUE(interpolated);

  Model g = load_model(out);
  EXPECT_FALSE(g.config.tie_embeddings);
  EXPECT_EQ(g.config.rope_factor, 8.f);
  EXPECT_EQ(g.config.rope_original_max, 8192);
  EXPECT_EQ(g.config.extra["rope_scaling"]["rope_type"], "llama3");
  ASSERT_TRUE(g.tokenizer);
  const std::string text = slurp(kValid).substr(0, 3000);
  std::vector<int32_t> ids = m.tokenizer->encode(text, true);
  EXPECT_EQ(g.tokenizer->encode(text, true), ids);
  ids.resize(128);
  EXPECT_EQ(next_token_nll(g, ids, 1, 128), next_token_nll(m, ids, 1, 128));
}

// ---- tokenizer metadata per family, read back with the parser above ----

// The keys llama.cpp reads for a tokenizer, as this file's parser finds them.
struct TokKeys {
  std::string model, pre;
  std::vector<std::string> tokens;
  std::vector<double> scores, types;
  std::map<std::string, double> ids;  // bos/eos/unknown/padding_token_id present
  bool add_bos = false, add_eos = false;
  int add_space_prefix = -1;  // -1: absent
  std::string chat_template;
};

TokKeys tok_keys(const std::string& gguf) {
  SpecFile f = parse_gguf(gguf);
  TokKeys k;
  k.model = need_key(f, "tokenizer.ggml.model").strs.at(0);
  k.pre = need_key(f, "tokenizer.ggml.pre").strs.at(0);
  k.tokens = need_key(f, "tokenizer.ggml.tokens").strs;
  if (f.kv.count("tokenizer.ggml.scores")) k.scores = f.kv["tokenizer.ggml.scores"].nums;
  k.types = need_key(f, "tokenizer.ggml.token_type").nums;
  for (const char* id : {"bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"})
    if (f.kv.count(std::string("tokenizer.ggml.") + id)) {
      EXPECT_EQ(f.kv[std::string("tokenizer.ggml.") + id].type, 4u) << id;  // u32
      k.ids[id] = f.kv[std::string("tokenizer.ggml.") + id].nums.at(0);
    }
  EXPECT_EQ(need_key(f, "tokenizer.ggml.add_bos_token").type, 7u);
  k.add_bos = need_key(f, "tokenizer.ggml.add_bos_token").nums.at(0) != 0;
  k.add_eos = need_key(f, "tokenizer.ggml.add_eos_token").nums.at(0) != 0;
  if (f.kv.count("tokenizer.ggml.add_space_prefix")) k.add_space_prefix = int(f.kv["tokenizer.ggml.add_space_prefix"].nums.at(0));
  if (f.kv.count("tokenizer.chat_template")) k.chat_template = f.kv["tokenizer.chat_template"].strs.at(0);
  return k;
}

// A tokenizer variant from tests/fixtures/tokenizer/variants.json (or `set` applied to a base),
// written as DIR/tokenizer.json.
std::string variant_tokenizer(const ScratchDir& tmp, const std::string& name, const json& variant) {
  fs::create_directories(tmp / name);
  json base = json::parse(slurp(kData + "/hf/" + variant["base"].get<std::string>() + "/tokenizer.json"));
  spit(tmp / name + "/tokenizer.json", apply_tokenizer_variant(base, variant).dump());
  return tmp / name + "/tokenizer.json";
}

json fixture_variant(const std::string& name) {
  json all = json::parse(slurp(std::string(DQ_SOURCE_DIR) + "/tests/fixtures/tokenizer/variants.json"))["variants"];
  for (const json& v : all)
    if (v["name"] == name) return v;
  throw std::runtime_error("no variant " + name);
}

TEST_F(Export, GgufTokenizerKeysPerFamily) {
  // stories260K (llama2.c vocabulary): SentencePiece, BOS/EOS spelled as SentencePiece does.
  export_gguf(load_model(src_dir()), tmp_ / "stories.gguf");
  TokKeys st = tok_keys(tmp_ / "stories.gguf");
  EXPECT_EQ(st.model, "llama");
  EXPECT_EQ(st.pre, "default");
  EXPECT_EQ(st.tokens.at(1), "<s>");
  EXPECT_EQ(st.tokens.at(2), "</s>");
  EXPECT_EQ(st.ids["bos_token_id"], 1);
  EXPECT_EQ(st.ids["eos_token_id"], 2);
  EXPECT_EQ(st.ids["unknown_token_id"], 0);
  EXPECT_TRUE(st.add_bos);
  EXPECT_FALSE(st.add_eos);
  EXPECT_EQ(st.add_space_prefix, 1);

  struct Family {
    std::string name, tokenizer, model, pre;
    bool add_bos;
    int space_prefix;
    int bos, eos, pad;  // -1: absent
  };
  const std::string hf = kData + "/hf/";
  std::vector<Family> families = {
      {"smollm2", hf + "smollm2-135m-instruct/tokenizer.json", "gpt2", "smollm", false, -1, 1, 2, -1},
      {"tinyllama", hf + "tinyllama-1.1b-chat-v1.0/tokenizer.json", "llama", "default", true, 1, 1, 2, 2},
      {"llama2", hf + "llama-2-7b-hf/tokenizer.json", "llama", "default", true, 1, 1, 2, -1},
      {"mistral", hf + "mistral-7b-v0.1/tokenizer.json", "llama", "default", true, 1, 1, 2, -1},
      {"llama3_split", variant_tokenizer(tmp_, "l3", fixture_variant("llama3_split")), "gpt2", "llama-bpe", true, -1, 0, 0, -1},
      {"qwen_split", variant_tokenizer(tmp_, "qw", fixture_variant("qwen_split")), "gpt2", "qwen2", false, -1, -1, 0, -1},
  };
  // (The variants sit without a config.json: BOS is the template's, EOS the conventional text token.)
  // GPT-2's own pre-tokenizer (ByteLevel with its regex) and Llama-3's split without ignore_merges.
  json gpt2 = {{"base", "smollm2-135m-instruct"},
               {"set", {{"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}}}}};
  families.push_back({"gpt2", variant_tokenizer(tmp_, "g2", gpt2), "gpt2", "gpt-2", false, -1, -1, 0, -1});
  json smaug = fixture_variant("llama3_split");
  smaug["model"]["ignore_merges"] = false;
  families.push_back({"smaug", variant_tokenizer(tmp_, "sm", smaug), "gpt2", "smaug-bpe", true, -1, 0, 0, -1});
  // Beside a config.json whose BOS/EOS ids belong to another vocabulary (Llama-3.2's, as the
  // synthetic Llama-3.2 shapes have): BOS is the token the template adds, the EOS id is left out.
  const std::string l3ids = variant_tokenizer(tmp_, "l3ids", fixture_variant("llama3_split"));
  spit(tmp_ / "l3ids/config.json", json{{"bos_token_id", 128000}, {"eos_token_id", 128001}}.dump());
  families.push_back({"llama3_foreign_ids", l3ids, "gpt2", "llama-bpe", true, -1, 0, -1, -1});

  for (const Family& fam : families) {
    SCOPED_TRACE(fam.name);
    Model m = random_model(fam.tokenizer, 32, 1);
    const std::string out = tmp_ / (fam.name + ".gguf");
    GgufExportStats stats = export_gguf(m, out);
    // Mistral's Metaspace leaves text that starts with a space alone; llama.cpp prefixes all text.
    // The foreign EOS id is not written, and said so.
    EXPECT_EQ(stats.notes.size(), fam.name == "mistral" || fam.name == "llama3_foreign_ids" ? 1u : 0u);
    if (fam.name == "llama3_foreign_ids") {
      EXPECT_NE(stats.notes.at(0).find("EOS id 128001"), std::string::npos);
    }
    TokKeys k = tok_keys(out);
    EXPECT_EQ(k.model, fam.model);
    EXPECT_EQ(k.pre, fam.pre);
    EXPECT_EQ(k.add_bos, fam.add_bos);
    EXPECT_FALSE(k.add_eos);
    EXPECT_EQ(k.add_space_prefix, fam.space_prefix);
    EXPECT_EQ(k.ids.count("bos_token_id") ? int(k.ids["bos_token_id"]) : -1, fam.bos);
    EXPECT_EQ(k.ids.count("eos_token_id") ? int(k.ids["eos_token_id"]) : -1, fam.eos);
    EXPECT_EQ(k.ids.count("padding_token_id") ? int(k.ids["padding_token_id"]) : -1, fam.pad);
    ASSERT_EQ(k.tokens.size(), m.tokenizer->vocab_size());
    // The chat template is tokenizer_config.json's, when it has one.
    const std::string cfg = fs::path(fam.tokenizer).parent_path() / "tokenizer_config.json";
    json tc = fs::exists(cfg) ? json::parse(slurp(cfg)) : json::object();
    EXPECT_EQ(k.chat_template, tc.value("chat_template", std::string()));
    if (fam.model == "llama") {
      // llama.cpp merges the pair whose result scores highest: each normal token scores minus the
      // rank of the first merge making it, so that order is tokenizer.json's merge order.
      json tj = json::parse(slurp(fam.tokenizer));
      std::map<std::string, double> first_rank;
      const json& merges = tj["model"]["merges"];
      for (size_t r = 0; r < merges.size(); ++r) {
        std::string ab = merges[r].is_string() ? merges[r].get<std::string>()
                                               : merges[r][0].get<std::string>() + " " + merges[r][1].get<std::string>();
        std::string t = ab.substr(0, ab.find(' ')) + ab.substr(ab.find(' ') + 1);
        if (!first_rank.count(t)) first_rank[t] = double(r);
      }
      ASSERT_EQ(k.scores.size(), k.tokens.size());
      size_t checked = 0;
      for (size_t i = 0; i < k.tokens.size(); ++i) {
        if (k.types[i] != 1) continue;
        auto it = first_rank.find(k.tokens[i]);
        EXPECT_EQ(k.scores[i], it == first_rank.end() ? -1e9f : -float(it->second)) << k.tokens[i];
        checked += it != first_rank.end();
      }
      EXPECT_GT(checked, k.tokens.size() / 2);
    }
    // Our reader rebuilds the same tokenizer from the file.
    const std::string text = slurp(kValid).substr(0, 2000) + " 12345 don't\n\n  x";
    EXPECT_EQ(load_model(out).tokenizer->encode(text, true), m.tokenizer->encode(text, true));
  }
  EXPECT_FALSE(tok_keys(tmp_ / "tinyllama.gguf").chat_template.empty());

  // Pre-tokenizers llama.cpp has no name for are refused, naming the tokenizer file.
  for (const char* name : {"gpt2_prefix_space", "metaspace_always_split", "digits_runs_no_regex", "split_behaviors"}) {
    SCOPED_TRACE(name);
    const std::string tok = variant_tokenizer(tmp_, name, fixture_variant(name));
    try {
      export_gguf(random_model(tok, 32, 1), tmp_ / "refused.gguf");
      ADD_FAILURE() << "exported";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(tok + ": cannot export the tokenizer to GGUF"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(tmp_ / "refused.gguf"));
  }
}

// Qwen2 (q/k/v biases): llama.cpp's "qwen2" architecture, whose RoPE pairs (i, i + d/2) as HF
// does, so q/k rows are written as they are; the biases are F32 vectors.
TEST_F(Export, GgufQwen2WithBiases) {
  ScratchDir dir;
  const std::string model_dir = dir / "qwen";
  SynthOptions so;
  so.dtype = DType::F32;
  so.seed = 3;
  synth_model(small_qwen_config(dir), model_dir, so);
  Model m = load_model(model_dir, kTok512);
  ASSERT_TRUE(m.config.qkv_bias);
  const std::string out = tmp_ / "qwen.gguf";
  export_gguf(m, out);
  SpecFile f = parse_gguf(out);
  EXPECT_EQ(need_key(f, "general.architecture").strs.at(0), "qwen2");
  EXPECT_EQ(need_key(f, "qwen2.embedding_length").nums.at(0), 128);
  EXPECT_EQ(need_key(f, "qwen2.attention.head_count_kv").nums.at(0), 2);
  EXPECT_EQ(need_key(f, "qwen2.block_count").nums.at(0), 2);
  EXPECT_FALSE(f.kv.count("llama.block_count"));
  auto data = [&](const std::string& name) {
    const SpecTensor& t = f.tensors.at(name);
    EXPECT_EQ(t.type, 0u) << name;
    uint64_t n = 1;
    for (uint64_t d : t.dims) n *= d;
    std::vector<float> v(n);
    std::memcpy(v.data(), f.bytes.data() + f.data_start + t.offset, n * 4);
    return v;
  };
  for (const char* b : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) {
    ASSERT_TRUE(f.tensors.count(std::string("blk.1.") + b)) << b;
    EXPECT_EQ(f.tensors[std::string("blk.1.") + b].dims.size(), 1u) << b;
  }
  EXPECT_EQ(data("blk.1.attn_q.bias"), m.weights.get(layer_name(1, "self_attn.q_proj.bias")).data);
  EXPECT_EQ(data("blk.1.attn_k.weight"), m.weights.get(layer_name(1, "self_attn.k_proj.weight")).data);  // not permuted

  Model g = load_model(out);
  EXPECT_EQ(g.config.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(g.config.qkv_bias);
  std::vector<int32_t> ids = m.tokenizer->encode(slurp(kValid).substr(0, 3000), true);
  ids.resize(128);
  EXPECT_EQ(next_token_nll(g, ids, 1, 128), next_token_nll(m, ids, 1, 128));
}

// Mistral's sliding window: llama.cpp converts Mistral as "llama" and attends over the whole
// context, so the export says up to where outputs agree instead of refusing.
TEST_F(Export, GgufMistralSlidingWindowIsNoted) {
  ScratchDir dir;
  SynthOptions so;
  so.dtype = DType::F32;
  synth_model(cut_config(dir, "mistral-7b-v0.1",
                         {{"hidden_size", 64}, {"intermediate_size", 96}, {"num_attention_heads", 4},
                          {"num_key_value_heads", 2}, {"num_hidden_layers", 1}, {"vocab_size", 512},
                          {"max_position_embeddings", 512}, {"sliding_window", 64}},
                         "mistral"),
              dir / "m", so);
  Model m = load_model(dir / "m", kTok512);
  ASSERT_EQ(m.config.sliding_window, 64);
  GgufExportStats s = export_gguf(m, tmp_ / "mistral.gguf");
  ASSERT_EQ(s.notes.size(), 1u);
  EXPECT_NE(s.notes[0].find("up to 64 tokens"), std::string::npos) << s.notes[0];
  SpecFile f = parse_gguf(tmp_ / "mistral.gguf");
  EXPECT_EQ(need_key(f, "general.architecture").strs.at(0), "llama");
  // Within the window the GGUF computes what the model does.
  std::vector<int32_t> ids = m.tokenizer->encode(slurp(kValid).substr(0, 2000), true);
  ids.resize(64);
  EXPECT_EQ(next_token_nll(load_model(tmp_ / "mistral.gguf"), ids, 1, 64), next_token_nll(m, ids, 1, 64));
}

// Mixtral: llama.cpp's "llama" with the experts of each layer stacked in one 3-D tensor (experts
// outermost) and the router as ffn_gate_inp; the GGUF computes what the model does.
TEST_F(Export, GgufMixtralStacksExperts) {
  ScratchDir dir;
  SynthOptions so;
  so.dtype = DType::F32;
  so.seed = 5;
  synth_model(cut_config(dir, "mixtral-8x7b-v0.1",
                         {{"hidden_size", 64}, {"intermediate_size", 64}, {"num_attention_heads", 4},
                          {"num_key_value_heads", 2}, {"num_hidden_layers", 2}, {"num_local_experts", 4},
                          {"num_experts_per_tok", 2}, {"max_position_embeddings", 256}, {"sliding_window", nullptr}},
                         "mixtral"),
              dir / "m", so);
  Model m = load_model(dir / "m");
  ASSERT_EQ(m.config.num_experts, 4);
  const std::string out = tmp_ / "mixtral.gguf";
  export_gguf(m, out);

  SpecFile f = parse_gguf(out);
  EXPECT_EQ(need_key(f, "general.architecture").strs.at(0), "llama");
  EXPECT_EQ(need_key(f, "llama.expert_count").nums.at(0), 4);
  EXPECT_EQ(need_key(f, "llama.expert_used_count").nums.at(0), 2);
  EXPECT_EQ(f.tensors.at("blk.1.ffn_gate_inp.weight").dims, (std::vector<uint64_t>{64, 4}));
  EXPECT_EQ(f.tensors.at("blk.1.ffn_gate_exps.weight").dims, (std::vector<uint64_t>{64, 64, 4}));
  EXPECT_EQ(f.tensors.at("blk.1.ffn_down_exps.weight").dims, (std::vector<uint64_t>{64, 64, 4}));
  EXPECT_FALSE(f.tensors.count("blk.1.ffn_gate.weight"));
  const SpecTensor& down = f.tensors.at("blk.1.ffn_down_exps.weight");
  std::vector<float> e2(64 * 64);  // expert 2's w2, the third 64 x 64 slab
  std::memcpy(e2.data(), f.bytes.data() + f.data_start + down.offset + 2 * e2.size() * 4, e2.size() * 4);
  EXPECT_EQ(e2, m.weights.get(layer_name(1, "block_sparse_moe.experts.2.w2.weight")).data);

  Model g = load_model(out);
  EXPECT_EQ(g.config.architecture, "MixtralForCausalLM");
  std::vector<int32_t> ids = m.tokenizer->encode(slurp(kValid).substr(0, 2000), true);
  ids.resize(96);
  EXPECT_EQ(next_token_nll(g, ids, 1, 96), next_token_nll(m, ids, 1, 96));

  // q4_0: the router stays f32, the experts are requantized as one tensor each.
  GgufExportOptions o;
  o.type = GgmlType::Q4_0;
  GgufExportStats s = export_gguf(m, tmp_ / "mixtral_q4.gguf", o);
  SpecFile q = parse_gguf(tmp_ / "mixtral_q4.gguf");
  EXPECT_EQ(q.tensors.at("blk.0.ffn_gate_inp.weight").type, 0u);
  EXPECT_EQ(q.tensors.at("blk.0.ffn_up_exps.weight").type, 2u);
  EXPECT_EQ(s.requantized, 2 * 7 + 2);  // q k v o + 3 expert stacks per layer, token_embd (q4_0), output (q8_0)
  EXPECT_EQ(q.tensors.at("output.weight").type, 8u);
}

// quantize --target gguf refuses what a GGUF cannot hold before any work is done.
TEST_F(Export, QuantizeTargetGgufRefusesRunTimeTransformsUpFront) {
  const std::string base = "quantize --model " + src_dir() + " --out " + (tmp_ / "q") + " --target gguf --w-bits 4 ";
  CliResult r = run_cli(base + "--rotation quarot", tmp_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--no-online-hadamard"), std::string::npos) << r.err;
  CliResult a = run_cli(base + "--a-bits 4 --kv-bits 8", tmp_);
  EXPECT_NE(a.exit_code, 0);
  EXPECT_NE(a.err.find("4-bit activations"), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("8-bit KV cache"), std::string::npos) << a.err;
  EXPECT_FALSE(fs::exists(tmp_ / "q"));
  EXPECT_FALSE(fs::exists(tmp_ / "q.partial"));
  CliResult ok = run_cli(base + "--rotation quarot --no-online-hadamard --w-group 32 --w-f16-scales", tmp_);
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.err.find("note: --target gguf"), std::string::npos) << ok.err;
}

}  // namespace

// ---- activations rounded as llama.cpp's CPU kernels round them (eval --protocol llama.cpp) ----

namespace {

// f16 rounding by the compiler's own _Float16, independent of the project's f32_to_f16.
float via_f16(float x) { return float(static_cast<_Float16>(x)); }

}  // namespace

TEST(LlamaCppRounding, Q8BlocksAsGgmlQuantizesActivations) {
  // One block with amax 127 (d = 1, so codes are the rounded values: halves go to even), one of
  // random values, one of zeros.
  Matrix x(1, 96);
  const float ties[] = {2.5f, 3.5f, -2.5f, 0.5f, 1.5f, -126.5f};
  for (int i = 0; i < 6; ++i) x.data[size_t(i)] = ties[i];
  x.data[10] = -127.f;
  std::mt19937 rng{3};
  std::normal_distribution<float> nd(0.f, 2.f);
  for (int i = 32; i < 64; ++i) x.data[size_t(i)] = nd(rng);
  const Matrix in = x;
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1}) {
    Matrix y = in;
    round_activations_like_ggml(t, y);
    const float want_ties[] = {2.f, 4.f, -2.f, 0.f, 2.f, -126.f};
    for (int i = 0; i < 6; ++i) EXPECT_EQ(y.data[size_t(i)], want_ties[i]) << i;
    EXPECT_EQ(y.data[10], -127.f);
    float amax = 0.f;
    for (int i = 32; i < 64; ++i) amax = std::max(amax, std::fabs(in.data[size_t(i)]));
    const float d = via_f16(amax / 127.f);
    for (int i = 32; i < 64; ++i) {
      const float v = in.data[size_t(i)], got = y.data[size_t(i)];
      const float code = std::round(v * (127.f / amax));  // ggml multiplies by 127 / amax; no halves here
      EXPECT_EQ(got, code * d) << i;
      EXPECT_LE(std::fabs(code), 127.f);
      EXPECT_NEAR(got, v, amax / 127.f);
    }
    for (int i = 64; i < 96; ++i) EXPECT_EQ(y.data[size_t(i)], 0.f);
  }
  Matrix h = in;
  round_activations_like_ggml(GgmlType::F16, h);
  for (size_t i = 0; i < h.data.size(); ++i) EXPECT_EQ(h.data[i], via_f16(in.data[i]));
  Matrix f = in;
  round_activations_like_ggml(GgmlType::F32, f);
  EXPECT_EQ(f.data, in.data);
  Matrix odd(1, 40);
  EXPECT_THROW(round_activations_like_ggml(GgmlType::Q4_0, odd), Error);
}

// ggml's q8_1 block of 32, written out naively: codes round(x * 127 / amax) (halves to even), d =
// amax / 127, and the sum s = f16(d * sum of codes) it stores.
struct NaiveQ8_1 {
  int codes[32];
  float d, s;
};
static NaiveQ8_1 naive_q8_1(const float* x) {
  NaiveQ8_1 q;
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  q.d = amax / 127.f;
  int sum = 0;
  for (int i = 0; i < 32; ++i) {
    q.codes[i] = amax == 0.f ? 0 : int(std::rint(x[i] * (127.f / amax)));  // rint: ties to even
    sum += q.codes[i];
  }
  q.s = via_f16(q.d * float(sum));
  return q;
}

TEST(LlamaCppRounding, Q8_1BlockSumsRoundTheUnroundedScaleTimesTheCodeSum) {
  Matrix x(3, 64);
  std::mt19937 rng{5};
  std::normal_distribution<float> nd(0.f, 0.7f);
  for (size_t i = 0; i < 160; ++i) x.data[i] = nd(rng);  // the last row's second block stays zero
  const Matrix s = q8_1_block_sums(x);
  ASSERT_EQ(s.rows, 3);
  ASSERT_EQ(s.cols, 2);
  int differs = 0;  // blocks where f16(d) * sum(codes), the rounded values' sum, is not s
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t b = 0; b < 2; ++b) {
      const NaiveQ8_1 q = naive_q8_1(x.row(r) + 32 * b);
      EXPECT_EQ(s(r, b), q.s) << r << " " << b;
      int sum = 0;
      for (int c : q.codes) sum += c;
      differs += via_f16(q.d) * float(sum) != q.s;
    }
  EXPECT_EQ(s(2, 1), 0.f);
  EXPECT_GT(differs, 0);
  EXPECT_THROW(q8_1_block_sums(Matrix(1, 40)), Error);
}

TEST_F(Export, LlamaCppRoundingComputesQ4_1ProductsAsGgml) {
  // A q4_1 file: each product is ggml's q4_1 x q8_1 dot product, sum over blocks of
  // d_w * d_a * sum(q * c) + m * s, computed here from the file's blocks (in its row order, q/k
  // interleaved per head) and the naive q8_1 blocks above.
  Model m = random_model(kData + "/hf/smollm2-135m-instruct/tokenizer.json", 64, 1);
  const std::string path = tmp_ / "q41.gguf";
  GgufExportOptions o;
  o.type = GgmlType::Q4_1;
  export_gguf(m, path, o);
  Model g = load_model(path);
  std::unique_ptr<Hook> hook = llama_cpp_activation_rounding(g);
  ASSERT_TRUE(hook);
  const LayerWeights w = load_layer(g, 0);
  GgufFile file(path);
  Matrix x(5, 64);
  std::mt19937 rng{9};
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& v : x.data) v = nd(rng);
  struct Case {
    Site site;
    const Matrix& w;
    const char* tensor;
    int heads;  // q/k rows: interleaved per head in the file
  };
  const Case cases[] = {{Site::AttnIn, w.q, "attn_q", g.config.num_heads},
                        {Site::AttnIn, w.k, "attn_k", g.config.num_kv_heads},
                        {Site::AttnIn, w.v, "attn_v", 0},
                        {Site::OprojIn, w.o, "attn_output", 0},
                        {Site::MlpIn, w.experts[0].gate, "ffn_gate", 0},
                        {Site::MlpIn, w.experts[0].up, "ffn_up", 0}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tensor);
    Matrix xr = x;
    hook->at(c.site, 0, xr);
    const Site reads = c.site == Site::MlpIn ? Site::ExpertIn : c.site;
    if (reads == Site::ExpertIn) hook->at(Site::ExpertIn, 0, xr);  // as the forward calls it
    Matrix y;
    ASSERT_TRUE(hook->linear(reads, xr, c.w, y));
    const GgufTensorInfo& t = file.tensor(std::string("blk.0.") + c.tensor + ".weight");
    ASSERT_EQ(t.type, GgmlType::Q4_1);
    const int64_t rows = c.w.rows, nb = 2;
    Matrix want(rows, x.rows);  // file row order
    for (int64_t fr = 0; fr < rows; ++fr)
      for (int64_t tok = 0; tok < x.rows; ++tok) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          BlockQ4_1 wb;
          std::memcpy(&wb, file.tensor_data(t) + size_t(fr * nb + b) * sizeof wb, sizeof wb);
          const NaiveQ8_1 a = naive_q8_1(x.row(tok) + 32 * b);
          int dot = 0;
          for (int i = 0; i < 32; ++i) dot += (i < 16 ? wb.qs[i] & 15 : wb.qs[i - 16] >> 4) * a.codes[i];
          acc += f16_to_f32(wb.d) * via_f16(a.d) * float(dot) + f16_to_f32(wb.m) * a.s;
        }
        want(fr, tok) = acc;
      }
    if (c.heads) want = gguf_permute_qk(want, c.heads, true);
    const Matrix plain = linear(xr, c.w);  // the rounded values times the dequantized weights
    double worst = 0, worst_plain = 0, scale = 0;
    for (int64_t tok = 0; tok < x.rows; ++tok)
      for (int64_t r = 0; r < rows; ++r) {
        worst = std::max(worst, double(std::fabs(y(tok, r) - want(r, tok))));
        worst_plain = std::max(worst_plain, double(std::fabs(plain(tok, r) - want(r, tok))));
        scale = std::max(scale, double(std::fabs(want(r, tok))));
      }
    EXPECT_LT(worst, 2e-6 * scale);
    EXPECT_GT(worst_plain, 1e-4 * scale);  // the m * s term matters
  }
  // down_proj's rows of 80 are not whole blocks: f32 in the file, its product left to the forward.
  Matrix d(5, 80);
  hook->at(Site::DownIn, 0, d);
  Matrix y;
  EXPECT_FALSE(hook->linear(Site::DownIn, d, w.experts[0].down, y));
}

namespace {

// Records, per site, whether the activations the other hooks left were on a q8 grid.
struct GridProbe : Hook {
  std::map<Site, bool> on_q8_grid;
  void at(Site site, int, Matrix& x) override {
    bool grid = true;
    for (size_t b = 0; b < x.data.size() && grid; b += 32) {
      float amax = 0.f;
      for (size_t i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(x.data[i]));
      const float d = via_f16(amax / 127.f);
      for (size_t i = b; i < b + 32 && amax > 0; ++i) grid &= std::fabs(x.data[i] / d - std::round(x.data[i] / d)) < 1e-3f;
    }
    on_q8_grid[site] = grid;
  }
};

}  // namespace

TEST_F(Export, LlamaCppRoundingFollowsTheGgufTypes) {
  Model m = random_model(kData + "/hf/smollm2-135m-instruct/tokenizer.json", 64, 1);
  const std::string f32 = tmp_ / "r32.gguf", q4 = tmp_ / "r4.gguf";
  export_gguf(m, f32);
  GgufExportOptions o;
  o.type = GgmlType::Q4_0;
  export_gguf(m, q4, o);
  EXPECT_EQ(llama_cpp_activation_rounding(load_model(f32)), nullptr);  // nothing to round
  EXPECT_EQ(llama_cpp_activation_rounding(m), nullptr);                // not a GGUF
  Model g = load_model(q4);
  std::unique_ptr<Hook> rounding = llama_cpp_activation_rounding(g);
  ASSERT_TRUE(rounding);
  std::vector<int32_t> ids = g.tokenizer->encode(slurp(kValid).substr(0, 2000), false);
  ids.resize(64);
  GridProbe before, after;
  std::vector<double> plain = next_token_nll(g, ids, 1, 64, {&before});
  std::vector<double> rounded = next_token_nll(g, ids, 1, 64, {rounding.get(), &after});
  // The inputs of a q4_0 file's weights (classifier q8_0) are rounded to q8 blocks; down_proj's
  // rows of 80 are not whole blocks, so it is f32 in the file and its input is left alone.
  for (Site s : {Site::AttnIn, Site::OprojIn, Site::MlpIn, Site::FinalNorm}) {
    EXPECT_FALSE(before.on_q8_grid.at(s)) << site_name(s);
    EXPECT_TRUE(after.on_q8_grid.at(s)) << site_name(s);
  }
  EXPECT_FALSE(after.on_q8_grid.at(Site::DownIn));
  EXPECT_FALSE(after.on_q8_grid.at(Site::Q));
  double sum_plain = 0, sum_rounded = 0;
  for (size_t i = 0; i < plain.size(); ++i) sum_plain += plain[i], sum_rounded += rounded[i];
  EXPECT_NE(sum_plain, sum_rounded);
  EXPECT_NEAR(sum_rounded / sum_plain, 1.0, 1e-2);
}
