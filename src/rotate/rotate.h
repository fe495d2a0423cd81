// Rotating a model without changing its function: norm fusion, folding R1 (residual stream) and
// R2 (per KV head, value/o_proj) into the weights, folding R4's transpose into down_proj, and the
// online Hadamard hooks (R3 on Q/K after RoPE, R4 on the down_proj input) that run at inference.
#pragma once
#include <map>
#include <vector>

#include "linalg/hadamard.h"
#include "model/forward.h"

namespace dq {

// Moves every RMSNorm gain into the linears that read the norm's output (q/k/v, gate/up, and
// lm_head for the final norm), leaving weightless norms. Unties a tied classifier.
void fuse_norms(Model& m);
// w ← w·diag(gain): a norm gain moved into the linear reading its output.
void scale_columns(Matrix& w, const Matrix& gain);
// Layer l's share of fuse_norms (its two norms), for pipelines that go one layer at a time.
void fuse_layer_norms(Model& m, int l);

struct Rotations {
  Matrix r1;                            // hidden x hidden
  std::vector<std::vector<Matrix>> r2;  // [layer][kv_head], head_dim x head_dim
};

// QuaRot: seeded random Hadamard R1 and R2 (a different seed per layer and KV head).
Rotations random_hadamard_rotations(const ModelConfig& c, uint64_t seed);

// Folds R1 and R2 (any orthogonal matrices) into the weights; requires fused norms. The residual
// stream becomes x·R1 and each value head v·R2.
void apply_rotations(Model& m, const Rotations& r);
// Layer l's share of apply_rotations (everything but the embedding and the classifier).
void rotate_layer(Model& m, const Rotations& r, int l);

// Folds R4ᵀ into every expert's down_proj (W ← W·H/√n, n its intermediate size) so the online R4
// on its input cancels.
void fold_r4(Model& m);
void fold_r4_layer(Model& m, int l);

// R3 (x ← x·H/√head_dim on every head of Q and K) and R4 (x ← x·H/√n on each expert's down_proj
// input, n its intermediate size) as forward-pass hooks.
class OnlineHadamard : public Hook {
 public:
  OnlineHadamard(const ModelConfig& c, bool r3, bool r4);
  void at(Site site, int layer, Matrix& x) override;
  bool genuine() const;  // false when a size had no Hadamard construction (random block used)

 private:
  bool r3_, r4_;
  Hadamard head_;
  std::map<int64_t, Hadamard> inter_;  // by down_proj input size
};

}  // namespace dq

namespace dq {

// Rotations as safetensors: "R1" and "R2.<layer>.<kv_head>" (f32).
void save_rotations(const std::string& path, const Rotations& r);
// r2_layers: how many layers' R2 the file holds (the first ones; -1 = all), for files written
// while R2 is still being learnt (checkpoints).
Rotations load_rotations(const std::string& path, const ModelConfig& c, int r2_layers = -1);

}  // namespace dq
