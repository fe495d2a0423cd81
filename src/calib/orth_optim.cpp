#include "calib/orth_optim.h"

#include <cmath>
#include <numbers>

#include "tensor/kernels.h"

namespace dq {

OrthMethod orth_from_name(const std::string& name) {
  if (name == "qr") return OrthMethod::QR;
  if (name == "qr-householder") return OrthMethod::QRHouseholder;
  if (name == "cayley") return OrthMethod::Cayley;
  throw Error("unknown orthogonal optimiser '" + name + "' (expected qr, qr-householder or cayley)");
}

OptimizerKind optimizer_from_name(const std::string& name) {
  if (name == "sgd") return OptimizerKind::SGD;
  if (name == "adam") return OptimizerKind::Adam;
  throw Error("unknown optimizer '" + name + "' (expected sgd or adam)");
}

const char* orth_name(OrthMethod m) {
  switch (m) {
    case OrthMethod::QR: return "qr";
    case OrthMethod::QRHouseholder: return "qr-householder";
    case OrthMethod::Cayley: return "cayley";
  }
  return "?";
}
const char* optimizer_name(OptimizerKind k) { return k == OptimizerKind::SGD ? "sgd" : "adam"; }

RotationOptimizer::RotationOptimizer(const Matrix& init, const OrthOptions& opt)
    : opt_(opt), n_(init.rows) {
  if (init.rows != init.cols || init.rows == 0) throw Error("rotation optimizer: init must be square");
  if (opt.method == OrthMethod::Cayley && opt.optimizer != OptimizerKind::SGD)
    throw Error("rotation optimizer: Cayley supports sgd only");
  if (opt.cosine && opt.total_steps <= 0)
    throw Error("rotation optimizer: the cosine schedule needs total_steps");
  if (opt.cayley_iterations < 1) throw Error("rotation optimizer: cayley_iterations must be >= 1");
  m_ = Matrix(n_, n_);
  if (opt.method != OrthMethod::Cayley) {
    Z_ = init;
    qr_ = opt.method == OrthMethod::QR ? qr_positive_cholesky(Z_) : qr_positive(Z_);
    if (opt.optimizer == OptimizerKind::Adam) v_ = Matrix(n_, n_);
  } else {
    R_ = init;
  }
}

float RotationOptimizer::lr_at(int64_t t) const {
  if (!opt_.cosine) return opt_.lr;
  const double f = double(std::min(t, opt_.total_steps)) / double(opt_.total_steps);
  return float(opt_.lr * 0.5 * (1.0 + std::cos(std::numbers::pi * f)));
}

float RotationOptimizer::step(const Matrix& X, float weight) {
  if (X.cols != n_)
    throw Error("rotation optimizer: batch has " + std::to_string(X.cols) + " channels, R is " +
                std::to_string(n_) + "x" + std::to_string(n_));
  gemm(X, false, rotation(), false, O_);
  const float loss = loss_and_grad(opt_.loss, O_, &dO_);
  if (!std::isfinite(loss))
    throw Error("rotation calibration diverged: the loss is not finite at step " + std::to_string(t_) +
                " (lower the learning rate)");
  const float lr = lr_at(t_);
  if (opt_.method == OrthMethod::QR) {
    gemm(O_, true, dO_, false, G_, weight);  // B = QᵀQ̄ = Oᵀ·dL/dO
    step_qr(qr_backward_from_b(qr_, G_), lr);
  } else {
    gemm(X, true, dO_, false, G_, weight);  // Q̄ = dL/dR = Xᵀ·dL/dO
    if (opt_.method == OrthMethod::QRHouseholder)
      step_qr(qr_backward(qr_, G_), lr);
    else
      step_cayley(G_, lr);
  }
  ++t_;
  return loss * weight;
}

void RotationOptimizer::step_qr(const Matrix& g, float lr) {
  const size_t N = g.size();
  if (opt_.optimizer == OptimizerKind::SGD) {
    for (size_t i = 0; i < N; ++i) {
      m_.data[i] = opt_.momentum * m_.data[i] + g.data[i];
      Z_.data[i] -= lr * m_.data[i];
    }
  } else {
    const double t = double(t_ + 1);
    const float c1 = float(1 - std::pow(double(opt_.momentum), t));
    const float c2 = float(1 - std::pow(double(opt_.beta2), t));
    for (size_t i = 0; i < N; ++i) {
      m_.data[i] = opt_.momentum * m_.data[i] + (1 - opt_.momentum) * g.data[i];
      v_.data[i] = opt_.beta2 * v_.data[i] + (1 - opt_.beta2) * g.data[i] * g.data[i];
      Z_.data[i] -= lr * (m_.data[i] / c1) / (std::sqrt(v_.data[i] / c2) + opt_.adam_eps);
    }
  }
  // LAPACK would only answer "geqrf failed (info -4)" or a zero pivot: say what happened.
  bool finite = true;
  for (float z : Z_.data) finite = finite && std::isfinite(z);
  try {
    if (!finite) throw Error("its parameters are not finite");
    qr_ = opt_.method == OrthMethod::QR ? qr_positive_cholesky(Z_) : qr_positive(Z_);
  } catch (const Error& e) {
    throw Error("rotation calibration diverged at step " + std::to_string(t_) + " (" + e.what() +
                "): lower the learning rate");
  }
}

void RotationOptimizer::step_cayley(const Matrix& G, float lr) {
  const size_t N = G.size();
  for (size_t i = 0; i < N; ++i) m_.data[i] = opt_.momentum * m_.data[i] - G.data[i];
  // Ŵ = M Rᵀ − ½ R (Rᵀ M Rᵀ), W = Ŵ − Ŵᵀ: the momentum as a skew-symmetric generator.
  Matrix What, RtM, RtMRt;
  gemm(m_, false, R_, true, What);
  gemm(R_, true, m_, false, RtM);
  gemm(RtM, false, R_, true, RtMRt);
  gemm(R_, false, RtMRt, false, What, -0.5f, 1.f);
  Matrix W(n_, n_);
  double norm1 = 0;  // ‖W‖₁ = max column abs sum (≥ spectral norm, so the iteration contracts)
  for (int64_t j = 0; j < n_; ++j) {
    double col = 0;
    for (int64_t i = 0; i < n_; ++i) {
      W(i, j) = What(i, j) - What(j, i);
      col += std::abs(W(i, j));
    }
    norm1 = std::max(norm1, col);
  }
  gemm(W, false, R_, false, m_);  // momentum projected onto the tangent space
  const float q = 0.5f, alpha = float(std::min<double>(lr, 2 * q / (norm1 + 1e-8)));
  Matrix Y = R_, S(n_, n_);
  for (size_t i = 0; i < N; ++i) Y.data[i] += alpha * m_.data[i];
  for (int it = 0; it < opt_.cayley_iterations; ++it) {
    for (size_t i = 0; i < N; ++i) S.data[i] = R_.data[i] + Y.data[i];
    Y = R_;
    gemm(W, false, S, false, Y, 0.5f * alpha, 1.f);
  }
  R_ = std::move(Y);
}

BatchedRotationOptimizer::BatchedRotationOptimizer(const std::vector<Matrix>& init,
                                                   int64_t n_q_heads, const OrthOptions& opt,
                                                   bool rms_normalize)
    : n_q_heads_(n_q_heads), rms_normalize_(rms_normalize) {
  if (init.empty() || n_q_heads <= 0 || n_q_heads % int64_t(init.size()) != 0)
    throw Error("batched rotation optimizer: query heads must be a multiple of the latents");
  head_dim_ = init[0].rows;
  for (const Matrix& m : init) {
    if (m.rows != head_dim_) throw Error("batched rotation optimizer: latents differ in size");
    opts_.emplace_back(m, opt);
  }
}

float BatchedRotationOptimizer::step(const Matrix& X) {
  if (X.cols != n_q_heads_ * head_dim_)
    throw Error("batched rotation optimizer: batch has " + std::to_string(X.cols) +
                " channels, expected " + std::to_string(n_q_heads_ * head_dim_));
  // The loss is a mean over a head's rows, so weight by the group size to get the sum over the
  // group's query heads.
  const float group = float(n_q_heads_ / heads());
  float total = 0;
  for (int64_t h = 0; h < heads(); ++h) total += opts_[size_t(h)].step(head_rows(X, h), group);
  return total;
}

Matrix BatchedRotationOptimizer::head_rows(const Matrix& X, int64_t h) const {
  const int64_t group = n_q_heads_ / heads(), T = X.rows, d = head_dim_;
  Matrix Xh(T * group, d);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < T; ++t) {
      const float* src = X.row(t) + (h * group + g) * d;
      std::copy(src, src + d, Xh.row(g * T + t));
    }
  if (rms_normalize_) rmsnorm(Xh, nullptr, 1e-12f);  // an all-zero slice stays zero
  return Xh;
}

std::vector<Matrix> BatchedRotationOptimizer::rotations() const {
  std::vector<Matrix> r;
  for (const auto& o : opts_) r.push_back(o.rotation());
  return r;
}

}  // namespace dq
