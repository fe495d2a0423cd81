// Strict inputs (issue 16): options out of range, config fields and tensors the model does not
// implement, ambiguous files (duplicate keys, overlapping data), out-of-domain values, non-finite
// results, bad rotations, values a 16-bit output cannot hold. Each case: a non-zero exit that is
// not a signal, the message, and the scratch directory (inputs included) byte-identical afterwards.
#include <gtest/gtest.h>

#include "io/gguf.h"
#include "model/cli_fixtures.h"
#include "model/config.h"
#include "model/weights.h"

using namespace dq;
using namespace dq::test;

namespace {

// Runs `args`, expects the one-line error naming `file` and saying `problem`, and that nothing in
// the scratch directory was created, changed or removed.
void expect_refused(const ScratchDir& dir, const std::string& args, const std::string& file,
                    const std::string& problem) {
  const auto before = tree_snapshot(dir.path());
  expect_one_line_error(run_cli(args, dir), file, problem);
  EXPECT_EQ(tree_snapshot(dir.path()), before) << "the directory changed: " << args;
}

// A bad option value is refused while parsing (CLI11 formats the message): a non-zero exit that
// is not a crash, the allowed range in the message, the value not echoed, and nothing created.
void expect_option_refused(const ScratchDir& dir, const std::string& args, const std::string& range) {
  const auto before = tree_snapshot(dir.path());
  CliResult r = run_cli(args, dir);
  EXPECT_GT(r.exit_code, 0) << args << "\n" << r.err;
  EXPECT_NE(r.err.find(range), std::string::npos) << args << ": does not say '" << range << "': " << r.err;
  EXPECT_LT(r.err.size(), 300u) << r.err;
  EXPECT_EQ(tree_snapshot(dir.path()), before) << "the directory changed: " << args;
}

// The model's safetensors rewritten with an extra tensor (a 1 x n matrix is stored 1-D).
void add_tensor(const std::string& file, const std::string& name, const Matrix& m) {
  std::vector<TensorBlob> blobs;
  {
    SafetensorsFile f(file);
    for (const auto& [n, t] : f.tensors())
      blobs.push_back({n, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)});
  }
  blobs.push_back(m.rows == 1 ? blob_from_matrix(name, m, DType::F32, {m.cols}) : blob_from_matrix(name, m, DType::F32));
  write_safetensors(file, blobs);
}

// SRC's metadata and tensors written to DST, with edit() applied to each metadata value.
void rewrite_gguf(const std::string& src, const std::string& dst,
                  const std::function<GgufValue(const std::string&, const GgufValue&)>& edit) {
  GgufFile g(src);
  GgufWriter w(dst);
  for (const auto& [key, v] : g.metadata()) w.set(key, edit(key, v));
  for (const GgufTensorInfo& t : g.tensors())
    w.add_tensor_bytes(t.name, t.shape, t.type, std::vector<uint8_t>(g.tensor_data(t), g.tensor_data(t) + t.nbytes));
  w.write();
}

void edit_config(const std::string& model, const std::function<void(json&)>& edit) {
  json c = json::parse(slurp(model + "/config.json"));
  edit(c);
  spit(model + "/config.json", c.dump());
}

}  // namespace

