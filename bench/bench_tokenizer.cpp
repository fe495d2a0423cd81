// Encoding WikiText-2 test (every line of wiki.test.raw, without special tokens, one thread) with
// the three real tokenizer.json kinds. Counters: tokens/s and input bytes/s. The word cache is warm
// after the first iteration, as the reference library's is. scripts/tokenizer-fixtures/bench.js
// runs the reference on the same lines and prints the ratio.
// Data: $DQ_DATA_DIR, else ../shared/data next to the project root.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tokenizer/tokenizer.h"

namespace {

std::string data_dir() {
  if (const char* d = std::getenv("DQ_DATA_DIR")) return d;
  return (std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "shared/data").string();
}

const std::vector<std::string>& wiki_lines() {
  static const std::vector<std::string> lines = [] {
    std::ifstream f(data_dir() + "/wikitext2/wiki.test.raw", std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + data_dir() + "/wikitext2/wiki.test.raw");
    std::vector<std::string> out;
    for (std::string line; std::getline(f, line);) out.push_back(line);
    return out;
  }();
  return lines;
}

void BM_EncodeWikiText2(benchmark::State& state, const char* model) {
  auto tok = dq::load_tokenizer(data_dir() + "/hf/" + model + "/tokenizer.json");
  const auto& lines = wiki_lines();
  size_t tokens = 0, bytes = 0;
  for (auto _ : state) {
    for (const auto& line : lines) {
      auto ids = tok->encode(line, false);
      tokens += ids.size();
      bytes += line.size() + 1;
      benchmark::DoNotOptimize(ids.data());
    }
  }
  state.counters["tokens_per_s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsRate);
  state.counters["tokens"] = double(tokens) / double(state.iterations());
  state.SetBytesProcessed(int64_t(bytes));
}

void BM_LoadTokenizer(benchmark::State& state, const char* model) {
  for (auto _ : state) benchmark::DoNotOptimize(dq::load_tokenizer(data_dir() + "/hf/" + model + "/tokenizer.json"));
}

BENCHMARK_CAPTURE(BM_EncodeWikiText2, smollm2, "smollm2-135m-instruct")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_EncodeWikiText2, tinyllama, "tinyllama-1.1b-chat-v1.0")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_EncodeWikiText2, mistral, "mistral-7b-v0.1")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_LoadTokenizer, smollm2, "smollm2-135m-instruct")->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
