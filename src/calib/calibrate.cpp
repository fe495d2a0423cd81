#include "calib/calibrate.h"

#include "io/file.h"
#include "io/report.h"
#include "model/layerwise.h"
#include "quant/quantizer.h"
#include "tensor/kernels.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <chrono>
#include <memory>
#include <cstdio>
#include <numeric>
#include <random>

namespace dq {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Token vectors kept from one site, stored as bf16 rows: in memory while the shared budget lasts,
// then appended to an unlinked temporary file that is memory-mapped for training. A sample resumed
// from a checkpoint maps the checkpoint's file instead. Each row carries its group (R1: layer and
// site; R2: one group), and finish() computes each group's per-channel mean, which gather()
// subtracts when asked (--center).
class Sample {
 public:
  Sample(int64_t cols, int64_t* budget_left) : cols_(cols), budget_left_(budget_left) {}
  Sample(Sample&& o) noexcept { *this = std::move(o); }
  Sample& operator=(Sample&& o) noexcept {
    std::swap(cols_, o.cols_); std::swap(budget_left_, o.budget_left_); std::swap(mem_, o.mem_);
    std::swap(file_, o.file_); std::swap(file_rows_, o.file_rows_); std::swap(map_, o.map_);
    std::swap(map_bytes_, o.map_bytes_); std::swap(loaded_, o.loaded_); std::swap(group_, o.group_);
    std::swap(mean_, o.mean_); std::swap(mean_share_, o.mean_share_); std::swap(count_, o.count_);
    return *this;
  }
  ~Sample() {
    if (map_) munmap(map_, map_bytes_);
    if (file_) std::fclose(file_);
  }
  int64_t rows() const { return int64_t(mem_.size()) / std::max<int64_t>(cols_, 1) + file_rows_; }
  int64_t spilled_rows() const { return file_rows_; }

  void add(const float* row, uint16_t group) {
    group_.push_back(group);
    std::vector<uint16_t> h(static_cast<size_t>(cols_));
    for (int64_t j = 0; j < cols_; ++j) h[size_t(j)] = f32_to_bf16(row[j]);
    const int64_t bytes = cols_ * 2;
    if (!file_ && *budget_left_ >= bytes) {
      *budget_left_ -= bytes;
      mem_.insert(mem_.end(), h.begin(), h.end());
      return;
    }
    if (!file_ && !(file_ = std::tmpfile())) throw Error("cannot create a temporary file for captured activations");
    if (std::fwrite(h.data(), 2, h.size(), file_) != h.size())
      throw Error(std::string("writing captured activations failed (") + (errno == ENOSPC ? "disk full" : "I/O error") + ")");
    ++file_rows_;
  }

  // Maps the spilled rows and computes the group means; call once capture is over.
  void finish() {
    if (file_ && !map_) {
      if (std::fflush(file_) != 0) throw Error("writing captured activations failed (disk full?)");
      map_bytes_ = size_t(file_rows_ * cols_ * 2);
      void* p = mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fileno(file_), 0);
      if (p == MAP_FAILED) throw Error("cannot map captured activations");
      map_ = p;
    }
    compute_means();
  }

  // Checkpoints: all rows as raw bf16 (after finish()), and a Sample that maps such a file.
  // The rows' groups go to a second file beside them.
  void save(const std::string& path) const {
    write_file_atomic(path, [&](OutStream& out) {
      out.write(mem_.data(), mem_.size() * sizeof(uint16_t));
      out.write(spilled(), size_t(file_rows_ * cols_) * sizeof(uint16_t));
    });
    write_file_atomic(path + ".groups", [&](OutStream& out) { out.write(group_.data(), group_.size() * sizeof(uint16_t)); });
  }
  static Sample mapped(const std::string& path, int64_t cols) {
    Sample s(cols, nullptr);
    s.loaded_ = std::make_unique<MappedFile>(path);
    if (s.loaded_->size() % size_t(cols * 2) != 0) throw Error(path + ": truncated captured activations");
    s.file_rows_ = int64_t(s.loaded_->size()) / (cols * 2);
    const std::string groups = read_file(path + ".groups");
    if (groups.size() != size_t(s.file_rows_) * sizeof(uint16_t)) throw Error(path + ".groups: does not match the activations");
    s.group_.resize(size_t(s.file_rows_));
    std::memcpy(s.group_.data(), groups.data(), groups.size());
    s.compute_means();
    return s;
  }

