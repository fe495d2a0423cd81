// The quantize pipeline end to end through the CLI on stories260K (W4A16 RTN vs GPTQ, QuaRot at
// 16 bits = FP, a stored W4A4KV4 QuaRot model re-evaluated from its quantization section, stored
// codes vs stored weights, a clean failure), and the activation-quantization hook against an
// independent computation of the documented spec.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "io/safetensors.h"
#include "quant/quantize_model.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Evaluation shared by every run: 20 windows of 256 tokens of valid.txt.
const std::string kPplArgs = " --ppl " + kValid + " --seqlen 256 --max-windows 20";
const std::string kCalibArgs = " --calib " + kCalib + " --nsamples 16 --calib-seqlen 128";

// One scratch directory for the whole program (CLI outputs are shared between tests), removed at exit.
struct Scratch {
  fs::path path = fs::temp_directory_path() / ("dq_pipeline_" + std::to_string(getpid()));
  Scratch() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& n) const { return (path / n).string(); }
};
const Scratch& scratch() {
  static Scratch s;
  return s;
}

struct CliRun : CliResult {
  json report;  // the --json report, when one was written
};

// `dartquant --threads 1 ARGS`, named so its stdout/stderr/json land in the scratch directory.
CliRun cli(const std::string& name, const std::string& args, bool with_json = true) {
  const std::string prefix = scratch() / name, j = prefix + ".json";
  CliRun r{run_cli_logged(args + (with_json ? " --json " + j : ""), prefix), json()};
  if (with_json && fs::exists(j)) r.report = json::parse(slurp(j));
  return r;
}

// A quantize run into scratch/NAME, computed once per program.
const CliRun& quantize_run(const std::string& name, const std::string& args) {
  static std::map<std::string, CliRun> done;
  auto it = done.find(name);
  if (it == done.end())
    it = done.emplace(name, cli(name, "quantize --model " + kStories + " --out " + scratch() / name + " " +
                                          args + kPplArgs)).first;
  return it->second;
}

double quantize_ppl(const CliRun& r) {
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.report.at("ppl").at("ppl").get<double>();
}

// FP reference: stories260K itself through `eval`.
double fp_ppl() {
  static const CliRun r = cli("fp_eval", "eval --model " + kStories + kPplArgs);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.report.at("ppl").get<double>();
}

const CliRun& rtn_w4() { return quantize_run("rtn_w4", "--w-bits 4 --w-method rtn"); }
const CliRun& gptq_w4() { return quantize_run("gptq_w4", "--w-bits 4 --w-method gptq" + kCalibArgs); }
const CliRun& quarot_w4a4kv4() {
  return quantize_run("quarot_w4a4kv4",
                      "--rotation quarot --seed 1 --w-bits 4 --a-bits 4 --kv-bits 4 --w-method gptq" + kCalibArgs);
}

}  // namespace

TEST(PipelineCli, GptqBeatsRtnAtW4A16) {
  const double rtn = quantize_ppl(rtn_w4()), gptq = quantize_ppl(gptq_w4());
  EXPECT_LT(gptq, rtn);
  EXPECT_GT(gptq, fp_ppl() * 0.99);  // quantization does not make the model better than FP by chance
  EXPECT_EQ(gptq_w4().report.at("ppl").at("windows").get<int>(), 20);
  EXPECT_EQ(gptq_w4().report.at("ppl").at("seqlen").get<int>(), 256);
  // The report records the GPTQ calibration and one entry per layer.
  const json& q = gptq_w4().report.at("quantization");
  EXPECT_EQ(q.at("weights").at("method"), "gptq");
  EXPECT_EQ(q.at("weights").at("nsamples"), 16);
  EXPECT_EQ(q.at("weights").at("calib_seqlen"), 128);
  EXPECT_EQ(gptq_w4().report.at("gptq_layers").size(), 5u);
  EXPECT_EQ(q.at("rotation").at("kind"), "none");
  EXPECT_EQ(q.at("online").at("r4"), false);
}

TEST(PipelineCli, QuarotAt16BitsGivesTheFpPerplexity) {
  const double fp = fp_ppl();
  const CliRun& q = quantize_run("quarot_w16", "--rotation quarot --seed 2 --w-bits 16");
  const double ppl = quantize_ppl(q);
  EXPECT_NEAR(ppl / fp, 1.0, 1e-4) << "quarot " << ppl << " vs FP " << fp;
  // The rotation was really applied, with the online R4 (no KV quantization, so no R3).
  EXPECT_EQ(q.report.at("quantization").at("rotation").at("kind"), "quarot");
  EXPECT_EQ(q.report.at("quantization").at("online").at("r4"), true);
  EXPECT_EQ(q.report.at("quantization").at("online").at("r3"), false);
  // Nothing was quantized, so no codes were written.
  EXPECT_FALSE(fs::exists(scratch() / "quarot_w16/quantized.safetensors"));
}

