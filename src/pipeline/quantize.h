// The quantize job, one decoder layer at a time: rotations (none, QuaRot, DartQuant-calibrated, or
// from a file), then for each layer norm fusion, R1/R2/R4 folding and weight quantization (RTN or
// GPTQ on the outputs of the quantized layers before it), its tensors streamed straight into the
// output files. Memory holds the calibration activations (bf16) and one layer's f32 weights, never
// the whole model.
//
// The job runs in OUT.partial/ (claimed by the caller's OutputPlan, io/output.h) and checkpoints
// after the rotations and after every layer (the files' lengths, the activations entering the next
// layer, the report so far); `resume` continues a killed run from its last checkpoint to output
// identical to an uninterrupted run's. The job leaves the finished directory in
// staging_path(OUT); the caller's OutputPlan::commit makes it OUT.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "calib/calibrate.h"
#include "quant/quantize_model.h"

namespace dq {

struct QuantizeJob {
  std::string out;
  std::string rotation = "none";  // none, quarot or dartquant
  std::string rotations_file;     // use these instead of making them
  bool r3 = false, r4 = false;    // online Hadamards (R3 on Q/K, R4 on the down_proj input)
  WeightQuantOptions weights;
  // The classifier as written: 16 bits, as QuaRot and DartQuant keep lm_head (the runtime then
  // multiplies it in place at half the memory of f32), or F32 to keep every bit of the rotation.
  DType head_dtype = DType::F16;
  std::vector<int32_t> calib;     // windows x len calibration tokens (GPTQ, DartQuant)
  int windows = 0, len = 0;
  CalibOptions calib_options;     // DartQuant; its seed also seeds QuaRot
  nlohmann::json section;         // the dartquant_quantization section written into config.json
  // Everything that determines the output (options, input paths, threads): a checkpoint made under
  // a different fingerprint is refused.
  nlohmann::json fingerprint;
  bool resume = false;
};

using JobProgress = std::function<void(const std::string& stage, int done, int total)>;

// Writes staging_path(job.out) from m (loaded, RoPE in HF order); m's layers are consumed. Returns the report:
// calibration, per-layer GPTQ figures, stage times and peak RSS.
nlohmann::json run_quantize_job(Model& m, const QuantizeJob& job, const JobProgress& progress = nullptr);

}  // namespace dq