  // Rows idx[from, from + n), minus their group's mean when center.
  Matrix gather(const std::vector<int64_t>& idx, size_t from, size_t n, bool center = false) const {
    Matrix x(int64_t(n), cols_);
    for (size_t i = 0; i < n; ++i) {
      const int64_t r = idx[from + i];
      const uint16_t* src = row(r);
      float* dst = x.row(int64_t(i));
      for (int64_t j = 0; j < cols_; ++j) dst[j] = bf16_to_f32(src[j]);
      if (center) {
        const std::vector<float>& mu = mean_[group_[size_t(r)]];
        for (int64_t j = 0; j < cols_; ++j) dst[j] -= mu[size_t(j)];
      }
    }
    return x;
  }
  // Per group: ‖mean‖² / mean over rows of ‖row‖², the share of the rows' energy that centring
  // removes (0: zero-mean channels; 1: every row the same vector).
  const std::vector<double>& mean_share() const { return mean_share_; }
  // The mean over all rows, every group pooled.
  std::vector<double> pooled_mean() const {
    std::vector<double> mu(size_t(cols_), 0.0);
    for (size_t g = 0; g < mean_.size(); ++g)
      for (int64_t j = 0; j < cols_; ++j) mu[size_t(j)] += double(mean_[g][size_t(j)]) * count_[g];
    const double n = double(std::max<int64_t>(rows(), 1));
    for (double& v : mu) v /= n;
    return mu;
  }

 private:
  const uint16_t* spilled() const {
    return loaded_ ? reinterpret_cast<const uint16_t*>(loaded_->data()) : static_cast<const uint16_t*>(map_);
  }
  const uint16_t* row(int64_t r) const {
    const int64_t in_mem = int64_t(mem_.size()) / std::max<int64_t>(cols_, 1);
    return r < in_mem ? mem_.data() + r * cols_ : spilled() + (r - in_mem) * cols_;
  }
  void compute_means() {
    size_t groups = 0;
    for (uint16_t g : group_) groups = std::max(groups, size_t(g) + 1);
    std::vector<std::vector<double>> sum(groups, std::vector<double>(size_t(cols_)));
    std::vector<double> energy(groups), count(groups);
    for (int64_t r = 0; r < rows(); ++r) {
      const uint16_t* src = row(r);
      const size_t g = group_[size_t(r)];
      for (int64_t j = 0; j < cols_; ++j) {
        const double v = bf16_to_f32(src[j]);
        sum[g][size_t(j)] += v, energy[g] += v * v;
      }
      count[g] += 1;
    }
    mean_.assign(groups, std::vector<float>(size_t(cols_)));
    count_ = count;
    mean_share_.assign(groups, 0.0);
    for (size_t g = 0; g < groups; ++g) {
      if (count[g] == 0) continue;
      double norm2 = 0;
      for (int64_t j = 0; j < cols_; ++j) {
        const double mu = sum[g][size_t(j)] / count[g];
        mean_[g][size_t(j)] = float(mu), norm2 += mu * mu;
      }
      if (energy[g] > 0) mean_share_[g] = norm2 / (energy[g] / count[g]);
    }
  }
  int64_t cols_ = 0;
  int64_t* budget_left_ = nullptr;
  std::vector<uint16_t> mem_;
  std::FILE* file_ = nullptr;
  int64_t file_rows_ = 0;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::unique_ptr<MappedFile> loaded_;
  std::vector<uint16_t> group_;           // per row
  std::vector<std::vector<float>> mean_;  // per group, per channel
  std::vector<double> mean_share_;        // per group
  std::vector<double> count_;             // rows per group
};

