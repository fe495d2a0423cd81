// dartquant eval: perplexity (and zero-shot tasks) of a model, plain or quantized.
#include <cstdio>

#include "cli/command.h"
#include "cli/validators.h"
#include "eval/perplexity.h"
#include "io/output.h"
#include "io/report.h"
#include "eval/runtime.h"
#include "eval/zeroshot.h"
#include "model/llamacpp_rounding.h"

namespace dq::cli {
namespace {

struct EvalArgs {
  std::string model, tokenizer, ppl, json, tasks, tasks_dir = "../shared/data/zeroshot", protocol = "gptq", kl_base;
  int seqlen = 0, max_windows = 0, limit = 0;
  bool force = false;
  bool fake_quant = false;
  std::vector<std::string> fp_sites;
};

// --fp-sites: the linear inputs whose activation quantization can be left out.
std::vector<Site> parse_fp_sites(const std::vector<std::string>& names) {
  std::vector<Site> sites;
  for (const std::string& n : names) {
    const Site s = site_from_name(n);
    if (s != Site::AttnIn && s != Site::OprojIn && s != Site::MlpIn && s != Site::DownIn)
      throw Error("eval: --fp-sites takes attn_in, o_proj_in, mlp_in and down_in, not '" + n + "'");
    sites.push_back(s);
  }
  return sites;
}

int run_eval(const EvalArgs& a) {
  if (a.ppl.empty() && a.tasks.empty()) throw Error("eval: pass --ppl FILE, --tasks LIST, or both");
  if (!a.kl_base.empty() && a.ppl.empty()) throw Error(a.kl_base + ": --kl-base compares on the --ppl windows: pass --ppl FILE");
  if (!a.kl_base.empty() && a.protocol != "gptq") throw Error(a.kl_base + ": --kl-base uses the gptq protocol's windows");
  OutputPlan plan({a.model, a.tokenizer, a.ppl, a.tasks.empty() ? "" : a.tasks_dir, a.kl_base}, a.force);
  plan.add(a.json, OutputKind::Json);
  const std::vector<std::string> task_names =
      a.tasks.empty() ? std::vector<std::string>{} : resolve_tasks(a.tasks, a.tasks_dir);
  const std::vector<Site> fp_sites = parse_fp_sites(a.fp_sites);
  Model m = load_model(a.model, a.tokenizer);
  if (!fp_sites.empty() && (m.quantization.is_null() || quant_config(m).bits == 16))
    throw Error(a.model + ": --fp-sites needs a model with quantized activations");
  const std::string why_not = a.fake_quant ? "--fake-quant" : !fp_sites.empty() ? "--fp-sites" : use_integer_runtime(m);
  RuntimeHooks runtime(m, fp_sites);
  nlohmann::json report = {{"model", a.model}, {"quantization", m.quantization}, {"path", runtime.path()}};
  if (!fp_sites.empty()) report["fp_sites"] = a.fp_sites;
  if (!m.quantization.is_null() && !why_not.empty()) report["integer_unavailable"] = why_not;
  if (!a.ppl.empty()) {
    int seqlen = a.seqlen > 0 ? a.seqlen : std::min(2048, m.config.max_seq);
    std::vector<int32_t> ids = tokenize_file(m, a.ppl);
    PplProtocol protocol;
    protocol.llama_cpp = a.protocol == "llama.cpp";
    if (!ids.empty() && ids[0] == m.tokenizer->bos_id()) protocol.bos = ids[0];  // the tokenizer adds BOS
    // llama.cpp rounds activations to the weights' dot-product type (quantized GGUF weights).
    Hooks hooks = runtime.hooks();
    std::unique_ptr<Hook> rounding = protocol.llama_cpp ? llama_cpp_activation_rounding(m) : nullptr;
    if (rounding) hooks.push_back(rounding.get());
    PplResult r = perplexity(m, ids, seqlen, a.max_windows, hooks,
                             [](int done, int total) { progress_line("perplexity windows", done, total); }, protocol);
    std::printf("ppl %.4f  (%s, %d windows x %d tokens, %.0f tokens/s, %s%s)\n", r.ppl, a.ppl.c_str(),
                r.windows, r.seqlen, r.tokens_per_second, runtime.path(), kernels_note().c_str());
    report["ppl"] = r.ppl;
    report["mean_nll"] = r.mean_nll;
    report["tokens"] = r.tokens;
    report["windows"] = r.windows;
    report["seqlen"] = r.seqlen;
    report["protocol"] = a.protocol;
    report["text"] = a.ppl;
    report["seconds"] = r.seconds;
    report["tokens_per_second"] = r.tokens_per_second;
    if (!a.kl_base.empty()) {
      const Model base = load_model(a.kl_base, a.tokenizer);  // ids come from the model's tokenizer
      RuntimeHooks base_runtime(base);
      const KlResult kl = kl_divergence(base, base_runtime.hooks(), m, hooks, ids, seqlen, a.max_windows,
                                        [](int done, int total) { progress_line("KL windows", done, total); });
      std::printf("kl %.6f nats/token against %s (max %.4f; same top token %.2f%% of %lld positions)\n", kl.mean_kl,
                  a.kl_base.c_str(), kl.max_kl, 100 * kl.same_top, static_cast<long long>(kl.tokens));
      report["kl"] = {{"base", a.kl_base}, {"mean", kl.mean_kl}, {"max", kl.max_kl}, {"same_top", kl.same_top},
                      {"tokens", kl.tokens}};
    }
  }
  if (!task_names.empty()) {
    nlohmann::json tasks = nlohmann::json::object();
    for (const std::string& name : task_names) {
      Task t = load_task(name, a.tasks_dir + "/" + name + ".jsonl", a.limit);
      TaskResult r = evaluate_task(m, t, runtime.hooks(), {}, [&name](int done, int total) {
        progress_line(name + " sequences", done, total);
      });
      for (const Metric& mt : r.metrics)
        std::printf("%-16s %-10s %9.4f +- %.4f  (n %d, %.1f examples/s)\n", name.c_str(),
                    mt.name.c_str(), mt.value, mt.se, r.examples, r.examples_per_second);
      tasks[name] = to_json(r);
    }
    report["tasks"] = tasks;
  }
  report["kernels"] = int_kernels_used();
  report["peak_rss_mib"] = peak_rss_mib();
  if (!a.json.empty()) {
    plan.write(a.json, [&](const std::string& path) { write_json(path, report); });
  }
  return 0;
}

RegisterCommand reg("eval", "perplexity of a model (llama2.c .bin, HF directory, quantized directory, .gguf)",
                    [](CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  app.add_option("--model", a->model, "model path")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer.json or llama2.c tokenizer.bin (default: beside the model)");
  app.add_option("--ppl", a->ppl, "text file whose perplexity to measure");
  app.add_option("--tasks", a->tasks, "zero-shot tasks: comma list of names in --tasks-dir, or 'all'");
  app.add_option("--tasks-dir", a->tasks_dir, "directory of NAME.jsonl task files")->capture_default_str();
  app.add_option("--limit", a->limit, "evaluate only the first N examples of each task")
      ->check(int_in(0, INT32_MAX));
  app.add_option("--seqlen", a->seqlen, "window length in tokens (default: min(2048, max_position_embeddings))")
      ->check(int_in(2, 1 << 24));
  app.add_option("--max-windows", a->max_windows, "evaluate only the first K windows (0 = all)")
      ->check(int_in(0, INT32_MAX));
  app.add_option("--protocol", a->protocol,
                 "gptq: every token of each window scored; llama.cpp: llama-perplexity's (BOS first in each "
                 "window, second half scored; a GGUF's activations rounded as llama.cpp's CPU kernels round them for "
                 "its weight types), to compare with llama.cpp on the same GGUF")
      ->capture_default_str()
      ->check(CLI::IsMember({"gptq", "llama.cpp"}));
  app.add_option("--kl-base", a->kl_base,
                 "also measure KL(base || model) of the next-token distributions per token on the --ppl windows, "
                 "against this model (e.g. the unquantized original; same vocabulary)");
  app.add_option("--json", a->json, "write a JSON report here");
  app.add_flag("--force", a->force, "replace a report that exists (only one dartquant wrote)");
  app.add_flag("--fake-quant", a->fake_quant,
               "run a quantized model on the f32 fake-quant reference path instead of the integer kernels");
  app.add_option("--fp-sites", a->fp_sites,
                 "leave the activations at these linear inputs unquantized (attn_in, o_proj_in, mlp_in, down_in; "
                 "comma list), on the fake-quant path: what each site's quantization costs")
      ->delimiter(',');
  return [a] { return run_eval(*a); };
});

}  // namespace
}  // namespace dq::cli
