// safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/file.h"
#include "tensor/tensor.h"

namespace dq {

struct TensorInfo {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the mapped file
  size_t nbytes = 0;
  size_t offset = 0;  // from the start of the file
  int64_t numel() const;
};

// A memory-mapped, validated safetensors file. Every header claim (sizes, offsets, shapes) is
// checked against the file before use.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo& at(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const MappedFile& file() const { return file_; }

 private:
  MappedFile file_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: a name, a dtype and shape, and its raw bytes (already in that dtype).
struct TensorBlob {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
TensorBlob blob_from_matrix(const std::string& name, const Matrix& m, DType dtype,
                            std::vector<int64_t> shape = {});

// The file's first bytes (8-byte length, then the JSON header padded to 8 bytes) for tensors whose
// data follows in this order; for writers that produce the data themselves (streaming).
struct TensorLayout {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t nbytes;
};
std::string safetensors_prefix(const std::vector<TensorLayout>& tensors,
                               const std::map<std::string, std::string>& metadata);
// The size of a file with this prefix and layout.
double safetensors_size(const std::string& prefix, const std::vector<TensorLayout>& layout);

// A safetensors file produced tensor by tensor in an order fixed up front (the header goes first),
// so a model never has to be whole in memory; resumable: a writer reopened with the count of
// tensors a checkpoint recorded continues after them, and the bytes come out as if never stopped.
class SafetensorsStreamWriter {
 public:
  SafetensorsStreamWriter(const std::string& path, std::vector<TensorLayout> layout,
                          const std::map<std::string, std::string>& metadata, size_t resume_after = 0)
      : SafetensorsStreamWriter(path, std::move(layout), resume_after, metadata) {}
  // The next tensor in layout order: its name, dtype and byte count must match the layout.
  void write(const TensorBlob& t);
  // Part of the next tensor (for tensors too large to hold whole): parts must add up to its size.
  void write_bytes(const std::string& name, const void* bytes, size_t n);
  size_t written() const { return next_; }
  void sync() { file_.sync(); }  // durable up to here: a checkpoint may record written()
  void finish();                 // every tensor written; synced

 private:
  SafetensorsStreamWriter(const std::string& path, std::vector<TensorLayout> layout, size_t resume_after,
                          const std::map<std::string, std::string>& metadata);  // builds prefix_ first
  std::string path_;
  std::vector<TensorLayout> layout_;
  std::string prefix_;  // length + JSON header
  size_t next_;
  size_t partial_ = 0;  // bytes of tensor next_ written so far
  ResumableFile file_;
};

// Writes a safetensors file atomically.
void write_safetensors(const std::string& path, const std::vector<TensorBlob>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace dq
