// The backend's GEMM entry points (dq::gemm into a reused output, dq::linear which allocates its
// output, and dq::linear into a reused output as the forward pass now calls it) against raw cblas_sgemm on the same operands, at the linear-layer shapes of
// the models we calibrate: `tokens` rows of activations times an out x in weight (Y = X Wᵀ), plus
// the per-head attention products (QKᵀ and PV, head_dim 64) the forward pass issues.
// Counter FLOP/s = 2 m n k per iteration. The fast Hadamard transform against the dense product is
// in bench_linalg, not repeated here.
//
// BM_IntGemmTilesVsRows: the integer kernels (tensor/intgemm.h), register tiles against the row by
// row dots they replaced and against sgemm at the same shape, one thread, interleaved.
//
// Args: m (tokens), n (out features), k (in features); BM_*Attn take seq and head_dim.
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <chrono>
#include <random>

#include "io/report.h"
#include "tensor/intgemm.h"
#include "tensor/kernels.h"

namespace {

dq::Matrix random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  dq::Matrix m(rows, cols);
  for (float& v : m.data) v = nd(rng);
  return m;
}

void flops(benchmark::State& state, double m, double n, double k) {
  state.counters["FLOP/s"] =
      benchmark::Counter(2 * m * n * k, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

// Raw OpenBLAS: C = X Wᵀ, C preallocated.
void BM_CblasSgemm(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const dq::Matrix X = random_matrix(m, k, 1), W = random_matrix(n, k, 2);
  dq::Matrix C(m, n);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.f, X.data.data(), int(k),
                W.data.data(), int(k), 0.f, C.data.data(), int(n));
    benchmark::DoNotOptimize(C.data.data());
    benchmark::ClobberMemory();
  }
  flops(state, double(m), double(n), double(k));
}

// dq::gemm with the output already shaped (no allocation): the wrapper's own overhead.
void BM_Gemm(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const dq::Matrix X = random_matrix(m, k, 1), W = random_matrix(n, k, 2);
  dq::Matrix C(m, n);
  for (auto _ : state) {
    dq::gemm(X, false, W, true, C);
    benchmark::DoNotOptimize(C.data.data());
    benchmark::ClobberMemory();
  }
  flops(state, double(m), double(n), double(k));
}

// dq::linear with a fresh output every call.
void BM_Linear(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const dq::Matrix X = random_matrix(m, k, 1), W = random_matrix(n, k, 2);
  for (auto _ : state) {
    dq::Matrix Y = dq::linear(X, W);
    benchmark::DoNotOptimize(Y.data.data());
  }
  flops(state, double(m), double(n), double(k));
}

// The four side by side in every iteration (cblas_sgemm, dq::gemm, dq::linear with a fresh output,
// dq::linear into a reused output, on the same operands, in rotating order), so their ratios hold on
// a shared machine whose load drifts between benchmarks. Reported time is the fresh dq::linear's;
// counters give each rate and the ratios to raw sgemm.
void BM_GemmVsCblas(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const dq::Matrix X = random_matrix(m, k, 1), W = random_matrix(n, k, 2);
  dq::Matrix C(m, n), G(m, n), R(m, n);
  double t[4] = {0, 0, 0, 0};
  int64_t it = 0;
  for (auto _ : state) {
    for (int j = 0; j < 4; ++j) {
      const int which = int((it + j) % 4);
      auto a = std::chrono::steady_clock::now();
      if (which == 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.f, X.data.data(), int(k),
                    W.data.data(), int(k), 0.f, C.data.data(), int(n));
        benchmark::DoNotOptimize(C.data.data());
      } else if (which == 1) {
        dq::gemm(X, false, W, true, G);
        benchmark::DoNotOptimize(G.data.data());
      } else if (which == 2) {
        dq::Matrix Y = dq::linear(X, W);
        benchmark::DoNotOptimize(Y.data.data());
      } else {
        dq::linear(X, W, R);
        benchmark::DoNotOptimize(R.data.data());
      }
      benchmark::ClobberMemory();
      const double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
      t[which] += d;
      if (which == 2) state.SetIterationTime(d);
    }
    ++it;
  }
  const double f = 2.0 * double(m) * double(n) * double(k) * double(it);
  state.counters["sgemm_GFLOP/s"] = f / t[0] / 1e9;
  state.counters["gemm/sgemm"] = t[0] / t[1];
  state.counters["linear/sgemm"] = t[0] / t[2];
  state.counters["linear_reuse/sgemm"] = t[0] / t[3];
}

