// DartQuant calibration: capture the rotation sites' activations in one layer-by-layer pass of the
// norm-fused, unrotated FP model, keep a seeded random fraction of token vectors (bf16), and learn R1 (pooled
// q_proj and up_proj inputs of every layer) and each layer's R2 (o_proj input, one rotation per
// KV head) with QR-Orth or Cayley SGD.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>

#include "calib/orth_optim.h"
#include "io/checkpoint.h"
#include "rotate/rotate.h"

namespace dq {

struct CalibOptions {
  float token_ratio = 0.1f;  // fraction of token vectors kept
  int epochs = 10;           // R1
  int batch = 64;            // R1 sequences per step: a step sees batch * seqlen * token_ratio vectors
  int r2_epochs = 40, r2_batch = 16;  // the same for each layer's R2 (docs/DARTQUANT.md, "Defaults")
  bool r2_rms_norm = true;   // scale each token's head slice to RMS 1 before R2's loss (orth_optim.h)
  // Fraction of each layer's R2 token vectors kept out of training; the report then compares the
  // learned R2 with the initial random Hadamard on them, head by head.
  float r2_holdout = 0.f;
  // Train on inputs minus their per-channel mean (R1: per layer and site; R2: per layer); the
  // rotations are then applied to the uncentred activations, as every fusion here requires
  // (docs/DARTQUANT.md, "Zero-mean question").
  bool center = false;
  // After training, compose each learned rotation with the reflection that turns the mean of its
  // inputs (R1: all sites pooled; R2: per KV head) into a multiple of the all-ones vector: a
  // per-token constant, which the asymmetric per-token quantizer's zero point takes up instead of
  // its range (docs/DARTQUANT.md, "Zero-mean question").
  bool align_mean = false;
  OrthOptions r1, r2;        // r1.lr 2e-3 (paper App. K), r2.lr 1e-2 (sweep, docs/DARTQUANT.md)
  uint64_t seed = 0;
  int64_t memory_mib = 4096;  // captured activations beyond this spill to a memory-mapped temp file
  CalibOptions() { r2.lr = 1e-2f; }
};

struct CalibResult {
  Rotations rotations;
  nlohmann::json report;  // kept tokens, loss curves (per step: loss, seconds), stage times
};

using CalibProgress = std::function<void(const std::string& stage, int done, int total)>;

// m must be unrotated (its norms fused or not: capture fuses each layer as it goes); calib holds
// windows x len tokens.
// With a checkpoint, progress is saved after the capture, R1 and each layer's R2 (files calib-* in
// its directory, state under "calibration_progress"), and a resumed checkpoint continues from
// there to the same rotations.
CalibResult calibrate(const Model& m, const std::vector<int32_t>& calib, int windows, int len,
                      const CalibOptions& o, const CalibProgress& progress = nullptr, Checkpoint* ck = nullptr);
// R·H for the Householder reflection H that maps the direction of mean·R onto ±1/√n (the sign
// nearer to it), so that mean·(R·H) has all entries equal; R itself when mean·R is 0 or already there.
Matrix align_mean_with_ones(const Matrix& R, const std::vector<double>& mean);

// Removes calibrate's checkpoint files and state once its result is saved elsewhere.
void drop_calibration_checkpoint(Checkpoint& ck, const ModelConfig& c);

}  // namespace dq
