#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io/half.h"
#include "io/json_limits.h"
#include "io/printable.h"

namespace dq {

using json = nlohmann::json;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const size_t size = file_.size();
  if (size < 8) throw Error(path + ": truncated safetensors file (no header length)");
  uint64_t header_len;
  std::memcpy(&header_len, file_.data(), 8);
  if (header_len > size - 8) throw Error(path + ": header length " + std::to_string(header_len) + " exceeds file size");
  if (header_len > (100u << 20)) throw Error(path + ": header larger than 100 MB");
  const std::string_view text(reinterpret_cast<const char*>(file_.data()) + 8, header_len);
  if (text.empty() || text[0] != '{') throw Error(path + ": not a safetensors file (header is not a JSON object)");
  const json header = parse_json_strict(text, path + ": safetensors header");
  if (!header.is_object()) throw Error(path + ": safetensors header is not a JSON object");
  const size_t data_start = 8 + header_len, data_len = size - data_start;
  for (auto& [key, v] : header.items()) {
    const std::string name = printable(key);
    if (key == "__metadata__") {
      if (!v.is_object()) throw Error(path + ": __metadata__ is not a JSON object");
      for (auto& [k, s] : v.items()) {
        if (!s.is_string()) throw Error(path + ": __metadata__ value of '" + printable(k) + "' is not a string");
        metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets") ||
        !v["dtype"].is_string() || !v["shape"].is_array() || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      throw Error(path + ": malformed entry for tensor '" + name + "'");
    TensorInfo t;
    try {
      t.dtype = dtype_from_name(v["dtype"].get<std::string>());
    } catch (const Error& e) {
      throw Error(path + ": tensor '" + name + "': " + e.what());
    }
    // Sizes are checked as they are multiplied so no product can overflow.
    uint64_t numel = 1;
    for (auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw Error(path + ": tensor '" + name + "' has an invalid shape");
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (uint64_t(1) << 48) / dim)
        throw Error(path + ": tensor '" + name + "' claims an absurd size");
      numel *= dim;
      t.shape.push_back(int64_t(dim));
    }
    auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Error(path + ": tensor '" + name + "' has invalid data_offsets");
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_len)
      throw Error(path + ": tensor '" + name + "' data offsets [" + std::to_string(begin) + ", " +
                  std::to_string(end) + ") lie past the end of the file");
    if (end - begin != numel * dtype_size(t.dtype))
      throw Error(path + ": tensor '" + name + "' byte size does not match its shape and dtype");
    t.offset = data_start + begin;
    t.nbytes = end - begin;
    t.data = file_.data() + t.offset;
    // Readers convert in place from the map: each tensor must start on a multiple of its element size.
    if (t.offset % dtype_size(t.dtype) != 0)
      throw Error(path + ": tensor '" + name + "' data is not aligned to its " + dtype_name(t.dtype) + " elements");
    tensors_[key] = std::move(t);
  }
  // safetensors' own rule: the data ranges tile the byte buffer, no gaps, no overlaps (a gap could
  // hide other content; an overlap makes two tensors share bytes).
  std::vector<std::pair<size_t, const std::string*>> by_offset;
  for (const auto& [name, t] : tensors_) by_offset.push_back({t.offset, &name});
  std::sort(by_offset.begin(), by_offset.end(), [&](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : tensors_.at(*a.second).nbytes < tensors_.at(*b.second).nbytes;
  });
  size_t next = data_start;
  for (const auto& [offset, name] : by_offset) {
    if (offset != next)
      throw Error(path + ": tensor '" + printable(*name) + "' data " + (offset < next ? "overlaps the tensor before it" :
                  "leaves a gap after the tensor before it") + " (safetensors data ranges must tile the buffer)");
    next = offset + tensors_.at(*name).nbytes;
  }
  if (next != size)
    throw Error(path + ": " + std::to_string(size - next) + " bytes after the last tensor's data");
}

