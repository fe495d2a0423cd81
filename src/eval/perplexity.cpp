#include "eval/perplexity.h"

#include <chrono>
#include <cmath>

#include "io/file.h"
#include "quant/quantize_model.h"

namespace dq {

std::vector<int32_t> tokenize_file(const Model& m, const std::string& path) {
  if (!m.tokenizer) throw Error(m.source + ": no tokenizer found; pass --tokenizer");
  return m.tokenizer->encode(read_file(path), true);
}

std::vector<int32_t> calibration_windows(const Model& m, const std::string& path, int n, int len, uint64_t seed) {
  const std::vector<int32_t> ids = tokenize_file(m, path);
  if (ids.size() <= size_t(len))
    throw Error(path + ": " + std::to_string(ids.size()) + " tokens, too short for a calibration window of " +
                std::to_string(len) + " (it needs " + std::to_string(len + 1) + "; pass a smaller --calib-seqlen)");
  return sample_windows(ids, n, len, seed);
}

namespace {

// Remembers the first site (in forward order) whose activations hold a NaN or an Inf.
struct FiniteCheck : Hook {
  bool found = false;
  Site site = Site::AttnIn;
  int layer = 0;
  void at(Site s, int l, Matrix& x) override {
    if (found) return;
    for (float v : x.data)
      if (!std::isfinite(v)) {
        found = true;
        site = s;
        layer = l;
        return;
      }
  }
};

}  // namespace

void fail_non_finite(const Model& m, const std::string& what, const Hooks& hooks,
                     const std::function<void(const Hooks&)>& rerun) {
  FiniteCheck check;
  Hooks with_check = hooks;
  with_check.push_back(&check);  // last: it sees what the other hooks made of each activation
  rerun(with_check);
  std::string where = "every activation is finite, the classifier's output is not";
  if (check.found)
    where = "activations stop being finite at " +
            (check.layer < 0 ? std::string("the final norm") : "layer " + std::to_string(check.layer)) + ", " +
            site_name(check.site);
  throw Error(m.source + ": " + what + " is not finite: " + where);
}

// Whole windows of seqlen tokens in the text, at most max_windows (0: all); none is an error.
static int window_count(const std::vector<int32_t>& ids, int seqlen, int max_windows) {
  if (seqlen < 2) throw Error("seqlen must be at least 2");
  int windows = int(ids.size() / size_t(seqlen));
  if (max_windows > 0) windows = std::min(windows, max_windows);
  if (windows == 0)
    throw Error("text has " + std::to_string(ids.size()) + " tokens, fewer than one window of " +
                std::to_string(seqlen));
  return windows;
}

// Several windows per forward pass, bounded so activations stay small at any model size.
static int windows_per_pass(int windows, int seqlen) { return std::max(1, std::min(windows, 8192 / seqlen)); }

PplResult perplexity(const Model& m, const std::vector<int32_t>& ids, int seqlen, int max_windows,
                     const Hooks& hooks, const Progress& progress, const PplProtocol& protocol) {
  const int windows = window_count(ids, seqlen, max_windows), per_batch = windows_per_pass(windows, seqlen);
  auto start = std::chrono::steady_clock::now();
  double sum = 0;
  int64_t count = 0;
  for (int w0 = 0; w0 < windows; w0 += per_batch) {
    int b = std::min(per_batch, windows - w0);
    std::vector<int32_t> tokens(ids.begin() + int64_t(w0) * seqlen, ids.begin() + int64_t(w0 + b) * seqlen);
    if (protocol.llama_cpp && protocol.bos >= 0)
      for (int w = 0; w < b; ++w) tokens[size_t(w) * size_t(seqlen)] = protocol.bos;
    std::vector<double> nll = next_token_nll(m, tokens, b, seqlen, hooks);
    for (size_t i = 0; i < nll.size(); ++i) {
      // nll[i] predicts token i % (seqlen - 1) + 1 of its window
      if (protocol.llama_cpp && int(i % size_t(seqlen - 1)) < seqlen / 2) continue;
      if (!std::isfinite(nll[i]))
        fail_non_finite(m, "the NLL of window " + std::to_string(w0 + 1), hooks,
                        [&](const Hooks& h) { next_token_nll(m, tokens, b, seqlen, h); });
      sum += nll[i];
      ++count;
    }
    if (progress) progress(w0 + b, windows);
  }
  PplResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.windows = windows;
  r.seqlen = seqlen;
  r.tokens = count;
  r.mean_nll = sum / double(count);
  r.ppl = std::exp(r.mean_nll);
  r.tokens_per_second = double(windows) * seqlen / r.seconds;
  return r;
}

KlResult kl_divergence(const Model& base, const Hooks& base_hooks, const Model& m, const Hooks& hooks,
                       const std::vector<int32_t>& ids, int seqlen, int max_windows, const Progress& progress) {
  if (base.config.vocab_size != m.config.vocab_size)
    throw Error(base.source + ": vocabulary of " + std::to_string(base.config.vocab_size) + " tokens, " + m.source +
                " has " + std::to_string(m.config.vocab_size) + ": their distributions cannot be compared");
  const int windows = window_count(ids, seqlen, max_windows), per_batch = windows_per_pass(windows, seqlen);
  constexpr int64_t kRowChunk = 256;  // bounds the two logits buffers (vocab can be 128k wide)
  KlResult r;
  double sum = 0;
  int64_t same = 0;
  for (int w0 = 0; w0 < windows; w0 += per_batch) {
    const int b = std::min(per_batch, windows - w0);
    const std::vector<int32_t> tokens(ids.begin() + int64_t(w0) * seqlen, ids.begin() + int64_t(w0 + b) * seqlen);
    // Only the final-norm outputs of the batch are kept; log-probabilities are made a chunk at a time.
    const Matrix xb = forward(base, tokens, b, seqlen, base_hooks), xm = forward(m, tokens, b, seqlen, hooks);
    for (int w = 0; w < b; ++w)
      for (int64_t t0 = 0; t0 < seqlen - 1; t0 += kRowChunk) {
        const int64_t n = std::min<int64_t>(kRowChunk, seqlen - 1 - t0), row0 = int64_t(w) * seqlen + t0;
        const Matrix pb = log_probs(base, xb, row0, n), pm = log_probs(m, xm, row0, n);
        for (int64_t i = 0; i < n; ++i) {
          const float *lb = pb.row(i), *lm = pm.row(i);
          double kl = 0;
          for (int64_t v = 0; v < pb.cols; ++v) kl += std::exp(double(lb[v])) * (double(lb[v]) - double(lm[v]));
          if (!std::isfinite(kl))
            fail_non_finite(m, "the KL divergence in window " + std::to_string(w0 + w + 1), hooks,
                            [&](const Hooks& h) { forward(m, tokens, b, seqlen, h); });
          sum += kl;
          r.max_kl = std::max(r.max_kl, kl);
          same += std::max_element(lb, lb + pb.cols) - lb == std::max_element(lm, lm + pm.cols) - lm;
          ++r.tokens;
        }
      }
    if (progress) progress(w0 + b, windows);
  }
  r.windows = windows;
  r.seqlen = seqlen;
  r.mean_kl = sum / double(r.tokens);
  r.same_top = double(same) / double(r.tokens);
  return r;
}

}  // namespace dq
