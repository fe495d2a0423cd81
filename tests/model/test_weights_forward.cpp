// Weights::get's finite check and owned/mapped paths, and load_layer/forward on top of them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/forward.h"
#include "model/synth.h"
#include "test_helpers.h"

using namespace dq;
using namespace dq::test;
using json = nlohmann::json;

namespace {

// A 2-layer model with Qwen2.5-0.5B's structure (biases, GQA) at small sizes.
Model small_model(const ScratchDir& dir, DType dtype) {
  SynthOptions o;
  o.dtype = dtype;
  o.seed = 5;
  synth_model(small_qwen_config(dir), dir / "model", o);
  return load_model(dir / "model");
}

std::vector<int32_t> tokens(int n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[size_t(i)] = (i * 37 + 11) % 512;
  return t;
}

}  // namespace

TEST(Weights, GetReportsNonFiniteValuesOfMappedAndOwnedTensors) {
  ScratchDir dir;
  const int64_t rows = 300, cols = 301;  // above the parallel-conversion threshold
  Matrix clean(rows, cols, 0.75f), dirty = clean;
  dirty(rows - 1, cols - 1) = std::numeric_limits<float>::quiet_NaN();
  // The writers refuse a NaN, so the stored ones are put in by hand (bf16 0x7FC0, f16 0x7E00).
  auto with_nan_last = [&](const char* name, DType dtype, uint16_t nan) {
    TensorBlob b = blob_from_matrix(name, clean, dtype);
    std::memcpy(b.bytes.data() + b.bytes.size() - 2, &nan, 2);
    return b;
  };
  write_safetensors(dir / "w.safetensors", {blob_from_matrix("clean", clean, DType::BF16),
                                            with_nan_last("dirty", DType::BF16, 0x7FC0),
                                            with_nan_last("dirty16", DType::F16, 0x7E00)});
  Weights w;
  w.add_file(std::make_shared<const SafetensorsFile>(dir / "w.safetensors"));
  w.set("owned_dirty", dirty);
  bool finite = false;
  EXPECT_EQ(w.get("clean", &finite).data, clean.data);
  EXPECT_TRUE(finite);
  for (const char* name : {"dirty", "dirty16", "owned_dirty"}) {
    finite = true;
    const Matrix m = w.get(name, &finite);
    EXPECT_FALSE(finite) << name;
    EXPECT_TRUE(std::isnan(m(rows - 1, cols - 1))) << name;
  }
  EXPECT_EQ(w.get("dirty").rows, rows);  // the flag is optional
}

TEST(Forward, LogProbsReadTheStoredClassifierInPlace) {
  // A mapped bf16 classifier of 9000 rows (one whole 8192-row chunk and a partial one): one row
  // goes through the GEMV on the stored values, several through f32 chunks and sgemm; both against
  // a log-softmax in double over the whole tensor converted at once.
  ScratchDir dir;
  const std::string cfg = cut_config(dir, "qwen2.5-0.5b", {{"hidden_size", 16}, {"intermediate_size", 32},
                                                            {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                                                            {"num_hidden_layers", 1}, {"vocab_size", 9000}},
                                     "wide_vocab");
  SynthOptions o;
  o.dtype = DType::BF16;
  synth_model(cfg, dir / "model", o);
  const Model m = load_model(dir / "model");
  ASSERT_EQ(m.weights.stored_dtype(lm_head_name(m)), DType::BF16);
  const Matrix head = m.weights.get(lm_head_name(m)), x = gaussian_matrix(3, 16, 4);
  ASSERT_EQ(head.rows, 9000);
  auto expect_reference = [&](const Matrix& lp, int64_t lp_row, int64_t x_row) {
    std::vector<double> z(size_t(head.rows));
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < head.rows; ++v) {
      for (int64_t c = 0; c < head.cols; ++c) z[size_t(v)] += double(x(x_row, c)) * head(v, c);
      mx = std::max(mx, z[size_t(v)]);
    }
    for (double v : z) sum += std::exp(v - mx);
    for (int64_t v = 0; v < head.rows; ++v)
      ASSERT_NEAR(lp(lp_row, v), z[size_t(v)] - mx - std::log(sum), 1e-4) << "row " << x_row << " token " << v;
  };
  const Matrix all = log_probs(m, x, 0, 3);
  ASSERT_EQ(all.rows, 3);
  ASSERT_EQ(all.cols, 9000);
  for (int64_t r = 0; r < 3; ++r) {
    expect_reference(all, r, r);
    expect_reference(log_probs(m, x, r, 1), 0, r);
  }
}

