// `dartquant bench` on stories260K: the report's fields are there, finite and positive, the path is
// the one eval would take, and bad options are one-line errors that write nothing. (Speed itself is
// not tested: it lives in bench/README.md.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "tensor/intgemm.h"
#include "test_helpers.h"

using namespace dq::test;
using json = nlohmann::json;

namespace {

void expect_positive(const json& j, const std::string& key) {
  ASSERT_TRUE(j.contains(key)) << key << " missing in " << j.dump();
  ASSERT_TRUE(j[key].is_number()) << key;
  const double v = j[key].get<double>();
  EXPECT_TRUE(std::isfinite(v) && v > 0) << key << " = " << v;
}

// The report of `bench --model MODEL -p 16 -n 4 -r 2 EXTRA`.
json bench(const ScratchDir& dir, const std::string& model, const std::string& extra = "") {
  const std::string out = dir / "bench.json";
  const CliResult r = run_cli("bench --model " + model + " -p 16 -n 4 -r 2 --json " + out + " --force " + extra, dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("pp16"), std::string::npos) << r.out;  // the table
  EXPECT_NE(r.out.find("tg4"), std::string::npos) << r.out;
  return json::parse(slurp(out));
}

void expect_complete(const json& j) {
  for (const char* key : {"weight_bytes", "lm_head_bytes", "kv_cache_bytes", "peak_rss_bytes", "rss_bytes"})
    expect_positive(j, key);
  EXPECT_EQ(j["threads"], 1);
  EXPECT_EQ(j["repetitions"], 2);
  ASSERT_EQ(j["tests"].size(), 2u);
  EXPECT_EQ(j["tests"][0]["test"], "pp16");
  EXPECT_EQ(j["tests"][1]["test"], "tg4");
  for (const json& t : j["tests"]) {
    for (const char* key : {"avg_ts", "avg_cpu_ts", "avg_cpu_share"}) expect_positive(t, key);
    EXPECT_TRUE(t["stddev_ts"].is_number() && t["stddev_ts"].get<double>() >= 0);
    for (const char* key : {"samples_ts", "samples_wall_s", "samples_cpu_s"}) {
      ASSERT_EQ(t[key].size(), 2u) << key;
      for (const json& v : t[key]) EXPECT_TRUE(std::isfinite(v.get<double>()) && v.get<double>() > 0) << key;
    }
  }
}

}  // namespace

TEST(BenchCli, ReportsEveryPathWithFinitePositiveFigures) {
  ScratchDir dir;
  const std::string q = dir / "w4a4kv4";
  ASSERT_EQ(run_cli("quantize --model " + kStories + " --out " + q + " --rotation quarot --a-bits 4 --kv-bits 4", dir)
                .exit_code,
            0);

  json fp = bench(dir, kStories);
  expect_complete(fp);
  EXPECT_EQ(fp["path"], "fp");
  EXPECT_EQ(fp["packed_weight_bytes"], 0);
  expect_positive(fp, "f32_linear_bytes");

  json integer = bench(dir, q);
  expect_complete(integer);
  EXPECT_EQ(integer["path"], "integer");
  EXPECT_FALSE(integer["kernels"].empty());
  expect_positive(integer, "packed_weight_bytes");
  EXPECT_EQ(integer["f32_linear_bytes"], 0);
  // 4-bit codes plus scales: well under the f32 linears' size.
  EXPECT_LT(integer["packed_weight_bytes"].get<double>(), fp["f32_linear_bytes"].get<double>() / 4);
  // The larger cache the tests kept, pp16's 16 tokens (stories260K: 5 layers, K and V, 4 KV heads of
  // 8): f32 rows, or 4-bit codes plus an f32 scale and a one-byte zero point per head (docs/FORMAT.md).
  EXPECT_EQ(fp["kv_cache_bytes"].get<double>(), 5 * 2 * 16 * (32 * 4));
  EXPECT_EQ(integer["kv_cache_bytes"].get<double>(), 5 * 2 * 16 * (32 / 2 + 4 * 5));

  json fake = bench(dir, q, "--fake-quant");
  expect_complete(fake);
  EXPECT_EQ(fake["path"], "fake-quant");
  EXPECT_EQ(fake["packed_weight_bytes"], 0);

  // A forced kernel path runs, and the report names the kernels that ran (AVX2 with 4-bit weights
  // and activations: maddubs).
  json scalar = bench(dir, q, "--int-path scalar");
  expect_complete(scalar);
  EXPECT_EQ(scalar["kernels"], json::array({"scalar"}));
  if (dq::supported_int_paths().size() > 1) {
    json avx2 = bench(dir, q, "--int-path avx2");
    EXPECT_EQ(avx2["kernels"], json::array({"avx2-maddubs"}));
  }
  // A path this CPU lacks, an unknown one, one on an unquantized model or with --fake-quant: errors.
  const std::string out = dir / "refused.json";
  using dq::IntPath;
  for (IntPath p : {IntPath::Avx2, IntPath::AvxVnni, IntPath::Avx512Vnni}) {
    const auto ok = dq::supported_int_paths();
    if (std::find(ok.begin(), ok.end(), p) != ok.end()) continue;
    expect_one_line_error(run_cli("bench --model " + q + " -p 4 -n 1 --int-path " + dq::int_path_name(p) + " --json " + out, dir),
                          "--int-path", "this CPU cannot run it");
  }
  auto usage_error = [](const CliResult& r, const std::string& says) {  // option errors: CLI11's exit codes
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
    EXPECT_EQ(r.err.rfind("dartquant: error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(says), std::string::npos) << r.err;
  };
  usage_error(run_cli("bench --model " + q + " -p 4 -n 1 --int-path avx3 --json " + out, dir), "--int-path: avx3");
  expect_one_line_error(run_cli("bench --model " + kStories + " -p 4 -n 1 --int-path scalar --json " + out, dir), kStories,
                        "not a quantized model");
  usage_error(run_cli("bench --model " + q + " -p 4 -n 1 --int-path scalar --fake-quant --json " + out, dir),
              "--fake-quant excludes --int-path");
  EXPECT_FALSE(fs::exists(out));
}

TEST(BenchCli, BadOptionsAreOneLineErrorsAndWriteNothing) {
  ScratchDir dir;
  const std::string out = dir / "bench.json";
  auto one_line = [](const CliResult& r, const std::string& says) {
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
    EXPECT_EQ(r.err.rfind("dartquant: error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(says), std::string::npos) << r.err;
  };
  one_line(run_cli("bench --model " + kStories + " -p -1 --json " + out, dir), "-p");
  one_line(run_cli("bench --model " + kStories + " -r 0 --json " + out, dir), "-r");
  one_line(run_cli("bench --model " + kStories + " --threads 0 --json " + out, dir), "--threads");
  one_line(run_cli("bench --model " + kStories + " -p 0 -n 0 --json " + out, dir), "nothing to measure");
  expect_one_line_error(run_cli("bench --model " + kStories + " -p 4096 -n 4 --json " + out, dir), kStories,
                        "512-token context");
  expect_one_line_error(run_cli("bench --model " + (dir / "none") + " -p 4 -n 4 --json " + out, dir), "none", "");
  EXPECT_FALSE(fs::exists(out));
  // A file dartquant did not write is not replaced, even with --force.
  spit(out, "{}");
  expect_one_line_error(run_cli("bench --model " + kStories + " -p 4 -n 4 --force --json " + out, dir), out, "");
  EXPECT_EQ(slurp(out), "{}");
}
