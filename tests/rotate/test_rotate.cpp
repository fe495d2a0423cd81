// Rotations leave the model's function unchanged: norm fusion, fused R1/R2 (any orthogonal
// matrices, here Haar-random ones built in the test, not Hadamards), online R3/R4 with R4ᵀ folded
// into down_proj. Checked on stories260K (real text) and on a synthetic Qwen2-shaped GQA model with
// q/k/v biases (random tokens); plus the v_proj/o_proj algebra of R2 against a naive reference.
//
// Tolerances: everything runs in fp32 (unit roundoff 6e-8). A rotated model computes the same sums
// in a different order and basis, so each layer adds relative noise of order sqrt(n)·eps ~ 1e-6 on
// O(1) activations; through a handful of layers and a log-softmax over at most 512 logits the
// log-probabilities move by ~1e-5. 1e-3 leaves two orders of margin, while every defect these tests
// are meant to catch (a missing transpose, the wrong head for a GQA group, a bias left unrotated, a
// Hadamard not folded) moves log-probabilities by 0.1 or more; negative controls below check that.
#include <gtest/gtest.h>

#include "test_helpers.h"
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "model/synth.h"
#include "rotate/rotate.h"

using namespace dq;
namespace fs = std::filesystem;

namespace {

using test::kStories;
using test::kValid;

using Scratch = test::ScratchDir;

// Haar-random orthogonal n×n: Q of the QR factorisation of a Gaussian matrix, by modified
// Gram-Schmidt in double (applied twice for full orthogonality), signs fixed so diag(U) > 0.
Matrix gaussian_orthogonal(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g;
  std::vector<std::vector<double>> cols(size_t(n), std::vector<double>(size_t(n), 0.0));
  for (auto& c : cols)
    for (double& v : c) v = g(rng);
  for (int64_t j = 0; j < n; ++j) {
    auto& v = cols[size_t(j)];
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t k = 0; k < j; ++k) {
        const auto& q = cols[size_t(k)];
        double d = 0;
        for (int64_t i = 0; i < n; ++i) d += q[size_t(i)] * v[size_t(i)];
        for (int64_t i = 0; i < n; ++i) v[size_t(i)] -= d * q[size_t(i)];
      }
    double norm = 0;
    for (double x : v) norm += x * x;
    norm = std::sqrt(norm);
    for (double& x : v) x /= norm;
  }
  Matrix Q(n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Q(i, j) = float(cols[size_t(j)][size_t(i)]);
  return Q;
}

double orthogonality_error(const Matrix& R) {
  double worst = 0;
  for (int64_t i = 0; i < R.rows; ++i)
    for (int64_t j = 0; j < R.rows; ++j) {
      double d = 0;
      for (int64_t k = 0; k < R.cols; ++k) d += double(R(k, i)) * R(k, j);
      worst = std::max(worst, std::abs(d - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

Rotations gaussian_rotations(const ModelConfig& c, uint64_t seed) {
  Rotations r;
  r.r1 = gaussian_orthogonal(c.hidden_size, seed);
  r.r2.resize(size_t(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l)
    for (int h = 0; h < c.num_kv_heads; ++h)
      r.r2[size_t(l)].push_back(gaussian_orthogonal(c.head_dim, seed + 100 + uint64_t(l * 16 + h)));
  return r;
}

// Log-probabilities of every position of batch x seq tokens.
Matrix all_log_probs(const Model& m, const std::vector<int32_t>& tokens, int batch, int seq,
                     const Hooks& hooks = {}) {
  Matrix x = forward(m, tokens, batch, seq, hooks);
  return log_probs(m, x, 0, x.rows);
}

double max_abs_diff(const Matrix& a, const Matrix& b) {
  EXPECT_EQ(a.rows, b.rows);
  EXPECT_EQ(a.cols, b.cols);
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, double(std::abs(a.data[i] - b.data[i])));
  return d;
}

// Two windows of 48 tokens of real text.
std::vector<int32_t> story_tokens(const Model& m, int batch, int seq) {
  std::ifstream f(kValid);
  std::stringstream ss;
  ss << f.rdbuf();
  std::vector<int32_t> ids = m.tokenizer->encode(ss.str().substr(0, 4000), true);
  EXPECT_GE(ids.size(), size_t(batch * seq));
  ids.resize(size_t(batch * seq));
  return ids;
}

Model stories() {
  Model m = load_model(kStories);
  rope_to_halves(m);
  return m;
}

constexpr double kTol = 1e-3;  // see the header comment
constexpr int kBatch = 2, kSeq = 48;

// The synthetic Qwen2-shaped model: hidden 64, 4 query heads sharing 2 KV heads (head_dim 16),
// intermediate 172 (a non-power-of-two Hadamard: K = 172 itself, no 2^m part), 2 layers, vocab 256,
// q/k/v biases, tied embeddings, and two massive-activation channels.
Model synth_qwen(const Scratch& s) {
  nlohmann::json j = {{"architectures", {"Qwen2ForCausalLM"}},
                      {"model_type", "qwen2"},
                      {"hidden_size", 64},
                      {"intermediate_size", 172},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"num_hidden_layers", 2},
                      {"vocab_size", 256},
                      {"max_position_embeddings", 512},
                      {"rms_norm_eps", 1e-6},
                      {"rope_theta", 1000000.0},
                      {"tie_word_embeddings", true},
                      {"hidden_act", "silu"},
                      {"initializer_range", 0.02}};
  const std::string cfg = (s.path() / "config.json").string();
  std::ofstream(cfg) << j.dump();
  SynthOptions o;
  o.seed = 7;
  o.dtype = DType::F32;
  o.outliers = 2;
  synth_model(cfg, (s.path() / "model").string(), o);
  Model m = load_model((s.path() / "model").string());
  // Random weights give nearly flat next-token distributions; a 5x final-norm gain (fused into
  // lm_head like any other gain) sharpens them so that a broken rotation shows clearly.
  Matrix gain = m.weights.get("model.norm.weight");
  for (float& v : gain.data) v *= 5.f;
  m.weights.set("model.norm.weight", std::move(gain));
  EXPECT_EQ(m.config.num_kv_heads, 2);
  EXPECT_EQ(m.config.head_dim, 16);
  EXPECT_TRUE(m.config.qkv_bias);
  EXPECT_TRUE(m.weights.has("model.layers.0.self_attn.v_proj.bias"));
  return m;
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(size_t(n), 0);
  for (auto& x : t) x = d(rng);
  return t;
}

// The whole invariance chain on one model: FP -> fused norms -> R1/R2 -> R4 folded + online R3/R4.
void check_invariance_chain(const Model& fp, const std::vector<int32_t>& tokens, uint64_t seed) {
  const Matrix ref = all_log_probs(fp, tokens, kBatch, kSeq);

  Model fused = fp;
  fuse_norms(fused);
  EXPECT_TRUE(fused.weights.has("lm_head.weight"));
  EXPECT_FALSE(fused.config.tie_embeddings);
  // The norms are now weightless and the gains live in the readers.
  Matrix g = fused.weights.get("model.layers.0.input_layernorm.weight");
  for (float v : g.data) ASSERT_EQ(v, 1.f);
  EXPECT_GT(max_abs_diff(fused.weights.get("model.layers.0.self_attn.q_proj.weight"),
                         fp.weights.get("model.layers.0.self_attn.q_proj.weight")),
            1e-4);
  EXPECT_LT(max_abs_diff(all_log_probs(fused, tokens, kBatch, kSeq), ref), kTol) << "fuse_norms";

  const Rotations rot = gaussian_rotations(fp.config, seed);
  ASSERT_LT(orthogonality_error(rot.r1), 1e-6);
  ASSERT_LT(orthogonality_error(rot.r2[0][1]), 1e-6);
  Model rotated = fused;
  apply_rotations(rotated, rot);
  EXPECT_LT(max_abs_diff(all_log_probs(rotated, tokens, kBatch, kSeq), ref), kTol) << "R1 + R2";

  // R1 alone, and R2 alone, each preserve the function too.
  Model r1_only = fused;
  apply_rotations(r1_only, Rotations{rot.r1, {}});
  EXPECT_LT(max_abs_diff(all_log_probs(r1_only, tokens, kBatch, kSeq), ref), kTol) << "R1 only";
  Model r2_only = fused;
  apply_rotations(r2_only, Rotations{Matrix::identity(fp.config.hidden_size), rot.r2});
  EXPECT_LT(max_abs_diff(all_log_probs(r2_only, tokens, kBatch, kSeq), ref), kTol) << "R2 only";

  // The rotated residual stream really is x·R1: the final-norm output (before lm_head) rotates.
  Matrix h_ref = forward(fused, tokens, kBatch, kSeq), h_rot = forward(rotated, tokens, kBatch, kSeq);
  Matrix expect(h_ref.rows, h_ref.cols);
  for (int64_t r = 0; r < h_ref.rows; ++r)
    for (int64_t j = 0; j < h_ref.cols; ++j) {
      double s = 0;
      for (int64_t k = 0; k < h_ref.cols; ++k) s += double(h_ref(r, k)) * rot.r1(k, j);
      expect(r, j) = float(s);
    }
  EXPECT_LT(max_abs_diff(h_rot, expect), 1e-3);
  EXPECT_GT(max_abs_diff(h_rot, h_ref), 0.1);  // and it is not the unrotated stream

  Model online = rotated;
  fold_r4(online);
  OnlineHadamard hook(online.config, true, true);
  EXPECT_LT(max_abs_diff(all_log_probs(online, tokens, kBatch, kSeq, {&hook}), ref), kTol) << "online R3/R4";

  // R3 alone needs no weight change (it cancels in QKᵀ).
  OnlineHadamard r3(rotated.config, true, false);
  EXPECT_LT(max_abs_diff(all_log_probs(rotated, tokens, kBatch, kSeq, {&r3}), ref), kTol) << "R3 only";

  // Negative controls: the test can see a broken rotation.
  OnlineHadamard r4(rotated.config, false, true);
  EXPECT_GT(max_abs_diff(all_log_probs(rotated, tokens, kBatch, kSeq, {&r4}), ref), 0.1)
      << "online R4 without fold_r4 must change the logits";
  EXPECT_GT(max_abs_diff(all_log_probs(online, tokens, kBatch, kSeq), ref), 0.1)
      << "fold_r4 without the online R4 must change the logits";
  Model r1_unfused = fp;
  if (!r1_unfused.weights.has("lm_head.weight"))
    r1_unfused.weights.set("lm_head.weight", fp.weights.get("model.embed_tokens.weight"));
  apply_rotations(r1_unfused, Rotations{rot.r1, {}});
  EXPECT_GT(max_abs_diff(all_log_probs(r1_unfused, tokens, kBatch, kSeq), ref), 0.1)
      << "R1 through unfused norm gains must change the logits";
}

}  // namespace

TEST(RotateStories, FusedNormsRandomOrthogonalR1R2AndOnlineR3R4PreserveLogits) {
  const Model fp = stories();
  ASSERT_EQ(fp.config.hidden_size, 64);
  check_invariance_chain(fp, story_tokens(fp, kBatch, kSeq), 11);
}

TEST(RotateStories, QuarotRandomHadamardRotationsPreserveLogits) {
  const Model fp = stories();
  const auto tokens = story_tokens(fp, kBatch, kSeq);
  const Matrix ref = all_log_probs(fp, tokens, kBatch, kSeq);
  Model m = fp;
  fuse_norms(m);
  Rotations r = random_hadamard_rotations(m.config, 3);
  EXPECT_LT(orthogonality_error(r.r1), 1e-5);
  ASSERT_EQ(r.r2.size(), size_t(m.config.num_layers));
  for (const auto& layer : r.r2) {
    ASSERT_EQ(layer.size(), size_t(m.config.num_kv_heads));
    for (const Matrix& R : layer) EXPECT_LT(orthogonality_error(R), 1e-5);
  }
  // A different seed per layer and KV head.
  EXPECT_GT(max_abs_diff(r.r2[0][0], r.r2[0][1]), 0.1);
  EXPECT_GT(max_abs_diff(r.r2[0][0], r.r2[1][0]), 0.1);
  // Seeded: the same seed gives the same matrices, another seed others.
  EXPECT_EQ(random_hadamard_rotations(m.config, 3).r1.data, r.r1.data);
  EXPECT_NE(random_hadamard_rotations(m.config, 4).r1.data, r.r1.data);
  apply_rotations(m, r);
  fold_r4(m);
  OnlineHadamard hook(m.config, true, true);
  EXPECT_TRUE(hook.genuine());
  EXPECT_LT(max_abs_diff(all_log_probs(m, tokens, kBatch, kSeq, {&hook}), ref), kTol);
}

TEST(RotateSynth, Qwen2GqaWithBiasesPreservesLogits) {
  Scratch s;
  const Model fp = synth_qwen(s);
  check_invariance_chain(fp, random_tokens(kBatch * kSeq, fp.config.vocab_size, 5), 23);
  // The R4 Hadamard of order 172 is a genuine one.
  EXPECT_TRUE(OnlineHadamard(fp.config, true, true).genuine());
}

// R1 and R2 are inputs: a wrong shape is refused.
TEST(RotateSynth, WrongRotationShapesThrow) {
  Scratch s;
  Model m = synth_qwen(s);
  fuse_norms(m);
  Rotations r = gaussian_rotations(m.config, 1);
  Model a = m;
  EXPECT_THROW(apply_rotations(a, Rotations{gaussian_orthogonal(32, 1), r.r2}), Error);
  Rotations bad = r;
  bad.r2[1].pop_back();
  Model b = m;
  EXPECT_THROW(apply_rotations(b, bad), Error);
  bad = r;
  bad.r2[0][0] = gaussian_orthogonal(8, 2);
  Model c = m;
  EXPECT_THROW(apply_rotations(c, bad), Error);
}

// The R2 algebra against a naive reference, on the synthetic GQA model with biases and R1 = I:
// value head h of the new v_proj equals the old one times R2[h] (bias included), and o_proj reading
// every query head's slice times its KV head's R2 gives the old o_proj output.
TEST(RotateAlgebra, R2RotatesValueHeadsAndCancelsInOproj) {
  Scratch s;
  Model m = synth_qwen(s);
  fuse_norms(m);
  const ModelConfig& c = m.config;
  const int hd = c.head_dim, group = c.num_heads / c.num_kv_heads, L = 1;
  ASSERT_EQ(group, 2);
  Rotations r = gaussian_rotations(c, 41);
  r.r1 = Matrix::identity(c.hidden_size);
  Model rot = m;
  apply_rotations(rot, r);

  const std::string vw = layer_name(L, "self_attn.v_proj.weight"), vb = layer_name(L, "self_attn.v_proj.bias"),
                    ow = layer_name(L, "self_attn.o_proj.weight");
  const Matrix Wv0 = m.weights.get(vw), bv0 = m.weights.get(vb), Wo0 = m.weights.get(ow);
  const Matrix Wv1 = rot.weights.get(vw), bv1 = rot.weights.get(vb), Wo1 = rot.weights.get(ow);
  // q/k untouched by R2.
  EXPECT_EQ(rot.weights.get(layer_name(L, "self_attn.q_proj.weight")).data,
            m.weights.get(layer_name(L, "self_attn.q_proj.weight")).data);

  std::mt19937_64 rng(9);
  std::normal_distribution<float> g;
  const int T = 5;
  Matrix X(T, c.hidden_size);
  for (float& v : X.data) v = g(rng);
  // v = X·Wvᵀ + b, naively in double.
  auto values = [&](const Matrix& W, const Matrix& b) {
    std::vector<std::vector<double>> v(T, std::vector<double>(size_t(W.rows)));
    for (int t = 0; t < T; ++t)
      for (int64_t o = 0; o < W.rows; ++o) {
        double acc = b.data[size_t(o)];
        for (int64_t i = 0; i < W.cols; ++i) acc += double(X(t, i)) * W(o, i);
        v[size_t(t)][size_t(o)] = acc;
      }
    return v;
  };
  const auto v0 = values(Wv0, bv0), v1 = values(Wv1, bv1);
  double worst = 0, moved = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < c.num_kv_heads; ++h)
      for (int j = 0; j < hd; ++j) {
        double e = 0;
        for (int k = 0; k < hd; ++k) e += v0[size_t(t)][size_t(h * hd + k)] * r.r2[L][size_t(h)](k, j);
        worst = std::max(worst, std::abs(v1[size_t(t)][size_t(h * hd + j)] - e));
        moved = std::max(moved, std::abs(v1[size_t(t)][size_t(h * hd + j)] - v0[size_t(t)][size_t(h * hd + j)]));
      }
  EXPECT_LT(worst, 1e-5);
  EXPECT_GT(moved, 1e-2);

  // o_proj: Y (tokens x q_dim, any attention output); Y' = each query head q's slice · R2[q / group].
  Matrix Y(T, c.q_dim()), Y1(T, c.q_dim());
  for (float& v : Y.data) v = g(rng);
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < c.num_heads; ++q)
      for (int j = 0; j < hd; ++j) {
        double e = 0;
        for (int k = 0; k < hd; ++k) e += double(Y(t, q * hd + k)) * r.r2[L][size_t(q / group)](k, j);
        Y1(t, q * hd + j) = float(e);
      }
  worst = 0;
  for (int t = 0; t < T; ++t)
    for (int64_t o = 0; o < Wo0.rows; ++o) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < Wo0.cols; ++i) {
        a += double(Y(t, i)) * Wo0(o, i);
        b += double(Y1(t, i)) * Wo1(o, i);
      }
      worst = std::max(worst, std::abs(a - b));
    }
  EXPECT_LT(worst, 1e-5);
  // And column-wise: Wo1[:, head q] = Wo0[:, head q] · R2[q / group].
  worst = 0;
  for (int64_t o = 0; o < Wo0.rows; ++o)
    for (int q = 0; q < c.num_heads; ++q)
      for (int j = 0; j < hd; ++j) {
        double e = 0;
        for (int k = 0; k < hd; ++k) e += double(Wo0(o, q * hd + k)) * r.r2[L][size_t(q / group)](k, j);
        worst = std::max(worst, std::abs(Wo1(o, q * hd + j) - e));
      }
  EXPECT_LT(worst, 1e-6);
}