TEST(Forward, LoadLayerRejectsNaNWithTheTensorName) {
  ScratchDir dir;
  Model m = small_model(dir, DType::BF16);
  const std::string name = layer_name(1, "mlp.up_proj.weight");
  Matrix up = m.weights.get(name);
  up(3, 4) = std::numeric_limits<float>::infinity();
  m.weights.set(name, up);
  EXPECT_NO_THROW(load_layer(m, 0));
  try {
    load_layer(m, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'" + name + "' contains NaN or Inf"), std::string::npos) << e.what();
  }
}

// Owned f32 copies of the mapped bf16 weights go through the other conversion path: same output bits.
TEST(Forward, OwnedAndMappedWeightsGiveIdenticalOutput) {
  ScratchDir dir;
  const Model mapped = small_model(dir, DType::BF16);
  Model owned = mapped;
  for (const std::string& n : owned.weights.names()) owned.weights.set(n, mapped.weights.get(n));
  const std::vector<int32_t> t = tokens(2 * 40);
  const Matrix a = forward(mapped, t, 2, 40), b = forward(owned, t, 2, 40);
  ASSERT_EQ(a.rows, 80);
  EXPECT_EQ(a.data, b.data);
  EXPECT_EQ(forward(mapped, t, 2, 40).data, a.data);  // reused buffers leave no state behind
}

// The output buffers layer_forward reuses must not change what the hooks see or the output: one
// layer at a time equals forward() and every site keeps its documented shape.
TEST(Forward, LayerByLayerMatchesForwardAndSiteShapes) {
  ScratchDir dir;
  const Model m = small_model(dir, DType::F32);
  const ModelConfig& c = m.config;
  struct Shapes : Hook {
    std::vector<std::pair<Site, std::pair<int64_t, int64_t>>> seen;
    void at(Site s, int, Matrix& x) override { seen.push_back({s, {x.rows, x.cols}}); }
  } hook;
  const std::vector<int32_t> t = tokens(48);
  Matrix x = embed(m, t);
  for (int l = 0; l < c.num_layers; ++l) layer_forward(c, load_layer(m, l), l, x, 1, 48, {&hook});
  final_norm(m, x, {});
  EXPECT_EQ(x.data, forward(m, t, 1, 48).data);
  const int64_t D = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size;
  const std::map<Site, std::pair<int64_t, int64_t>> want = {
      {Site::AttnIn, {48, D}}, {Site::Q, {48, Q}},       {Site::K, {48, KV}},      {Site::V, {48, KV}},
      {Site::OprojIn, {48, Q}}, {Site::MlpIn, {48, D}}, {Site::ExpertIn, {48, D}}, {Site::DownIn, {48, I}}};
  ASSERT_EQ(hook.seen.size(), 2 * want.size());
  for (const auto& [s, shape] : hook.seen) EXPECT_EQ(shape, want.at(s)) << site_name(s);
}

// A prompt in chunks against the KV cache (prefill) gives the rows of one pass over it, within
// float rounding (the f32 products have other shapes), and the same greedy token; by default an f32
// model's prompt goes in one call (the one pass's bits); prefill refuses an empty prompt and a
// negative chunk.
TEST(KvCache, ChunkedPrefillMatchesOnePass) {
  const Model m = load_model(dq::test::kStories);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 150; ++i) prompt.push_back(int32_t(1 + (i * 37) % 500));
  const Matrix whole = forward(m, prompt, 1, int(prompt.size()));
  for (int chunk : {64, 100, 150}) {
    KvCache cache;
    const Matrix last = prefill(m, prompt, {}, cache, chunk);
    ASSERT_EQ(cache.tokens(), int64_t(prompt.size())) << chunk;
    ASSERT_EQ(last.rows, int64_t(prompt.size()) - (int64_t(prompt.size()) - 1) / chunk * chunk) << chunk;
    const int64_t first = whole.rows - last.rows;
    for (int64_t r = 0; r < last.rows; ++r)
      for (int64_t j = 0; j < last.cols; ++j) ASSERT_NEAR(last(r, j), whole(first + r, j), 1e-4) << chunk;
    EXPECT_EQ(greedy_next(m, last), greedy_next(m, whole)) << chunk;
  }
  KvCache cache;
  EXPECT_EQ(prefill(m, prompt, {}, cache).data, whole.data);
  EXPECT_THROW(prefill(m, {}, {}, cache), Error);
  EXPECT_THROW(prefill(m, prompt, {}, cache, -1), Error);
}

// Decoding a token at a time against the KV cache gives the greedy tokens (and, within float
// rounding, the final hidden states) of recomputing the whole sequence each step.
TEST(KvCache, IncrementalDecodingMatchesRecomputation) {
  const Model m = load_model(dq::test::kStories);
  auto greedy = [&](const Matrix& x) { return greedy_next(m, x); };
  std::vector<int32_t> full{1, 403, 407, 261}, cached = full;
  KvCache cache;
  std::vector<int32_t> fresh = full;
  for (int i = 0; i < 40; ++i) {
    const Matrix a = forward(m, full, 1, int(full.size()));
    const Matrix b = forward(m, fresh, 1, int(fresh.size()), {}, &cache);
    ASSERT_EQ(cache.tokens(), int64_t(full.size()));
    for (int64_t j = 0; j < a.cols; ++j) ASSERT_NEAR(b(b.rows - 1, j), a(a.rows - 1, j), 1e-4) << i;
    const int32_t na = greedy(a), nb = greedy(b);
    ASSERT_EQ(na, nb) << "step " << i;
    full.push_back(na);
    fresh = {nb};
  }
}
