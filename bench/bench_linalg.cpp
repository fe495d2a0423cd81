// Rotation kernels: the fast Hadamard transform against the dense product it replaces (R3/R4
// online), and one optimiser step of QR-Orth (Cholesky QR2 route, and the Householder route it
// replaced) against one of Cayley SGD (R1 calibration) on a fixed 2048-token batch.
#include <benchmark/benchmark.h>

#include <chrono>
#include <string>
#include <random>

#include "calib/orth_optim.h"
#include "io/report.h"
#include "linalg/hadamard.h"
#include "tensor/kernels.h"

namespace {

dq::Matrix laplace(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::exponential_distribution<float> ex(1.f);
  dq::Matrix m(rows, cols);
  for (float& v : m.data) v = ex(rng) * ((rng() & 1) ? 1.f : -1.f);
  return m;
}

constexpr int64_t kHadamardRows = 256, kTokens = 2048;

void BM_HadamardFast(benchmark::State& state) {
  const int64_t n = state.range(0);
  const dq::Hadamard h(n);
  const dq::Matrix X = laplace(kHadamardRows, n, 1);
  dq::Matrix Y;
  for (auto _ : state) {
    Y = X;
    h.apply(Y);
    benchmark::DoNotOptimize(Y.data.data());
  }
  state.counters["K"] = double(h.block());
}

void BM_HadamardDense(benchmark::State& state) {
  const int64_t n = state.range(0);
  const dq::Matrix H = dq::Hadamard(n).matrix(), X = laplace(kHadamardRows, n, 1);
  dq::Matrix Y;
  for (auto _ : state) {
    dq::gemm(X, false, H, false, Y);
    benchmark::DoNotOptimize(Y.data.data());
  }
}

void optimizer_step(benchmark::State& state, dq::OrthMethod method) {
  const int64_t n = state.range(0);
  dq::OrthOptions opt;
  opt.method = method;
  opt.lr = 1e-3f;
  dq::RotationOptimizer o(dq::random_hadamard(n, 0), opt);
  const dq::Matrix X = laplace(kTokens, n, 2);
  for (auto _ : state) benchmark::DoNotOptimize(o.step(X));
}

void BM_QrOrthStep(benchmark::State& state) { optimizer_step(state, dq::OrthMethod::QR); }
void BM_QrOrthHouseholderStep(benchmark::State& state) { optimizer_step(state, dq::OrthMethod::QRHouseholder); }
void BM_CayleyStep(benchmark::State& state) { optimizer_step(state, dq::OrthMethod::Cayley); }

// The three steps interleaved in one iteration (order rotating), so that the machine's load swings
// hit all three alike; counters: each step's wall and CPU seconds and the new step's speed-ups
// (in CPU time; run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1).
void BM_OrthStepsInterleaved(benchmark::State& state) {
  const int64_t n = state.range(0);
  const dq::OrthMethod methods[3] = {dq::OrthMethod::QR, dq::OrthMethod::QRHouseholder, dq::OrthMethod::Cayley};
  std::vector<dq::RotationOptimizer> opts;
  for (dq::OrthMethod m : methods) {
    dq::OrthOptions opt;
    opt.method = m;
    opt.lr = 1e-3f;
    opts.emplace_back(dq::random_hadamard(n, 0), opt);
  }
  const dq::Matrix X = laplace(kTokens, n, 2);
  double wall[3] = {0, 0, 0}, cpu[3] = {0, 0, 0};
  int64_t it = 0;
  for (auto _ : state) {
    double total = 0;
    for (int k = 0; k < 3; ++k) {
      const int i = int((it + k) % 3);
      const auto t0 = std::chrono::steady_clock::now();
      const double c0 = dq::thread_cpu_seconds();
      benchmark::DoNotOptimize(opts[size_t(i)].step(X));
      cpu[i] += dq::thread_cpu_seconds() - c0;
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      wall[i] += s, total += s;
    }
    state.SetIterationTime(total);
    ++it;
  }
  const char* names[3] = {"chol", "householder", "cayley"};
  for (int i = 0; i < 3; ++i) {
    state.counters[std::string(names[i]) + "_wall_s"] = wall[i] / double(it);
    state.counters[std::string(names[i]) + "_cpu_s"] = cpu[i] / double(it);
  }
  state.counters["householder/chol_cpu"] = cpu[1] / cpu[0];
  state.counters["cayley/chol_cpu"] = cpu[2] / cpu[0];
}

}  // namespace

BENCHMARK(BM_HadamardFast)->Arg(128)->Arg(4096)->Arg(11008)->Arg(14336)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_HadamardDense)->Arg(128)->Arg(4096)->Arg(11008)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_QrOrthStep)->Arg(64)->Arg(576)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_QrOrthHouseholderStep)->Arg(64)->Arg(576)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CayleyStep)->Arg(64)->Arg(576)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_OrthStepsInterleaved)->Arg(576)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseManualTime();
BENCHMARK_MAIN();