// R1 on the residual stream: embedding rows and input-side weights W·R1, output-side R1ᵀ·W (bias
// too would follow, none here), naive reference.
TEST(RotateAlgebra, R1InputAndOutputSides) {
  Scratch s;
  Model m = synth_qwen(s);
  fuse_norms(m);
  const ModelConfig& c = m.config;
  Rotations r{gaussian_orthogonal(c.hidden_size, 5), {}};
  Model rot = m;
  apply_rotations(rot, r);
  auto times_r1 = [&](const Matrix& W) {  // W·R1
    Matrix out(W.rows, W.cols);
    for (int64_t i = 0; i < W.rows; ++i)
      for (int64_t j = 0; j < W.cols; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < W.cols; ++k) acc += double(W(i, k)) * r.r1(k, j);
        out(i, j) = float(acc);
      }
    return out;
  };
  auto r1t_times = [&](const Matrix& W) {  // R1ᵀ·W
    Matrix out(W.rows, W.cols);
    for (int64_t i = 0; i < W.rows; ++i)
      for (int64_t j = 0; j < W.cols; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < W.rows; ++k) acc += double(r.r1(k, i)) * W(k, j);
        out(i, j) = float(acc);
      }
    return out;
  };
  for (const std::string& n : {std::string("model.embed_tokens.weight"), std::string("lm_head.weight"),
                               layer_name(0, "self_attn.k_proj.weight"), layer_name(1, "mlp.up_proj.weight")})
    EXPECT_LT(max_abs_diff(rot.weights.get(n), times_r1(m.weights.get(n))), 1e-5) << n;
  for (const std::string& n : {layer_name(0, "self_attn.o_proj.weight"), layer_name(1, "mlp.down_proj.weight")})
    EXPECT_LT(max_abs_diff(rot.weights.get(n), r1t_times(m.weights.get(n))), 1e-5) << n;
  // Biases live on the head side of q/k/v and do not rotate with R1.
  EXPECT_EQ(rot.weights.get(layer_name(0, "self_attn.q_proj.bias")).data,
            m.weights.get(layer_name(0, "self_attn.q_proj.bias")).data);
}