TEST(StrictInputs, OptionsOutOfRangeAreRefusedBeforeAnythingIsCreated) {
  ScratchDir dir;
  const std::string out = dir / "out";
  const std::string q = "quantize --model " + kStories + " --out " + out + " ";
  const std::string bits = "2..8, or 16";
  for (const char* b : {"--w-bits 33", "--w-bits 1", "--a-bits 0", "--a-bits 1", "--a-bits 9", "--a-bits 32",
                        "--kv-bits 17", "--w-bits four"})
    expect_option_refused(dir, q + b, bits);
  for (const char* c : {"--a-clip 0", "--a-clip 2", "--a-clip nan", "--kv-clip inf", "--kv-clip -0.5"})
    expect_option_refused(dir, q + c, "finite number in (0, 1]");
  expect_option_refused(dir, q + "--damp nan", "finite number in (0, 1]");
  expect_option_refused(dir, q + "--w-group -1", "integer in [0,");
  expect_option_refused(dir, q + "--nsamples 0", "integer in [1,");
  expect_option_refused(dir, q + "--calib-seqlen -3", "integer in [2,");
  expect_option_refused(dir, q + "--lr-r1 nan", "finite number in (0, 100]");
  expect_option_refused(dir, q + "--lr-r2 inf", "finite number in (0, 100]");
  expect_option_refused(dir, q + "--token-ratio 0", "finite number in (0, 1]");
  expect_option_refused(dir, q + "--epochs 0", "integer in [1,");
  expect_option_refused(dir, q + "--loss l2", "whip");
  const std::string e = "eval --model " + kStories + " --ppl " + kValid + " --json " + (dir / "r.json") + " ";
  expect_option_refused(dir, e + "--seqlen 0", "integer in [2, 16777216]");
  expect_option_refused(dir, e + "--seqlen -5", "integer in [2, 16777216]");
  expect_option_refused(dir, e + "--max-windows -1", "integer in [0,");
  const std::string huge(300, '9');
  expect_option_refused(dir, e + "--seqlen " + huge, "integer in [2, 16777216]");
  EXPECT_EQ(run_cli(e + "--seqlen " + huge, dir).err.find("99999999"), std::string::npos);
  expect_option_refused(dir, "--threads 100000 " + e, "integer in [1, 1024]");
  expect_option_refused(dir, "--threads 0 " + e, "integer in [1, 1024]");
  expect_option_refused(dir, "generate --model " + kStories + " --temperature nan", "finite number in [0, 1000]");
  expect_option_refused(dir, "generate --model " + kStories + " -n 0", "integer in [1,");
  expect_option_refused(dir, "calibrate --model " + kStories + " --calib " + kCalib + " --out " + out +
                                 " --calib-seqlen 0", "integer in [2,");
  expect_option_refused(dir, "stats --model " + kStories + " --calib " + kCalib + " --nsamples -1", "integer in [1,");
}

TEST(StrictInputs, RotationsFileWithoutARotationIsRefused) {
  ScratchDir dir;
  spit(dir / "rot.safetensors", "x");
  expect_refused(dir, "quantize --model " + kStories + " --out " + (dir / "out") + " --rotation none --rotations " +
                          (dir / "rot.safetensors"),
                 dir / "rot.safetensors", "--rotations needs --rotation quarot or dartquant");
}

TEST(StrictInputs, ConfigFieldsDartquantDoesNotImplementAreRefused) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string cfg = model + "/config.json";
  const std::string original = slurp(cfg);
  struct Case {
    std::function<void(json&)> edit;
    std::string problem;
  };
  const std::vector<Case> cases = {
      {[](json& c) { c["hidden_act"] = "gelu"; }, "unsupported hidden_act 'gelu'"},
      {[](json& c) { c["hidden_act"] = "relu"; }, "unsupported hidden_act 'relu'"},
      {[](json& c) { c["mlp_bias"] = true; }, "mlp_bias"},
      {[](json& c) { c["final_logit_softcapping"] = 30.0; }, "final_logit_softcapping"},
      {[](json& c) { c["partial_rotary_factor"] = 0.5; }, "partial_rotary_factor"},
      {[](json& c) { c["rms_norm_eps"] = 0; }, "'rms_norm_eps' must be > 0"},
      {[](json& c) { c["rms_norm_eps"] = -1e-5; }, "'rms_norm_eps' must be > 0"},
      {[](json& c) { c["rms_norm_eps"] = 1e300; }, "'rms_norm_eps' is not a finite float"},
      {[](json& c) { c["rope_theta"] = 0; }, "'rope_theta' must be > 0"},
      {[](json& c) { c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 0}}; }, "'factor' must be > 0"},
      {[](json& c) {
         c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8}, {"low_freq_factor", 2}, {"high_freq_factor", 2}};
       },
       "low_freq_factor < high_freq_factor"},
      {[](json& c) { c["rope_scaling"] = "llama3"; }, "'rope_scaling' is not an object"},
      {[](json& c) { c["tie_word_embeddings"] = "yes"; }, "'tie_word_embeddings' is not true/false"},
      {[](json& c) { c["num_hidden_layers"] = 1; }, "tensor 'model.layers.1."},
  };
  for (const Case& c : cases) {
    spit(cfg, original);
    edit_config(model, c.edit);
    expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, model,
                   c.problem);
    EXPECT_EQ(run_cli("eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, dir)
                  .err.find("json.exception"),
              std::string::npos);
  }
}

