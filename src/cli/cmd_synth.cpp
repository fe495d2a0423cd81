// dartquant synth: an HF directory with seeded random weights of a real config's shapes.
#include <cstdio>
#include <filesystem>

#include "cli/command.h"
#include "cli/validators.h"
#include "io/output.h"
#include "model/synth.h"

namespace dq::cli {
namespace {

struct SynthArgs {
  std::string config, out, dtype = "bf16";
  SynthOptions opts;
  bool force = false;
};

int run_synth(SynthArgs a) {
  a.opts.dtype = a.dtype == "f32" ? DType::F32 : a.dtype == "f16" ? DType::F16 : DType::BF16;
  // Inputs: the config and the tokenizer.json beside it that is copied.
  OutputPlan plan({a.config, (std::filesystem::path(a.config).parent_path() / "tokenizer.json").string()}, a.force);
  plan.add(a.out, OutputKind::Dir);
  plan.write(a.out, [&](const std::string& path) { synth_model(a.config, path, a.opts); });
  std::printf("wrote %s\n", a.out.c_str());
  return 0;
}

RegisterCommand reg("synth", "write an HF directory with seeded random weights of a config's shapes",
                    [](CLI::App& app) {
  auto a = std::make_shared<SynthArgs>();
  app.add_option("--config", a->config, "an HF config.json (a tokenizer.json beside it is copied)")->required();
  app.add_option("--out", a->out, "output directory")->required();
  app.add_option("--seed", a->opts.seed, "random seed (same seed, same bytes)");
  app.add_option("--dtype", a->dtype, "bf16 (default), f16 or f32")->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_option("--outliers", a->opts.outliers, "residual channels with massive activations (default 0)")
      ->check(int_in(0, 1 << 24));
  app.add_option("--layers", a->opts.layers, "override num_hidden_layers (smaller models for quick tests)")
      ->check(int_in(1, 1 << 24));
  app.add_flag("--force", a->force, "replace an output that exists (only one dartquant wrote)");
  return [a] { return run_synth(*a); };
});

}  // namespace
}  // namespace dq::cli
