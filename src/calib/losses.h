// Losses on rotated activations O = X·R (tokens × channels). Each returns the loss and, when
// grad is not null, writes dL/dO into it (resized to O's shape); then dL/dR = Xᵀ·dL/dO.
// All are means over tokens of a per-token quantity (accumulated in double).
#pragma once
#include <string>

#include "tensor/tensor.h"

namespace dq {

enum class LossKind { Whip, Variance, Kurtosis, Quant };

// "whip", "variance", "kurtosis", "quant"; throws Error on anything else.
LossKind loss_from_name(const std::string& name);
const char* loss_name(LossKind k);

// DartQuant's Whip loss: mean over tokens of Σ_c exp(−|o_c|). dL/do = −sign(o)·exp(−|o|)/T
// (0 at o = 0). The exponentials come from exp_nonpositive (tensor/kernels.h).
float whip_loss(const Matrix& O, Matrix* grad);

// Mean over tokens of the variance across channels, (1/C)Σ(o − μ)². Nearly rotation invariant
// (Σo² is), which is why the paper finds it useless; kept for the ablation.
float variance_loss(const Matrix& O, Matrix* grad);

// Mean over tokens of the kurtosis across channels, C·Σ(o − μ)⁴ / (Σ(o − μ)²)².
float kurtosis_loss(const Matrix& O, Matrix* grad);

// Mean over tokens of Σ_c (q(o_c) − o_c)² for asymmetric per-token round-to-nearest
// quantization with 2^bits levels over [clip·min, clip·max]. The gradient is a straight-through
// surrogate (as in LSQ): round() has derivative 1 inside the range and clamped entries have
// d q/d o = 0; the scale s = clip·(max − min)/(2^bits − 1) is differentiated (through the max and
// min entries), the zero point is held fixed. So the gradient mostly shrinks each token's range.
float quant_loss(const Matrix& O, Matrix* grad, int bits = 4, float clip = 1.f);

// Dispatch (quant uses 4 bits, clip 1).
float loss_and_grad(LossKind kind, const Matrix& O, Matrix* grad);

}  // namespace dq
