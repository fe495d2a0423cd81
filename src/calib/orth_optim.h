// Optimisers for a rotation R (n×n orthogonal) minimising loss(X·R) over activation batches X.
//  - QR-Orth (DartQuant): an unconstrained latent Z, R = Q of QR(Z) with diag(U) > 0; the loss
//    gradient is pulled back through the QR (linalg/qr.h) and Z takes a plain SGD-momentum
//    (PyTorch convention: m ← μm + g, Z ← Z − lr·m) or Adam step. Two routes to the same
//    iterates: `qr` (Cholesky QR, linalg/qr.h, and the backward from B = Oᵀ·dL/dO, never forming
//    dL/dR = Xᵀ·dL/dO) and `qr-householder` (LAPACK Householder QR, dL/dR formed, then
//    QᵀdL/dR): the route this project used first, kept as the reference and for bench_linalg.
//  - Cayley SGD with momentum on the Stiefel manifold (Li et al. 2020, Algorithm 2; SpinQuant's
//    optimizer): M ← βM − G; Ŵ = MRᵀ − ½R(RᵀMRᵀ); W = Ŵ − Ŵᵀ; M ← WR;
//    α = min(lr, 2q/(‖W‖₁ + ε)) with q = ½; Y ← R + αM, then s times Y ← R + (α/2)W(R + Y).
//    The fixed-point iteration only approximates the Cayley transform, so R drifts off
//    orthogonality, the more the larger α‖W‖ (on the n = 64 test data after 200 steps:
//    ‖RᵀR − I‖∞ ≈ 2e-4 at lr 0.02, 7e-3 at lr 0.1, 0.2 when α hits the bound 1/‖W‖₁); a drifting R
//    can lower scale-dependent losses such as Whip without rotating. QR-Orth is exact.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "calib/losses.h"
#include "linalg/qr.h"
#include "tensor/tensor.h"

namespace dq {

enum class OrthMethod { QR, QRHouseholder, Cayley };
enum class OptimizerKind { SGD, Adam };
OrthMethod orth_from_name(const std::string& name);          // "qr" | "qr-householder" | "cayley"
OptimizerKind optimizer_from_name(const std::string& name);  // "sgd" | "adam"
const char* orth_name(OrthMethod m);
const char* optimizer_name(OptimizerKind k);

struct OrthOptions {
  OrthMethod method = OrthMethod::QR;
  OptimizerKind optimizer = OptimizerKind::SGD;  // Cayley supports SGD (with momentum) only
  LossKind loss = LossKind::Whip;
  float lr = 2e-3f;        // paper App. K: 0.002 for Llama-2-7B R1
  float momentum = 0.9f;   // SGD momentum, Adam β1, Cayley β
  float beta2 = 0.999f;    // Adam
  float adam_eps = 1e-8f;  // Adam
  bool cosine = false;     // lr·½(1 + cos(π·t/total_steps))
  int64_t total_steps = 0; // required by the cosine schedule
  int cayley_iterations = 2;  // s in Li et al. (their default)
};

class RotationOptimizer {
 public:
  // init: an orthogonal n×n start (e.g. random_hadamard); for QR-Orth it is the initial latent
  // Z, whose Q is init itself.
  RotationOptimizer(const Matrix& init, const OrthOptions& opt);

  // One optimisation step on a batch X (tokens × n, unrotated): computes the loss at the current
  // R (scaled by weight, which also scales the gradient), updates R, returns that loss.
  float step(const Matrix& X, float weight = 1.f);

  const Matrix& rotation() const { return method() == OrthMethod::Cayley ? R_ : qr_.Q; }
  int64_t size() const { return n_; }
  int64_t steps_done() const { return t_; }
  float lr_at(int64_t t) const;  // the schedule
  OrthMethod method() const { return opt_.method; }

 private:
  void step_qr(const Matrix& Zbar, float lr);
  void step_cayley(const Matrix& G, float lr);

  OrthOptions opt_;
  int64_t n_, t_ = 0;
  Matrix Z_;       // QR-Orth latent
  QRFactors qr_;   // QR of Z_: qr_.Q is the current R
  Matrix R_;       // Cayley: the current R
  Matrix m_, v_;   // momentum / Adam moments
  Matrix O_, dO_, G_;  // per-step buffers, kept to spare the allocation (and page faults)
};

// R2: one latent per KV head. X holds the o_proj input (tokens × n_q_heads·head_dim); query
// head j uses latent j / (n_q_heads / n_kv_heads). The loss is the sum over query heads of the
// per-head loss (for Whip: the loss over all channels). With rms_normalize each token's head
// slice is scaled to RMS 1 before the loss (rotation keeps the RMS, so this is the same as
// normalising O): Whip's exp(−|o|) is not scale-invariant, and unlike R1's inputs (x / rms(x))
// the o_proj input has no norm in front of it, so its scale, which varies by layer, head and
// token, would otherwise set the effective learning rate. Activation quantization is per token
// and per head here, so the normalised slice is what the quantizer sees, up to its scale.
class BatchedRotationOptimizer {
 public:
  BatchedRotationOptimizer(const std::vector<Matrix>& init, int64_t n_q_heads,
                           const OrthOptions& opt, bool rms_normalize = false);
  // The rows of head h's latent as its optimizer sees them: the group's query-head slices of X
  // stacked as extra tokens (normalised when rms_normalize).
  Matrix head_rows(const Matrix& X, int64_t h) const;
  float step(const Matrix& X);
  std::vector<Matrix> rotations() const;
  int64_t heads() const { return int64_t(opts_.size()); }

 private:
  std::vector<RotationOptimizer> opts_;
  int64_t n_q_heads_, head_dim_;
  bool rms_normalize_;
};

}  // namespace dq
