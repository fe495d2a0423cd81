#include "model/layerwise.h"

#include <algorithm>
#include <cstring>

#include "io/file.h"

namespace dq {

LayerActivations::LayerActivations(const Model& m, const std::vector<int32_t>& tokens, int windows, int len)
    : windows_(windows), len_(len), cols_(m.config.hidden_size) {
  if (windows < 1 || len < 1 || tokens.size() != size_t(windows) * size_t(len))
    throw Error("calibration: " + std::to_string(tokens.size()) + " tokens are not " + std::to_string(windows) +
                " windows of " + std::to_string(len));
  x_.resize(tokens.size() * size_t(cols_));
  const int64_t per = std::max(1, 8192 / len_);
  for (int64_t w0 = 0; w0 < windows_; w0 += per) {
    const int64_t b = std::min<int64_t>(per, windows_ - w0);
    std::vector<int32_t> part(tokens.begin() + w0 * len_, tokens.begin() + (w0 + b) * len_);
    const Matrix e = embed(m, part);
    uint16_t* dst = x_.data() + size_t(w0 * len_ * cols_);
    for (size_t i = 0; i < e.size(); ++i) dst[i] = f32_to_bf16(e.data[i]);
  }
}

// Converts a few windows at a time (8192 tokens: bounded memory) to f32 and hands them to f.
template <class F>
void LayerActivations::for_chunks(bool store_back, F f) {
  const int per = std::max(1, 8192 / len_);
  for (int w0 = 0; w0 < windows_; w0 += per) {
    const int b = std::min(per, windows_ - w0);
    Matrix part(int64_t(b) * len_, cols_);
    uint16_t* src = x_.data() + size_t(int64_t(w0) * len_ * cols_);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < int64_t(part.size()); ++i) part.data[size_t(i)] = bf16_to_f32(src[i]);
    f(part, b);
    if (!store_back) continue;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < int64_t(part.size()); ++i) src[i] = f32_to_bf16(part.data[size_t(i)]);
  }
}

void LayerActivations::run(const ModelConfig& c, const LayerWeights& w, int layer, const Hooks& hooks,
                           bool advance) {
  for_chunks(advance, [&](Matrix& part, int b) { layer_forward(c, w, layer, part, b, len_, hooks); });
}

void LayerActivations::transform(const std::function<void(Matrix&)>& f) {
  for_chunks(true, [&](Matrix& part, int) { f(part); });
}

void LayerActivations::save(const std::string& path) const {
  write_file_atomic(path, [&](OutStream& out) { out.write(x_.data(), x_.size() * sizeof(uint16_t)); });
}

void LayerActivations::load(const std::string& path) {
  const MappedFile f(path);
  if (f.size() != x_.size() * sizeof(uint16_t))
    throw Error(path + ": holds " + std::to_string(f.size()) + " bytes of activations, expected " +
                std::to_string(x_.size() * sizeof(uint16_t)));
  if (f.size() > 0) std::memcpy(x_.data(), f.data(), f.size());
}

}  // namespace dq
