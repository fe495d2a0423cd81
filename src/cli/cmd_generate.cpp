// dartquant generate: sample a continuation (greedy at temperature 0).
#include <cstdio>
#include <random>

#include "cli/command.h"
#include "cli/validators.h"
#include "eval/perplexity.h"
#include "eval/runtime.h"
#include "model/forward.h"

namespace dq::cli {
namespace {

struct GenerateArgs {
  std::string model, tokenizer, prompt;
  int n = 64;
  float temperature = 0.f;
  uint64_t seed = 0;
  bool fake_quant = false;
};

int run_generate(const GenerateArgs& a) {
  Model m = load_model(a.model, a.tokenizer);
  if (!m.tokenizer) throw Error(a.model + ": no tokenizer found; pass --tokenizer");
  if (!a.fake_quant) use_integer_runtime(m);
  RuntimeHooks runtime(m);
  if (!m.quantization.is_null()) std::fprintf(stderr, "generate: %s path\n", runtime.path());
  std::vector<int32_t> ids = m.tokenizer->encode(a.prompt, true);
  if (ids.empty()) throw Error("the prompt is empty and the tokenizer adds no BOS token");
  if (int64_t(ids.size()) >= m.config.max_seq)
    throw Error(a.model + ": the prompt has " + std::to_string(ids.size()) + " tokens, no room left in the model's " +
                std::to_string(m.config.max_seq) + "-token context");
  std::mt19937_64 rng(a.seed);
  std::string printed;
  // The prompt goes through in chunks (prefill), then each new token alone against the KV cache
  // (codes when the model quantizes it), sized once for the whole run.
  KvCache cache = runtime.kv_cache();
  cache.reserve(m.config, std::min<int64_t>(m.config.max_seq, int64_t(ids.size()) + a.n));
  std::vector<int32_t> fresh = ids;
  for (int i = 0; i < a.n && int(ids.size()) < m.config.max_seq; ++i) {
    Matrix x = prefill(m, fresh, runtime.hooks(), cache);  // the prompt, then one token at a time
    Matrix lp = log_probs(m, x, x.rows - 1, 1);
    for (float v : lp.data)
      if (!std::isfinite(v))
        fail_non_finite(m, "the next-token distribution", runtime.hooks(),
                        [&](const Hooks& h) { forward(m, ids, 1, int(ids.size()), h); });
    int32_t next = most_likely(lp);
    if (a.temperature > 0) {
      // Relative to the most likely token, so a small temperature cannot underflow every weight to 0.
      const double top = lp(0, next);
      std::vector<double> p(size_t(lp.cols));
      for (int64_t j = 0; j < lp.cols; ++j) p[size_t(j)] = std::exp((double(lp(0, j)) - top) / a.temperature);
      next = int32_t(std::discrete_distribution<int64_t>(p.begin(), p.end())(rng));
    }
    if (next == m.tokenizer->eos_id()) break;
    ids.push_back(next);
    fresh = {next};
    // Prints the text as it grows; decoding the whole sequence keeps multi-byte pieces whole.
    std::string text = m.tokenizer->decode(ids);
    std::fwrite(text.data() + printed.size(), 1, text.size() - std::min(text.size(), printed.size()), stdout);
    std::fflush(stdout);
    printed = text;
  }
  std::printf("\n");
  std::fflush(stdout);  // the text's end before the note on stderr, also when both go to one pipe
  const std::string kernels = kernels_note();
  if (!kernels.empty()) std::fprintf(stderr, "generate: %s\n", kernels.c_str() + 2);
  return 0;
}

RegisterCommand reg("generate", "generate text from a prompt", [](CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--prompt", a->prompt, "prompt text (default: empty, start from BOS)");
  app.add_option("-n", a->n, "tokens to generate")->check(int_in(1, 1 << 24));
  app.add_option("--temperature", a->temperature, "0 = greedy")->check(real_in(0, 1000));
  app.add_option("--seed", a->seed, "sampling seed");
  app.add_flag("--fake-quant", a->fake_quant,
               "run a quantized model on the f32 fake-quant reference path instead of the integer kernels");
  return [a] { return run_generate(*a); };
});

}  // namespace
}  // namespace dq::cli