TEST(PipelineCli, StoredW4A4Kv4QuarotModelReevaluatesToTheIdenticalPerplexity) {
  const CliRun& q = quarot_w4a4kv4();
  const double ppl = quantize_ppl(q);
  const std::string dir = scratch() / "quarot_w4a4kv4";
  // The quantization section asks for everything the run-time needs.
  const json cfg = json::parse(slurp(dir + "/config.json"));
  const json& sec = cfg.at("dartquant_quantization");
  EXPECT_EQ(sec.at("online").at("r3"), true);
  EXPECT_EQ(sec.at("online").at("r4"), true);
  EXPECT_EQ(sec.at("activations").at("bits"), 4);
  EXPECT_EQ(sec.at("kv_cache").at("bits"), 4);

  // The f32 fake-quant path reproduces quantize's own evaluation exactly.
  const CliRun re = cli("quarot_w4a4kv4_eval", "eval --fake-quant --model " + dir + kPplArgs);
  ASSERT_EQ(re.exit_code, 0) << re.err;
  EXPECT_EQ(re.report.at("ppl").get<double>(), ppl) << "reloaded model evaluates differently";
  EXPECT_EQ(re.report.at("windows").get<int>(), 20);
  EXPECT_EQ(re.report.at("path"), "fake-quant");
  // By default the directory runs on the integer kernels, close to the reference (their sums are
  // exact where the reference rounds, and a 4-bit code that lands on the other side of a rounding
  // boundary moves the rest of the window: tests/eval/test_intruntime.cpp has the tight checks).
  const CliRun integer = cli("quarot_w4a4kv4_int_eval", "eval --model " + dir + kPplArgs);
  ASSERT_EQ(integer.exit_code, 0) << integer.err;
  EXPECT_EQ(integer.report.at("path"), "integer");
  EXPECT_FALSE(integer.report.at("kernels").empty());
  EXPECT_NEAR(integer.report.at("ppl").get<double>() / ppl, 1.0, 5e-3);

  // Control: the same weights without the run-time section are a different model (the section is
  // what makes the PPLs agree, not luck).
  const std::string plain = scratch() / "quarot_w4a4kv4_plain";
  fs::create_directories(plain);
  json stripped = cfg;
  stripped.erase("dartquant_quantization");
  spit(plain + "/config.json", stripped.dump());
  for (const char* f : {"model.safetensors", "tokenizer.bin", "tokenizer.json"})
    if (fs::exists(dir + "/" + f)) fs::copy_file(dir + "/" + f, plain + "/" + f);
  const CliRun bare = cli("quarot_w4a4kv4_plain_eval", "eval --model " + plain + kPplArgs);
  ASSERT_EQ(bare.exit_code, 0) << bare.err;
  EXPECT_GT(std::abs(bare.report.at("ppl").get<double>() - ppl), 1e-3 * ppl);
}