// fold_r4: down_proj ← down_proj·H/√n, with H from the Hadamard class (dense reference).
TEST(RotateAlgebra, FoldR4IsDownProjTimesNormalisedHadamard) {
  Scratch s;
  Model m = synth_qwen(s);
  Model f = m;
  fold_r4(f);
  const Matrix H = Hadamard(m.config.intermediate_size).matrix();
  ASSERT_LT(orthogonality_error(H), 1e-5);
  const Matrix W = m.weights.get(layer_name(1, "mlp.down_proj.weight"));
  Matrix e(W.rows, W.cols);
  for (int64_t i = 0; i < W.rows; ++i)
    for (int64_t j = 0; j < W.cols; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < W.cols; ++k) acc += double(W(i, k)) * H(k, j);
      e(i, j) = float(acc);
    }
  EXPECT_LT(max_abs_diff(f.weights.get(layer_name(1, "mlp.down_proj.weight")), e), 1e-5);
  // The entries of H·√n are ±1 (a genuine Hadamard of order 172).
  const double sq = std::sqrt(double(m.config.intermediate_size));
  for (float v : H.data) ASSERT_NEAR(std::abs(v) * sq, 1.0, 1e-5);
}

// The online hook rotates every head of Q and K (not V) and the down_proj input, nothing else.
TEST(RotateOnline, HookTouchesOnlyItsSitesPerHead) {
  Scratch s;
  const Model m = synth_qwen(s);
  const ModelConfig& c = m.config;
  OnlineHadamard hook(c, true, true);
  const Matrix Hh = Hadamard(c.head_dim).matrix(), Hi = Hadamard(c.intermediate_size).matrix();
  std::mt19937_64 rng(3);
  std::normal_distribution<float> g;
  auto rnd = [&](int64_t r, int64_t cols) {
    Matrix x(r, cols);
    for (float& v : x.data) v = g(rng);
    return x;
  };
  auto per_block = [](const Matrix& x, const Matrix& H) {
    Matrix out(x.rows, x.cols);
    for (int64_t r = 0; r < x.rows; ++r)
      for (int64_t b = 0; b < x.cols / H.rows; ++b)
        for (int64_t j = 0; j < H.rows; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < H.rows; ++k) acc += double(x(r, b * H.rows + k)) * H(k, j);
          out(r, b * H.rows + j) = float(acc);
        }
    return out;
  };
  Matrix q = rnd(3, c.q_dim()), k = rnd(3, c.kv_dim()), v = rnd(3, c.kv_dim()), d = rnd(3, c.intermediate_size),
         a = rnd(3, c.hidden_size);
  Matrix q1 = q, k1 = k, v1 = v, d1 = d, a1 = a;
  hook.at(Site::Q, 0, q1);
  hook.at(Site::K, 0, k1);
  hook.at(Site::V, 0, v1);
  hook.at(Site::DownIn, 0, d1);
  hook.at(Site::AttnIn, 0, a1);
  EXPECT_LT(max_abs_diff(q1, per_block(q, Hh)), 1e-5);
  EXPECT_LT(max_abs_diff(k1, per_block(k, Hh)), 1e-5);
  EXPECT_LT(max_abs_diff(d1, per_block(d, Hi)), 1e-5);
  EXPECT_EQ(v1.data, v.data);
  EXPECT_EQ(a1.data, a.data);
  // Switched off: identity.
  OnlineHadamard off(c, false, false);
  Matrix q2 = q, d2 = d;
  off.at(Site::Q, 0, q2);
  off.at(Site::DownIn, 0, d2);
  EXPECT_EQ(q2.data, q.data);
  EXPECT_EQ(d2.data, d.data);
}

TEST(RotateIo, SaveLoadRotationsRoundTripsAndChecksShapes) {
  Scratch s;
  const Model m = synth_qwen(s);
  const Rotations r = gaussian_rotations(m.config, 77);
  const std::string path = (s.path() / "rot.safetensors").string();
  save_rotations(path, r);
  Rotations back = load_rotations(path, m.config);
  EXPECT_EQ(back.r1.data, r.r1.data);
  ASSERT_EQ(back.r2.size(), r.r2.size());
  for (size_t l = 0; l < r.r2.size(); ++l) {
    ASSERT_EQ(back.r2[l].size(), r.r2[l].size());
    for (size_t h = 0; h < r.r2[l].size(); ++h) EXPECT_EQ(back.r2[l][h].data, r.r2[l][h].data);
  }
  // Rotations for another shape of model are refused (hidden 64 vs 32).
  ModelConfig other = m.config;
  other.hidden_size = 32;
  EXPECT_THROW(load_rotations(path, other), Error);
  ModelConfig more_layers = m.config;
  more_layers.num_layers = 3;
  EXPECT_THROW(load_rotations(path, more_layers), Error);
}
