#include "eval/stats.h"

#include <algorithm>
#include <cmath>

namespace dq {

void Moments::add(const float* x, int64_t count) {
  if (count <= 0) return;
  Moments b;
  b.n = count;
  double s = 0;
  for (int64_t i = 0; i < count; ++i) s += x[i];
  b.mean = s / double(count);
  for (int64_t i = 0; i < count; ++i) {
    double d = x[i] - b.mean, d2 = d * d;
    b.m2 += d2;
    b.m3 += d2 * d;
    b.m4 += d2 * d2;
  }
  merge(b);
}

void Moments::merge(const Moments& b) {
  if (b.n == 0) return;
  if (n == 0) {
    *this = b;
    return;
  }
  const double na = double(n), nb = double(b.n), nn = na + nb;
  const double d = b.mean - mean, d2 = d * d;
  const double m2n = m2 + b.m2 + d2 * na * nb / nn;
  const double m3n = m3 + b.m3 + d2 * d * na * nb * (na - nb) / (nn * nn) + 3 * d * (na * b.m2 - nb * m2) / nn;
  const double m4n = m4 + b.m4 + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / (nn * nn * nn) +
                     6 * d2 * (na * na * b.m2 + nb * nb * m2) / (nn * nn) + 4 * d * (na * b.m3 - nb * m3) / nn;
  mean += d * nb / nn;
  m2 = m2n;
  m3 = m3n;
  m4 = m4n;
  n += b.n;
}

void SiteStats::add(const Matrix& x, const QuantSpec& q) {
  moments.add(x.data.data(), int64_t(x.size()));
  Matrix fq = x;
  fake_quantize(fq, q);
  const int64_t bins = int64_t(hist.size());
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* row = x.row(r);
    const float* qrow = fq.row(r);
    double ss = 0;
    for (int64_t j = 0; j < x.cols; ++j) {
      const double v = row[j], e = qrow[j] - v;
      ss += v * v;
      qerr += e * e;
      max_abs = std::max(max_abs, std::abs(v));
    }
    energy += ss;
    const double rms = std::sqrt(ss / double(x.cols));
    if (rms == 0) continue;  // an all-zero row has no outliers and nothing to place in the histogram
    for (int64_t j = 0; j < x.cols; ++j) {
      const double u = row[j] / rms;
      if (std::abs(u) > 4) ++outliers;
      if (bins) {
        int64_t b = int64_t(std::floor((u + hist_bound) / (2 * hist_bound) * double(bins)));
        hist[size_t(std::clamp<int64_t>(b, 0, bins - 1))] += 1;
      }
    }
  }
}

nlohmann::json SiteStats::to_json() const {
  return {{"mean", moments.mean},          {"variance", moments.variance()},
          {"kurtosis", moments.kurtosis()}, {"max_abs", max_abs},
          {"outlier_fraction", outlier_fraction()}, {"quant_rel_mse", quant_rel_mse()},
          {"count", moments.n}};
}

StatsHook::StatsHook(const ModelConfig& c, const StatsOptions& o)
    : o_(o), layers_(c.num_layers), s_(size_t(c.num_layers) * o.sites.size()) {
  o_.quant.validate();
  for (int l : o_.hist_layers) {
    if (l < 0 || l >= layers_) throw Error("histogram layer " + std::to_string(l) + " is not in 0.." +
                                           std::to_string(layers_ - 1));
    for (Site s : o_.sites) {
      const int cols = s == Site::DownIn ? c.intermediate_size : s == Site::OprojIn ? c.q_dim() : c.hidden_size;
      SiteStats& st = s_[size_t(l) * o_.sites.size() + size_t(index(s))];
      st.hist_bound = std::clamp(std::ceil(std::sqrt(double(cols))), 4.0, 64.0);
      st.hist.assign(size_t(o_.bins), 0);
    }
  }
}

int StatsHook::index(Site site) const {
  auto it = std::find(o_.sites.begin(), o_.sites.end(), site);
  return it == o_.sites.end() ? -1 : int(it - o_.sites.begin());
}

void StatsHook::at(Site site, int layer, Matrix& x) {
  const int i = index(site);
  if (i < 0 || layer < 0) return;
  s_[size_t(layer) * o_.sites.size() + size_t(i)].add(x, o_.quant);
}

const SiteStats& StatsHook::get(int layer, Site site) const {
  const int i = index(site);
  if (i < 0 || layer < 0 || layer >= layers_) throw Error("no statistics for that layer and site");
  return s_[size_t(layer) * o_.sites.size() + size_t(i)];
}

void collect_stats(const Model& m, const std::vector<int32_t>& tokens, int windows, int len,
                   const Hooks& pre, StatsHook& stats) {
  Hooks hooks = pre;
  hooks.push_back(&stats);
  const int per = std::max(1, 8192 / len);  // bounds the activation memory of one pass
  for (int w0 = 0; w0 < windows; w0 += per) {
    const int b = std::min(per, windows - w0);
    std::vector<int32_t> toks(tokens.begin() + int64_t(w0) * len, tokens.begin() + int64_t(w0 + b) * len);
    forward(m, toks, b, len, hooks);
  }
}

nlohmann::json stats_to_json(const std::vector<std::string>& variants,
                             const std::vector<const StatsHook*>& hooks) {
  if (hooks.empty() || hooks.size() != variants.size()) throw Error("stats_to_json: one hook per variant");
  const StatsOptions& o = hooks[0]->options();
  nlohmann::json j;
  j["definitions"] = {
      {"kurtosis", "Pearson m4/m2^2 pooled over all elements of the site (Gaussian 3)"},
      {"outlier_fraction", "fraction of elements with |x| > 4 * RMS of their token"},
      {"quant_rel_mse", "sum (q(x)-x)^2 / sum x^2, per-token fake quantization as in \"quant\""},
      {"histogram", "x / RMS of its token, linear bins over [-bound, bound], edges clamp"}};
  j["quant"] = {{"bits", o.quant.bits}, {"symmetric", o.quant.symmetric}, {"clip_ratio", o.quant.clip_ratio},
                {"granularity", "per token"}};
  j["variants"] = variants;
  j["layers"] = hooks[0]->num_layers();
  j["sites"] = nlohmann::json::array();
  for (Site s : o.sites) j["sites"].push_back(site_name(s));
  j["table"] = nlohmann::json::array();
  j["histograms"] = nlohmann::json::array();
  for (int l = 0; l < hooks[0]->num_layers(); ++l)
    for (Site s : o.sites) {
      nlohmann::json row = {{"layer", l}, {"site", site_name(s)}};
      for (size_t v = 0; v < variants.size(); ++v) row[variants[v]] = hooks[v]->get(l, s).to_json();
      j["table"].push_back(row);
      const SiteStats& first = hooks[0]->get(l, s);
      if (first.hist.empty()) continue;
      nlohmann::json h = {{"layer", l}, {"site", site_name(s)}, {"bound", first.hist_bound},
                          {"bins", first.hist.size()}};
      for (size_t v = 0; v < variants.size(); ++v) h[variants[v]] = hooks[v]->get(l, s).hist;
      j["histograms"].push_back(h);
    }
  return j;
}

}  // namespace dq