// Every stored code dequantizes, as scale * (code - zero), to exactly the stored weight.
TEST(PipelineCli, StoredCodesDequantizeToTheStoredWeights) {
  for (const CliRun* r : {&gptq_w4(), &quarot_w4a4kv4()}) ASSERT_EQ(r->exit_code, 0) << r->err;
  for (const char* name : {"gptq_w4", "quarot_w4a4kv4"}) {
    SCOPED_TRACE(name);
    const std::string dir = scratch() / name;
    SafetensorsFile model(dir + "/model.safetensors"), codes(dir + "/quantized.safetensors");
    int checked = 0;
    for (const auto& [tname, info] : model.tensors()) {
      const bool linear = tname.find("_proj.weight") != std::string::npos;
      const bool has_codes = codes.tensors().count(tname + ".codes") > 0;
      EXPECT_EQ(linear, has_codes) << tname;  // every linear and only them (lm_head stays 16-bit)
      if (!has_codes) continue;
      ASSERT_EQ(info.dtype, DType::F32);
      ASSERT_EQ(info.shape.size(), 2u);
      const int64_t rows = info.shape[0], cols = info.shape[1];
      const TensorInfo &c = codes.at(tname + ".codes"), &s = codes.at(tname + ".scales"),
                       &z = codes.at(tname + ".zeros");
      ASSERT_EQ(c.dtype, DType::U8);
      ASSERT_EQ(c.shape, (std::vector<int64_t>{rows, (cols * 4 + 7) / 8}));
      ASSERT_EQ(s.shape, (std::vector<int64_t>{rows, 1}));  // per output channel
      ASSERT_EQ(z.shape, (std::vector<int64_t>{rows, 1}));
      const std::vector<uint8_t> packed(c.data, c.data + c.nbytes);
      const std::vector<uint8_t> q = unpack_codes(packed, rows, cols, 4);
      const float* W = reinterpret_cast<const float*>(info.data);
      const float* sc = reinterpret_cast<const float*>(s.data);
      const float* ze = reinterpret_cast<const float*>(z.data);
      int64_t mismatches = 0;
      for (int64_t r = 0; r < rows; ++r) {
        ASSERT_EQ(ze[r], 8.f) << "symmetric 4-bit zero is 2^(bits-1)";
        ASSERT_GT(sc[r], 0.f);
        for (int64_t j = 0; j < cols; ++j) {
          ASSERT_LE(q[size_t(r * cols + j)], 15);
          const float expect = sc[r] * (float(q[size_t(r * cols + j)]) - ze[r]);
          if (W[r * cols + j] != expect) ++mismatches;
        }
      }
      EXPECT_EQ(mismatches, 0) << tname;
      // The packing itself: the low nibble of byte 0 is code 0, the high nibble code 1.
      EXPECT_EQ(packed[0] & 0xF, q[0]);
      EXPECT_EQ(packed[0] >> 4, q[1]);
      ++checked;
    }
    EXPECT_EQ(checked, 5 * 7);
  }
}

TEST(PipelineCli, GptqWithoutCalibFailsCleanly) {
  const std::string out = scratch() / "no_calib";
  const CliRun r = cli("no_calib", "quantize --model " + kStories + " --out " + out + " --w-bits 4 --w-method gptq",
                    false);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.exit_code, -1);  // an error exit, not a crash
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("--calib"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out));
  // Nor a temporary one (any entry named after it other than this run's captured output).
  for (const auto& e : fs::directory_iterator(scratch().path)) {
    const std::string n = e.path().filename().string();
    if (n.find("no_calib") != std::string::npos) {
      EXPECT_TRUE(n == "no_calib.stdout" || n == "no_calib.stderr") << "left behind: " << e.path();
    }
  }
}

// --- ActQuantHook -----------------------------------------------------------------------------

namespace {

// The documented activation quantizer, written out independently: per row-group, asymmetric,
// lo = clip * min(min x, 0), hi = clip * max(max x, 0), scale = (hi - lo) / (2^b - 1),
// zero = round(-lo / scale), q = clamp(round(x / scale) + zero, 0, 2^b - 1), x' = scale * (q - zero).
Matrix expected_asym(const Matrix& x, int bits, float clip, int64_t group) {
  Matrix out = x;
  const float maxq = float((1 << bits) - 1);
  for (int64_t r = 0; r < x.rows; ++r)
    for (int64_t g0 = 0; g0 < x.cols; g0 += group) {
      const int64_t g1 = std::min(x.cols, g0 + group);
      float mn = 0, mx = 0;
      for (int64_t j = g0; j < g1; ++j) {
        mn = std::min(mn, x(r, j));
        mx = std::max(mx, x(r, j));
      }
      // The scale rounded up to 18 - bits significant bits (quantizer.h).
      const float lo = clip * mn, hi = clip * mx, scale = naive_round_up((hi - lo) / maxq, 18 - bits);
      const float zero = std::nearbyint(-lo / scale);
      for (int64_t j = g0; j < g1; ++j) {
        const float q = std::clamp(std::nearbyint(x(r, j) / scale) + zero, 0.f, maxq);
        out(r, j) = scale * (q - zero);
      }
    }
  return out;
}

Matrix random_acts(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Matrix x(rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) x(r, j) = g(rng) * float(1 + r) + (j == 3 ? 8.f : 0.f) + 0.3f;
  return x;
}

double max_diff(const Matrix& a, const Matrix& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::abs(a.data[i] - b.data[i])));
  return d;
}

