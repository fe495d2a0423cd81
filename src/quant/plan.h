// A dry run of `quantize` from a config alone: the peak memory each stage needs when weights are
// streamed layer by layer from their bf16 files, so a model's fit on a machine can be checked
// before any weights are fetched.
#pragma once
#include <nlohmann/json.hpp>

#include "model/config.h"

namespace dq {

struct PlanOptions {
  int nsamples = 128, seqlen = 2048;  // calibration windows (GPTQ, DartQuant capture)
  float token_ratio = 0.1f;           // DartQuant: fraction of token vectors captured
  int batch = 64;                     // DartQuant: sequences per step
  int64_t calib_memory_mib = 4096;    // captured activations kept in RAM; the rest spills to disk
  int experts_per_pass = 0;           // GPTQ Hessians per layer pass; 0 = the most that fit
  double budget_gib = 24;
};

struct MemoryPlan {
  nlohmann::json report;     // per stage: bytes by component and the peak
  double peak_gib = 0;
  bool fits = false;
  int experts_per_pass = 0;  // chosen (or given)
};

MemoryPlan plan_memory(const ModelConfig& c, const PlanOptions& o);

}  // namespace dq
