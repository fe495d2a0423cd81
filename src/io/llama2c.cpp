#include "io/llama2c.h"

#include <cstdlib>
#include <cstring>

#include "io/file.h"

namespace dq {

Llama2cCheckpoint read_llama2c(const std::string& path) {
  MappedFile f(path);
  Llama2cCheckpoint c;
  if (f.size() < 28) throw Error(path + ": truncated llama2.c checkpoint (no header)");
  int32_t h[7];
  std::memcpy(h, f.data(), 28);
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.shared_classifier = h[5] > 0;
  const int64_t vocab = std::llabs(int64_t(h[5]));
  c.vocab_size = vocab > (1 << 22) ? 0 : int(vocab);
  c.seq_len = h[6];
  auto bad = [&](int v, int hi) { return v <= 0 || v > hi; };
  if (bad(c.dim, 1 << 16) || bad(c.hidden_dim, 1 << 18) || bad(c.n_layers, 1024) || bad(c.n_heads, 1024) ||
      bad(c.n_kv_heads, c.n_heads) || bad(c.vocab_size, 1 << 22) || bad(c.seq_len, 1 << 20) ||
      c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0)
    throw Error(path + ": not a llama2.c checkpoint (implausible header)");
  if ((c.dim / c.n_heads) % 2 != 0) throw Error(path + ": head dimension must be even for RoPE");
  const int64_t hd = c.dim / c.n_heads, kv = hd * c.n_kv_heads, L = c.n_layers;
  size_t pos = 28;
  auto take = [&](int64_t rows, int64_t cols) {
    // Checked against the file before allocating: the header bounds make rows * cols * 4 < 2^63.
    const size_t n = size_t(rows) * size_t(cols) * 4;
    if (n > f.size() - pos) throw Error(path + ": truncated llama2.c checkpoint (tensor data ends early)");
    Matrix m(rows, cols);
    std::memcpy(m.data.data(), f.data() + pos, n);
    pos += n;
    return m;
  };
  auto per_layer = [&](const std::string& suffix, int64_t rows, int64_t cols) {
    Matrix all = take(L * rows, cols);
    for (int64_t l = 0; l < L; ++l) {
      Matrix m(rows, cols);
      std::memcpy(m.data.data(), all.row(l * rows), m.size() * 4);
      c.tensors["model.layers." + std::to_string(l) + "." + suffix] = std::move(m);
    }
  };
  c.tensors["model.embed_tokens.weight"] = take(c.vocab_size, c.dim);
  per_layer("input_layernorm.weight", 1, c.dim);
  per_layer("self_attn.q_proj.weight", c.dim, c.dim);
  per_layer("self_attn.k_proj.weight", kv, c.dim);
  per_layer("self_attn.v_proj.weight", kv, c.dim);
  per_layer("self_attn.o_proj.weight", c.dim, c.dim);
  per_layer("post_attention_layernorm.weight", 1, c.dim);
  per_layer("mlp.gate_proj.weight", c.hidden_dim, c.dim);
  per_layer("mlp.down_proj.weight", c.dim, c.hidden_dim);
  per_layer("mlp.up_proj.weight", c.hidden_dim, c.dim);
  c.tensors["model.norm.weight"] = take(1, c.dim);
  take(c.seq_len, hd);  // freq_cis_real and freq_cis_imag (seq_len x hd/2 each): recomputed, unused
  if (!c.shared_classifier) c.tensors["lm_head.weight"] = take(c.vocab_size, c.dim);
  if (pos != f.size()) throw Error(path + ": " + std::to_string(f.size() - pos) + " unexpected trailing bytes");
  return c;
}

}  // namespace dq