// int_gemm with register tiles, with column slices (AVX-512 and AVX2; tiles on AVX-VNNI), row by
// row, and f32 sgemm at the same shape, in rotating order in
// every iteration, on one thread (timed in thread CPU time: steadier than wall time on a loaded
// machine). Weights of `wbits`, activations of `abits` per token; path: 0 = the best this CPU has,
// 1 = AVX2 (what an AVX2-only CPU such as Zen 3 runs); ag: the activations' group (0: the whole
// row; o_proj's input is quantized one group per head). Counters: each rate in G(FL)OP/s, and
// tiles/rows, tiles/sgemm and slices/tiles as speed ratios.
void BM_IntGemmTilesVsRows(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const int wbits = int(state.range(3)), abits = int(state.range(4));
  const int64_t ag = state.range(6) > 0 ? state.range(6) : k;
  const std::vector<dq::IntPath> paths = dq::supported_int_paths();
  if (paths.size() < 2) {
    state.SkipWithError("no vector path on this CPU");
    return;
  }
  const dq::IntPath path = state.range(5) == 0 ? paths.back() : dq::IntPath::Avx2;
  state.SetLabel(dq::int_path_name(path));
  const int threads = dq::num_threads();
  dq::set_num_threads(1);
  std::mt19937_64 rng(3);
  std::vector<uint8_t> codes(size_t(n * k));
  for (uint8_t& c : codes) c = uint8_t(rng() % (1u << wbits));
  std::vector<float> scales(size_t(n), 0.01f), zeros(size_t(n), float(1 << (wbits - 1)));
  const dq::IntWeights w = dq::IntWeights::pack(codes.data(), n, k, wbits, 0, scales.data(), zeros.data(), ag % k);
  dq::IntActs a;
  a.rows = m;
  a.cols = k;
  a.bits = abits;
  a.group = ag;
  a.codes.resize(size_t(m * k));
  for (uint8_t& c : a.codes) c = uint8_t(rng() % (1u << abits));
  a.scales.assign(size_t(m * a.groups()), 0.02f);
  a.zeros.assign(size_t(m * a.groups()), 1 << (abits - 1));
  const dq::Matrix X = random_matrix(m, k, 1), W = random_matrix(n, k, 2);
  dq::Matrix tiles, rows, slices, C(m, n);
  double t[4] = {0, 0, 0, 0};
  int64_t it = 0;
  for (auto _ : state) {
    for (int j = 0; j < 4; ++j) {
      const int which = int((it + j) % 4);
      const double c0 = dq::thread_cpu_seconds();
      if (which == 0) dq::int_gemm(a, w, path, tiles, dq::IntTiling::Tiles);
      else if (which == 1) dq::int_gemm(a, w, path, rows, dq::IntTiling::Rows);
      else if (which == 3) dq::int_gemm(a, w, path, slices, dq::IntTiling::Slices);
      else dq::sgemm(false, true, m, n, k, 1.f, X.data.data(), k, W.data.data(), k, 0.f, C.data.data(), n);
      benchmark::ClobberMemory();
      const double d = dq::thread_cpu_seconds() - c0;
      t[which] += d;
      if (which == 0) state.SetIterationTime(d);
    }
    ++it;
  }
  dq::set_num_threads(threads);
  if (tiles.data != rows.data || slices.data != rows.data) state.SkipWithError("tiles, slices and rows differ");
  const double ops = 2.0 * double(m) * double(n) * double(k) * double(it);
  state.counters["tiles_GOP/s"] = ops / t[0] / 1e9;
  state.counters["rows_GOP/s"] = ops / t[1] / 1e9;
  state.counters["sgemm_GFLOP/s"] = ops / t[2] / 1e9;
  state.counters["tiles/rows"] = t[1] / t[0];
  state.counters["tiles/sgemm"] = t[2] / t[0];
  state.counters["slices_GOP/s"] = ops / t[3] / 1e9;
  state.counters["slices/tiles"] = t[0] / t[3];
}

// One head's attention products at sequence length `seq`: scores = Q Kᵀ (seq x seq x hd) and
// out = P V (seq x hd x seq), strided inside [seq, heads * hd] activations as forward.cpp does.
void BM_HeadAttnGemms(benchmark::State& state) {
  const int64_t seq = state.range(0), hd = state.range(1), heads = 32;
  const dq::Matrix Q = random_matrix(seq, heads * hd, 1), K = random_matrix(seq, heads * hd, 2);
  dq::Matrix S(seq, seq), O(seq, heads * hd);
  for (auto _ : state) {
    dq::sgemm(false, true, seq, seq, hd, 1.f, Q.data.data(), heads * hd, K.data.data(), heads * hd, 0.f,
              S.data.data(), seq);
    dq::sgemm(false, false, seq, hd, seq, 1.f, S.data.data(), seq, K.data.data(), heads * hd, 0.f,
              O.data.data(), heads * hd);
    benchmark::DoNotOptimize(O.data.data());
    benchmark::ClobberMemory();
  }
  flops(state, 2.0 * double(seq), double(seq), double(hd));
}

// LLM linear shapes at 2048 tokens: {out, in}.
//   Llama-3.2-1B: q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192
//   SmolLM2-135M: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536
//   Llama-2-7B:  q/k/v/o 4096x4096
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k"});
  for (auto nk : std::vector<std::pair<int, int>>{{2048, 2048}, {512, 2048}, {8192, 2048}, {2048, 8192},
                                                   {576, 576}, {1536, 576}, {576, 1536}, {4096, 4096}})
    b->Args({2048, nk.first, nk.second});
  b->Unit(benchmark::kMillisecond);
}

// Prefill (512 tokens) and decode (1 token) at SmolLM2-135M and Llama-3.2-1B linear shapes, for
// W4A8, W4A4 and W8A8, on the best path and on AVX2; SmolLM2's o_proj with its per-head groups.
void int_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k", "wb", "ab", "avx2", "ag"});
  for (int path : {0, 1})
    for (auto bits : std::vector<std::pair<int, int>>{{4, 8}, {4, 4}, {8, 8}})
      for (int m : {512, 1}) {
        for (auto nk : std::vector<std::pair<int, int>>{{1536, 576}, {576, 1536}, {2048, 2048}, {8192, 2048}})
          b->Args({m, nk.first, nk.second, bits.first, bits.second, path, 0});
        b->Args({m, 576, 576, bits.first, bits.second, path, 64});
      }
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_GemmVsCblas)->Apply(shapes)->UseManualTime();
BENCHMARK(BM_CblasSgemm)->Apply(shapes)->UseRealTime();
BENCHMARK(BM_Gemm)->Apply(shapes)->UseRealTime();
BENCHMARK(BM_Linear)->Apply(shapes)->UseRealTime();
BENCHMARK(BM_HeadAttnGemms)->ArgNames({"seq", "hd"})->Args({2048, 64})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_IntGemmTilesVsRows)->Apply(int_shapes)->UseManualTime();
BENCHMARK_MAIN();
