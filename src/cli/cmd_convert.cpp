// dartquant convert: a llama2.c checkpoint (or any loadable model) to an HF directory.
#include <cstdio>

#include "cli/command.h"
#include "io/output.h"
#include "model/save.h"

namespace dq::cli {
namespace {

struct ConvertArgs {
  std::string model, tokenizer, out, dtype = "f32";
  bool force = false;
};

int run_convert(const ConvertArgs& a) {
  OutputPlan plan({a.model, a.tokenizer}, a.force);
  plan.add(a.out, OutputKind::Dir);
  Model m = load_model(a.model, a.tokenizer);
  rope_to_halves(m);  // HF rotates halves: q/k rows are reordered so the function is unchanged
  // A tied classifier stays tied: HF's LlamaForCausalLM reads tie_word_embeddings.
  SaveOptions opts;
  opts.dtype = a.dtype == "bf16" ? DType::BF16 : a.dtype == "f16" ? DType::F16 : DType::F32;
  plan.write(a.out, [&](const std::string& path) { save_model(m, path, opts); });
  std::printf("wrote %s\n", a.out.c_str());
  return 0;
}

RegisterCommand reg("convert", "write a model (e.g. a llama2.c checkpoint) as an HF directory",
                    [](CLI::App& app) {
  auto a = std::make_shared<ConvertArgs>();
  app.add_option("--model", a->model, "source model (llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--out", a->out, "output directory")->required();
  app.add_option("--dtype", a->dtype, "f32, f16 or bf16")->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_flag("--force", a->force, "replace an output that exists (only one dartquant wrote)");
  return [a] { return run_convert(*a); };
});

}  // namespace
}  // namespace dq::cli
