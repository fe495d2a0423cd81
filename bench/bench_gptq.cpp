// GPTQ on a square layer (default 4096 x 4096, a LLaMA-7B attention projection) with H from random
// correlated data: the inverse-Hessian factorisation plus the blocked column sweep.
#include <benchmark/benchmark.h>

#include <cmath>
#include <map>
#include <random>

#include "quant/gptq.h"

namespace {

dq::Matrix random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  dq::Matrix m(rows, cols);
  for (float& v : m.data) v = nd(rng);
  return m;
}

// Inputs with uneven channel scales (a few outlier channels), 2n tokens; built once per size.
const dq::Matrix& hessian(int64_t n) {
  static std::map<int64_t, dq::Matrix> cache;
  auto it = cache.find(n);
  if (it != cache.end()) return it->second;
  dq::Matrix X = random_matrix(2 * n, n, 1);
  for (int64_t t = 0; t < X.rows; ++t)
    for (int64_t j = 0; j < n; ++j) X(t, j) *= (j % 97 == 0) ? 20.f : 1.f + float(j % 5);
  dq::HessianAccumulator acc(n);
  acc.add(X);
  return cache.emplace(n, acc.hessian()).first->second;
}

// Args: size, act_order, group (0 = per channel), f64.
void BM_Gptq(benchmark::State& state) {
  const int64_t n = state.range(0);
  const dq::Matrix& H = hessian(n);
  dq::Matrix W = random_matrix(n, n, 2);
  dq::QuantSpec spec;
  spec.bits = 4;
  spec.group = int(state.range(2));
  dq::GptqOptions opt;
  opt.act_order = state.range(1) != 0;
  opt.static_groups = true;
  opt.f64 = state.range(3) != 0;
  for (auto _ : state) {
    dq::GptqResult r = dq::gptq(W, H, spec, opt);
    benchmark::DoNotOptimize(r.weight.data.data());
  }
  state.counters["weights/s"] =
      benchmark::Counter(double(n * n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Gptq)
    ->ArgNames({"n", "act", "group", "f64"})
    ->Args({4096, 0, 0, 0})
    ->Args({4096, 1, 0, 0})
    ->Args({4096, 1, 128, 0})
    ->Args({4096, 0, 0, 1})
    ->Args({1024, 0, 0, 0})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2)
    ->UseRealTime();

// Accumulating one 2048-token calibration window into a 4096-wide Hessian.
void BM_HessianAdd(benchmark::State& state) {
  const int64_t n = state.range(0);
  dq::Matrix X = random_matrix(2048, n, 3);
  dq::HessianAccumulator acc(n);
  for (auto _ : state) acc.add(X);
  state.counters["tokens/s"] =
      benchmark::Counter(2048.0, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_HessianAdd)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