TEST(StrictInputs, BiasTensorsTheModelWouldDropAreRefused) {
  ScratchDir dir;
  for (const char* bias : {"model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.down_proj.bias",
                           "model.layers.0.self_attn.q_proj.bias"}) {
    const std::string model = synth_tiny(dir, std::string("m_") + bias);
    add_tensor(model + "/model.safetensors", bias, Matrix(1, 64, 0.5f));
    expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, model,
                   std::string("tensor '") + bias + "' is not used");
  }
}

TEST(StrictInputs, DuplicateJsonKeysAreRefused) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string cfg = slurp(model + "/config.json");
  spit(model + "/config.json", "{\"hidden_size\": 128, " + cfg.substr(cfg.find('{') + 1));
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid,
                 model + "/config.json", "duplicate key 'hidden_size'");
  spit(model + "/config.json", cfg);
  // A nested object: keys repeat across objects freely, but not within one.
  spit(dir / "tok.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "a": 2}, "merges": []}})");
  spit(dir / "text.txt", "a\n");
  expect_refused(dir, "tokenize --tokenizer " + (dir / "tok.json") + " --text-file " + (dir / "text.txt"),
                 dir / "tok.json", "duplicate key 'a'");
  // A safetensors header.
  const std::string st = model + "/model.safetensors";
  const std::string dup = safetensors_bytes(
      R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
      std::string(4, '\0'));
  spit(st, dup);
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, st,
                 "duplicate key 'x'");
}

TEST(StrictInputs, SafetensorsDataRangesMustTileTheBuffer) {
  ScratchDir dir;
  const std::string model = hf_dir(dir, "m", tiny_config());
  const std::string st = model + "/model.safetensors";
  const std::string a4 = R"("a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})";
  struct Case {
    std::string header, data, problem;
  };
  const std::vector<Case> cases = {
      {"{" + a4 + R"(, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", std::string(4, '\0'),
       "overlaps"},
      {"{" + a4 + R"(, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})", std::string(12, '\0'),
       "gap"},
      {"{" + a4 + "}", std::string(8, '\0'), "4 bytes after the last tensor"},
      {R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}})",
       std::string(5, '\0'), "not aligned"},
      {R"({"__metadata__": {"format": 1}})", "", "not a string"},
  };
  for (const Case& c : cases) {
    std::string header = c.header;
    header.append((8 - header.size() % 8) % 8, ' ');
    spit(st, safetensors_bytes(header, c.data));
    expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, st, c.problem);
  }
}

TEST(StrictInputs, OneTensorInTwoShardsIsRefused) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string single = model + "/model.safetensors";
  fs::copy_file(single, model + "/a.safetensors");
  fs::copy_file(single, model + "/b.safetensors");
  fs::remove(single);
  json index = {{"weight_map", json::object()}};
  {
    SafetensorsFile f(model + "/a.safetensors");
    for (const auto& [name, t] : f.tensors()) index["weight_map"][name] = "a.safetensors";
  }
  index["weight_map"]["model.norm.weight"] = "b.safetensors";
  spit(model + "/model.safetensors.index.json", index.dump());
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid,
                 model + "/a.safetensors", "is not where");
}

TEST(StrictInputs, MissingWeightNamesTheModel) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  edit_config(model, [](json& c) { c["tie_word_embeddings"] = false; });
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid, model,
                 "missing weight 'lm_head.weight'");
}

TEST(StrictInputs, NonFinitePerplexityNamesTheFirstNonFiniteSite) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  // Row 0 of layer 1's up_proj so large that its dot products overflow to Inf: finite weights, so
  // the load-time check passes, and the first non-finite activation is layer 1's down_proj input.
  for (size_t j = 0; j < 64; ++j) poke_f32(model + "/model.safetensors", "model.layers.1.mlp.up_proj.weight", j, 3e38f);
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid +
                          " --seqlen 32 --max-windows 2 --json " + (dir / "r.json"),
                 model, "is not finite: activations stop being finite at layer 1, down_in");
  // The same for a zero-shot score.
  expect_refused(dir, "eval --model " + model + " --tokenizer " + kTok512 + " --tasks copa --limit 2 --tasks-dir " +
                          kData + "/zeroshot --json " + (dir / "r.json"),
                 model, "the log-likelihood of a zero-shot request is not finite: activations stop being finite at "
                        "layer 1, down_in");
}

