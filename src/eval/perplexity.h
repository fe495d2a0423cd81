// Perplexity by the GPTQ/QuaRot protocol: tokenize the whole text once, cut it into
// floor(tokens / seqlen) non-overlapping windows, each window predicts its own tokens 2..seqlen.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "model/forward.h"

namespace dq {

struct PplResult {
  double ppl = 0, mean_nll = 0;
  int64_t tokens = 0;  // predictions scored
  int windows = 0, seqlen = 0;
  double seconds = 0, tokens_per_second = 0;  // forward-pass tokens (windows * seqlen) per second
};

// The text of a file as token ids (with BOS first when the tokenizer adds one).
std::vector<int32_t> tokenize_file(const Model& m, const std::string& path);
// n calibration windows of len tokens drawn from the text of a file (sample_windows). A text too
// short for one window is an error naming the file: windows are never shortened to fit.
std::vector<int32_t> calibration_windows(const Model& m, const std::string& path, int n, int len, uint64_t seed);

// A result that is not finite is an error, never a figure. Reruns the forward pass that produced it
// (rerun, given the hooks to run with) with a finiteness check after the given hooks, and throws
// Error("MODEL: WHAT is not finite: activations stop being finite at layer L, SITE").
[[noreturn]] void fail_non_finite(const Model& m, const std::string& what, const Hooks& hooks,
                                  const std::function<void(const Hooks&)>& rerun);

// llama_cpp_bos >= 0 follows llama.cpp's llama-perplexity instead (same windows): each window's
// first token is replaced by that BOS id, and only its second half is scored (tokens
// seqlen/2 + 1 .. seqlen - 1 of the window), so both tools report the same number for one model.
struct PplProtocol {
  bool llama_cpp = false;
  int32_t bos = -1;  // llama_cpp: the BOS put first in each window; -1: the tokenizer adds none
};

using Progress = std::function<void(int done, int total)>;
PplResult perplexity(const Model& m, const std::vector<int32_t>& ids, int seqlen, int max_windows,
                     const Hooks& hooks = {}, const Progress& progress = nullptr, const PplProtocol& protocol = {});

// How far a model's next-token distributions are from a base model's (the unquantized original) on
// the same windows as perplexity (GPTQ protocol: every position but each window's last), per token:
// KL(P_base || P_model) in nats, and how often both put the same token first.
struct KlResult {
  double mean_kl = 0, max_kl = 0;
  double same_top = 0;  // share of positions
  int64_t tokens = 0;   // positions compared
  int windows = 0, seqlen = 0;
};
KlResult kl_divergence(const Model& base, const Hooks& base_hooks, const Model& m, const Hooks& hooks,
                       const std::vector<int32_t>& ids, int seqlen, int max_windows,
                       const Progress& progress = nullptr);

}  // namespace dq
