#include "eval/perplexity.h"

#include <chrono>
#include <cmath>

#include "io/file.h"

namespace dq {

std::vector<int32_t> tokenize_file(const Model& m, const std::string& path) {
  if (!m.tokenizer) throw Error(m.source + ": no tokenizer found; pass --tokenizer");
  return m.tokenizer->encode(read_file(path), true);
}

PplResult perplexity(const Model& m, const std::vector<int32_t>& ids, int seqlen, int max_windows,
                     const Hooks& hooks, const Progress& progress, const PplProtocol& protocol) {
  if (seqlen < 2) throw Error("seqlen must be at least 2");
  int windows = int(ids.size() / size_t(seqlen));
  if (max_windows > 0) windows = std::min(windows, max_windows);
  if (windows == 0)
    throw Error("text has " + std::to_string(ids.size()) + " tokens, fewer than one window of " +
                std::to_string(seqlen));
  // Several windows per forward pass, bounded so activations stay small at any model size.
  const int per_batch = std::max(1, std::min(windows, 8192 / seqlen));
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

}  // namespace dq