TEST(StrictInputs, RotationsAreShapeAndOrthogonalityChecked) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string rot = dir / "rot.safetensors";
  // calibrate's layout for the tiny config: R1 (64 x 64) and R2.<layer>.<kv head> (16 x 16), here
  // identities (orthogonal), then spoiled one way at a time.
  auto identity = [](int64_t n) {
    Matrix m(n, n, 0.f);
    for (int64_t i = 0; i < n; ++i) m(i, i) = 1.f;
    return m;
  };
  auto write = [&](const std::function<void(std::map<std::string, Matrix>&)>& spoil) {
    std::map<std::string, Matrix> mats = {{"R1", identity(64)}};
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) mats["R2." + std::to_string(l) + "." + std::to_string(h)] = identity(16);
    spoil(mats);
    std::vector<TensorBlob> blobs;
    for (const auto& [name, m] : mats) blobs.push_back(blob_from_matrix(name, m, DType::F32));
    write_safetensors(rot, blobs);
  };
  const std::string args = "quantize --model " + model + " --tokenizer " + kTok512 + " --out " + (dir / "q") +
                           " --rotation dartquant --w-bits 16 --rotations " + rot;
  write([](auto& m) { m["R2.1.0"](2, 3) = 0.05f; });
  expect_refused(dir, args, rot, "'R2.1.0' is not orthogonal");
  write([](auto& m) { m["R1"](0, 0) = std::nanf(""); });
  expect_refused(dir, args, rot, "'R1' has non-finite values");
  write([](auto& m) { m["R1"] = Matrix(32, 32, 0.f); });
  expect_refused(dir, args, rot, "'R1' must be 64 x 64");
  write([&](auto& m) { m["R2.2.0"] = identity(16); });  // a third layer: made for another model
  expect_refused(dir, args, rot, "the model needs 5");
  write([](auto&) {});
  CliResult r = run_cli(args, dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(StrictInputs, SixteenBitOutputsRefuseValuesOutOfRange) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  poke_f32(model + "/model.safetensors", "model.layers.0.self_attn.v_proj.weight", 7, 1e6f);
  const std::string base = " --model " + model + " --tokenizer " + kTok512 + " --out ";
  expect_refused(dir, "convert" + base + (dir / "hf") + " --dtype f16", "model.layers.0.self_attn.v_proj.weight",
                 "value 1e+06 at element 7 is outside the range of f16");
  expect_refused(dir, "export --format hf --dtype f16" + base + (dir / "hf"), "model.layers.0.self_attn.v_proj.weight",
                 "outside the range of f16");
  expect_refused(dir, "export --format gguf --gguf-type f16" + base + (dir / "m.gguf"), "'blk.0.attn_v.weight'",
                 "value 1e+06 at element 7 is outside the range of f16");
  // bf16 holds it.
  EXPECT_EQ(run_cli("convert" + base + (dir / "hf") + " --dtype bf16", dir).exit_code, 0);

  // quantize writes the classifier at f16 by default: a head that cannot fit is refused before any
  // work (here the tied embedding, rotated: its row norm bounds what R1 can make of it).
  const std::string tied = synth_tiny(dir, "tied");
  poke_f32(tied + "/model.safetensors", "model.embed_tokens.weight", 64 * 5 + 1, 7e4f);
  const std::string q = " --model " + tied + " --tokenizer " + kTok512 + " --rotation quarot --out ";
  expect_refused(dir, "quantize" + q + (dir / "q"), tied, "beyond f16's range (65504); use --lm-head-dtype bf16 or f32");
  ASSERT_EQ(run_cli("quantize" + q + (dir / "q") + " --lm-head-dtype bf16", dir).exit_code, 0);
  SafetensorsFile written(dir / "q/model.safetensors");
  EXPECT_EQ(written.at("lm_head.weight").dtype, DType::BF16);
  EXPECT_EQ(written.at("model.embed_tokens.weight").dtype, DType::F32);
  const std::string fits = synth_tiny(dir, "fits");
  ASSERT_EQ(run_cli("quantize --model " + fits + " --tokenizer " + kTok512 + " --rotation quarot --out " + (dir / "q16"),
                    dir).exit_code,
            0);
  EXPECT_EQ(SafetensorsFile(dir / "q16/model.safetensors").at("lm_head.weight").dtype, DType::F16);
  EXPECT_EQ(json::parse(slurp(dir / "q16/config.json"))["dartquant_quantization"]["lm_head"]["dtype"], "f16");
}

