// The calibration-data and DartQuant options `calibrate` and `quantize` share.
#pragma once
#include <CLI/CLI.hpp>

#include "calib/calibrate.h"

namespace dq::cli {

struct CalibArgs {
  std::string calib, loss = "whip", orth = "qr", optimizer = "sgd";
  int nsamples = 128, calib_seqlen = 2048, epochs = 10, batch = 64, r2_epochs = 40, r2_batch = 16;
  float token_ratio = 0.1f, lr_r1 = 2e-3f, lr_r2 = 1e-2f, r2_holdout = 0.f;
  bool cosine = false, r2_rms_norm = true, center = false, align_mean = false;
  uint64_t seed = 0;
  int64_t calib_memory = 4096;

  void add_options(CLI::App& app);  // --calib is added by the command (required or not)
  CalibOptions options() const;
  nlohmann::json to_json(int effective_seqlen) const;
  // What a resumable job's checkpoint must share with the run that resumes it: these options, the
  // model and tokenizer paths, the calibration tokens themselves (a digest) and the thread count
  // (BLAS sums in another order on another count).
  nlohmann::json fingerprint(const std::string& model, const std::string& tokenizer,
                             const std::vector<int32_t>& tokens, int effective_seqlen) const;
};

}  // namespace dq::cli
