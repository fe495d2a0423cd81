// Bit-exact comparison with the reference Hugging Face tokenizers library. Expected values come
// from scripts/tokenizer-fixtures/generate.js (see tests/fixtures/tokenizer/); regenerating them
// needs node, running these tests does not.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"
#include "fixtures/tokenizer/variant.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kData = DQ_DATA_DIR;
const std::string kFix = std::string(DQ_SOURCE_DIR) + "/tests/fixtures/tokenizer";

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json load_json(const std::string& path) { return json::parse(slurp(path)); }

std::vector<std::string> lines_of(const std::string& path) {
  std::string text = slurp(path);
  std::vector<std::string> out;
  size_t b = 0;
  while (b < text.size()) {
    size_t e = text.find('\n', b);
    if (e == std::string::npos) e = text.size();
    out.push_back(text.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

std::string fnv64(const void* data, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(data)[i]) * 0x100000001b3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}
std::string ids_hash(const std::vector<int32_t>& ids) { return fnv64(ids.data(), ids.size() * 4); }
std::string text_hash(const std::string& s) { return fnv64(s.data(), s.size()); }

// Files the tests write (variant tokenizer.json files, CLI input/output); removed at exit.
std::string scratch_dir() {
  static const struct Dir {
    fs::path path = fs::temp_directory_path() / ("dq_test_tokenizer_" + std::to_string(::getpid()));
    Dir() { fs::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } dir;
  return dir.path.string();
}

std::string write_file(const std::string& name, const std::string& content) {
  std::string path = scratch_dir() + "/" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

const json& variants() {
  static const json v = load_json(kFix + "/variants.json")["variants"];
  return v;
}

// The tokenizer.json a variant describes, as generate.js builds it.
json variant_json(const json& v) {
  return dq::test::apply_tokenizer_variant(load_json(kData + "/hf/" + v["base"].get<std::string>() + "/tokenizer.json"), v);
}

bool is_real(const json& v) { return !v.contains("set") && !v.contains("model") && !v.contains("add_tokens"); }

const dq::Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<dq::Tokenizer>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return *it->second;
  for (const json& v : variants()) {
    if (v["name"] != name) continue;
    std::string path = is_real(v) ? kData + "/hf/" + v["base"].get<std::string>() + "/tokenizer.json"
                                  : write_file(name + ".tokenizer.json", variant_json(v).dump());
    return *(cache[name] = dq::load_tokenizer(path));
  }
  throw std::runtime_error("no variant " + name);
}

// torture.json cases as the bytes passed to encode.
std::vector<std::pair<std::string, std::string>> torture_cases() {
  std::vector<std::pair<std::string, std::string>> out;
  const json all = load_json(kFix + "/torture.json");
  for (const json& c : all["cases"]) {
    std::string unit;
    if (c.contains("hex")) {
      std::string hex = c["hex"];
      for (size_t i = 0; i + 1 < hex.size(); i += 2) unit += char(std::stoi(hex.substr(i, 2), nullptr, 16));
    } else {
      unit = c["text"];
    }
    std::string text;
    for (int r = 0; r < c.value("repeat", 1); ++r) text += unit;
    out.emplace_back(c["name"], text);
  }
  return out;
}

std::string show(const std::vector<int32_t>& ids) { return json(ids).dump(); }

class Variant : public ::testing::TestWithParam<std::string> {};

TEST_P(Variant, TortureMatchesReference) {
  const dq::Tokenizer& tok = tokenizer(GetParam());
  json expected = load_json(kFix + "/expected/" + GetParam() + ".torture.json");
  auto cases = torture_cases();
  ASSERT_EQ(expected.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [name, text] = cases[i];
    const json& e = expected[i];
    std::vector<int32_t> ids = tok.encode(text, false);
    if (e.contains("ids")) {
      EXPECT_EQ(show(ids), e["ids"].dump()) << name;
    }
    EXPECT_EQ(ids.size(), e["n"].get<size_t>()) << name;
    EXPECT_EQ(ids_hash(ids), e["ids_hash"]) << name << " ids " << show(ids).substr(0, 400);
    std::string decoded = tok.decode(ids);
    if (e.contains("decoded")) {
      EXPECT_EQ(decoded, e["decoded"].get<std::string>()) << name;
    }
    EXPECT_EQ(text_hash(decoded), e["decoded_hash"]) << name;
    std::vector<int32_t> with = e["special_prefix"].get<std::vector<int32_t>>();
    with.insert(with.end(), ids.begin(), ids.end());
    for (int32_t id : e["special_suffix"]) with.push_back(id);
    EXPECT_EQ(show(tok.encode(text, true)), show(with)) << name << " with special tokens";
  }
}

// Every line of a corpus: ids and decoded text against the reference's hashes.
void check_corpus(const std::string& variant, const std::string& corpus, const std::string& file) {
  const dq::Tokenizer& tok = tokenizer(variant);
  auto lines = lines_of(file);
  auto expected = lines_of(kFix + "/expected/" + variant + "." + corpus + ".txt");
  ASSERT_LE(expected.size(), lines.size());
  size_t bad = 0, tokens = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    std::istringstream row(expected[i]);
    size_t n;
    std::string ih, dh;
    row >> n >> ih >> dh;
    std::vector<int32_t> ids = tok.encode(lines[i], false);
    tokens += ids.size();
    bool ok_ids = ids.size() == n && ids_hash(ids) == ih;
    bool ok_dec = text_hash(tok.decode(ids)) == dh;
    if ((!ok_ids || !ok_dec) && ++bad <= 5)
      ADD_FAILURE() << variant << " " << corpus << " line " << i + 1 << (ok_ids ? " decode" : " ids")
                    << " differ; text: " << lines[i].substr(0, 200) << "\nours: " << show(ids).substr(0, 600);
  }
  EXPECT_EQ(bad, 0u) << "of " << expected.size() << " lines";
  EXPECT_GT(tokens, expected.size() / 4);
}

TEST_P(Variant, WikiText2MatchesReference) {
  check_corpus(GetParam(), "wikitext2", kData + "/wikitext2/wiki.test.raw");
}

INSTANTIATE_TEST_SUITE_P(Hf, Variant, ::testing::ValuesIn([] {
                           std::vector<std::string> names;
                           for (const json& v : variants()) names.push_back(v["name"]);
                           return names;
                         }()),
                         [](const auto& info) { return info.param; });

class Real : public ::testing::TestWithParam<std::string> {};
TEST_P(Real, PtbMatchesReference) { check_corpus(GetParam(), "ptb", kData + "/ptb/ptb.valid.txt"); }
INSTANTIATE_TEST_SUITE_P(Hf, Real, ::testing::Values("smollm2", "tinyllama", "mistral"),
                         [](const auto& info) { return info.param; });

TEST(HfTokenizer, ByteLevelRoundTripsEveryLine) {
  const dq::Tokenizer& tok = tokenizer("smollm2");
  for (const auto& line : lines_of(kData + "/wikitext2/wiki.test.raw")) ASSERT_EQ(tok.decode(tok.encode(line, false)), line);
  for (const auto& [name, text] : torture_cases())
    if (name.rfind("invalid", 0) != 0) {
      EXPECT_EQ(tok.decode(tok.encode(text, false)), text) << name;
    }
}

TEST(HfTokenizer, InvalidUtf8IsReplacementCharacters) {
  const dq::Tokenizer& tok = tokenizer("smollm2");
  EXPECT_EQ(tok.decode(tok.encode("a\xff\xc0\xaf" "b\xe2\x82", false)), "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" "b\xEF\xBF\xBD");
  EXPECT_EQ(tok.encode("a\xff", false), tok.encode("a\xEF\xBF\xBD", false));
}

TEST(HfTokenizer, SpecialTokensAndVocabInfo) {
  const dq::Tokenizer& llama = tokenizer("tinyllama");
  EXPECT_EQ(llama.bos_id(), 1);
  EXPECT_EQ(llama.eos_id(), 2);
  EXPECT_EQ(llama.vocab_size(), 32000u);
  EXPECT_EQ(llama.encode("Hello", true).front(), 1);
  dq::VocabInfo v = llama.vocab_info();
  EXPECT_EQ(v.model, "llama");
  ASSERT_EQ(v.tokens.size(), 32000u);
  EXPECT_EQ(v.tokens[1], "<s>");
  EXPECT_EQ(v.tokens[3], "<0x00>");
  EXPECT_EQ(v.token_types[0], 2);
  EXPECT_EQ(v.token_types[1], 3);
  EXPECT_EQ(v.token_types[3], 6);
  EXPECT_EQ(v.token_types[1000], 1);
  ASSERT_EQ(v.scores.size(), 32000u);
  EXPECT_GT(v.scores[300], v.scores[301]);
  EXPECT_TRUE(v.add_bos);
  EXPECT_EQ(v.unk, 0);

  const dq::Tokenizer& smol = tokenizer("smollm2");
  EXPECT_EQ(smol.bos_id(), 1);  // from config.json
  EXPECT_EQ(smol.eos_id(), 2);
  dq::VocabInfo s = smol.vocab_info();
  EXPECT_EQ(s.model, "gpt2");
  EXPECT_EQ(s.tokens.size(), 49152u);
  EXPECT_EQ(s.merges.size(), 48900u);
  EXPECT_EQ(s.merges[0], "Ġ t");
  EXPECT_TRUE(s.scores.empty());
  EXPECT_FALSE(s.add_bos);
  EXPECT_EQ(s.token_types[0], 3);
  EXPECT_EQ(smol.encode("Hello", true), smol.encode("Hello", false));
}

TEST(HfTokenizer, LoadTokenizerDispatchesOnContent) {
  auto hf = dq::load_tokenizer(kData + "/hf/mistral-7b-v0.1/tokenizer.json");
  EXPECT_EQ(hf->vocab_size(), 32000u);
  EXPECT_EQ(hf->encode("Hello world", false), (std::vector<int32_t>{22557, 1526}));
  auto l2c = dq::load_tokenizer(kData + "/stories260K/tok512.bin");
  EXPECT_EQ(l2c->vocab_size(), 512u);
}

// The message names the file and the offending component.
void expect_error(const std::string& content, const std::string& needle) {
  std::string path = write_file("bad.tokenizer.json", content);
  try {
    dq::load_tokenizer(path);
    ADD_FAILURE() << "no error for " << needle;
  } catch (const dq::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

TEST(HfTokenizer, RefusesCorruptAndUnsupportedFiles) {
  expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {", "invalid JSON");
  expect_error("{\"version\": \"1.0\"}", "no \"model\"");
  EXPECT_THROW(dq::load_hf_tokenizer(write_file("array.json", "[1, 2]")), dq::Error);
}

TEST(HfTokenizer, MinimalFileWorks) {
  std::string path = write_file("min.tokenizer.json",
                                R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}})");
  auto t = dq::load_tokenizer(path);
  EXPECT_EQ(t->encode("abba", false), (std::vector<int32_t>{2, 1, 0}));
  EXPECT_EQ(t->decode({2, 1, 0}), "ab b a");  // no decoder: tokens joined by spaces
  EXPECT_EQ(t->bos_id(), -1);
}

TEST(HfTokenizer, RefusesUnsupportedComponentsByName) {
  const std::string model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  auto with = [&](const std::string& field) { return "{" + model + ", " + field + "}"; };
  expect_error(R"({"model": {"type": "Unigram", "vocab": []}})", "unsupported model 'Unigram'");
  expect_error(with(R"("normalizer": {"type": "Lowercase"})"), "unsupported normalizer 'Lowercase'");
  expect_error(with(R"("normalizer": {"type": "NFKD"})"), "unsupported normalizer 'NFKD'");
  expect_error(with(R"("pre_tokenizer": {"type": "Whitespace"})"), "unsupported pre_tokenizer 'Whitespace'");
  expect_error(with(R"("pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}]})"),
               "unsupported pre_tokenizer 'Punctuation'");
  expect_error(with(R"("decoder": {"type": "WordPiece"})"), "unsupported decoder 'WordPiece'");
  expect_error(with(R"("post_processor": {"type": "Unknown"})"), "unsupported post_processor 'Unknown'");
  expect_error(with(R"("pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a"}, "behavior": "Isolated"})"), "bad regex");
  expect_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "missing from the vocabulary");
  expect_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1}})", "dropout");
  expect_error(R"({"model": {"type": "BPE", "vocab": "x", "merges": []}})", "vocab");
}

TEST(HfTokenizer, CliTokenizeAndDecode) {
  std::string tok = kData + "/hf/tinyllama-1.1b-chat-v1.0/tokenizer.json";
  std::string in = write_file("cli_in.txt", "Hello world\n\n  two  spaces\n\xff\n");
  std::string out = scratch_dir() + "/cli_out.txt", back = scratch_dir() + "/cli_back.txt";
  std::string cmd = std::string(DQ_BINARY) + " tokenize --tokenizer " + tok + " --text-file " + in + " --add-special > " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto t = dq::load_tokenizer(tok);
  auto rows = lines_of(out);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0], show(t->encode("Hello world", true)));
  EXPECT_EQ(rows[1], "[1]");
  cmd = std::string(DQ_BINARY) + " tokenize --tokenizer " + tok + " --text-file " + out + " --decode > " + back;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto texts = lines_of(back);
  ASSERT_EQ(texts.size(), 4u);
  EXPECT_EQ(texts[0], t->decode(t->encode("Hello world", true)));
  cmd = std::string(DQ_BINARY) + " tokenize --tokenizer " + in + " --text-file " + in + " 2>/dev/null";
  EXPECT_NE(std::system(cmd.c_str()), 0);
}

}  // namespace
