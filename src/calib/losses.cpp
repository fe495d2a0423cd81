#include "calib/losses.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tensor/kernels.h"

namespace dq {

LossKind loss_from_name(const std::string& name) {
  if (name == "whip") return LossKind::Whip;
  if (name == "variance") return LossKind::Variance;
  if (name == "kurtosis") return LossKind::Kurtosis;
  if (name == "quant") return LossKind::Quant;
  throw Error("unknown loss '" + name + "' (expected whip, variance, kurtosis or quant)");
}

const char* loss_name(LossKind k) {
  switch (k) {
    case LossKind::Whip: return "whip";
    case LossKind::Variance: return "variance";
    case LossKind::Kurtosis: return "kurtosis";
    case LossKind::Quant: return "quant";
  }
  return "?";
}

namespace {

// Runs per_token(o, g, C) -> token loss for every row in parallel; g is null when no gradient
// is wanted, else the row of grad to fill (before the 1/T factor, applied here).
template <class F>
float mean_over_tokens(const Matrix& O, Matrix* grad, F per_token) {
  const int64_t T = O.rows, C = O.cols;
  if (T == 0) throw Error("loss: empty batch");
  if (grad && (grad->rows != T || grad->cols != C)) *grad = Matrix(T, C);
  const float invT = 1.f / float(T);
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t t = 0; t < T; ++t) {
    float* g = grad ? grad->row(t) : nullptr;
    total += per_token(O.row(t), g, C);
    if (g)
      for (int64_t c = 0; c < C; ++c) g[c] *= invT;
  }
  return float(total / double(T));
}

}  // namespace

float whip_loss(const Matrix& O, Matrix* grad) {
  // The per-channel loop is branch-free (exp_nonpositive, selects) so that it vectorises: the
  // exponentials are most of this pass.
  return mean_over_tokens(O, grad, [](const float* o, float* g, int64_t C) {
    double s = 0;
    if (g) {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) {
        const float e = exp_nonpositive(-std::abs(o[c]));
        s += double(e);
        g[c] = o[c] > 0 ? -e : (o[c] < 0 ? e : 0.f);
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += double(exp_nonpositive(-std::abs(o[c])));
    }
    return s;
  });
}

float variance_loss(const Matrix& O, Matrix* grad) {
  return mean_over_tokens(O, grad, [](const float* o, float* g, int64_t C) {
    double mu = 0, s2 = 0;
    for (int64_t c = 0; c < C; ++c) mu += o[c];
    mu /= double(C);
    for (int64_t c = 0; c < C; ++c) s2 += (o[c] - mu) * (o[c] - mu);
    if (g)
      for (int64_t c = 0; c < C; ++c) g[c] = float(2.0 * (o[c] - mu) / double(C));
    return s2 / double(C);
  });
}

float kurtosis_loss(const Matrix& O, Matrix* grad) {
  return mean_over_tokens(O, grad, [](const float* o, float* g, int64_t C) {
    double mu = 0, s2 = 0, s3 = 0, s4 = 0;
    for (int64_t c = 0; c < C; ++c) mu += o[c];
    mu /= double(C);
    for (int64_t c = 0; c < C; ++c) {
      double d = o[c] - mu, d2 = d * d;
      s2 += d2, s3 += d2 * d, s4 += d2 * d2;
    }
    if (s2 == 0) {
      if (g) std::fill(g, g + C, 0.f);
      return 0.0;
    }
    // k = C·S4/S2²; dS4/do_c = 4(d_c³ − mean d³) (μ depends on o), dS2/do_c = 2 d_c.
    const double k = double(C) * s4 / (s2 * s2), m3 = s3 / double(C);
    if (g)
      for (int64_t c = 0; c < C; ++c) {
        double d = o[c] - mu;
        g[c] = float(double(C) / (s2 * s2) * 4.0 * (d * d * d - m3) - k / s2 * 4.0 * d);
      }
    return k;
  });
}

float quant_loss(const Matrix& O, Matrix* grad, int bits, float clip) {
  if (bits < 1 || bits > 16) throw Error("quant loss: bits must be in [1, 16]");
  const double Q = double((1 << bits) - 1);
  return mean_over_tokens(O, grad, [&](const float* o, float* g, int64_t C) {
    int64_t imax = 0, imin = 0;
    for (int64_t c = 1; c < C; ++c) {
      if (o[c] > o[imax]) imax = c;
      if (o[c] < o[imin]) imin = c;
    }
    // The range always contains 0 so that 0 is exactly representable.
    const double hi = clip * std::max(double(o[imax]), 0.0), lo = clip * std::min(double(o[imin]), 0.0);
    const double s = (hi - lo) / Q;
    if (s == 0) {
      if (g) std::fill(g, g + C, 0.f);
      return 0.0;
    }
    const double z = std::round(-lo / s);
    double loss = 0, dLds = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double u = std::round(o[c] / s + z), q = std::clamp(u, 0.0, Q);
      const double e = (q - z) * s - o[c];
      loss += e * e;
      const bool inside = u == q;
      // STE: d deq/d o = 1 inside (0 when clamped); d deq/d s = (q − z) − o/s inside, (q − z)
      // when clamped.
      dLds += 2 * e * ((q - z) - (inside ? o[c] / s : 0.0));
      if (g) g[c] = inside ? 0.f : float(-2 * e);
    }
    if (g) {
      if (o[imax] > 0) g[imax] += float(dLds * clip / Q);
      if (o[imin] < 0) g[imin] -= float(dLds * clip / Q);
    }
    return loss;
  });
}

float loss_and_grad(LossKind kind, const Matrix& O, Matrix* grad) {
  switch (kind) {
    case LossKind::Whip: return whip_loss(O, grad);
    case LossKind::Variance: return variance_loss(O, grad);
    case LossKind::Kurtosis: return kurtosis_loss(O, grad);
    case LossKind::Quant: return quant_loss(O, grad);
  }
  throw Error("loss: unknown kind");
}

}  // namespace dq