// Keeps each token row with probability `ratio`, seeded, at the R1 sites (pooled) and per layer
// at the o_proj input.
class CaptureHook : public Hook {
 public:
  CaptureHook(const ModelConfig& c, float ratio, uint64_t seed, int64_t budget_bytes)
      : budget_left_(budget_bytes), r1_(c.hidden_size, &budget_left_), ratio_(ratio), rng_(seed) {
    for (int l = 0; l < c.num_layers; ++l) r2_.emplace_back(c.q_dim(), &budget_left_);
  }
  void at(Site site, int layer, Matrix& x) override {
    Sample* s = site == Site::AttnIn || site == Site::MlpIn ? &r1_
                : site == Site::OprojIn                    ? &r2_[size_t(layer)]
                                                           : nullptr;
    if (!s) return;
    const uint16_t group = s == &r1_ ? r1_group(layer, site) : 0;
    std::bernoulli_distribution keep(ratio_);
    for (int64_t r = 0; r < x.rows; ++r)
      if (keep(rng_)) s->add(x.row(r), group);
  }
  static uint16_t r1_group(int layer, Site site) { return uint16_t(2 * layer + (site == Site::MlpIn)); }
  int64_t budget_left_;
  Sample r1_;
  std::vector<Sample> r2_;

 private:
  float ratio_;
  std::mt19937_64 rng_;
};

std::vector<int64_t> all_rows(const Sample& s) {
  std::vector<int64_t> idx(size_t(s.rows()));
  std::iota(idx.begin(), idx.end(), 0);
  return idx;
}

int64_t steps_per_epoch(int64_t rows, int64_t batch_rows) { return std::max<int64_t>(1, (rows + batch_rows - 1) / batch_rows); }

// Epochs of shuffled mini-batches over the sample rows idx; returns the loss curve.
template <class Step>
nlohmann::json train(const Sample& s, std::vector<int64_t> idx, int64_t batch_rows, int epochs, bool center,
                     uint64_t seed, Step step, const std::function<void(int, int)>& progress) {
  nlohmann::json curve = nlohmann::json::array();
  std::mt19937_64 rng(seed);
  const int64_t rows = int64_t(idx.size());
  const int64_t per_epoch = steps_per_epoch(rows, batch_rows);
  auto start = Clock::now();
  int64_t k = 0;
  for (int e = 0; e < epochs; ++e) {
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int64_t b = 0; b < per_epoch; ++b, ++k) {
      size_t from = size_t(b * batch_rows), n = std::min(size_t(batch_rows), idx.size() - from);
      if (n == 0) continue;
      float loss = step(s.gather(idx, from, n, center));
      curve.push_back({{"step", k}, {"epoch", e}, {"loss", loss}, {"seconds", since(start)}});
    }
    if (progress) progress(e + 1, epochs);
  }
  return curve;
}

// Mean loss of the first and of the last epoch of a curve, and its step count.
nlohmann::json curve_summary(const nlohmann::json& curve) {
  const int last = curve.back()["epoch"].get<int>();
  double first_sum = 0, last_sum = 0;
  int first_n = 0, last_n = 0;
  for (const auto& p : curve) {
    const double loss = p["loss"].get<double>();
    if (p["epoch"].get<int>() == 0) first_sum += loss, ++first_n;
    if (p["epoch"].get<int>() == last) last_sum += loss, ++last_n;
  }
  return {{"steps", curve.size()}, {"loss_first_epoch", first_sum / first_n}, {"loss_last_epoch", last_sum / last_n}};
}

// Per head: the mean over held-out tokens of the relative error ‖q(o) − o‖² / ‖o‖² of 4-bit
// per-token asymmetric quantization with clip 0.9 (the o_proj input's activation quantizer) of
// o = x·R, for the initial random Hadamard and the learned R2.
nlohmann::json holdout_report(const Matrix& X, const BatchedRotationOptimizer& learned, const std::vector<Matrix>& R,
                              const std::vector<Matrix>& init) {
  QuantSpec spec;
  spec.bits = 4, spec.symmetric = false, spec.clip_ratio = 0.9f;
  auto error = [&](const Matrix& Xh, const Matrix& R) {
    Matrix O, Q;
    gemm(Xh, false, R, false, O);
    Q = O;
    fake_quantize(Q, spec);
    double sum = 0;
    for (int64_t t = 0; t < O.rows; ++t) {
      double e = 0, n = 0;
      for (int64_t j = 0; j < O.cols; ++j) e += double(Q(t, j) - O(t, j)) * (Q(t, j) - O(t, j)), n += double(O(t, j)) * O(t, j);
      if (n > 0) sum += e / n;
    }
    return sum / double(O.rows);
  };
  nlohmann::json hadamard = nlohmann::json::array(), trained = nlohmann::json::array();
  int wins = 0;
  for (int64_t h = 0; h < learned.heads(); ++h) {
    const Matrix Xh = learned.head_rows(X, h);
    const double a = error(Xh, init[size_t(h)]), b = error(Xh, R[size_t(h)]);
    hadamard.push_back(a), trained.push_back(b);
    wins += b < a;
  }
  return {{"tokens", X.rows}, {"quant_error_hadamard", hadamard}, {"quant_error_learned", trained}, {"learned_wins", wins}};
}

