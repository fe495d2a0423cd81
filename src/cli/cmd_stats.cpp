// dartquant stats: activation statistics at the linear-layer inputs of the unrotated, random-Hadamard
// (QuaRot) and learned (DartQuant) models side by side, as JSON, an HTML report, and a summary.
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "cli/validators.h"
#include "eval/html_report.h"
#include "eval/perplexity.h"
#include "io/output.h"
#include "io/report.h"
#include "eval/stats.h"
#include "io/file.h"
#include "quant/quantize_model.h"
#include "rotate/rotate.h"

namespace dq::cli {
namespace {

struct StatsArgs {
  std::string model, tokenizer, calib, rotations, json, html;
  std::vector<std::string> calib_json, eval_json;
  std::vector<int> layers;
  int nsamples = 16, calib_seqlen = 256;
  uint64_t seed = 0;
  bool force = false;
};

// One forward pass of one variant; the model is loaded afresh because rotating it is in place.
std::unique_ptr<StatsHook> run_variant(const StatsArgs& a, const std::string& variant,
                                       const std::vector<int32_t>& calib, int len, const StatsOptions& so) {
  Model m = load_model(a.model, a.tokenizer);
  rope_to_halves(m);
  fuse_norms(m);
  const bool rotate = variant != "none";
  if (rotate) {
    apply_rotations(m, variant == "quarot" ? random_hadamard_rotations(m.config, a.seed)
                                           : load_rotations(a.rotations, m.config));
    fold_r4(m);
  }
  // R4 is an online Hadamard in both rotated pipelines; the stats hook must see its output.
  OnlineHadamard r4(m.config, false, true);
  Hooks pre;
  if (rotate) pre.push_back(&r4);
  auto hook = std::make_unique<StatsHook>(m.config, so);
  collect_stats(m, calib, a.nsamples, len, pre, *hook);
  return hook;
}

int run_stats(const StatsArgs& a) {
  std::vector<std::string> inputs{a.model, a.tokenizer, a.calib, a.rotations};
  inputs.insert(inputs.end(), a.calib_json.begin(), a.calib_json.end());
  inputs.insert(inputs.end(), a.eval_json.begin(), a.eval_json.end());
  OutputPlan plan(inputs, a.force);
  plan.add(a.json, OutputKind::Json);
  plan.add(a.html, OutputKind::Html);
  std::vector<int32_t> calib;
  int len = 0, layers = 0;
  {
    Model m = load_model(a.model, a.tokenizer);
    layers = m.config.num_layers;
    len = a.calib_seqlen;
    calib = calibration_windows(m, a.calib, a.nsamples, len, a.seed);
  }
  StatsOptions so;
  so.hist_layers = a.layers;
  if (so.hist_layers.empty()) so.hist_layers = layers > 2 ? std::vector<int>{0, layers / 2, layers - 1}
                                                          : std::vector<int>{0};
  std::vector<std::string> variants = {"none", "quarot"};
  if (!a.rotations.empty()) variants.push_back("learned");
  std::vector<std::unique_ptr<StatsHook>> hooks;
  std::vector<const StatsHook*> views;
  for (const std::string& v : variants) {
    if (show_progress()) std::fprintf(stderr, "\rstats: %s pass   ", v.c_str());
    hooks.push_back(run_variant(a, v, calib, len, so));
    views.push_back(hooks.back().get());
  }
  if (show_progress()) std::fprintf(stderr, "\n");

  nlohmann::json j = stats_to_json(variants, views);
  j["model"] = a.model;
  j["calib"] = a.calib;
  j["windows"] = a.nsamples;
  j["seqlen"] = len;
  j["seed"] = a.seed;
  if (!a.rotations.empty()) j["rotations"] = a.rotations;

  std::printf("%-6s %-10s", "layer", "site");
  for (const auto& v : variants) std::printf(" %11s", ("kurt." + v).c_str());
  for (const auto& v : variants) std::printf(" %11s", ("max|x|." + v).c_str());
  std::printf("\n");
  for (const auto& row : j["table"]) {
    std::printf("%-6d %-10s", row["layer"].get<int>(), row["site"].get<std::string>().c_str());
    for (const auto& v : variants) std::printf(" %11.3f", row[v]["kurtosis"].get<double>());
    for (const auto& v : variants) std::printf(" %11.3f", row[v]["max_abs"].get<double>());
    std::printf("\n");
  }
  if (!a.json.empty()) {
    plan.write(a.json, [&](const std::string& path) { write_json(path, j); });
  }
  if (!a.html.empty()) {
    ReportInput in;
    in.title = "Activation statistics: " + a.model;
    in.meta = {{"calibration text", a.calib},
               {"tokens", std::to_string(a.nsamples) + " windows x " + std::to_string(len) + " (seed " +
                              std::to_string(a.seed) + ")"},
               {"variants", "unrotated = norm-fused; QuaRot = random Hadamard R1/R2 (seed " +
                                std::to_string(a.seed) + ") + online Hadamard R4" +
                                (a.rotations.empty() ? std::string()
                                                     : "; learned = " + a.rotations + " + online Hadamard R4")}};
    in.stats = j;
    for (const auto& f : a.calib_json) in.calibrations.push_back(read_json(f));
    for (const auto& f : a.eval_json) in.evaluations.push_back(read_json(f));
    plan.write(a.html, [&](const std::string& path) { write_html_report(path, in); });
    std::printf("wrote %s\n", a.html.c_str());
  }
  return 0;
}

RegisterCommand reg("stats", "activation statistics and histograms: unrotated vs QuaRot vs learned rotations",
                    [](CLI::App& app) {
  auto a = std::make_shared<StatsArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--calib", a->calib, "text whose windows are run through the models")->required();
  app.add_option("--nsamples", a->nsamples, "windows")->capture_default_str()->check(int_in(1, 1 << 20));
  app.add_option("--calib-seqlen", a->calib_seqlen, "window length")->capture_default_str()
      ->check(int_in(2, 1 << 20));
  app.add_option("--rotations", a->rotations, "learned rotations (from `calibrate`): adds the learned variant");
  app.add_option("--seed", a->seed, "seed for windows and the random Hadamard")->capture_default_str();
  app.add_option("--layers", a->layers, "layers whose histograms are kept (default: first, middle, last)")
      ->delimiter(',')->check(int_in(0, 1 << 24));
  app.add_option("--calib-json", a->calib_json, "calibrate --json reports whose loss curves the HTML shows");
  app.add_option("--eval-json", a->eval_json, "quantize --json reports for the HTML evaluation table");
  app.add_option("--json", a->json, "write the statistics as JSON here");
  app.add_option("--html", a->html, "write a self-contained HTML report here");
  app.add_flag("--force", a->force, "replace outputs that exist (only ones dartquant wrote)");
  return [a] { return run_stats(*a); };
});

}  // namespace
}  // namespace dq::cli
