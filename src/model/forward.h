// The forward pass of a LLaMA-family decoder, layer by layer, with named sites where hooks observe
// or rewrite activations. Capture, GPTQ statistics, fake quantization and online Hadamards are all
// hooks on this one pass.
//
// Activations are matrices with one row per token, sequence-major: row b * seq + t.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/model.h"

namespace dq {

enum class Site {
  AttnIn,     // q/k/v input, after the attention norm        [tokens, hidden]
  Q,          // queries after RoPE                            [tokens, heads * head_dim]
  K,          // keys after RoPE                               [tokens, kv_heads * head_dim]
  V,          // values                                        [tokens, kv_heads * head_dim]
  OprojIn,    // attention output, o_proj input                [tokens, heads * head_dim]
  MlpIn,      // router and gate/up input, after the MLP norm  [tokens, hidden]
  ExpertIn,   // the MlpIn rows one expert reads (read only)   [routed tokens, hidden]
  DownIn,     // an expert's down_proj input, silu(gate) * up  [routed tokens, expert intermediate]
  FinalNorm,  // final-norm output, lm_head input              [tokens, hidden]
};
const char* site_name(Site s);
// The site a name from site_name() stands for; Error for any other string.
Site site_from_name(const std::string& name);

struct Hook {
  virtual ~Hook() = default;
  virtual void at(Site site, int layer, Matrix& x) = 0;  // layer is -1 for FinalNorm
  // The per-expert sites (ExpertIn, DownIn) come here, `expert` indexing LayerWeights::experts
  // (a dense MLP is expert 0); hooks that need not tell experts apart keep this default.
  virtual void at_expert(Site site, int layer, int expert, Matrix& x) { at(site, layer, x); }
  // A hook may compute the products of the linears that read a site itself (AttnIn: q/k/v,
  // OprojIn: o_proj, ExpertIn: gate/up, DownIn: down_proj), x being what the hooks left there:
  // it sets y = x Wᵀ and returns true. The fake-quant reference does (quant/quantize_model.h).
  virtual bool linear(Site input, const Matrix& x, const Matrix& w, Matrix& y) { return false; }
};
using Hooks = std::vector<Hook*>;

// One layer's weights as f32 (converted from their stored dtype when loaded). A linear the model
// holds packed (Weights::packed, the integer runtime) has its packed form set instead and its
// f32 matrix left empty.
using PackedPtr = std::shared_ptr<const PackedLinear>;
struct ExpertWeights {
  Matrix gate, up, down;
  PackedPtr gate_packed, up_packed, down_packed;
};
struct LayerWeights {
  Matrix attn_norm, q, k, v, o, q_bias, k_bias, v_bias, mlp_norm;
  PackedPtr q_packed, k_packed, v_packed, o_packed;
  Matrix router;                      // [routed experts, hidden]; empty for a dense MLP
  std::vector<ExpertWeights> experts;  // as mlp_experts(): routed ones (router rows) first
};

// Each token's routed experts and their weights, as the HF references compute them: softmax over
// the router logits, the top k (ties to the lower index), renormalised to sum 1 if the config says.
struct Routing {
  int k = 0;
  std::vector<int> expert;     // [tokens * k]
  std::vector<float> weight;   // [tokens * k]
};
Routing route(const ModelConfig& c, const Matrix& router, const Matrix& h);
LayerWeights load_layer(const Model& m, int layer);
void release_layer(const Model& m, int layer);  // hands the mapped pages back
// The names of decoder layer `layer`'s tensors that m has, in a fixed order: norms, attention
// (biases where present), router, then each expert's gate, up and down.
std::vector<std::string> layer_tensor_names(const Model& m, int layer);

// A hook that rounds K and V to per-token codes (the KV-cache quantization). A KvCache built on one
// keeps those codes instead of f32 rows.
struct KvQuantizer : Hook {
  // Bytes one token's row of `cols` keys or values takes encoded.
  virtual int64_t row_bytes(int64_t cols) const = 0;
  // Rounds x's rows to codes exactly as at() does, appends their encoding to `out` (row_bytes per
  // row), and leaves in x the values the codes stand for: what at() would have left there.
  virtual void encode(Matrix& x, std::vector<uint8_t>& out) const = 0;
  // The values n encoded rows of `cols` columns stand for, into out (n x cols).
  virtual void decode(const uint8_t* rows, int64_t n, int64_t cols, float* out) const = 0;
};

// One layer's cached keys or values: f32 rows as attention reads them, or their codes.
struct KvRows {
  Matrix f32;                  // [tokens, kv_dim], without a quantizer
  std::vector<uint8_t> codes;  // tokens x row_bytes(kv_dim), with one
  int64_t tokens = 0;
};

// One sequence's keys and values so far, per layer, for decoding a token at a time. Without a
// quantizer the rows are kept in f32 as attention reads them (after RoPE and the K/V hooks: R3 and
// the KV quantization). With one, the rows are kept as its codes: at the quantizer's place among
// the K/V hooks (it must be one of them) the new rows are encoded into the cache instead of
// fake-quantized, and attention reads the cached rows decoded. Either way the rows attention reads
// are what recomputing the whole sequence gives them (up to the float rounding of the products
// before them): the K/V hooks work per token. The quantizer is not owned and must outlive the cache.
struct KvCache {
  KvCache() = default;
  explicit KvCache(const KvQuantizer* q) : quantizer(q) {}
  const KvQuantizer* quantizer = nullptr;
  std::vector<KvRows> k, v;  // [layer]
  int64_t tokens() const { return k.empty() ? 0 : k[0].tokens; }
  // Bytes the cached rows occupy (f32 rows or codes with their scales and zero points).
  size_t bytes() const;
  // Makes room for `tokens` tokens in every layer of a model with config c, so appending up to
  // there does not reallocate (nor leave up to twice the memory a growing vector would).
  void reserve(const ModelConfig& c, int64_t tokens);
};

Matrix embed(const Model& m, const std::vector<int32_t>& tokens);
// Storage for a layer's intermediate activations that forward() hands from one layer to the next:
// a fresh matrix per layer is zero-filled memory out of cache (~6% of the samples of a SmolLM2
// W4A4KV4 integer prefill went to allocating and filling its linears' outputs, bench/README.md);
// the RoPE angles' cosines and sines are computed once for the pass's positions, not twice per layer.
struct RopeTable {
  int seq = 0;
  int64_t past = -1;
  std::vector<float> cos, sin;  // [position][frequency]
};
struct LayerBuffers {
  Matrix h, q, k, v;
  RopeTable rope;  // the positions the pass's layers rotate (the same for all), for one model
};
// Runs one decoder layer in place on x (batch sequences of seq tokens). With a cache (batch 1),
// x holds the tokens that follow the cached ones, whose keys and values are appended. With
// `buffers`, the layer's activations live in their storage (the MLP's two widest in q's and k's;
// v is released before the MLP).
void layer_forward(const ModelConfig& c, const LayerWeights& w, int layer, Matrix& x, int batch,
                   int seq, const Hooks& hooks, KvCache* cache = nullptr, LayerBuffers* buffers = nullptr);
// Applies the final norm (and the FinalNorm hooks) in place.
void final_norm(const Model& m, Matrix& x, const Hooks& hooks);
// The whole decoder: returns the final-norm output for batch x seq tokens.
Matrix forward(const Model& m, const std::vector<int32_t>& tokens, int batch, int seq,
               const Hooks& hooks = {}, KvCache* cache = nullptr);

// Tokens per forward() call in prefill() for a model whose linears are packed (the integer
// runtime): a multiple of the attention's query block (64 rows), so the chunks' attention runs the
// very products of one pass over the whole prompt. 256 (bench/README.md, "Memory"): SmolLM2-shape
// W4A4KV4 pp512 at the one pass's speed; 128 would save 2 MiB more at 5% of the speed (every chunk
// rearranges the weights into slices and decodes the cache again).
constexpr int kPrefillChunk = 256;
// Runs one sequence's tokens after those in `cache` (a prompt), `chunk` tokens per forward() call
// with the cache carrying keys and values from call to call (llama.cpp's micro-batches): the
// pass's activations are a chunk's, not the prompt's. chunk 0: kPrefillChunk for packed linears;
// one call for f32 ones, which forward() converts from their stored dtype on every call (chunks
// would convert every layer again: SmolLM2-shape f32 pp512 ran 10% slower in chunks of 256).
// Returns the last call's final-norm output (its last row is the last token's).
Matrix prefill(const Model& m, const std::vector<int32_t>& tokens, const Hooks& hooks, KvCache& cache,
               int chunk = 0);

// Log-probabilities over the vocabulary of rows [row0, row0 + n) of the final-norm output; the
// classifier is read as stored (see forward.cpp).
Matrix log_probs(const Model& m, const Matrix& x, int64_t row0, int64_t n);
// The id with the largest value in row 0 of lp (ties to the lower id).
int32_t most_likely(const Matrix& lp);
// The most likely token after the last row of the final-norm output x (ties to the lower id).
int32_t greedy_next(const Model& m, const Matrix& x);
// For each sequence, the NLL of tokens 1..seq-1 given their prefixes: batch * (seq - 1) values.
std::vector<double> next_token_nll(const Model& m, const std::vector<int32_t>& tokens, int batch,
                                   int seq, const Hooks& hooks = {});

}  // namespace dq
