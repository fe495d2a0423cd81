// eval --kl-base: KL(P_base || P_model) of next-token distributions on the perplexity windows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "eval/perplexity.h"
#include "eval/runtime.h"
#include "model/model.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;

TEST(KlDivergence, ZeroAgainstItselfAndEqualToADirectSumOverWholeWindows) {
  ScratchDir dir;
  ASSERT_EQ(run_cli("quantize --model " + kStories + " --out " + (dir / "q") + " --rotation quarot --a-bits 4", dir)
                .exit_code,
            0);
  const Model base = load_model(kStories), q = load_model(dir / "q");
  RuntimeHooks runtime(q);  // fake quantization of the activations
  // Windows of 300 tokens: 299 positions each, a whole 256-row chunk and a partial one.
  constexpr int kSeq = 300, kWindows = 2;
  std::vector<int32_t> ids = tokenize_file(base, kValid);
  ids.resize(size_t(kSeq * kWindows + 17));  // a partial third window is not scored

  const KlResult self = kl_divergence(base, {}, base, {}, ids, kSeq, 0);
  EXPECT_EQ(self.tokens, kWindows * (kSeq - 1));
  EXPECT_EQ(self.mean_kl, 0.0);
  EXPECT_EQ(self.same_top, 1.0);

  const KlResult kl = kl_divergence(base, {}, q, runtime.hooks(), ids, kSeq, 0);
  double sum = 0, max = 0;
  int64_t same = 0, n = 0;
  for (int w = 0; w < kWindows; ++w) {
    const std::vector<int32_t> window(ids.begin() + w * kSeq, ids.begin() + (w + 1) * kSeq);
    const Matrix pb = log_probs(base, forward(base, window, 1, kSeq), 0, kSeq - 1);
    const Matrix pq = log_probs(q, forward(q, window, 1, kSeq, runtime.hooks()), 0, kSeq - 1);
    for (int64_t t = 0; t < kSeq - 1; ++t) {
      double d = 0;
      int64_t top_b = 0, top_q = 0;
      for (int64_t v = 0; v < pb.cols; ++v) {
        const double p = std::exp(double(pb(t, v)));
        d += p * (double(pb(t, v)) - double(pq(t, v)));
        if (pb(t, v) > pb(t, top_b)) top_b = v;
        if (pq(t, v) > pq(t, top_q)) top_q = v;
      }
      ASSERT_GE(d, -1e-9) << "KL is never negative";
      sum += d;
      max = std::max(max, d);
      same += top_b == top_q;
      ++n;
    }
  }
  EXPECT_EQ(kl.tokens, n);
  EXPECT_EQ(kl.windows, kWindows);
  EXPECT_GT(kl.mean_kl, 1e-3);  // 4-bit activations move the distribution
  EXPECT_NEAR(kl.mean_kl, sum / double(n), 1e-6 * sum / double(n));
  EXPECT_NEAR(kl.max_kl, max, 1e-6 * max);
  EXPECT_EQ(kl.same_top, double(same) / double(n));
}

TEST(KlDivergence, CliPrintsAndReportsItAndRefusesWhatCannotBeCompared) {
  ScratchDir dir;
  const std::string args = "eval --model " + kStories + " --ppl " + kValid + " --seqlen 64 --max-windows 2 ";
  const CliResult r = run_cli(args + "--kl-base " + kStories + " --json " + (dir / "r.json"), dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("kl 0.000000 nats/token against " + kStories), std::string::npos) << r.out;
  const nlohmann::json j = nlohmann::json::parse(slurp(dir / "r.json"));
  EXPECT_EQ(j["kl"]["mean"], 0.0);
  EXPECT_EQ(j["kl"]["same_top"], 1.0);
  EXPECT_EQ(j["kl"]["tokens"], 2 * 63);

  const std::string other = cut_config(dir, "smollm2-135m-instruct",
                                       {{"hidden_size", 16}, {"intermediate_size", 32}, {"num_attention_heads", 2},
                                        {"num_key_value_heads", 1}, {"num_hidden_layers", 1}, {"vocab_size", 50000}},
                                       "v600");
  ASSERT_EQ(run_cli("synth --config " + other + " --out " + (dir / "v600-model"), dir).exit_code, 0);
  const auto before = tree_snapshot(dir.path());
  expect_one_line_error(run_cli(args + "--kl-base " + (dir / "v600-model") + " --json " + (dir / "x.json"), dir), dir / "v600-model",
                        "vocabulary of 50000 tokens");
  expect_one_line_error(run_cli("eval --model " + kStories + " --tasks hellaswag --kl-base " + kStories, dir), kStories,
                        "--kl-base compares on the --ppl windows");
  EXPECT_EQ(tree_snapshot(dir.path()), before);
}
