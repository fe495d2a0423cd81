// dartquant calibrate: learn R1 and every R2 with DartQuant and write them as safetensors.
#include <cstdio>

#include "calib/calibrate.h"
#include "cli/command.h"
#include "eval/html_report.h"
#include "eval/perplexity.h"
#include "io/report.h"
#include "quant/quantize_model.h"

namespace dq::cli {
namespace {

struct CalibrateArgs {
  std::string model, tokenizer, calib, out, json, html, loss = "whip", orth = "qr", optimizer = "sgd";
  int nsamples = 128, calib_seqlen = 2048, epochs = 10, batch = 64;
  float token_ratio = 0.1f, lr_r1 = 2e-3f, lr_r2 = 1e-3f;
  bool cosine = false;
  uint64_t seed = 0;
  int64_t calib_memory = 4096;
};

int run_calibrate(const CalibrateArgs& a) {
  Model m = load_model(a.model, a.tokenizer);
  rope_to_halves(m);
  fuse_norms(m);
  std::vector<int32_t> ids = tokenize_file(m, a.calib);
  const int len = std::min<int>(a.calib_seqlen, int(ids.size()) - 1);
  std::vector<int32_t> calib = sample_windows(ids, a.nsamples, len, a.seed);
  CalibOptions co;
  co.token_ratio = a.token_ratio;
  co.epochs = a.epochs;
  co.batch = a.batch;
  co.seed = a.seed;
  co.memory_mib = a.calib_memory;
  co.r1.loss = co.r2.loss = loss_from_name(a.loss);
  co.r1.method = co.r2.method = orth_from_name(a.orth);
  co.r1.optimizer = co.r2.optimizer = optimizer_from_name(a.optimizer);
  co.r1.lr = a.lr_r1;
  co.r2.lr = a.lr_r2;
  co.r1.cosine = co.r2.cosine = a.cosine;
  CalibResult r = calibrate(m, calib, a.nsamples, len, co, [](const std::string& s, int done, int total) {
    if (!show_progress()) return;
    std::fprintf(stderr, "\r%s: %d/%d", s.c_str(), done, total);
    if (done == total) std::fprintf(stderr, "\n");
  });
  save_rotations(a.out, r.rotations);
  const auto& curve = r.report["r1_curve"];
  if (!curve.empty())
    std::printf("R1 loss %.5f -> %.5f over %zu steps (%.1f s); kept %lld token vectors\n",
                curve.front()["loss"].get<double>(), curve.back()["loss"].get<double>(), curve.size(),
                r.report["r1_seconds"].get<double>(), (long long)r.report["kept_tokens_r1"].get<int64_t>());
  std::printf("wrote %s\n", a.out.c_str());
  if (!a.json.empty()) {
    nlohmann::json j = r.report;
    j["model"] = a.model;
    j["options"] = {{"loss", a.loss}, {"orth", a.orth}, {"optimizer", a.optimizer}, {"lr_r1", a.lr_r1},
                    {"lr_r2", a.lr_r2}, {"epochs", a.epochs}, {"batch", a.batch},
                    {"token_ratio", a.token_ratio}, {"nsamples", a.nsamples}, {"calib_seqlen", len},
                    {"seed", a.seed}};
    j["peak_rss_mib"] = peak_rss_mib();
    write_json(a.json, j);
  }
  if (!a.html.empty()) {
    nlohmann::json c = r.report;
    c["options"] = {{"orth", a.orth}, {"loss", a.loss}};  // names the loss curve
    write_html_report(a.html, {"DartQuant calibration: " + a.model, {{"calibration text", a.calib}}, nullptr, {c}, {}});
  }
  return 0;
}

RegisterCommand reg("calibrate", "learn DartQuant rotations R1/R2 from calibration text", [](CLI::App& app) {
  auto a = std::make_shared<CalibrateArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--calib", a->calib, "calibration text")->required();
  app.add_option("--out", a->out, "rotations.safetensors to write")->required();
  app.add_option("--nsamples", a->nsamples, "calibration windows")->capture_default_str();
  app.add_option("--calib-seqlen", a->calib_seqlen, "calibration window length")->capture_default_str();
  app.add_option("--token-ratio", a->token_ratio, "fraction of token vectors kept")->capture_default_str();
  app.add_option("--loss", a->loss, "whip, variance, kurtosis or quant")->capture_default_str();
  app.add_option("--orth", a->orth, "qr (QR-Orth) or cayley")->capture_default_str();
  app.add_option("--optimizer", a->optimizer, "sgd (momentum 0.9) or adam")->capture_default_str();
  app.add_option("--lr-r1", a->lr_r1, "R1 learning rate")->capture_default_str();
  app.add_option("--lr-r2", a->lr_r2, "R2 learning rate")->capture_default_str();
  app.add_option("--epochs", a->epochs, "epochs")->capture_default_str();
  app.add_option("--batch", a->batch, "sequences per step")->capture_default_str();
  app.add_option("--calib-memory", a->calib_memory, "MiB of captured activations kept in RAM; the rest spills to a memory-mapped temp file")
      ->capture_default_str();
  app.add_flag("--cosine", a->cosine, "cosine learning-rate schedule");
  app.add_option("--seed", a->seed, "seed")->capture_default_str();
  app.add_option("--json", a->json, "write a JSON report (loss curves, stage times) here");
  app.add_option("--html", a->html, "write a self-contained HTML report (loss curves) here");
  return [a] { return run_calibrate(*a); };
});

}  // namespace
}  // namespace dq::cli