// Checkpoint files: captured token vectors, and the rotations learnt so far (R1, then the R2 of
// the layers done), rewritten after each.
const std::string kR1Sample = "calib-r1-tokens.bin", kRotations = "calib-rotations.safetensors";
std::string r2_sample(int l) { return "calib-r2-tokens-" + std::to_string(l) + ".bin"; }

// One layer-by-layer pass of the FP model with the capture hook: only one layer's fused weights
// exist at a time (in `fused`, a cheap copy of m sharing the mapped tensors); fusing an already
// fused layer changes nothing.
void capture(const Model& m, const std::vector<int32_t>& calib, int windows, int len, CaptureHook& cap,
             const CalibProgress& progress) {
  const ModelConfig& c = m.config;
  Model fused = m;
  LayerActivations x(m, calib, windows, len);
  for (int l = 0; l < c.num_layers; ++l) {
    fuse_layer_norms(fused, l);
    x.run(c, load_layer(fused, l), l, {&cap}, true);
    for (const std::string& name : layer_tensor_names(fused, l)) fused.weights.erase(name);
    release_layer(m, l);
    if (progress) progress("capture", l + 1, c.num_layers);
  }
  cap.r1_.finish();
  for (Sample& s : cap.r2_) s.finish();
}

nlohmann::json capture_report(const CaptureHook& cap) {
  int64_t spilled = cap.r1_.spilled_rows();
  for (const Sample& s : cap.r2_) spilled += s.spilled_rows();
  // How far from zero-mean the captured inputs are (METHOD.md, open question 2): per R1 group
  // (layer, site) and per layer's o_proj input.
  nlohmann::json r1_share = nlohmann::json::array(), r2_share = nlohmann::json::array();
  const std::vector<double>& r1 = cap.r1_.mean_share();
  for (size_t g = 0; g < r1.size(); ++g)
    r1_share.push_back({{"layer", g / 2}, {"site", g % 2 ? "mlp_in" : "attn_in"}, {"mean_share", r1[g]}});
  for (const Sample& s : cap.r2_) r2_share.push_back(s.mean_share().empty() ? 0.0 : s.mean_share()[0]);
  return {{"spilled_rows", spilled},
          {"capture_peak_rss_mib", peak_rss_mib()},
          {"kept_tokens_r1", cap.r1_.rows()},
          {"kept_tokens_r2_per_layer", cap.r2_.empty() ? 0 : cap.r2_[0].rows()},
          {"r1_mean_share", r1_share},
          {"r2_mean_share", r2_share}};
}

}  // namespace

Matrix align_mean_with_ones(const Matrix& R, const std::vector<double>& mean) {
  const int64_t n = R.rows;
  if (int64_t(mean.size()) != n) throw Error("align_mean_with_ones: mean has the wrong size");
  std::vector<double> u(size_t(n), 0.0);  // mean·R, then normalised
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) u[size_t(j)] += mean[size_t(i)] * R(i, j);
  double norm = 0, sum = 0;
  for (double v : u) norm += v * v, sum += v;
  norm = std::sqrt(norm);
  if (!(norm > 0)) return R;
  // Reflect onto ±1/√n, the sign nearer to u (the smaller reflection).
  const double e = (sum >= 0 ? 1.0 : -1.0) / std::sqrt(double(n));
  std::vector<double> v(static_cast<size_t>(n));
  double vv = 0;
  for (int64_t j = 0; j < n; ++j) v[size_t(j)] = u[size_t(j)] / norm - e, vv += v[size_t(j)] * v[size_t(j)];
  if (vv < 1e-20) return R;
  // R·(I − 2vvᵀ/vᵀv) = R − 2(Rv)vᵀ/vᵀv
  Matrix out = R;
  for (int64_t i = 0; i < n; ++i) {
    double rv = 0;
    for (int64_t j = 0; j < n; ++j) rv += double(R(i, j)) * v[size_t(j)];
    for (int64_t j = 0; j < n; ++j) out(i, j) = float(double(R(i, j)) - 2 * rv * v[size_t(j)] / vv);
  }
  return out;
}

