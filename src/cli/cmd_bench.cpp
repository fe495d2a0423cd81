// dartquant bench: prompt-processing and generation speed and resident memory of a model on the path
// eval and generate would run it on (f32, fake-quant or integer), after llama-bench's conventions:
// pp<P> is a P-token prompt run into an empty KV cache the way generate runs one (prefill: forward
// passes of kPrefillChunk tokens on the integer path, one pass on the f32 ones), plus the
// next-token logits of the last one; tg<N> is N tokens
// decoded one at a time against the KV cache from an empty context, each with its logits. No
// tokenizer is loaded.
// Tokens are random ids (fixed seed). Every test first runs untimed on a few tokens (warm-up: pages
// of the weights touched, buffers allocated; 16 prompt tokens, 2 generated), then -r timed times;
// t/s is the mean ± standard deviation over those repetitions. Wall clock is what t/s counts; the
// process CPU time is reported beside it because this kind of machine is often shared: cpu_share =
// CPU seconds / (wall seconds × threads) well below 1 means other processes had the cores, and
// t/cpu-s (tokens per CPU second of the whole process) is then the steadier figure to compare.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "cli/command.h"
#include "cli/validators.h"
#include "eval/runtime.h"
#include "io/output.h"
#include "io/report.h"
#include "model/forward.h"
#include "quant/quantize_model.h"
#include "tensor/kernels.h"

namespace dq::cli {
namespace {

struct BenchArgs {
  std::string model, json, int_path;
  int prompt = 512, gen = 128, reps = 5, threads = 0;
  uint64_t seed = 0;
  bool fake_quant = false, force = false;
};

struct Sample {
  double wall, cpu;
};

struct TestResult {
  std::string name;
  int tokens;
  std::vector<Sample> samples;
};

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / double(v.size());
}

double stddev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / double(v.size() - 1));
}

// Runs fn(warmup) once untimed, then fn(n) reps times timed.
template <class Fn>
std::vector<Sample> measure(int reps, int n, int warmup, Fn fn) {
  fn(warmup);
  std::vector<Sample> out;
  for (int i = 0; i < reps; ++i) {
    const double c0 = process_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    fn(n);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    out.push_back({wall, process_cpu_seconds() - c0});
  }
  return out;
}

