// Regressions for what fuzzing (fuzz/) and the parser review behind it found: hostile files must
// give one-line errors, never allocate what they merely claim, and never crash. Model-level cases
// run the dartquant CLI, so they also hold the whole loading path to that contract.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "test_helpers.h"
#include "io/gguf.h"
#include "io/json_limits.h"
#include "io/jsonl.h"
#include "io/llama2c.h"
#include "io/safetensors.h"

namespace dq {
namespace {

using test::CliResult;
using test::run_cli;
using test::ScratchDir;
using test::spit;

template <class T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

std::string llama2c_header(std::initializer_list<int32_t> fields) {
  std::string s;
  for (int32_t v : fields) put<int32_t>(s, v);
  return s;
}

// The CLI failed cleanly: exit code 1 and one "dartquant: error: ..." line mentioning `what`.
void expect_clean_error(const CliResult& r, const std::string& what) {
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.err.rfind("dartquant: error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
}

// Found by review: read_llama2c allocated each tensor before checking the file holds it, so a
// 28-byte file claiming the largest allowed shapes asked for a terabyte.
TEST(FuzzRegressions, Llama2cClaimsAreCheckedBeforeAllocating) {
  ScratchDir dir;
  spit(dir / "big.bin", llama2c_header({65536, 1 << 18, 1024, 1024, 1024, 1 << 22, 1 << 20}));
  try {
    read_llama2c(dir / "big.bin");
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor data ends early"), std::string::npos) << e.what();
  }
}

TEST(FuzzRegressions, Llama2cOddHeadDimensionIsRefused) {
  ScratchDir dir;
  spit(dir / "odd.bin", llama2c_header({6, 8, 1, 2, 2, 260, 4}) + std::string(100000, '\0'));
  EXPECT_THROW(read_llama2c(dir / "odd.bin"), Error);
}

TEST(FuzzRegressions, JsonDepthLimit) {
  EXPECT_THROW(check_json_depth(std::string(1000000, '['), "x.json"), Error);
  EXPECT_NO_THROW(check_json_depth(R"({"a":[{"b":"[[[[[[\"{{{{"}]})", "x.json", 3));
  EXPECT_THROW(check_json_depth(R"({"a":[{"b":[]}]})", "x.json", 3), Error);
}

// Found by the jsonl fuzzer (jsonl-crash-282ee38f): a number too large for a double makes nlohmann
// throw out_of_range (406), not parse_error, and it escaped read_jsonl without PATH:LINE.
TEST(FuzzRegressions, JsonlNumberOverflowIsALocatedError) {
  ScratchDir dir;
  spit(dir / "t.jsonl", "{\"context\":\"a\",\"continuation\":\"b\"}\n{\"gold\":46000E707028359}\n");
  try {
    read_jsonl(dir / "t.jsonl");
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(dir / "t.jsonl:2: invalid JSON", 0), 0u) << e.what();
  }
}

// A tiny HF directory: config.json as given, and a model.safetensors with one tensor.
std::string hf_dir(const ScratchDir& dir, const std::string& config) {
  const std::string d = dir / "model";
  std::filesystem::create_directories(d);
  spit(d + "/config.json", config);
  write_safetensors(d + "/model.safetensors", {blob_from_matrix("model.norm.weight", Matrix(1, 4), DType::F32, {4})});
  return d;
}
const std::string kConfigHead =
    R"({"architectures":["LlamaForCausalLM"],"vocab_size":8,"intermediate_size":8,"num_hidden_layers":1,)";

// Found by the config fuzzer: a field of the wrong type escaped as a nlohmann exception, naming
// neither the file nor the field's owner.
TEST(FuzzRegressions, ConfigFieldOfWrongTypeNamesTheFile) {
  ScratchDir dir;
  const std::string d =
      hf_dir(dir, kConfigHead + R"("hidden_size":4,"num_attention_heads":2,"tie_word_embeddings":"yes"})");
  expect_clean_error(run_cli("generate --model " + d + " -n 1", dir), "config.json");
}

// Found by review: num_attention_heads * head_dim was an int product (q_dim()) that overflowed.
TEST(FuzzRegressions, ConfigHeadProductOutOfRange) {
  ScratchDir dir;
  const std::string d = hf_dir(
      dir, kConfigHead + R"("hidden_size":16777216,"num_attention_heads":16777216,"head_dim":16777216})");
  expect_clean_error(run_cli("generate --model " + d + " -n 1", dir), "head_dim out of range");
}

// Found by review: copying a config nested a million levels deep overflowed the stack.
TEST(FuzzRegressions, DeeplyNestedConfig) {
  ScratchDir dir;
  const std::string d = hf_dir(dir, kConfigHead + R"("hidden_size":4,"num_attention_heads":2,"x":)" +
                                        std::string(1000000, '[') + std::string(1000000, ']') + "}");
  expect_clean_error(run_cli("generate --model " + d + " -n 1", dir), "nested deeper");
}

// A llama GGUF with every tensor present; q_rows sets blk.0.attn_q's row count (32 is right).
void write_llama_gguf(const std::string& path, uint64_t q_rows, uint32_t block_count) {
  GgufWriter w(path);
  w.set("general.architecture", GgufValue::string("llama"));
  w.set("llama.embedding_length", GgufValue::u32(32));
  w.set("llama.feed_forward_length", GgufValue::u32(32));
  w.set("llama.block_count", GgufValue::u32(block_count));
  w.set("llama.attention.head_count", GgufValue::u32(2));
  w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(1e-5f));
  auto add = [&](const std::string& name, uint64_t rows, uint64_t cols) {
    std::vector<uint64_t> shape = rows == 1 ? std::vector<uint64_t>{cols} : std::vector<uint64_t>{cols, rows};
    w.add_tensor(name, shape, GgmlType::F32, Matrix(int64_t(rows), int64_t(cols), 0.01f));
  };
  add("token_embd.weight", 8, 32);
  add("output_norm.weight", 1, 32);
  add("blk.0.attn_norm.weight", 1, 32);
  add("blk.0.ffn_norm.weight", 1, 32);
  add("blk.0.attn_q.weight", q_rows, 32);
  for (const char* n : {"blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                        "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"})
    add(n, 32, 32);
  w.write();
}

// Found by review: load_gguf_model reordered q/k rows (rope_to_halves) before the shapes were
// validated, reading and writing past a q_proj with fewer rows than heads * head_dim.
TEST(FuzzRegressions, GgufShortQRowsAreRefusedBeforeReordering) {
  ScratchDir dir;
  write_llama_gguf(dir / "ok.gguf", 32, 1);
  CliResult ok = run_cli("generate --model " + (dir / "ok.gguf") + " -n 1", dir);
  EXPECT_EQ(ok.err.find("rows, expected"), std::string::npos) << ok.err;
  write_llama_gguf(dir / "short.gguf", 8, 1);
  expect_clean_error(run_cli("generate --model " + (dir / "short.gguf") + " -n 1", dir), "rows, expected 32");
}

// Found by review: a block_count of 2^24 built 150 million tensor names before the first lookup.
TEST(FuzzRegressions, GgufBlockCountIsBoundedByTheTensors) {
  ScratchDir dir;
  write_llama_gguf(dir / "m.gguf", 32, 1 << 24);
  expect_clean_error(run_cli("generate --model " + (dir / "m.gguf") + " -n 1", dir), "needs more tensors");
}

}  // namespace
}  // namespace dq
