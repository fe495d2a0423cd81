// dartquant plan: the dry run of `quantize` — peak memory per stage from a config's shapes alone.
#include <cstdio>
#include <filesystem>

#include "cli/command.h"
#include "cli/validators.h"
#include "io/output.h"
#include "io/report.h"
#include "quant/plan.h"

namespace dq::cli {
namespace {

struct PlanArgs {
  std::string model, json;
  PlanOptions opts;
  bool force = false;
};

int run_plan(const PlanArgs& a) {
  namespace fs = std::filesystem;
  OutputPlan plan({a.model}, a.force);
  plan.add(a.json, OutputKind::Json);
  const std::string path = fs::is_directory(a.model) ? (fs::path(a.model) / "config.json").string() : a.model;
  const MemoryPlan p = plan_memory(load_config(path), a.opts);
  const nlohmann::json& r = p.report;
  std::printf("%s: %.2fB parameters, bf16 checkpoint %.1f GiB, largest layer %.2f GiB\n",
              r["architecture"].get<std::string>().c_str(), r["parameters_billion"].get<double>(),
              r["bf16_checkpoint_gib"].get<double>(), r["largest_layer_bf16_gib"].get<double>());
  for (const char* s : {"capture", "train_r1", "rotate", "gptq", "eval"}) {
    const nlohmann::json& st = r["stages"][s];
    std::printf("  %-9s peak %6.2f GiB :", s, st["peak_gib"].get<double>());
    for (auto& [k, v] : st["components_gib"].items()) std::printf(" %s %.2f", k.c_str(), v.get<double>());
    std::printf("\n");
  }
  std::printf("  GPTQ: %d expert(s) per pass, %d pass(es) per layer; capture spills %.1f GiB to disk\n",
              p.experts_per_pass, r["stages"]["gptq"]["passes_per_layer"].get<int>(),
              r["stages"]["capture"]["spilled_to_disk_gib"].get<double>());
  std::printf("peak %.2f GiB: %s the %.0f GiB budget\n", p.peak_gib, p.fits ? "fits" : "does NOT fit", a.opts.budget_gib);
  if (!a.json.empty()) {
    plan.write(a.json, [&](const std::string& path) { write_json(path, r); });
  }
  return p.fits ? 0 : 3;
}

RegisterCommand reg("plan", "dry run of quantize: planned peak memory per stage from the config alone",
                    [](CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  app.add_option("--model", a->model, "a model directory or its config.json (no weights needed)")->required();
  app.add_option("--nsamples", a->opts.nsamples, "calibration windows")->capture_default_str()->check(int_in(1, 1 << 20));
  app.add_option("--calib-seqlen", a->opts.seqlen, "calibration window length")->capture_default_str()
      ->check(int_in(2, 1 << 20));
  app.add_option("--token-ratio", a->opts.token_ratio, "DartQuant: fraction of token vectors kept")->capture_default_str()
      ->check(real_in(0, 1, true));
  app.add_option("--batch", a->opts.batch, "DartQuant: sequences per step")->capture_default_str()
      ->check(int_in(1, 1 << 20));
  app.add_option("--calib-memory", a->opts.calib_memory_mib, "MiB of captured activations kept in RAM")
      ->capture_default_str()->check(int_in(0, int64_t(1) << 40));
  app.add_option("--experts-per-pass", a->opts.experts_per_pass, "GPTQ Hessians per layer pass (0 = most that fit)")
      ->capture_default_str()->check(int_in(0, 4096));
  app.add_option("--budget-gib", a->opts.budget_gib, "memory budget")->capture_default_str()->check(real_in(0, 1e6, true));
  app.add_option("--json", a->json, "write the plan as JSON here");
  app.add_flag("--force", a->force, "replace a report that exists (only one dartquant wrote)");
  return [a] { return run_plan(*a); };
});

}  // namespace
}  // namespace dq::cli
