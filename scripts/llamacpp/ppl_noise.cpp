// How far f32-level differences move `eval --protocol llama.cpp`: the perplexity of a GGUF with
// every activation a weight reads multiplied by (1 + EPS * N(0, 1)) before llama.cpp's rounding,
// once per seed. llama.cpp and dartquant sum in different orders, so their f32 activations differ
// by ~1e-7 to 1e-6 relative; rounding to f16 or to 8-bit blocks turns a few of those differences
// into whole steps, and the spread this prints is the size of that effect on the score.
// Built by scripts/check-llamacpp.sh against dartquant's static libraries.
// Usage: ppl_noise MODEL.gguf TEXT SEQLEN WINDOWS EPS SEEDS  -> one perplexity per seed
#include <cstdio>
#include <random>
#include <string>

#include "eval/perplexity.h"
#include "model/llamacpp_rounding.h"

using namespace dq;

struct RelativeNoise : Hook {
  double eps;
  std::mt19937_64 rng;
  void at(Site s, int, Matrix& x) override {
    if (s == Site::Q || s == Site::K || s == Site::V) return;  // not weight inputs
    std::normal_distribution<double> normal;
    for (float& v : x.data) v = float(v * (1 + eps * normal(rng)));
  }
};

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: ppl_noise MODEL.gguf TEXT SEQLEN WINDOWS EPS SEEDS\n");
    return 2;
  }
  const Model m = load_model(argv[1]);
  const std::vector<int32_t> ids = tokenize_file(m, argv[2]);
  PplProtocol protocol;
  protocol.llama_cpp = true;
  if (!ids.empty() && ids[0] == m.tokenizer->bos_id()) protocol.bos = ids[0];
  const std::unique_ptr<Hook> rounding = llama_cpp_activation_rounding(m);
  for (int seed = 0; seed < std::stoi(argv[6]); seed++) {
    RelativeNoise noise;
    noise.eps = std::stod(argv[5]);
    noise.rng.seed(seed);
    Hooks hooks{&noise};
    if (rounding) hooks.push_back(rounding.get());
    std::printf("%.6f\n", perplexity(m, ids, std::stoi(argv[3]), std::stoi(argv[4]), hooks, nullptr, protocol).ppl);
  }
  return 0;
}