TEST(StrictInputs, CalibrationTextTooShortAndPromptTooLong) {
  ScratchDir dir;
  spit(dir / "short.txt", "Once upon a time.");
  expect_refused(dir, "calibrate --model " + kStories + " --calib " + (dir / "short.txt") + " --out " +
                          (dir / "rot.safetensors") + " --calib-seqlen 64 --nsamples 8",
                 dir / "short.txt", "too short for a calibration window of 64");
  const std::string model = synth_tiny(dir, "m");
  edit_config(model, [](json& c) { c["max_position_embeddings"] = 16; });
  std::string prompt;
  for (int i = 0; i < 20; ++i) prompt += "Once upon a time ";
  expect_refused(dir, "generate --model " + model + " --tokenizer " + kTok512 + " -n 4 --prompt '" + prompt + "'",
                 model, "no room left in the model's 16-token context");
}

TEST(StrictInputs, HfTokenizerRefusesBadIdsAndEmptyVocabularies) {
  ScratchDir dir;
  const std::string vocab = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []})";
  spit(dir / "tok.json", "{" + vocab + "}");
  spit(dir / "ids.txt", "[0, 1, 7]\n");
  expect_refused(dir, "tokenize --decode --tokenizer " + (dir / "tok.json") + " --text-file " + (dir / "ids.txt"),
                 dir / "tok.json", "token id 7 is not in the vocabulary (size 2)");
  spit(dir / "text.txt", "ab\n");
  spit(dir / "added.json", "{" + vocab + R"(, "added_tokens": [{"id": -5, "content": "<s>", "special": true}]})");
  expect_refused(dir, "tokenize --tokenizer " + (dir / "added.json") + " --text-file " + (dir / "text.txt"),
                 dir / "added.json", "added token '<s>' has the invalid id -5");
  spit(dir / "shared.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": []}})");
  expect_refused(dir, "tokenize --tokenizer " + (dir / "shared.json") + " --text-file " + (dir / "text.txt"),
                 dir / "shared.json", "model.vocab gives 'a' and 'b' the same id 0");
  spit(dir / "empty.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []}})");
  expect_refused(dir, "tokenize --tokenizer " + (dir / "empty.json") + " --text-file " + (dir / "text.txt"),
                 dir / "empty.json", "empty vocabulary");
  // A byte-order mark before the JSON is still a tokenizer.json.
  spit(dir / "bom.json", "\xEF\xBB\xBF{" + vocab + "}");
  CliResult r = run_cli("tokenize --tokenizer " + (dir / "bom.json") + " --text-file " + (dir / "text.txt"), dir);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "[0,1]\n");
}

TEST(StrictInputs, GgufIsDetectedByContentAndBlockCountMustCoverItsTensors) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string gguf = dir / "m.gguf";
  ASSERT_EQ(run_cli("export --format gguf --model " + model + " --tokenizer " + kTok512 + " --out " + gguf, dir)
                .exit_code,
            0);
  const double ppl = cli_eval("--model " + gguf + " --tokenizer " + kTok512 + " --ppl " + kValid +
                                  " --seqlen 32 --max-windows 2",
                              dir)["ppl"];
  for (const char* name : {"UPPER.GGUF", "no_extension"}) {
    fs::copy_file(gguf, dir / name);
    EXPECT_EQ(cli_eval("--model " + (dir / name) + " --tokenizer " + kTok512 + " --ppl " + kValid +
                           " --seqlen 32 --max-windows 2",
                       dir)["ppl"],
              ppl);
  }
  // The same tensors with block_count 1: block 1 would be dropped silently.
  const std::string fewer = dir / "fewer.gguf";
  rewrite_gguf(gguf, fewer, [](const std::string& key, const GgufValue& v) {
    return key == "llama.block_count" ? GgufValue::u32(1) : v;
  });
  expect_refused(dir, "eval --model " + fewer + " --tokenizer " + kTok512 + " --ppl " + kValid, fewer,
                 "tensor 'blk.1.");
}

TEST(StrictInputs, AMalformedTokenizerInAGgufSaysWhatIsWrong) {
  ScratchDir dir;
  const std::string model = synth_tiny(dir, "m");
  const std::string gguf = dir / "m.gguf", bad = dir / "bad.gguf";
  ASSERT_EQ(run_cli("export --format gguf --model " + model + " --tokenizer " + kTok512 + " --out " + gguf, dir)
                .exit_code,
            0);
  rewrite_gguf(gguf, bad, [](const std::string& key, const GgufValue& v) {
    return key == "tokenizer.ggml.bos_token_id" ? GgufValue::u32(5) : v;
  });
  const std::string ppl = " --ppl " + kValid + " --seqlen 32 --max-windows 1";
  expect_refused(dir, "eval --model " + bad + ppl, bad,
                 "the tokenizer in its metadata cannot be used (unknown/bos/eos token ids are not 0/1/2)");
  // An explicit tokenizer replaces it.
  EXPECT_EQ(run_cli("eval --model " + bad + " --tokenizer " + kTok512 + ppl, dir).exit_code, 0);
}