ModelConfig tiny_config() {
  ModelConfig c;
  c.hidden_size = 12;
  c.num_heads = 3;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.intermediate_size = 20;
  c.num_layers = 1;
  c.vocab_size = 16;
  return c;
}

}  // namespace

TEST(PipelineActQuant, PerTokenAsymmetricClippedAtEveryLinearInput) {
  ActQuantConfig a;
  a.bits = 4;
  a.clip_ratio = 0.9f;
  ActQuantHook hook(tiny_config(), a);
  for (Site site : {Site::AttnIn, Site::MlpIn, Site::DownIn}) {
    SCOPED_TRACE(site_name(site));
    const int64_t cols = site == Site::DownIn ? 20 : 12;
    const Matrix x = random_acts(6, cols, 1);
    Matrix got = x;
    hook.at(site, 0, got);
    const Matrix want = expected_asym(x, 4, 0.9f, cols);
    EXPECT_LT(max_diff(got, want), 1e-6);
    // Also exactly fake_quantize with the spec the hook is documented to use.
    QuantSpec spec;
    spec.bits = 4;
    spec.symmetric = false;
    spec.clip_ratio = 0.9f;
    Matrix fq = x;
    fake_quantize(fq, spec);
    EXPECT_EQ(got.data, fq.data);
    // Per token: at most 16 levels in a row, and the clipped extremes really are clipped.
    for (int64_t r = 0; r < got.rows; ++r) {
      std::vector<float> levels(got.row(r), got.row(r) + cols);
      std::sort(levels.begin(), levels.end());
      EXPECT_LE(std::unique(levels.begin(), levels.end()) - levels.begin(), 16);
      const float mx = *std::max_element(x.row(r), x.row(r) + cols);
      EXPECT_LT(*std::max_element(got.row(r), got.row(r) + cols), mx);
    }
  }
}

TEST(PipelineActQuant, OprojInputOneGroupPerHeadAndKvPerHead) {
  ActQuantConfig a;
  a.bits = 4;
  a.clip_ratio = 0.9f;
  a.kv_bits = 3;
  a.kv_clip_ratio = 1.f;
  ActQuantHook hook(tiny_config(), a);
  const Matrix x = random_acts(5, 12, 2);
  Matrix got = x;
  hook.at(Site::OprojIn, 0, got);
  EXPECT_LT(max_diff(got, expected_asym(x, 4, 0.9f, 4)), 1e-6);
  EXPECT_GT(max_diff(got, expected_asym(x, 4, 0.9f, 12)), 1e-3);  // not per token
  // K and V: per head (head_dim 4 columns), kv bits and kv clip.
  const Matrix kv = random_acts(5, 4, 3);
  for (Site s : {Site::K, Site::V}) {
    Matrix k = kv;
    hook.at(s, 0, k);
    EXPECT_LT(max_diff(k, expected_asym(kv, 3, 1.f, 4)), 1e-6) << site_name(s);
  }
  // Q and the lm_head input stay 16-bit.
  for (Site s : {Site::Q, Site::FinalNorm}) {
    Matrix y = x;
    hook.at(s, -1, y);
    EXPECT_EQ(y.data, x.data) << site_name(s);
  }
  // 16-bit activations with a quantized KV cache: linear inputs untouched, KV quantized.
  ActQuantConfig kv_only;
  kv_only.kv_bits = 4;
  ActQuantHook h2(tiny_config(), kv_only);
  Matrix y = x;
  h2.at(Site::AttnIn, 0, y);
  EXPECT_EQ(y.data, x.data);
  Matrix k = kv;
  h2.at(Site::K, 0, k);
  EXPECT_LT(max_diff(k, expected_asym(kv, 4, 1.f, 4)), 1e-6);
}

TEST(PipelineWindows, SeededContiguousWindowsInRange) {
  std::vector<int32_t> ids(1000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
  const auto w = sample_windows(ids, 7, 50, 3);
  ASSERT_EQ(w.size(), 7u * 50u);
  for (int k = 0; k < 7; ++k) {
    const int32_t s = w[size_t(k * 50)];
    EXPECT_GE(s, 0);
    EXPECT_LE(s + 49, 999);
    for (int t = 1; t < 50; ++t) ASSERT_EQ(w[size_t(k * 50 + t)], s + t);
  }
  EXPECT_EQ(sample_windows(ids, 7, 50, 3), w);
  EXPECT_NE(sample_windows(ids, 7, 50, 4), w);
  EXPECT_THROW(sample_windows(std::vector<int32_t>(50, 1), 1, 50, 0), Error);
}
