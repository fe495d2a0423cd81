#include "quant/plan.h"

#include <algorithm>

namespace dq {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double gib(double bytes) { return bytes / kGiB; }

// A stage's components (bytes); its peak is their sum.
nlohmann::json stage(std::initializer_list<std::pair<const char*, double>> parts) {
  nlohmann::json j = nlohmann::json::object(), comp = nlohmann::json::object();
  double total = 0;
  for (auto& [name, bytes] : parts) {
    comp[name] = gib(bytes);
    total += bytes;
  }
  j["components_gib"] = comp;
  j["peak_gib"] = gib(total);
  return j;
}

}  // namespace

MemoryPlan plan_memory(const ModelConfig& c, const PlanOptions& o) {
  const double D = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), V = c.vocab_size, L = c.num_layers;
  const double N = double(o.nsamples) * o.seqlen;  // calibration tokens
  // The largest layer: load_layer holds it as f32 while its bf16 pages are mapped.
  double layer_params = 0, max_inter = 0, max_expert_inter = 0, experts = 1, total_params = 2 * V * D;
  for (int l = 0; l < c.num_layers; ++l) {
    double p = D * (Q + 2 * KV) + Q * D;
    std::vector<ExpertSpec> ex = mlp_experts(c, l);
    if (c.is_moe_layer(l)) p += double(c.num_experts) * D;
    for (const ExpertSpec& e : ex) {
      p += 3 * D * e.intermediate;
      max_inter = std::max(max_inter, double(e.intermediate));
    }
    max_expert_inter = std::max(max_expert_inter, double(ex.front().intermediate));
    experts = std::max(experts, double(ex.size()));
    layer_params = std::max(layer_params, p);
    total_params += p;
  }
  const double layer_f32 = 4 * layer_params, layer_bf16 = 2 * layer_params;
  // One forward chunk (8192 tokens, as calibrate/run_layer use): residual, norm output, q/k/v,
  // attention output, the largest expert's gate/up and its output, the MoE sum.
  const double T = double(std::max(1, 8192 / o.seqlen)) * o.seqlen;
  const double acts = 4 * T * (4 * D + 2 * Q + 2 * KV + 2 * max_inter) + 4 * 256.0 * o.seqlen;

  MemoryPlan plan;
  nlohmann::json stages = nlohmann::json::object();
  // DartQuant capture: R1 pools attention and MLP inputs of every layer, R2 the o_proj inputs.
  const double captured = o.token_ratio * N * (2 * L * D + L * Q) * 2;
  const double captured_ram = std::min(captured, double(o.calib_memory_mib) * 1024 * 1024);
  stages["capture"] = stage({{"layer_weights_f32", layer_f32}, {"layer_weights_bf16_mapped", layer_bf16},
                             {"activations", acts}, {"captured_in_ram", captured_ram}});
  stages["capture"]["spilled_to_disk_gib"] = gib(captured - captured_ram);
  // R1 training: latent, rotation, gradient, momentum and QR temporaries (~8 D x D), a batch of rows
  // with its rotated copy and gradient.
  const double rows = o.batch * o.seqlen * o.token_ratio;
  stages["train_r1"] = stage({{"captured_in_ram", captured_ram}, {"r1_state", 8 * 4 * D * D},
                              {"batch", 3 * 4 * rows * D}});
  // Rotation, per layer: its f32 weights, a rotated copy, R1.
  stages["rotate"] = stage({{"layer_weights_f32", 2 * layer_f32}, {"layer_weights_bf16_mapped", layer_bf16},
                            {"r1", 4 * D * D}});
  // GPTQ, per layer: the calibration residual stream, the layer, the activations of one chunk, the
  // Hessians of one pass (f64 sum + f32 chunk scratch: 12 bytes an entry), and GPTQ's working set
  // for the largest matrix (H, its inverse/Cholesky, W and its updates).
  const double x = 4 * N * D, attn_h = 12 * (D * D + Q * Q), expert_h = 12 * (D * D + max_expert_inter * max_expert_inter);
  const double gptq_work = 3 * 4 * max_inter * max_inter + 3 * 4 * D * max_inter;
  auto gptq_stage = [&](int per_pass) {
    return stage({{"calibration_stream", x}, {"layer_weights_f32", layer_f32}, {"layer_weights_bf16_mapped", layer_bf16},
                  {"activations", acts}, {"hessians", attn_h + expert_h * per_pass}, {"gptq_working_set", gptq_work}});
  };
  int per_pass = o.experts_per_pass;
  if (per_pass <= 0) {
    per_pass = 1;
    for (int p = int(experts); p >= 1; --p)
      if (gptq_stage(p)["peak_gib"].get<double>() <= o.budget_gib) {
        per_pass = p;
        break;
      }
  }
  per_pass = std::min(per_pass, int(experts));
  stages["gptq"] = gptq_stage(per_pass);
  stages["gptq"]["experts_per_pass"] = per_pass;
  stages["gptq"]["passes_per_layer"] = int((experts + per_pass - 1) / per_pass);
  // Evaluation: the residual stream of the evaluation batch, vocabulary chunks of lm_head.
  stages["eval"] = stage({{"layer_weights_f32", layer_f32}, {"layer_weights_bf16_mapped", layer_bf16},
                          {"activations", acts}, {"lm_head_chunk", 4 * 8192 * D + 4 * 256 * 8192}});

  for (auto& [name, s] : stages.items()) plan.peak_gib = std::max(plan.peak_gib, s["peak_gib"].get<double>());
  plan.fits = plan.peak_gib <= o.budget_gib;
  plan.experts_per_pass = per_pass;
  plan.report = {{"architecture", c.architecture},
                 {"parameters_billion", total_params / 1e9},
                 {"bf16_checkpoint_gib", gib(2 * total_params)},
                 {"largest_layer_bf16_gib", gib(layer_bf16)},
                 {"calibration_tokens", N},
                 {"budget_gib", o.budget_gib},
                 {"stages", stages},
                 {"peak_gib", plan.peak_gib},
                 {"fits", plan.fits},
                 {"note", "stages stream one layer at a time; today's quantize still holds every rotated and "
                          "quantized weight as f32 until it saves (in_memory_weights_gib)"},
                 {"in_memory_weights_gib", gib(4 * total_params)}};
  return plan;
}

}  // namespace dq
