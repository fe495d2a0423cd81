// dartquant quantize: rotate (none | QuaRot | DartQuant), quantize weights (RTN | GPTQ), record the
// activation/KV quantization, and write a self-describing model directory (pipeline/quantize.h),
// then optionally evaluate what was written.
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "calib/calibrate.h"
#include "cli/calib_args.h"
#include "cli/command.h"
#include "cli/validators.h"
#include "eval/html_report.h"
#include "eval/perplexity.h"
#include "io/output.h"
#include "io/report.h"
#include "eval/runtime.h"
#include "pipeline/quantize.h"

namespace dq::cli {
namespace {

namespace fs = std::filesystem;

struct QuantizeArgs {
  std::string model, tokenizer, out, rotation = "none", rotations_file, json, html, ppl;
  std::string w_method = "rtn", target = "dartquant", head_dtype = "f16";
  int w_bits = 4, w_group = 0, a_bits = 16, kv_bits = 16;
  int seqlen = 0, max_windows = 0;
  float a_clip = 0.9f, kv_clip = 1.f, damp = 0.01f;
  bool w_asym = false, w_clip = false, w_f16_scales = false, act_order = false, no_online = false, resume = false,
       force = false;
  int64_t min_expert_tokens = 128;
  int experts_per_pass = 0;
  CalibArgs cal;
};

// A GGUF or HF target holds weights only: refuse up front what `export` would refuse after the run.
void check_target(const QuantizeArgs& a) {
  if (a.target == "dartquant") return;
  std::vector<std::string> needs;
  if (a.rotation != "none" && !a.no_online) needs.push_back("online Hadamards (add --no-online-hadamard)");
  if (a.a_bits < 16) needs.push_back(std::to_string(a.a_bits) + "-bit activations (use --a-bits 16)");
  if (a.kv_bits < 16) needs.push_back(std::to_string(a.kv_bits) + "-bit KV cache (use --kv-bits 16)");
  if (!needs.empty()) {
    std::string list;
    for (const std::string& n : needs) list += (list.empty() ? "" : ", ") + n;
    throw Error(a.out + ": --target " + a.target + " cannot run a model that needs " + list +
                " at run time; `export` would refuse the result");
  }
  if (a.target == "gguf" && a.w_bits < 16 && (a.w_group % 32 != 0 || !a.w_f16_scales))
    std::fprintf(stderr, "note: --target gguf: with --w-group 0 or a multiple of 32 and --w-f16-scales, `export "
                         "--gguf-type q4_0|q4_1|q8_0` carries the codes exactly; otherwise it re-rounds them\n");
}

int run_quantize(const QuantizeArgs& a) {
  if (!a.rotations_file.empty() && a.rotation == "none")
    throw Error(a.rotations_file + ": --rotations needs --rotation quarot or dartquant (not none)");
  check_target(a);
  OutputPlan plan({a.model, a.tokenizer, a.rotations_file, a.cal.calib, a.ppl}, a.force);
  plan.add(a.out, OutputKind::Dir, a.resume);
  plan.add(a.json, OutputKind::Json);
  plan.add(a.html, OutputKind::Html);
  Model m = load_model(a.model, a.tokenizer);
  rope_to_halves(m);

  QuantizeJob job;
  job.out = a.out;
  job.rotation = a.rotation;
  job.rotations_file = a.rotations_file;
  const bool need_calib = (a.w_method == "gptq" && a.w_bits < 16) ||
                          (a.rotation == "dartquant" && a.rotations_file.empty());
  job.len = a.cal.calib_seqlen;
  if (need_calib) {
    if (a.cal.calib.empty()) throw Error("--calib is required for GPTQ and DartQuant calibration");
    job.windows = a.cal.nsamples;
    job.calib = calibration_windows(m, a.cal.calib, a.cal.nsamples, job.len, a.cal.seed);
  }
  const bool rotate = a.rotation != "none";
  job.r4 = rotate && !a.no_online;
  job.r3 = job.r4 && a.kv_bits < 16;
  job.calib_options = a.cal.options();
  job.head_dtype = a.head_dtype == "f16" ? DType::F16 : a.head_dtype == "bf16" ? DType::BF16 : DType::F32;

  WeightQuantOptions& wq = job.weights;
  wq.spec.bits = a.w_bits;
  wq.spec.symmetric = !a.w_asym;
  wq.spec.group = a.w_group;
  wq.spec.mse_clip = a.w_clip;
  wq.spec.f16_scales = a.w_f16_scales;
  wq.method = a.w_method;
  wq.gptq.damp = a.damp;
  wq.gptq.act_order = a.act_order;
  wq.gptq.static_groups = a.act_order && a.w_group > 0;
  wq.min_expert_tokens = a.min_expert_tokens;
  wq.experts_per_pass = a.experts_per_pass;

  job.section = {
      {"weights", {{"bits", a.w_bits}, {"method", a.w_method}, {"group", a.w_group}, {"symmetric", !a.w_asym},
                   {"mse_clip", a.w_clip}, {"f16_scales", a.w_f16_scales}, {"damp", a.damp}, {"act_order", a.act_order},
                   {"nsamples", need_calib ? a.cal.nsamples : 0}, {"calib_seqlen", need_calib ? job.len : 0}}},
      {"activations", {{"bits", a.a_bits}, {"symmetric", false}, {"clip_ratio", a.a_clip}}},
      {"kv_cache", {{"bits", a.kv_bits}, {"symmetric", false}, {"clip_ratio", a.kv_clip}}},
      {"rotation", {{"kind", a.rotation}, {"seed", a.cal.seed}}},
      {"online", {{"r3", job.r3}, {"r4", job.r4}}},
      {"lm_head", {{"dtype", a.head_dtype}}}};
  job.fingerprint = a.cal.fingerprint(a.model, a.tokenizer, job.calib, job.len);
  job.fingerprint.update({{"section", job.section},
                          {"rotations", a.rotations_file.empty() ? "" : fs::absolute(a.rotations_file).string()},
                          {"min_expert_tokens", a.min_expert_tokens},
                          {"experts_per_pass", a.experts_per_pass}});
  job.resume = a.resume;

  nlohmann::json report = {{"model", a.model}, {"out", a.out}};
  plan.write(a.out, [&](const std::string&) {  // the job writes where its checkpoint says
    try {
      report.update(run_quantize_job(m, job, progress_line));
    } catch (const Error& e) {
      throw Error(e.what() + resume_hint(a.out));
    }
  });
  report["quantization"] = job.section;

  if (!a.ppl.empty()) {
    auto t = std::chrono::steady_clock::now();
    Model q = load_model(a.out);
    RuntimeHooks rh(q);
    int seqlen = a.seqlen > 0 ? a.seqlen : std::min(2048, q.config.max_seq);
    PplResult r = perplexity(q, tokenize_file(q, a.ppl), seqlen, a.max_windows, rh.hooks());
    std::printf("ppl %.4f  (%s, %d windows x %d tokens)\n", r.ppl, a.ppl.c_str(), r.windows, r.seqlen);
    report["ppl"] = {{"ppl", r.ppl}, {"text", a.ppl}, {"windows", r.windows}, {"seqlen", r.seqlen}};
    report["stages"]["eval"] = {
        {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count()},
        {"peak_rss_mib", peak_rss_mib()}};
  }
  report["peak_rss_mib"] = peak_rss_mib();
  std::printf("wrote %s\n", a.out.c_str());
  if (!a.json.empty()) {
    plan.write(a.json, [&](const std::string& path) { write_json(path, report); });
  }
  if (!a.html.empty()) {
    std::vector<nlohmann::json> cals;
    if (report.contains("calibration")) cals.push_back(report["calibration"]);
    for (auto& c : cals) c["options"] = {{"orth", a.cal.orth}, {"loss", a.cal.loss}};  // names the loss curve
    const ReportInput in{"dartquant quantize: " + a.model, {{"output", a.out}}, nullptr, cals, {report}};
    plan.write(a.html, [&](const std::string& path) { write_html_report(path, in); });
  }
  return 0;
}

RegisterCommand reg("quantize", "rotate and quantize a model into a self-describing directory",
                    [](CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--out", a->out, "output directory")->required();
  app.add_option("--rotation", a->rotation, "none, quarot (random Hadamard) or dartquant (learned)")
      ->capture_default_str()->check(CLI::IsMember({"none", "quarot", "dartquant"}));
  app.add_option("--rotations", a->rotations_file, "use these rotations (from `calibrate`) instead");
  app.add_flag("--no-online-hadamard", a->no_online, "leave out R3/R4: the output is a plain LLaMA checkpoint");
  app.add_option("--target", a->target,
                 "where the model will run: dartquant (eval), or gguf / hf, which hold weights only: refuses "
                 "online Hadamards and activation/KV quantization before the run")
      ->capture_default_str()
      ->check(CLI::IsMember({"dartquant", "gguf", "hf"}));
  app.add_option("--w-bits", a->w_bits, "weight bits (16 = not quantized)")->capture_default_str()->check(quant_bits());
  app.add_option("--w-method", a->w_method, "rtn or gptq")->capture_default_str()
      ->check(CLI::IsMember({"rtn", "gptq"}));
  app.add_option("--w-group", a->w_group, "group size along the input dimension (0 = per channel)")
      ->capture_default_str()->check(int_in(0, 1 << 24));
  app.add_flag("--w-asym", a->w_asym, "asymmetric weights (default symmetric)");
  app.add_flag("--w-clip", a->w_clip, "MSE clip search for weights");
  app.add_flag("--w-f16-scales", a->w_f16_scales,
               "round weight scales to f16 (GGUF q4_0/q8_0 export then carries the exact values)");
  app.add_option("--damp", a->damp, "GPTQ damping, fraction of mean(diag H)")->capture_default_str()
      ->check(real_in(0, 1, true));
  app.add_flag("--act-order", a->act_order, "GPTQ act-order");
  app.add_option("--min-expert-tokens", a->min_expert_tokens,
                 "MoE: experts routed fewer calibration tokens than this get RTN instead of GPTQ")
      ->capture_default_str()->check(int_in(0, INT64_MAX));
  app.add_option("--experts-per-pass", a->experts_per_pass,
                 "MoE: expert Hessians collected per calibration pass over a layer (0 = all; see `plan`)")
      ->capture_default_str()->check(int_in(0, 4096));
  app.add_option("--a-bits", a->a_bits, "activation bits (16 = not quantized)")->capture_default_str()->check(quant_bits());
  app.add_option("--a-clip", a->a_clip, "activation clip ratio")->capture_default_str()->check(clip_ratio());
  app.add_option("--kv-bits", a->kv_bits, "KV-cache bits (16 = not quantized)")->capture_default_str()->check(quant_bits());
  app.add_option("--kv-clip", a->kv_clip, "KV-cache clip ratio")->capture_default_str()->check(clip_ratio());
  app.add_option("--lm-head-dtype", a->head_dtype,
                 "the classifier as written: f16 (as QuaRot keeps lm_head; the runtime reads it in place), bf16 "
                 "or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"f16", "bf16", "f32"}));
  app.add_option("--calib", a->cal.calib, "calibration text (GPTQ, DartQuant)");
  a->cal.add_options(app);
  app.add_option("--ppl", a->ppl, "evaluate the quantized model's perplexity on this text");
  app.add_option("--seqlen", a->seqlen, "evaluation window length")->check(int_in(2, 1 << 24));
  app.add_option("--max-windows", a->max_windows, "evaluate only the first K windows (0 = all)")
      ->check(int_in(0, INT32_MAX));
  app.add_flag("--resume", a->resume,
               "continue an interrupted run from OUT.partial (same options and inputs), else start over");
  app.add_option("--json", a->json, "write a JSON report here");
  app.add_option("--html", a->html, "write a self-contained HTML report (loss curves, evaluation) here");
  app.add_flag("--force", a->force, "replace outputs that exist (only ones dartquant wrote)");
  return [a] { return run_quantize(*a); };
});

}  // namespace
}  // namespace dq::cli
