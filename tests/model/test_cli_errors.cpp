// Bad input through the CLI: each case must end in exit code 1 (not a signal) with one line on
// stderr naming the file and the problem.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/cli_fixtures.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;

TEST(CliErrors, TruncatedLlama2cCheckpoint) {
  ScratchDir dir;
  const std::string path = dir / "truncated.bin";
  spit(path, slurp(kStories).substr(0, 100000));
  expect_one_line_error(eval(path, dir), path, "truncated");
}

TEST(CliErrors, CorruptLlama2cHeader) {
  ScratchDir dir;
  const std::string path = dir / "corrupt.bin";
  std::string bytes = slurp(kStories);
  const int32_t heads = 7;  // dim 64 is not divisible by 7
  std::memcpy(bytes.data() + 12, &heads, 4);
  spit(path, bytes);
  expect_one_line_error(eval(path, dir), path, "implausible header");
}

TEST(CliErrors, SafetensorsHeaderLengthBeyondFile) {
  ScratchDir dir;
  const std::string st = safetensors_bytes("{}", "", uint64_t(1) << 62);
  const std::string model = hf_dir(dir, "m", tiny_config(), &st);
  expect_one_line_error(eval(model, dir), model + "/model.safetensors", "exceeds file size");
}

TEST(CliErrors, SafetensorsTensorClaimsAbsurdSize) {
  ScratchDir dir;
  const std::string st = safetensors_bytes(
      R"({"model.embed_tokens.weight":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,16]}})",
      std::string(16, '\0'));
  const std::string model = hf_dir(dir, "m", tiny_config(), &st);
  expect_one_line_error(eval(model, dir), model + "/model.safetensors", "absurd size");
}

TEST(CliErrors, SafetensorsOffsetsPastTheEnd) {
  ScratchDir dir;
  const std::string st = safetensors_bytes(
      R"({"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}})", std::string(16, '\0'));
  const std::string model = hf_dir(dir, "m", tiny_config(), &st);
  expect_one_line_error(eval(model, dir), model + "/model.safetensors", "past the end");
}

TEST(CliErrors, TruncatedSafetensors) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m"), file = model + "/model.safetensors";
  const std::string bytes = slurp(file);
  spit(file, bytes.substr(0, bytes.size() - 1000));  // the data section ends early
  expect_one_line_error(eval(model, dir), file, "past the end");
  spit(file, bytes.substr(0, 100));  // the header ends early
  expect_one_line_error(eval(model, dir), file, "exceeds file size");
  spit(file, bytes.substr(0, 5));  // not even the header length
  expect_one_line_error(eval(model, dir), file, "truncated");
}

TEST(CliErrors, InvalidJsonConfig) {
  ScratchDir dir;
  fs::create_directories(dir.path() / "m");
  spit(dir / "m/config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,)");
  expect_one_line_error(eval(dir / "m", dir), dir / "m/config.json", "invalid JSON");
}

TEST(CliErrors, IncompleteConfig) {
  ScratchDir dir;
  json c = tiny_config();
  c.erase("hidden_size");
  const std::string model = hf_dir(dir, "m", c);
  expect_one_line_error(eval(model, dir), model + "/config.json", "missing 'hidden_size'");
}

TEST(CliErrors, UnknownArchitecture) {
  ScratchDir dir;
  json c = tiny_config();
  c["architectures"] = {"GPT2LMHeadModel"};
  const std::string model = hf_dir(dir, "m", c);
  expect_one_line_error(eval(model, dir), model + "/config.json", "unsupported architecture 'GPT2LMHeadModel'");
}

TEST(CliErrors, MissingModelPath) {
  ScratchDir dir;
  expect_one_line_error(eval(dir / "nowhere", dir), dir / "nowhere", "no such file or directory");
}

TEST(CliErrors, MissingSafetensors) {
  ScratchDir dir;
  const std::string model = hf_dir(dir, "m", tiny_config());
  expect_one_line_error(eval(model, dir), model, "no model.safetensors");
}

TEST(CliErrors, MissingShardOfAnIndex) {
  ScratchDir dir;
  const std::string model = hf_dir(dir, "m", tiny_config());
  spit(model + "/model.safetensors.index.json",
       R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})");
  expect_one_line_error(eval(model, dir), model + "/model-00001-of-00002.safetensors", "cannot open");
}

TEST(CliErrors, MissingTextAndTokenizerFiles) {
  ScratchDir dir;
  CliResult r = run_cli("eval --model " + kStories + " --ppl " + (dir / "no.txt"), dir);
  expect_one_line_error(r, dir / "no.txt", "cannot open");
  r = run_cli("eval --model " + kStories + " --tokenizer " + (dir / "no.bin") + " --ppl " + kValid, dir);
  expect_one_line_error(r, dir / "no.bin", "cannot open");
}

TEST(CliErrors, NanInALayerWeight) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  poke_nan(model + "/model.safetensors", "model.layers.1.mlp.up_proj.weight", 77);
  expect_one_line_error(eval(model, dir), "model.layers.1.mlp.up_proj.weight", "NaN");
  EXPECT_NE(eval(model, dir).err.find(model), std::string::npos);
}

TEST(CliErrors, NanInTheEmbeddingAndFinalNorm) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  poke_nan(model + "/model.safetensors", "model.embed_tokens.weight", 64 * 1 + 3);  // BOS's row
  expect_one_line_error(eval(model, dir), "model.embed_tokens.weight", "NaN");
  const std::string model2 = synth_tiny(dir, "m2");
  poke_nan(model2 + "/model.safetensors", "model.norm.weight", 5);
  expect_one_line_error(eval(model2, dir), "model.norm.weight", "NaN");
}

TEST(CliErrors, FailedConvertLeavesNoOutputDirectory) {
  ScratchDir dir;
  const std::string bad = dir / "truncated.bin";
  spit(bad, slurp(kStories).substr(0, 5000));
  CliResult r = run_cli("convert --model " + bad + " --tokenizer " + kTok512 + " --out " + (dir / "out"), dir);
  expect_one_line_error(r, bad, "truncated");
  r = run_cli("convert --model " + kStories + " --out " + (dir / "no/such/parent/out"), dir);
  expect_one_line_error(r, dir / "no/such/parent/out", "parent directory does not exist");
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().rfind("out", 0), std::string::npos) << e.path();
}

TEST(CliErrors, SynthOfABadConfigLeavesNoOutputDirectory) {
  ScratchDir dir;
  json c = tiny_config();
  c["architectures"] = {"BertModel"};
  spit(dir / "bad.json", c.dump());
  CliResult r = run_cli("synth --config " + (dir / "bad.json") + " --out " + (dir / "out"), dir);
  expect_one_line_error(r, dir / "bad.json", "unsupported architecture 'BertModel'");
  EXPECT_FALSE(fs::exists(dir / "out"));
  r = run_cli("synth --config " + (dir / "none.json") + " --out " + (dir / "out"), dir);
  expect_one_line_error(r, dir / "none.json", "cannot open");
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(CliErrors, StatsNamesAnInvalidReportFile) {
  ScratchDir dir;
  const std::string bad = dir / "report.json";
  spit(bad, "{\"r1_curve\": [1, 2,");
  CliResult r = run_cli("stats --model " + kStories + " --calib " + kValid + " --nsamples 2 --calib-seqlen 64 --calib-json " +
                            bad + " --html " + (dir / "out.html"),
                        dir);
  expect_one_line_error(r, bad, "invalid JSON");
  EXPECT_FALSE(fs::exists(dir / "out.html"));
}
