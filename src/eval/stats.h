// Activation statistics at the linear-layer inputs (q/k/v, o_proj, gate/up, down_proj), gathered by
// a forward-pass hook in one streaming pass: moments, max |x|, the outlier fraction, the 4-bit
// per-token quantization error, and fixed-bin histograms for a few layers. Comparing the same
// statistics for the unrotated, random-Hadamard and learned models shows what a rotation does to
// the distributions (the paper's Table 19 and histogram figures).
//
// Definitions (the JSON repeats them so a report is self-describing):
// - mean, variance, kurtosis: pooled over every element of the site (all tokens, all channels);
//   kurtosis is Pearson's m4 / m2² (Gaussian 3, Laplace 6, uniform 1.8).
// - outlier fraction: elements with |x| > 4 · RMS of their own token row. A token's RMS is
//   unchanged by a rotation of its row, so the threshold is the same for every variant.
// - quantization error: Σ(q(x) − x)² / Σx² with q = 4-bit asymmetric per-token fake quantization
//   (clip 0.9, as the W4A4 pipeline quantizes activations).
// - histograms: values in units of their token's RMS, fixed linear bins over [−B, B] with
//   B = clamp(ceil(√channels), 4, 64) (|x| / RMS can never exceed √channels); values outside land
//   in the edge bins.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/forward.h"
#include "quant/quantizer.h"

namespace dq {

// Streaming central moments (count, mean, M2..M4), merged batch by batch with the pairwise update
// formulas so a large mean does not cancel the higher moments.
struct Moments {
  int64_t n = 0;
  double mean = 0, m2 = 0, m3 = 0, m4 = 0;  // m_k = Σ (x − mean)^k
  void add(const float* x, int64_t count);
  void merge(const Moments& o);
  double variance() const { return n ? m2 / double(n) : 0; }
  double kurtosis() const { return m2 > 0 ? double(n) * m4 / (m2 * m2) : 0; }
};

struct SiteStats {
  Moments moments;
  double max_abs = 0;
  int64_t outliers = 0;
  double qerr = 0, energy = 0;  // Σ(q(x) − x)², Σx²
  double hist_bound = 0;        // B; 0 when no histogram is kept
  std::vector<double> hist;     // counts per bin

  double outlier_fraction() const { return moments.n ? double(outliers) / double(moments.n) : 0; }
  double quant_rel_mse() const { return energy > 0 ? qerr / energy : 0; }
  // Adds every row of x (tokens × channels).
  void add(const Matrix& x, const QuantSpec& q);
  nlohmann::json to_json() const;  // without the histogram
};

struct StatsOptions {
  std::vector<Site> sites = {Site::AttnIn, Site::OprojIn, Site::MlpIn, Site::DownIn};
  std::vector<int> hist_layers;  // layers whose histograms are kept
  int bins = 120;
  QuantSpec quant;
  StatsOptions() {
    quant.bits = 4;
    quant.symmetric = false;
    quant.clip_ratio = 0.9f;
  }
};

// Accumulates SiteStats for every layer at the chosen sites; put it after any hook that rewrites
// the activation (an online Hadamard) so it sees what the linear layer sees.
class StatsHook : public Hook {
 public:
  StatsHook(const ModelConfig& c, const StatsOptions& o);
  void at(Site site, int layer, Matrix& x) override;
  const SiteStats& get(int layer, Site site) const;
  const StatsOptions& options() const { return o_; }
  int num_layers() const { return layers_; }

 private:
  StatsOptions o_;
  int layers_;
  std::vector<SiteStats> s_;  // [layer][site index]
  int index(Site site) const;
};

// Runs the forward pass over windows × len tokens (a few windows per batch) with `pre` hooks first,
// then the statistics hook.
void collect_stats(const Model& m, const std::vector<int32_t>& tokens, int windows, int len,
                   const Hooks& pre, StatsHook& stats);

// The stats report: {"definitions", "variants": [names], "layers", "sites": [names],
// "table": [{layer, site, <variant>: {mean, variance, kurtosis, max_abs, outlier_fraction,
// quant_rel_mse, count}}], "histograms": [{layer, site, bound, bins, <variant>: [counts]}]}.
// All hooks must come from the same model and options.
nlohmann::json stats_to_json(const std::vector<std::string>& variants,
                             const std::vector<const StatsHook*>& hooks);

}  // namespace dq