int run_bench(const BenchArgs& a) {
  OutputPlan plan({a.model}, a.force);
  plan.add(a.json, OutputKind::Json);
  if (a.threads > 0) set_num_threads(a.threads);
  Model m = load_model(a.model, "", /*with_tokenizer=*/false);  // the tests run on random ids
  const ModelConfig& c = m.config;
  if (a.prompt > c.max_seq || a.gen > c.max_seq)
    throw Error(a.model + ": -p " + std::to_string(a.prompt) + " / -n " + std::to_string(a.gen) +
                " do not fit the model's " + std::to_string(c.max_seq) + "-token context");
  IntPath path = best_int_path();
  if (!a.int_path.empty()) {
    path = int_path_named(a.int_path);
    const std::vector<IntPath> ok = supported_int_paths();
    if (std::find(ok.begin(), ok.end(), path) == ok.end()) {
      std::string names;
      for (IntPath p : ok) names += std::string(names.empty() ? "" : ", ") + int_path_name(p);
      throw Error("bench: --int-path " + a.int_path + ": this CPU cannot run it (it can: " + names + ")");
    }
  }
  const std::string why_not = a.fake_quant ? "--fake-quant" : use_integer_runtime(m, path);
  if (!a.int_path.empty() && !why_not.empty())
    throw Error(a.model + ": --int-path needs the integer runtime, which cannot run this model: " + why_not);
  RuntimeHooks runtime(m);

  // What stays resident for the weights: each linear's packed form, or its f32 matrix (the f32 path
  // converts a layer at a time; counted at f32 because that is what the products read), and the
  // classifier as stored (decoding multiplies it in place).
  double packed = 0, f32_linears = 0, other = 0;
  for (int l = 0; l < c.num_layers; ++l)
    for (const std::string& name : quantized_linears(c, l)) {
      if (auto p = m.weights.packed(name)) packed += double(p->bytes());
      else f32_linears += 4.0 * double(m.weights.shape(name).at(0) * m.weights.shape(name).at(1));
    }
  const std::string head_name = lm_head_name(m);
  const DType head_dtype = m.weights.stored_dtype(head_name);
  const double head_bytes = double(dtype_size(head_dtype)) * double(c.vocab_size) * double(c.hidden_size);
  for (const std::string& name : m.weights.names()) {
    if (name == head_name || name.find(".layers.") != std::string::npos) continue;
    std::vector<int64_t> s = m.weights.shape(name);
    double n = 1;
    for (int64_t d : s) n *= double(d);
    other += 4.0 * n;  // embedding (looked up by rows) and final norm
  }

  std::mt19937_64 rng(a.seed);
  std::uniform_int_distribution<int32_t> token(0, int32_t(c.vocab_size) - 1);
  std::vector<TestResult> tests;
  double kv = 0;  // bytes of the largest KV cache a test kept
  if (a.prompt > 0) {
    std::vector<int32_t> ids(size_t(a.prompt));
    for (int32_t& t : ids) t = token(rng);
    auto pp = [&](int n) {
      KvCache cache = runtime.kv_cache();
      cache.reserve(c, n);
      Matrix x = prefill(m, std::vector<int32_t>(ids.begin(), ids.begin() + n), runtime.hooks(), cache);
      greedy_next(m, x);
      kv = std::max(kv, double(cache.bytes()));
    };
    tests.push_back({"pp" + std::to_string(a.prompt), a.prompt, measure(a.reps, a.prompt, std::min(a.prompt, 16), pp)});
  }
  if (a.gen > 0) {
    const int32_t first = token(rng);
    auto tg = [&](int n) {
      KvCache cache = runtime.kv_cache();  // packed codes for a quantized KV cache
      cache.reserve(c, n);
      int32_t next = first;
      for (int i = 0; i < n; ++i) {
        Matrix x = forward(m, {next}, 1, 1, runtime.hooks(), &cache);
        next = greedy_next(m, x);
      }
      kv = std::max(kv, double(cache.bytes()));
    };
    tests.push_back({"tg" + std::to_string(a.gen), a.gen, measure(a.reps, a.gen, std::min(a.gen, 2), tg)});
  }

  const int threads = num_threads();
  const std::vector<std::string> kernels = int_kernels_used();
  const std::string kernel_list = kernels.empty() ? "f32" : kernels_used();
  const double peak = proc_status_bytes("VmHWM"), now = proc_status_bytes("VmRSS");
  const double anon = proc_status_bytes("RssAnon"), file = proc_status_bytes("RssFile");
  const double weights = packed + f32_linears + head_bytes + other;
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);

  nlohmann::json report = {{"model", a.model},
                           {"path", runtime.path()},
                           {"kernels", kernels},
                           {"threads", threads},
                           {"repetitions", a.reps},
                           {"packed_weight_bytes", packed},
                           {"f32_linear_bytes", f32_linears},
                           {"lm_head_bytes", head_bytes},
                           {"lm_head_dtype", dtype_name(head_dtype)},
                           {"other_f32_bytes", other},
                           {"weight_bytes", weights},
                           {"kv_cache_bytes", kv},
                           {"peak_rss_bytes", peak},
                           {"rss_bytes", now},
                           {"rss_anon_bytes", anon},
                           {"rss_file_bytes", file},
                           {"load_average", {load[0], load[1], load[2]}}};
  if (!m.quantization.is_null() && !why_not.empty()) report["integer_unavailable"] = why_not;
  std::printf("| %-28s | %-10s | %-24s | %7s | %8s | %20s | %12s | %9s |\n", "model", "path", "kernels", "threads",
              "test", "t/s", "t/cpu-s", "cpu_share");
  std::printf("| %-28s | %-10s | %-24s | %7s | %8s | %20s | %12s | %9s |\n", "---", "---", "---", "---:", "---",
              "---:", "---:", "---:");
  for (const TestResult& t : tests) {
    std::vector<double> ts, cpu_ts, wall, cpu, share;
    for (const Sample& s : t.samples) {
      if (!(s.wall > 0)) throw Error(a.model + ": " + t.name + " took no measurable time; raise -p or -n");
      if (!(s.cpu > 0)) throw Error(a.model + ": " + t.name + " took no measurable CPU time; raise -p or -n");
      ts.push_back(t.tokens / s.wall);
      cpu_ts.push_back(t.tokens / s.cpu);
      wall.push_back(s.wall);
      cpu.push_back(s.cpu);
      share.push_back(s.cpu / (s.wall * threads));
    }
    std::string name = a.model;
    if (name.size() > 28) name = "..." + name.substr(name.size() - 25);
    char tps[64];
    std::snprintf(tps, sizeof tps, "%.2f ± %.2f", mean(ts), stddev(ts));  // '±' is 2 bytes: width 21
    std::printf("| %-28s | %-10s | %-24s | %7d | %8s | %21s | %12.2f | %9.2f |\n", name.c_str(), runtime.path(),
                kernel_list.c_str(), threads, t.name.c_str(), tps, mean(cpu_ts), mean(share));
    report["tests"].push_back({{"test", t.name},
                               {"n_tokens", t.tokens},
                               {"avg_ts", mean(ts)},
                               {"stddev_ts", stddev(ts)},
                               {"samples_ts", ts},
                               {"avg_cpu_ts", mean(cpu_ts)},
                               {"samples_wall_s", wall},
                               {"samples_cpu_s", cpu},
                               {"avg_cpu_share", mean(share)}});
  }
  const double mib = 1048576.0;
  std::printf("memory: peak RSS %.1f MiB (now %.1f: %.1f heap, %.1f mapped files); weights %.1f MiB (packed %.1f, f32 linears %.1f, "
              "lm_head %.1f as %s, f32 embedding+norms %.1f); largest KV cache (%d tokens) %.2f MiB\n",
              peak / mib, now / mib, anon / mib, file / mib, weights / mib, packed / mib, f32_linears / mib, head_bytes / mib,
              dtype_name(head_dtype), other / mib,
              std::max(a.prompt, a.gen), kv / mib);
  if (!a.json.empty()) plan.write(a.json, [&](const std::string& path) { write_json(path, report); });
  return 0;
}

