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
#include "model/save.h"
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

// 4-bit symmetric group-32 codes of every linear whose rows split into groups of 32, written as a
// quantized model directory (FORMAT.md). f16_scales rounds each scale to f16 first.
void write_group32_model(const std::string& src, const std::string& dir, bool f16_scales) {
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
        float mx = 0;
        for (int64_t c = g * 32; c < g * 32 + 32; ++c) mx = std::max(mx, std::fabs(w(r, c)));
        float s = mx / 7.f;
        if (f16_scales) s = f16_to_f32(f32_to_f16(s));
        scales(r, g) = s;
        for (int64_t c = g * 32; c < g * 32 + 32; ++c) {
          int q = int(std::clamp(std::nearbyint(w(r, c) / s) + 8.f, 0.f, 15.f));
          w(r, c) = s * (float(q) - 8.f);
          packed[size_t(r * w.cols / 2 + c / 2)] |= uint8_t(c % 2 ? q << 4 : q);
        }
      }
    extra.push_back({name + ".codes", DType::U8, {w.rows, w.cols / 2}, packed});
    extra.push_back(blob_from_matrix(name + ".scales", scales, DType::F32));
    extra.push_back(blob_from_matrix(name + ".zeros", zeros, DType::F32));
    m.weights.set(name, std::move(w));
  }
  m.quantization = {{"weights", {{"bits", 4}, {"method", "rtn"}, {"group", 32}, {"symmetric", true}}},
                    {"online", {{"r3", false}, {"r4", false}}}};
  SaveOptions o;
  o.extra = std::move(extra);
  save_model(m, dir, o);
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
                                 std::tuple{GgmlType::Q8_0, 5e-3, "q8_0"}, std::tuple{GgmlType::Q4_0, 0.1, "q4_0"}}) {
    const std::string out = tmp_ / (std::string(name) + ".gguf");
    GgufExportOptions o;
    o.type = type;
    GgufExportStats s = export_gguf(src, out, o);
    SpecFile f = parse_gguf(out);
    EXPECT_EQ(f.tensors["blk.0.attn_q.weight"].type, uint32_t(type)) << name;
    EXPECT_EQ(f.tensors["blk.0.attn_norm.weight"].type, 0u) << name;
    const bool q = type == GgmlType::Q8_0 || type == GgmlType::Q4_0;
    // 172-wide rows are not whole blocks; the unquantized embedding stays f32 in a quantized file.
    EXPECT_EQ(f.tensors["blk.0.ffn_down.weight"].type, q ? 0u : uint32_t(type)) << name;
    EXPECT_EQ(f.tensors["token_embd.weight"].type, q ? 0u : uint32_t(type)) << name;
    if (q) {
      EXPECT_EQ(s.requantized, 30) << name;
      EXPECT_EQ(s.kept_float, 6) << name;
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
  o.codes_path = qdir + "/quantized.safetensors";
  GgufExportStats s = export_gguf(qm, tmp_ / "q.gguf", o);
  EXPECT_EQ(s.from_codes, 30);  // q, k, v, o, gate, up of 5 layers; down (172) stays f32
  EXPECT_EQ(s.requantized, 0);
  EXPECT_TRUE(s.notes.empty());
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

  // Codes of another bit width, or that no longer match the weights, are not carried.
  o.type = GgmlType::Q8_0;
  o.codes_path = qdir + "/quantized.safetensors";
  GgufExportStats s8 = export_gguf(qm, tmp_ / "q8.gguf", o);
  EXPECT_EQ(s8.from_codes, 0);
  EXPECT_EQ(s8.notes.size(), 30u);
  Model edited = qm;
  edited.weights.set(layer_name(0, "self_attn.q_proj.weight"), Matrix(64, 64, 0.5f));
  o.type = GgmlType::Q4_0;
  GgufExportStats se = export_gguf(edited, tmp_ / "e.gguf", o);
  EXPECT_EQ(se.from_codes, 29);
  ASSERT_EQ(se.notes.size(), 1u);
  EXPECT_NE(se.notes[0].find("do not reproduce"), std::string::npos) << se.notes[0];
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
  CliResult e = run_cli("export --model " + qdir + " --format gguf --gguf-type q4_0 --out " + out, tmp_);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_NE(e.out.find("30 tensors from the model's codes, 0 re-rounded"), std::string::npos) << e.out;

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
}

// A synthetic Llama-3-style model: untied classifier, llama3 rope scaling (rope_freqs), and an HF
// byte-level BPE tokenizer carried in tokenizer.huggingface.json.
TEST_F(Export, GgufLlama3RopeUntiedHeadAndHfTokenizer) {
  const std::string tok = kData + "/hf/smollm2-135m-instruct/tokenizer.json";
  Model m;
  m.tokenizer = load_tokenizer(tok);
  m.tokenizer_path = tok;
  ModelConfig& c = m.config;
  c.vocab_size = int(m.tokenizer->vocab_size());
  c.hidden_size = 64;
  c.intermediate_size = 80;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.max_seq = 256;
  c.rope_theta = 500000.f;
  c.rope_factor = 8.f;
  c.rope_low_freq = 1.f;
  c.rope_high_freq = 4.f;
  c.rope_original_max = 8192;
  c.extra = c.to_json();
  c.extra["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                             {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.08f);
  auto rnd = [&](int64_t r, int64_t k, float base = 0.f) {
    Matrix x(r, k);
    for (float& v : x.data) v = base + nd(rng);
    return x;
  };
  m.weights.set("model.embed_tokens.weight", rnd(c.vocab_size, 64));
  m.weights.set("lm_head.weight", rnd(c.vocab_size, 64));
  m.weights.set("model.norm.weight", rnd(1, 64, 1.f));
  for (int l = 0; l < 2; ++l) {
    m.weights.set(layer_name(l, "input_layernorm.weight"), rnd(1, 64, 1.f));
    m.weights.set(layer_name(l, "post_attention_layernorm.weight"), rnd(1, 64, 1.f));
    m.weights.set(layer_name(l, "self_attn.q_proj.weight"), rnd(64, 64));
    m.weights.set(layer_name(l, "self_attn.k_proj.weight"), rnd(32, 64));
    m.weights.set(layer_name(l, "self_attn.v_proj.weight"), rnd(32, 64));
    m.weights.set(layer_name(l, "self_attn.o_proj.weight"), rnd(64, 64));
    m.weights.set(layer_name(l, "mlp.gate_proj.weight"), rnd(80, 64));
    m.weights.set(layer_name(l, "mlp.up_proj.weight"), rnd(80, 64));
    m.weights.set(layer_name(l, "mlp.down_proj.weight"), rnd(64, 80));
  }
  m.source = "synthetic";
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

}  // namespace