// Found by the hostile-input pass.
TEST(StrictInputs, HostileInputPassRegressions) {
  ScratchDir dir;
  // A path too long for the file system came back as "filesystem error: status: File name too long".
  const std::string long_name = dir / std::string(5000, 'x');
  expect_refused(dir, "eval --model " + long_name + " --ppl " + kValid, long_name, ": File name too long");
  // A quantization section read by export: json's own conversion threw "[json.exception.type_error.302]".
  const std::string qdir = synth_tiny(dir, "q");
  edit_config(qdir, [](json& c) { c["dartquant_quantization"] = {{"online", {{"r3", "yes"}}}}; });
  expect_refused(dir, "export --format hf --model " + qdir + " --tokenizer " + kTok512 + " --out " + (dir / "hf"),
                 qdir, "'online.r3' is not true/false");
  // synth's initializer_range became an Inf standard deviation.
  spit(dir / "init.json", [] {
    json c = tiny_config();
    c["initializer_range"] = 1e300;
    return c.dump();
  }());
  expect_refused(dir, "synth --config " + (dir / "init.json") + " --out " + (dir / "s"), dir / "init.json",
                 "'initializer_range' must be a number in (0, 1000]");
  // An id beyond int32 wrapped to a valid one and decoded a token nobody asked for.
  spit(dir / "ids.txt", "[4294967297]\n");
  expect_refused(dir, "tokenize --decode --tokenizer " + kTok512 + " --text-file " + (dir / "ids.txt"),
                 dir / "ids.txt", "not a JSON array of 32-bit ids");
  // A tiny temperature underflowed every sampling weight to 0; it must pick what greedy picks.
  const std::string gen = "generate --model " + kStories + " --prompt 'Once upon a time' -n 12";
  CliResult greedy = run_cli(gen, dir), cold = run_cli(gen + " --temperature 0.0001", dir);
  EXPECT_EQ(greedy.exit_code, 0) << greedy.err;
  EXPECT_EQ(cold.exit_code, 0) << cold.err;
  EXPECT_EQ(cold.out, greedy.out);
  // tie_word_embeddings true beside a different lm_head.weight: HF uses the embedding, we used lm_head.
  const std::string tied = synth_tiny(dir, "tied");
  Matrix head;
  {
    Weights w;
    w.add_file(std::make_shared<const SafetensorsFile>(tied + "/model.safetensors"));
    head = w.get("model.embed_tokens.weight");
  }
  head(511, 63) += 1.f;
  add_tensor(tied + "/model.safetensors", "lm_head.weight", head);
  const std::string eval_tail = " --tokenizer " + kTok512 + " --ppl " + kValid + " --seqlen 32 --max-windows 1";
  expect_refused(dir, "eval --model " + tied + eval_tail, tied, "lm_head.weight differs from the embedding");
  // Qwen2 slides its window only in layers >= max_window_layers: one window everywhere is not that.
  spit(dir / "qwen.json", [&] {
    json c = json::parse(slurp(small_qwen_config(dir)));
    c["use_sliding_window"] = true;
    c["sliding_window"] = 16;
    c["max_window_layers"] = 1;
    return c.dump();
  }());
  try {
    load_config(dir / "qwen.json");
    ADD_FAILURE() << "a sliding window in only some layers was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_window_layers 1 of 2"), std::string::npos) << e.what();
  }
  // HF's rotary_emb.inv_freq caches (older Llama checkpoints) are derived buffers HF ignores too.
  const std::string model = synth_tiny(dir, "m");
  add_tensor(model + "/model.safetensors", "model.layers.0.self_attn.rotary_emb.inv_freq", Matrix(1, 8, 1.f));
  EXPECT_EQ(run_cli("eval --model " + model + " --tokenizer " + kTok512 + " --ppl " + kValid +
                        " --seqlen 32 --max-windows 1",
                    dir)
                .exit_code,
            0);
}
