// dartquant calibrate: learn R1 and every R2 with DartQuant and write them as safetensors.
#include <cstdio>

#include "cli/calib_args.h"
#include "cli/command.h"
#include "eval/html_report.h"
#include "eval/perplexity.h"
#include "io/output.h"
#include "io/report.h"
#include "quant/quantize_model.h"

namespace dq::cli {
namespace {

struct CalibrateArgs {
  std::string model, tokenizer, out, json, html;
  CalibArgs cal;
  bool resume = false, force = false;
};

int run_calibrate(const CalibrateArgs& a) {
  OutputPlan plan({a.model, a.tokenizer, a.cal.calib}, a.force);
  plan.add(a.out, OutputKind::Safetensors, a.resume);
  plan.add(a.json, OutputKind::Json);
  plan.add(a.html, OutputKind::Html);
  Model m = load_model(a.model, a.tokenizer);
  rope_to_halves(m);
  const int len = a.cal.calib_seqlen;
  std::vector<int32_t> calib = calibration_windows(m, a.cal.calib, a.cal.nsamples, len, a.cal.seed);
  CalibResult r;
  plan.write(a.out, [&](const std::string& path) {
    Checkpoint ck(a.out, a.cal.fingerprint(a.model, a.tokenizer, calib, len), a.resume);
    try {
      r = calibrate(m, calib, a.cal.nsamples, len, a.cal.options(), progress_line, &ck);
    } catch (const Error& e) {
      throw Error(e.what() + resume_hint(a.out));
    }
    save_rotations(path, r.rotations);
  });
  const auto& curve = r.report["r1_curve"];
  if (!curve.empty())
    std::printf("R1 loss %.5f -> %.5f over %zu steps (%.1f s); kept %lld token vectors\n",
                curve.front()["loss"].get<double>(), curve.back()["loss"].get<double>(), curve.size(),
                r.report["r1_seconds"].get<double>(), (long long)r.report["kept_tokens_r1"].get<int64_t>());
  std::printf("wrote %s\n", a.out.c_str());
  if (!a.json.empty()) {
    nlohmann::json j = r.report;
    j["model"] = a.model;
    j["options"] = a.cal.to_json(len);
    j["peak_rss_mib"] = peak_rss_mib();
    plan.write(a.json, [&](const std::string& path) { write_json(path, j); });
  }
  if (!a.html.empty()) {
    nlohmann::json c = r.report;
    c["options"] = {{"orth", a.cal.orth}, {"loss", a.cal.loss}};  // names the loss curve
    const ReportInput in{"DartQuant calibration: " + a.model, {{"calibration text", a.cal.calib}}, nullptr, {c}, {}};
    plan.write(a.html, [&](const std::string& path) { write_html_report(path, in); });
  }
  return 0;
}

RegisterCommand reg("calibrate", "learn DartQuant rotations R1/R2 from calibration text", [](CLI::App& app) {
  auto a = std::make_shared<CalibrateArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--calib", a->cal.calib, "calibration text")->required();
  app.add_option("--out", a->out, "rotations.safetensors to write")->required();
  a->cal.add_options(app);
  app.add_flag("--resume", a->resume,
               "continue an interrupted run from OUT.partial (same options and inputs), else start over");
  app.add_option("--json", a->json, "write a JSON report (loss curves, stage times) here");
  app.add_option("--html", a->html, "write a self-contained HTML report (loss curves) here");
  app.add_flag("--force", a->force, "replace outputs that exist (only ones dartquant wrote)");
  return [a] { return run_calibrate(*a); };
});

}  // namespace
}  // namespace dq::cli