void drop_calibration_checkpoint(Checkpoint& ck, const ModelConfig& c) {
  for (const std::string& f : {kR1Sample, kR1Sample + ".groups", kRotations}) ck.remove(f);
  for (int l = 0; l < c.num_layers; ++l) ck.remove(r2_sample(l)), ck.remove(r2_sample(l) + ".groups");
  ck.state().erase("calibration_progress");
}

CalibResult calibrate(const Model& m, const std::vector<int32_t>& calib, int windows, int len,
                      const CalibOptions& o, const CalibProgress& progress, Checkpoint* ck) {
  const ModelConfig& c = m.config;
  if (o.token_ratio <= 0 || o.token_ratio > 1) throw Error("--token-ratio must be in (0, 1]");
  if (o.epochs < 1 || o.batch < 1 || o.r2_epochs < 1 || o.r2_batch < 1)
    throw Error("--epochs, --batch, --r2-epochs and --r2-batch must be positive");
  if (!(o.r2_holdout >= 0 && o.r2_holdout < 1)) throw Error("--r2-holdout must be in [0, 1)");
  CalibResult res;
  CaptureHook cap(c, o.token_ratio, o.seed, int64_t(o.memory_mib) << 20);
  nlohmann::json* saved = ck ? &ck->state()["calibration_progress"] : nullptr;
  if (saved && saved->contains("report")) {
    res.report = (*saved)["report"];
    cap.r1_ = Sample::mapped(ck->file(kR1Sample), c.hidden_size);
    for (int l = 0; l < c.num_layers; ++l) cap.r2_[size_t(l)] = Sample::mapped(ck->file(r2_sample(l)), c.q_dim());
  } else {
    auto t0 = Clock::now();
    const double cpu0 = process_cpu_seconds();
    capture(m, calib, windows, len, cap, progress);
    res.report = capture_report(cap);
    res.report["capture_seconds"] = since(t0);
    res.report["capture_cpu_seconds"] = process_cpu_seconds() - cpu0;
    if (ck) {
      cap.r1_.save(ck->file(kR1Sample));
      for (int l = 0; l < c.num_layers; ++l) cap.r2_[size_t(l)].save(ck->file(r2_sample(l)));
      (*saved)["report"] = res.report;
      ck->save("capture");
    }
  }
  if (cap.r1_.rows() == 0) throw Error("no token vectors were kept; raise --token-ratio or --nsamples");

  const int64_t batch_rows = std::max<int64_t>(1, int64_t(double(o.batch) * len * o.token_ratio));
  res.report["batch_rows"] = batch_rows;
  Rotations init = random_hadamard_rotations(c, o.seed);  // DartQuant starts from a random Hadamard
  if (res.report.contains("r1_curve")) {
    const int r2_done = int(res.report.value("r2_curves", nlohmann::json::array()).size());
    res.rotations = load_rotations(ck->file(kRotations), c, r2_done);
  } else {
    auto t1 = Clock::now();
    const double cpu1 = process_cpu_seconds();
    OrthOptions r1_options = o.r1;
    r1_options.total_steps = o.epochs * steps_per_epoch(cap.r1_.rows(), batch_rows);  // for --cosine
    RotationOptimizer r1(init.r1, r1_options);
    res.report["r1_curve"] = train(cap.r1_, all_rows(cap.r1_), batch_rows, o.epochs, o.center, o.seed + 1,
                                   [&](const Matrix& x) { return r1.step(x); },
                                   [&](int e, int n) { if (progress) progress("R1", e, n); });
    res.rotations.r1 = o.align_mean ? align_mean_with_ones(r1.rotation(), cap.r1_.pooled_mean()) : r1.rotation();
    res.report["r1_seconds"] = since(t1);
    res.report["r1_cpu_seconds"] = process_cpu_seconds() - cpu1;
    res.report["r1_peak_rss_mib"] = peak_rss_mib();
    if (ck) {
      save_rotations(ck->file(kRotations), res.rotations);
      (*saved)["report"] = res.report;
      ck->save("r1");
    }
  }

  auto t2 = Clock::now();
  const double cpu2 = process_cpu_seconds();
  const int64_t r2_batch_rows = std::max<int64_t>(1, int64_t(double(o.r2_batch) * len * o.token_ratio));
  res.report["r2_batch_rows"] = r2_batch_rows;
  for (const char* key : {"r2_curves", "r2_layers"})
    if (!res.report.contains(key)) res.report[key] = nlohmann::json::array();
  for (int l = int(res.rotations.r2.size()); l < c.num_layers; ++l) {
    const Sample& sample = cap.r2_[size_t(l)];
    // A seeded split: the first (1 − r2_holdout) of a shuffled row order trains, the rest is held out.
    std::vector<int64_t> rows = all_rows(sample);
    std::mt19937_64 split_rng(o.seed + 1000 + uint64_t(l));
    if (o.r2_holdout > 0) std::shuffle(rows.begin(), rows.end(), split_rng);
    const size_t held = size_t(double(rows.size()) * o.r2_holdout);
    std::vector<int64_t> held_rows(rows.end() - std::ptrdiff_t(held), rows.end());
    rows.resize(rows.size() - held);
    if (rows.empty()) throw Error("no R2 token vectors left to train on; lower --r2-holdout");
    OrthOptions r2_options = o.r2;
    r2_options.total_steps = o.r2_epochs * steps_per_epoch(int64_t(rows.size()), r2_batch_rows);
    BatchedRotationOptimizer r2(init.r2[size_t(l)], c.num_heads, r2_options, o.r2_rms_norm);
    nlohmann::json curve = train(sample, rows, r2_batch_rows, o.r2_epochs, o.center, o.seed + 2 + uint64_t(l),
                                 [&](const Matrix& x) { return r2.step(x); }, nullptr);
    nlohmann::json layer = curve_summary(curve);
    layer["layer"] = l;
    std::vector<Matrix> learned = r2.rotations();
    if (o.align_mean) {
      // Per KV head: the mean of its query heads' slices (what its rows pool).
      const std::vector<double> mu = sample.pooled_mean();
      const int64_t d = c.head_dim, group = c.num_heads / int64_t(learned.size());
      for (size_t h = 0; h < learned.size(); ++h) {
        std::vector<double> head_mu(size_t(d), 0.0);
        for (int64_t g = 0; g < group; ++g)
          for (int64_t j = 0; j < d; ++j) head_mu[size_t(j)] += mu[size_t((int64_t(h) * group + g) * d + j)] / double(group);
        learned[h] = align_mean_with_ones(learned[h], head_mu);
      }
    }
    if (!held_rows.empty())
      layer["holdout"] = holdout_report(sample.gather(held_rows, 0, held_rows.size()), r2, learned, init.r2[size_t(l)]);
    res.report["r2_curves"].push_back(std::move(curve));
    res.report["r2_layers"].push_back(std::move(layer));
    res.rotations.r2.push_back(std::move(learned));
    if (ck) {
      save_rotations(ck->file(kRotations), res.rotations);
      (*saved)["report"] = res.report;
      ck->save("r2-" + std::to_string(l));
    }
    if (progress) progress("R2", l + 1, c.num_layers);
  }
  res.report["r2_seconds"] = since(t2);
  res.report["r2_cpu_seconds"] = process_cpu_seconds() - cpu2;
  if (o.r2_holdout > 0) {
    int wins = 0, heads = 0;
    for (const auto& layer : res.report["r2_layers"])
      if (layer.contains("holdout"))
        wins += layer["holdout"]["learned_wins"].get<int>(), heads += int(layer["holdout"]["quant_error_learned"].size());
    res.report["r2_holdout_learned_wins"] = wins;
    res.report["r2_holdout_heads"] = heads;
  }
  res.report["r2_peak_rss_mib"] = peak_rss_mib();
  return res;
}

}  // namespace dq
