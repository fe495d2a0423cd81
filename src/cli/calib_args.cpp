#include "cli/calib_args.h"

#include <filesystem>

#include "cli/validators.h"
#include "tensor/kernels.h"

namespace dq::cli {

void CalibArgs::add_options(CLI::App& app) {
  app.add_option("--nsamples", nsamples, "calibration windows")->capture_default_str()->check(int_in(1, 1 << 20));
  app.add_option("--calib-seqlen", calib_seqlen, "calibration window length")->capture_default_str()
      ->check(int_in(2, 1 << 20));
  app.add_option("--seed", seed, "seed for windows, rotations and sampling")->capture_default_str();
  app.add_option("--token-ratio", token_ratio, "DartQuant: fraction of token vectors kept")->capture_default_str()
      ->check(real_in(0, 1, true));
  app.add_option("--loss", loss, "DartQuant loss: whip, variance, kurtosis, quant")->capture_default_str()
      ->check(CLI::IsMember({"whip", "variance", "kurtosis", "quant"}));
  app.add_option("--orth", orth, "DartQuant optimizer: qr (QR-Orth, Cholesky QR), qr-householder (QR-Orth, LAPACK QR: same rotations, slower) or cayley")
      ->capture_default_str()->check(CLI::IsMember({"qr", "qr-householder", "cayley"}));
  app.add_option("--optimizer", optimizer, "sgd (momentum 0.9) or adam")->capture_default_str()->check(CLI::IsMember({"sgd", "adam"}));
  app.add_option("--lr-r1", lr_r1, "R1 learning rate")->capture_default_str()->check(real_in(0, 100, true));
  app.add_option("--lr-r2", lr_r2, "R2 learning rate")->capture_default_str()->check(real_in(0, 100, true));
  app.add_option("--epochs", epochs, "R1 calibration epochs")->capture_default_str()->check(int_in(1, 1 << 20));
  app.add_option("--batch", batch, "R1 calibration sequences per step")->capture_default_str()
      ->check(int_in(1, 1 << 20));
  app.add_option("--r2-epochs", r2_epochs, "R2 calibration epochs")->capture_default_str()->check(int_in(1, 1 << 20));
  app.add_option("--r2-batch", r2_batch, "R2 calibration sequences per step")->capture_default_str()
      ->check(int_in(1, 1 << 20));
  app.add_option("--r2-rms-norm", r2_rms_norm, "scale each token's head slice to RMS 1 before R2's loss")
      ->capture_default_str();
  app.add_option("--r2-holdout", r2_holdout,
                 "fraction of R2 token vectors held out; the report compares learned R2 with the random Hadamard on them")
      ->capture_default_str()->check(real_in(0, 1));
  app.add_option("--calib-memory", calib_memory,
                 "MiB of captured activations kept in RAM; the rest spills to a memory-mapped temp file")
      ->capture_default_str()->check(int_in(0, int64_t(1) << 40));
  app.add_flag("--cosine", cosine, "cosine learning-rate schedule");
  app.add_option("--center", center,
                 "calibrate on activations minus their per-channel mean (the rotations still apply to uncentred ones)")
      ->capture_default_str();
  app.add_option("--align-mean", align_mean,
                 "after training, reflect each rotation so that its inputs' mean becomes a per-token constant")
      ->capture_default_str();
}

CalibOptions CalibArgs::options() const {
  CalibOptions co;
  co.token_ratio = token_ratio;
  co.epochs = epochs;
  co.batch = batch;
  co.r2_epochs = r2_epochs;
  co.r2_batch = r2_batch;
  co.r2_rms_norm = r2_rms_norm;
  co.r2_holdout = r2_holdout;
  co.center = center;
  co.align_mean = align_mean;
  co.seed = seed;
  co.memory_mib = calib_memory;
  co.r1.loss = co.r2.loss = loss_from_name(loss);
  co.r1.method = co.r2.method = orth_from_name(orth);
  co.r1.optimizer = co.r2.optimizer = optimizer_from_name(optimizer);
  co.r1.lr = lr_r1;
  co.r2.lr = lr_r2;
  co.r1.cosine = co.r2.cosine = cosine;
  return co;
}

nlohmann::json CalibArgs::to_json(int effective_seqlen) const {
  return {{"loss", loss},       {"orth", orth},         {"optimizer", optimizer},
          {"lr_r1", lr_r1},     {"lr_r2", lr_r2},       {"epochs", epochs},
          {"batch", batch},     {"r2_epochs", r2_epochs}, {"r2_batch", r2_batch}, {"r2_rms_norm", r2_rms_norm},
          {"center", center},       {"align_mean", align_mean},
          {"r2_holdout", r2_holdout}, {"token_ratio", token_ratio}, {"nsamples", nsamples},
          {"calib_seqlen", effective_seqlen}, {"seed", seed}, {"calib_memory_mib", calib_memory}};
}

}  // namespace dq::cli

namespace dq::cli {

nlohmann::json CalibArgs::fingerprint(const std::string& model, const std::string& tokenizer,
                                      const std::vector<int32_t>& tokens, int effective_seqlen) const {
  uint64_t digest = 1469598103934665603ull;  // FNV-1a
  for (int32_t t : tokens) digest = (digest ^ uint64_t(uint32_t(t))) * 1099511628211ull;
  auto absolute = [](const std::string& p) { return p.empty() ? p : std::filesystem::absolute(p).string(); };
  return {{"calibration", to_json(effective_seqlen)}, {"model", absolute(model)}, {"tokenizer", absolute(tokenizer)},
          {"calib_tokens", std::to_string(digest)}, {"threads", num_threads()}};
}

}  // namespace dq::cli
