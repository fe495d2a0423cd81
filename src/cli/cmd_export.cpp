// dartquant export: a model as a plain HF checkpoint or a llama.cpp GGUF file.
#include <cstdio>
#include <filesystem>

#include "cli/command.h"
#include "io/output.h"
#include "model/export.h"

namespace dq::cli {
namespace {

struct ExportArgs {
  std::string model, tokenizer, format, out, gguf_type = "f32", dtype = "f32";
  bool force = false;
};

int run_export(const ExportArgs& a) {
  OutputPlan plan({a.model, a.tokenizer}, a.force);
  plan.add(a.out, a.format == "hf" ? OutputKind::Dir : OutputKind::Gguf);
  Model m = load_model(a.model, a.tokenizer);
  if (a.format == "hf") {
    const DType dtype = a.dtype == "bf16" ? DType::BF16 : a.dtype == "f16" ? DType::F16 : DType::F32;
    plan.write(a.out, [&](const std::string& path) { export_hf(m, path, dtype); });
    if (m.tokenizer && m.tokenizer_path.empty())
      std::fprintf(stderr, "note: the tokenizer came from GGUF metadata and was not written; copy it beside %s\n",
                   a.out.c_str());
    std::printf("wrote %s\n", a.out.c_str());
    return 0;
  }
  GgufExportOptions o;
  o.type = a.gguf_type == "f16" ? GgmlType::F16 : a.gguf_type == "bf16" ? GgmlType::BF16
         : a.gguf_type == "q8_0" ? GgmlType::Q8_0 : a.gguf_type == "q4_0" ? GgmlType::Q4_0 : GgmlType::F32;
  // A quantized model directory keeps its integer codes beside the dequantized weights.
  std::filesystem::path codes = std::filesystem::path(a.model) / "quantized.safetensors";
  if (std::filesystem::is_directory(a.model) && std::filesystem::exists(codes)) o.codes_path = codes.string();
  GgufExportStats s;
  plan.write(a.out, [&](const std::string& path) { s = export_gguf(m, path, o); });
  for (const std::string& n : s.notes) std::fprintf(stderr, "note: %s\n", n.c_str());
  std::printf("wrote %s (%s: %d tensors from the model's codes, %d re-rounded, %d kept f32)\n", a.out.c_str(),
              a.gguf_type.c_str(), s.from_codes, s.requantized, s.kept_float);
  return 0;
}

RegisterCommand reg("export", "write a model as a plain HF checkpoint or a llama.cpp GGUF file", [](CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  app.add_option("--model", a->model, "source model (HF or quantized directory, llama2.c .bin, .gguf)")->required();
  app.add_option("--tokenizer", a->tokenizer, "tokenizer file (default: beside the model)");
  app.add_option("--format", a->format, "hf or gguf")->required()->check(CLI::IsMember({"hf", "gguf"}));
  app.add_option("--out", a->out, "output directory (hf) or file (gguf)")->required();
  app.add_option("--gguf-type", a->gguf_type,
                 "type of the 2-D weights: f32, f16, bf16, q8_0 or q4_0 (norms stay f32; with q8_0/q4_0, "
                 "rows not a multiple of 32 and an unquantized embedding/classifier stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0", "q4_0"}));
  app.add_option("--dtype", a->dtype, "hf: dtype of model.safetensors, f32, f16 or bf16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_flag("--force", a->force, "replace an output that exists (only one dartquant wrote)");
  return [a] { return run_export(*a); };
});

}  // namespace
}  // namespace dq::cli
