// stories260K against an independent float64 llama2.c forward pass, and the HF conversion.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "io/file.h"
#include "model/model.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;

namespace {

// A float64 llama2.c model read straight from the checkpoint (no project code): the reference.
struct RefModel {
  int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  std::vector<double> emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls;
};

RefModel read_reference(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  EXPECT_NE(f, nullptr);
  int32_t h[7];
  EXPECT_EQ(std::fread(h, 4, 7, f), 7u);
  RefModel m{h[0], h[1], h[2], h[3], h[4], std::abs(h[5]), h[6], {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const size_t D = size_t(m.dim), F = size_t(m.hidden), L = size_t(m.layers), hd = D / size_t(m.heads),
               KV = hd * size_t(m.kv_heads), V = size_t(m.vocab);
  auto take = [&](std::vector<double>& dst, size_t n) {
    std::vector<float> tmp(n);
    EXPECT_EQ(std::fread(tmp.data(), 4, n, f), n);
    dst.assign(tmp.begin(), tmp.end());
  };
  take(m.emb, V * D);
  take(m.rms_att, L * D);
  take(m.wq, L * D * D);
  take(m.wk, L * KV * D);
  take(m.wv, L * KV * D);
  take(m.wo, L * D * D);
  take(m.rms_ffn, L * D);
  take(m.w1, L * F * D);
  take(m.w2, L * D * F);
  take(m.w3, L * F * D);
  take(m.rms_final, D);
  std::vector<double> freq_cis;
  take(freq_cis, size_t(m.seq_len) * hd);  // unused: RoPE is recomputed below
  if (h[5] > 0) m.wcls = m.emb;
  else take(m.wcls, V * D);
  std::fclose(f);
  return m;
}

// out[r] = sum_c w[r * cols + c] * x[c]
void matvec(const double* w, const double* x, size_t rows, size_t cols, double* out) {
  for (size_t r = 0; r < rows; ++r) {
    double s = 0;
    for (size_t c = 0; c < cols; ++c) s += w[r * cols + c] * x[c];
    out[r] = s;
  }
}

void rmsnorm(const double* x, const double* g, size_t n, double* out) {
  double ss = 0;
  for (size_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double inv = 1.0 / std::sqrt(ss / double(n) + 1e-5);
  for (size_t i = 0; i < n; ++i) out[i] = x[i] * inv * g[i];
}

// Summed NLL of tokens 1..T-1 of one window, as llama2.c's run.c computes its forward pass.
double window_nll(const RefModel& m, const int32_t* tok, size_t T) {
  const size_t D = size_t(m.dim), F = size_t(m.hidden), hd = D / size_t(m.heads),
               KV = hd * size_t(m.kv_heads), V = size_t(m.vocab), group = size_t(m.heads / m.kv_heads);
  std::vector<double> x(T * D), xb(D), q(T * D), k(T * KV), v(T * KV), att(D), tmp(D), h1(F), h3(F),
      scores(T), logits(V);
  for (size_t t = 0; t < T; ++t)
    std::copy_n(&m.emb[size_t(tok[t]) * D], D, &x[t * D]);
  for (size_t l = 0; l < size_t(m.layers); ++l) {
    for (size_t t = 0; t < T; ++t) {
      rmsnorm(&x[t * D], &m.rms_att[l * D], D, xb.data());
      matvec(&m.wq[l * D * D], xb.data(), D, D, &q[t * D]);
      matvec(&m.wk[l * KV * D], xb.data(), KV, D, &k[t * KV]);
      matvec(&m.wv[l * KV * D], xb.data(), KV, D, &v[t * KV]);
      // llama2.c RoPE: pairs (i, i+1), frequency from the position inside the head.
      for (size_t i = 0; i < D; i += 2) {
        const double freq = 1.0 / std::pow(10000.0, double(i % hd) / double(hd)), a = double(t) * freq;
        const double c = std::cos(a), s = std::sin(a);
        for (int which = 0; which < (i < KV ? 2 : 1); ++which) {
          double* vec = which == 0 ? &q[t * D] : &k[t * KV];
          const double v0 = vec[i], v1 = vec[i + 1];
          vec[i] = v0 * c - v1 * s;
          vec[i + 1] = v0 * s + v1 * c;
        }
      }
    }
    for (size_t t = 0; t < T; ++t) {
      for (size_t hh = 0; hh < size_t(m.heads); ++hh) {
        const double* qh = &q[t * D + hh * hd];
        const size_t kvh = hh / group;
        double mx = -1e300;
        for (size_t u = 0; u <= t; ++u) {
          double s = 0;
          for (size_t i = 0; i < hd; ++i) s += qh[i] * k[u * KV + kvh * hd + i];
          scores[u] = s / std::sqrt(double(hd));
          mx = std::max(mx, scores[u]);
        }
        double sum = 0;
        for (size_t u = 0; u <= t; ++u) sum += (scores[u] = std::exp(scores[u] - mx));
        for (size_t i = 0; i < hd; ++i) {
          double acc = 0;
          for (size_t u = 0; u <= t; ++u) acc += scores[u] / sum * v[u * KV + kvh * hd + i];
          att[hh * hd + i] = acc;
        }
      }
      matvec(&m.wo[l * D * D], att.data(), D, D, tmp.data());
      for (size_t i = 0; i < D; ++i) x[t * D + i] += tmp[i];
    }
    for (size_t t = 0; t < T; ++t) {
      rmsnorm(&x[t * D], &m.rms_ffn[l * D], D, xb.data());
      matvec(&m.w1[l * F * D], xb.data(), F, D, h1.data());
      matvec(&m.w3[l * F * D], xb.data(), F, D, h3.data());
      for (size_t i = 0; i < F; ++i) h1[i] = h1[i] / (1.0 + std::exp(-h1[i])) * h3[i];
      matvec(&m.w2[l * D * F], h1.data(), D, F, tmp.data());
      for (size_t i = 0; i < D; ++i) x[t * D + i] += tmp[i];
    }
  }
  double nll = 0;
  for (size_t t = 0; t + 1 < T; ++t) {
    rmsnorm(&x[t * D], m.rms_final.data(), D, xb.data());
    matvec(m.wcls.data(), xb.data(), V, D, logits.data());
    double mx = -1e300;
    for (double z : logits) mx = std::max(mx, z);
    double sum = 0;
    for (double z : logits) sum += std::exp(z - mx);
    nll += mx + std::log(sum) - logits[size_t(tok[t + 1])];
  }
  return nll;
}

constexpr int kSeqlen = 256;
constexpr int kWindows = 8;  // the naive float64 pass is slow; the first 8 windows of valid.txt

}  // namespace

TEST(Reference, Stories260KPerplexityMatchesFloat64Reference) {
  ScratchDir dir;
  json got = cli_eval("--model " + kStories + " --ppl " + kValid + " --seqlen " + std::to_string(kSeqlen) +
                          " --max-windows " + std::to_string(kWindows),
                      dir);
  ASSERT_TRUE(got.contains("ppl"));
  EXPECT_EQ(got["windows"], kWindows);
  EXPECT_EQ(got["tokens"], int64_t(kWindows) * (kSeqlen - 1));

  // The reference scores the same token ids (the tokenizer is tested elsewhere): BOS, then the text.
  Model m = load_model(kStories);
  std::vector<int32_t> ids = m.tokenizer->encode(read_file(kValid), true);
  ASSERT_GE(ids.size(), size_t(kSeqlen) * kWindows);
  ASSERT_EQ(ids[0], m.tokenizer->bos_id());
  RefModel ref = read_reference(kStories);
  double nll = 0;
  for (int w = 0; w < kWindows; ++w) nll += window_nll(ref, &ids[size_t(w) * kSeqlen], kSeqlen);
  const double ref_ppl = std::exp(nll / double(kWindows * (kSeqlen - 1)));
  const double ppl = got["ppl"].get<double>();
  std::printf("stories260K valid.txt, first %d windows x %d: ppl %.6f, float64 reference %.6f\n", kWindows,
              kSeqlen, ppl, ref_ppl);
  EXPECT_NEAR(ppl / ref_ppl, 1.0, 1e-4);
}

TEST(Reference, ConvertedHfDirectoryGivesTheSamePerplexity) {
  ScratchDir dir;
  const std::string out = dir / "stories_hf";
  CliResult r = run_cli("convert --model " + kStories + " --out " + out, dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Model hf = load_model(out);
  EXPECT_FALSE(hf.config.rope_interleaved);  // the HF (rotate-halves) RoPE path is what runs
  EXPECT_FALSE(hf.config.extra.contains("dq_rope_interleaved"));
  EXPECT_TRUE(fs::exists(out + "/tokenizer.bin"));

  // The first 128 of valid.txt's 1043 windows keep the test quick; each model uses its own tokenizer copy.
  const std::string args = " --ppl " + kValid + " --seqlen " + std::to_string(kSeqlen) + " --max-windows 128";
  json a = cli_eval("--model " + kStories + args, dir), b = cli_eval("--model " + out + args, dir);
  ASSERT_TRUE(a.contains("ppl") && b.contains("ppl"));
  std::printf("stories260K valid.txt, first %d windows x %d: llama2.c ppl %.6f, converted HF ppl %.6f\n",
              a["windows"].get<int>(), kSeqlen, a["ppl"].get<double>(), b["ppl"].get<double>());
  EXPECT_EQ(a["windows"], b["windows"]);
  EXPECT_EQ(a["tokens"], b["tokens"]);
  EXPECT_NEAR(b["ppl"].get<double>() / a["ppl"].get<double>(), 1.0, 1e-5);
}

TEST(Reference, GreedyGenerationFromBosTellsTheLilyStory) {
  ScratchDir dir;
  CliResult r = run_cli("generate --model " + kStories + " -n 40", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << r.out;
}
