// Regressions for what fuzzing the tokenizer readers (fuzz/fuzz_llama2c_vocab, fuzz_hf_tokenizer)
// and the review behind it found: hostile vocabularies fail with an Error naming the file, never
// hang, crash or make encode() emit an id outside the vocabulary.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

namespace dq {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class TokFuzzRegressions : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("dq_tokfuzz_" + std::to_string(getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& bytes) {
    std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  // A tokenizer.json with the given model vocabulary/merges and extra top-level fields.
  std::string hf(json vocab, json extra = json::object(), json merges = json::array()) {
    json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
    for (auto& [k, v] : extra.items()) j[k] = v;
    return write("tokenizer.json", j.dump());
  }
  void expect_error(const std::string& path, const std::string& what) {
    try {
      load_hf_tokenizer(path);
      FAIL() << "accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).rfind(path, 0), 0u) << e.what();
    }
  }
  fs::path dir_;
};

template <class T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// llama2.c layout: unk, bos, eos, 256 byte tokens, then `extra` pieces (scored -index).
std::string llama2c_vocab(const std::vector<std::string>& extra, float first_score = 0.f) {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) pieces.push_back("<0x" + std::to_string(b) + ">");
  pieces.insert(pieces.end(), extra.begin(), extra.end());
  std::string s;
  put<int32_t>(s, 16);
  for (size_t i = 0; i < pieces.size(); ++i) {
    put<float>(s, i == 0 ? first_score : -float(i));
    put<int32_t>(s, int32_t(pieces[i].size()));
    s += pieces[i];
  }
  return s;
}

// Found by review: a vocabulary without a " " piece made encode() push -1 as the dummy prefix,
// then index pieces_[-1] while merging.
TEST_F(TokFuzzRegressions, Llama2cVocabWithoutSpacePiece) {
  auto tok = load_llama2c_tokenizer(write("tok.bin", llama2c_vocab({"a", "b", "ab"})));
  for (bool special : {false, true}) {
    std::vector<int32_t> ids = tok->encode("ab a", special);
    ASSERT_FALSE(ids.empty());
    for (int32_t id : ids) EXPECT_TRUE(id >= 0 && size_t(id) < tok->vocab_size()) << id;
    EXPECT_EQ(tok->decode(ids), "ab a");
  }
}

TEST_F(TokFuzzRegressions, Llama2cNanScoreIsRefused) {
  EXPECT_THROW(load_llama2c_tokenizer(write("tok.bin", llama2c_vocab({" ", "a"}, std::nanf("")))), Error);
}

// Found by the fuzzer: an empty Metaspace replacement made the pre-tokenizer's and the decoder's
// search loops spin forever on the empty string.
TEST_F(TokFuzzRegressions, MetaspaceEmptyReplacementIsRefused) {
  expect_error(hf({{"a", 0}}, {{"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", ""}}}}), "empty replacement");
  expect_error(hf({{"a", 0}}, {{"decoder", {{"type", "Metaspace"}, {"replacement", ""}}}}), "empty replacement");
}

// Found by review: Strip with empty content looped `start` times (any size_t) without progress.
TEST_F(TokFuzzRegressions, StripEmptyContentIsRefused) {
  expect_error(hf({{"a", 0}}, {{"decoder", {{"type", "Strip"}, {"content", ""}, {"start", 1e18}, {"stop", 0}}}}),
               "empty content");
}

// Found by review: one vocabulary id of 2^31-1 resized the id table to 2^31 strings (64 GB).
TEST_F(TokFuzzRegressions, HugeVocabIdIsRefusedBeforeAllocating) {
  expect_error(hf({{"a", 0}, {"b", 2147483647}}), "exceeds the limit");
}

// Found by the fuzzer (hf_tokenizer-crash-c8e5561b): a vocabulary id written as a float too large
// for int was converted with nlohmann's get<int32_t>(), undefined behaviour (UBSan).
TEST_F(TokFuzzRegressions, NonIntegerIdsAreRefused) {
  expect_error(write("tokenizer.json", R"({"model":{"type":"BPE","vocab":{"a":0,"<0xA0>":6.666666e46},"merges":[]}})"),
               "is not an integer");
  expect_error(write("tokenizer.json", R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"added_tokens":[{"id":1.5,"content":"x"}]})"),
               "is not an integer");
  expect_error(hf({{"a", 0}}, {{"decoder", {{"type", "Strip"}, {"content", " "}, {"start", 1e300}}}}), "is not an integer");
  expect_error(hf({{"a", 0}}, {{"post_processor", {{"type", "BertProcessing"}, {"cls", {"a", 1e20}}, {"sep", {"a", 0}}}}}),
               "is not an integer");
}

// Found by review: post-processor ids were emitted by encode() unchecked, outside the vocabulary.
TEST_F(TokFuzzRegressions, PostProcessorIdsMustBeInTheVocabulary) {
  json bert = {{"type", "BertProcessing"}, {"cls", {"[CLS]", 1000}}, {"sep", {"[SEP]", 0}}};
  expect_error(hf({{"a", 0}}, {{"post_processor", bert}}), "outside the vocabulary");
  json tmpl = {{"type", "TemplateProcessing"},
               {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
               {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {-5}}}}}}};
  expect_error(hf({{"a", 0}}, {{"post_processor", tmpl}}), "outside the vocabulary");
  bert["cls"] = {"a", 0};
  auto ok = load_hf_tokenizer(hf({{"a", 0}}, {{"post_processor", bert}}));
  EXPECT_EQ(ok->encode("a", true), (std::vector<int32_t>{0, 0, 0}));
}

// Found by review: normalizer/pre-tokenizer/decoder "Sequence"s are built recursively, so one
// nested 100000 levels deep overflowed the stack.
TEST_F(TokFuzzRegressions, DeeplyNestedSequenceIsRefused) {
  std::string nested;
  const int depth = 100000;
  for (int i = 0; i < depth; ++i) nested += R"({"type":"Sequence","normalizers":[)";
  nested += R"({"type":"Prepend","prepend":"x"})";
  for (int i = 0; i < depth; ++i) nested += "]}";
  const std::string path = write("tokenizer.json", R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"normalizer":)" + nested + "}");
  expect_error(path, "nested deeper");
}

// A regex that backtracks catastrophically hits PCRE2's match limit during encode(): that is an
// Error naming the file, like every other tokenizer failure (it was a bare std::runtime_error).
TEST_F(TokFuzzRegressions, RegexMatchLimitIsAnError) {
  json split = {{"type", "Split"}, {"pattern", {{"Regex", "(a|aa)+[0-9]"}}}, {"behavior", "Isolated"}};
  const std::string path = hf({{"a", 0}}, {{"pre_tokenizer", split}});
  auto tok = load_hf_tokenizer(path);
  try {
    tok->encode(std::string(64, 'a') + "!", false);
    GTEST_SKIP() << "this PCRE2 finished the match within its limit";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path, 0), 0u) << e.what();
  }
}

}  // namespace
}  // namespace dq
