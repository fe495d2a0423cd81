// GPTQ (Frantar et al., 2022): quantizes a weight column by column, spreading each column's
// rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer's
// inputs. Matrix-level: the caller collects the layer inputs into a HessianAccumulator.
#pragma once
#include <cstdint>
#include <vector>

#include "quant/quantizer.h"
#include "tensor/tensor.h"

namespace dq {

// Accumulates H = 2 XᵀX / n over batches of input rows X (tokens x dim). Each batch's XᵀX is formed
// in f32 (in chunks of at most 4096 tokens) and summed in f64, so the result does not depend on how
// the tokens were split into batches beyond f32 rounding within a chunk.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t dim);
  void add(const Matrix& X);
  void add(const float* X, int64_t tokens);  // row-major tokens x dim
  int64_t dim() const { return dim_; }
  int64_t tokens() const { return tokens_; }
  // 2 XᵀX / n as a dim x dim f32 matrix; all zeros before any token was added.
  Matrix hessian() const;

 private:
  int64_t dim_ = 0, tokens_ = 0;
  std::vector<double> sum_;   // upper triangle of XᵀX, row-major dim x dim
};

struct GptqOptions {
  double damp = 0.01;      // added to diag(H) as a fraction of mean(diag H)
  int64_t block = 128;     // columns per lazy block update
  bool act_order = false;  // process columns by descending diag(H)
  // Group parameters from the (dead-column-zeroed) original W, computed up front. Without it each
  // group's parameters come from the error-updated weights when GPTQ reaches the group's first
  // column. act_order with group > 0 requires it, because stored groups are contiguous columns.
  bool static_groups = false;
  int max_retries = 4;  // Cholesky failures retried with 10x the damping each time
  bool f64 = false;     // run the column updates in double (slower; used to verify)
};

struct GptqResult {
  QuantizedMatrix q;  // codes/scales/zeros, same layout as quantize()
  Matrix weight;      // dequantized weights, equal to q.dequantize()
  // GPTQ's proxy loss sum over all weights of (w - q)² / (2 [H⁻¹]_jj), H⁻¹ of the remaining
  // columns at the time w was quantized.
  double error = 0;
  double damp = 0;           // damping fraction finally used
  int retries = 0;           // Cholesky retries needed
  int64_t dead_columns = 0;  // columns with diag(H) == 0 (their weights are set to 0)
};

// W: out x in (f32), H: in x in, symmetric; taken by value so a caller done with it can move it in
// (an 8192-wide Hessian is 256 MiB, freed once converted to f64). Dead columns get H_jj = 1 and W[:, j] = 0 (no input
// ever reaches them). Throws Error on shape mismatch, a non-finite H or W, !spec.enabled(),
// per-tensor specs, or when the Cholesky factorisation still fails after max_retries.
GptqResult gptq(const Matrix& W, Matrix H, const QuantSpec& spec, const GptqOptions& opt = {});

}  // namespace dq
