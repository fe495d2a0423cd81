#include "model/weights.h"

#include <algorithm>

namespace dq {

void Weights::add_file(std::shared_ptr<const SafetensorsFile> file) {
  for (const auto& [name, info] : file->tensors()) {
    auto [it, fresh] = entries_.try_emplace(name, Entry{file, &info, nullptr});
    if (!fresh)  // one tensor in two shards: which one the model would use is not for us to guess
      throw Error(file->file().path() + ": tensor '" + name + "' is also in " +
                  (it->second.file ? it->second.file->file().path() : std::string("another file")));
  }
}

const Weights::Entry& Weights::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error("missing weight '" + name + "'");
  return it->second;
}

Matrix Weights::get(const std::string& name, bool* all_finite) const {
  const Entry& e = entry(name);
  bool finite;
  Matrix m;
  if (e.owned) {
    m = Matrix(e.owned->rows, e.owned->cols);
    finite = convert_to_f32(DType::F32, e.owned->data.data(), m.size(), m.data.data());
  } else {
    const TensorInfo& t = *e.info;
    if (t.shape.empty() || t.shape.size() > 2)
      throw Error(e.file->file().path() + ": tensor '" + name + "' is not 1-D or 2-D");
    m = Matrix(t.shape.size() == 1 ? 1 : t.shape[0], t.shape.back());
    try {
      finite = convert_to_f32(t.dtype, t.data, m.size(), m.data.data());
    } catch (const Error& err) {
      throw Error(e.file->file().path() + ": tensor '" + name + "': " + err.what());
    }
  }
  if (all_finite) *all_finite = finite;
  return m;
}

Matrix Weights::get_rows(const std::string& name, int64_t row0, int64_t n) const {
  const Entry& e = entry(name);
  const std::vector<int64_t> s = shape(name);
  if (s.size() != 2 || row0 < 0 || n < 0 || row0 + n > s[0])
    throw Error("weight '" + name + "': rows [" + std::to_string(row0) + ", " + std::to_string(row0 + n) +
                ") out of range");
  Matrix m(n, s[1]);
  if (e.owned) {
    std::copy_n(e.owned->row(row0), m.size(), m.data.data());
    return m;
  }
  const TensorInfo& t = *e.info;
  try {
    convert_to_f32(t.dtype, t.data + size_t(row0 * s[1]) * dtype_size(t.dtype), m.size(), m.data.data());
  } catch (const Error& err) {
    throw Error(e.file->file().path() + ": tensor '" + name + "': " + err.what());
  }
  return m;
}

std::vector<int64_t> Weights::shape(const std::string& name) const {
  const Entry& e = entry(name);
  if (e.owned) return e.owned->rows == 1 ? std::vector<int64_t>{e.owned->cols}
                                        : std::vector<int64_t>{e.owned->rows, e.owned->cols};
  return e.info->shape;
}

DType Weights::stored_dtype(const std::string& name) const {
  const Entry& e = entry(name);
  return e.owned ? DType::F32 : e.info->dtype;
}

Weights::View Weights::view(const std::string& name) const {
  const Entry& e = entry(name);
  const std::vector<int64_t> s = shape(name);
  if (s.size() != 2) throw Error("weight '" + name + "' is not 2-D");
  if (e.owned) return {DType::F32, e.owned->data.data(), s[0], s[1]};
  return {e.info->dtype, e.info->data, s[0], s[1]};
}

void Weights::set(const std::string& name, Matrix m) {
  entries_[name] = Entry{nullptr, nullptr, std::make_shared<const Matrix>(std::move(m))};
}

void Weights::release(const std::string& name) const {
  auto it = entries_.find(name);
  if (it != entries_.end() && it->second.file)
    it->second.file->file().release(it->second.info->offset, it->second.info->nbytes);
}

std::vector<std::string> Weights::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

std::shared_ptr<const PackedLinear> Weights::packed(const std::string& name) const {
  auto it = packed_.find(name);
  return it == packed_.end() ? nullptr : it->second;
}

std::string layer_name(int layer, const std::string& suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}

}  // namespace dq