RegisterCommand reg("bench", "prompt-processing and generation speed and resident memory (llama-bench style)",
                    [](CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("-p,--n-prompt", a->prompt, "prompt tokens processed in one forward pass (0: no pp test)")
      ->capture_default_str()
      ->check(int_in(0, 1 << 20));
  app.add_option("-n,--n-gen", a->gen, "tokens generated one at a time (0: no tg test)")
      ->capture_default_str()
      ->check(int_in(0, 1 << 20));
  app.add_option("-r,--repetitions", a->reps, "timed repetitions of each test")->capture_default_str()->check(int_in(1, 1000));
  app.add_option("--threads", a->threads, "threads (default: the global --threads, else all cores)")
      ->check(int_in(1, 1024));
  app.add_option("--seed", a->seed, "seed of the random token ids");
  app.add_option("--json", a->json, "write the results as JSON here");
  app.add_flag("--force", a->force, "replace a report that exists (only one dartquant wrote)");
  auto* fake = app.add_flag("--fake-quant", a->fake_quant,
                            "run a quantized model on the f32 fake-quant reference path instead of the integer kernels");
  app.add_option("--int-path", a->int_path,
                 "integer kernels to run instead of the fastest this CPU has (one it supports): scalar, avx2 "
                 "(the AVX2 + FMA baseline, e.g. Zen 3), avx-vnni or avx512-vnni; the report's kernels name "
                 "what ran")
      ->check(CLI::IsMember({"scalar", "avx2", "avx-vnni", "avx512-vnni"}))
      ->excludes(fake);
  return [a] {
    if (a->prompt == 0 && a->gen == 0) throw Error("bench: -p and -n are both 0, nothing to measure");
    return run_bench(*a);
  };
});

}  // namespace
}  // namespace dq::cli