const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(file_.path() + ": missing tensor '" + name + "'");
  return it->second;
}

TensorBlob blob_from_matrix(const std::string& name, const Matrix& m, DType dtype,
                            std::vector<int64_t> shape) {
  TensorBlob b{name, dtype, shape.empty() ? std::vector<int64_t>{m.rows, m.cols} : std::move(shape), {}};
  b.bytes.resize(m.size() * dtype_size(dtype));
  switch (dtype) {
    case DType::F32: std::memcpy(b.bytes.data(), m.data.data(), b.bytes.size()); break;
    case DType::BF16:
    case DType::F16:
      try {
        encode_16bit(dtype, m.data.data(), m.size(), reinterpret_cast<uint16_t*>(b.bytes.data()));
      } catch (const Error& e) {
        throw Error("tensor '" + name + "': " + e.what());
      }
      break;
    default: throw Error(std::string("cannot store a matrix as ") + dtype_name(dtype));
  }
  return b;
}

std::string safetensors_prefix(const std::vector<TensorLayout>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  uint64_t n = h.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + h;
}

double safetensors_size(const std::string& prefix, const std::vector<TensorLayout>& layout) {
  double n = double(prefix.size());
  for (const TensorLayout& t : layout) n += double(t.nbytes);
  return n;
}

// Where the file resumes after k tensors; first checks that what remains fits on the disk.
static size_t resume_offset(const std::string& path, const std::string& prefix, const std::vector<TensorLayout>& layout,
                            size_t k) {
  if (k > layout.size()) throw Error("safetensors stream: resuming after more tensors than the layout has");
  size_t n = k == 0 ? 0 : prefix.size();
  for (size_t i = 0; i < k; ++i) n += layout[i].nbytes;
  check_free_space(path, safetensors_size(prefix, layout) - double(n));
  return n;
}

SafetensorsStreamWriter::SafetensorsStreamWriter(const std::string& path, std::vector<TensorLayout> layout,
                                                 size_t resume_after,
                                                 const std::map<std::string, std::string>& metadata)
    : path_(path),
      layout_(std::move(layout)),
      prefix_(safetensors_prefix(layout_, metadata)),
      next_(resume_after),
      file_(path, resume_offset(path, prefix_, layout_, resume_after)) {
  if (resume_after == 0) file_.out().write(prefix_);
}

void SafetensorsStreamWriter::write(const TensorBlob& t) {
  if (partial_ != 0 || next_ >= layout_.size() || layout_[next_].dtype != t.dtype ||
      layout_[next_].nbytes != t.bytes.size())
    throw Error(path_ + ": tensor '" + t.name + "' written out of the announced order or size");
  write_bytes(t.name, t.bytes.data(), t.bytes.size());
}

void SafetensorsStreamWriter::write_bytes(const std::string& name, const void* bytes, size_t n) {
  if (next_ >= layout_.size() || layout_[next_].name != name || partial_ + n > layout_[next_].nbytes)
    throw Error(path_ + ": tensor '" + name + "' written out of the announced order or size");
  file_.out().write(bytes, n);
  partial_ += n;
  if (partial_ == layout_[next_].nbytes) {
    ++next_;
    partial_ = 0;
  }
}

void SafetensorsStreamWriter::finish() {
  if (next_ != layout_.size())
    throw Error(path_ + ": " + std::to_string(layout_.size() - next_) + " announced tensors were never written");
  file_.sync();
}

void write_safetensors(const std::string& path, const std::vector<TensorBlob>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorLayout> layout;
  for (const auto& t : tensors) layout.push_back({t.name, t.dtype, t.shape, t.bytes.size()});
  const std::string prefix = safetensors_prefix(layout, metadata);
  check_free_space(path, safetensors_size(prefix, layout));
  write_file_atomic(path, [&](OutStream& out) {
    out.write(prefix);
    for (const auto& t : tensors) out.write(t.bytes.data(), t.bytes.size());
  });
}

}  // namespace dq
