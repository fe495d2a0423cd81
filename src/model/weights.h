// Named weight tensors (HF names). A tensor is either a view into a memory-mapped safetensors file,
// kept in its stored dtype until used, or an owned f32 matrix that replaced it (after fusion or
// quantization). Copies share both, so cloning a model is cheap and never duplicates weights.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "tensor/intgemm.h"
#include "tensor/tensor.h"

namespace dq {

class Weights {
 public:
  void add_file(std::shared_ptr<const SafetensorsFile> file);  // registers all of its tensors
  bool has(const std::string& name) const { return entries_.count(name) > 0; }
  // An f32 copy; a 1-D tensor becomes a 1 x n matrix. Throws Error naming a missing tensor.
  // When all_finite is given, it is set to whether every value is finite (checked while copying).
  Matrix get(const std::string& name, bool* all_finite = nullptr) const;
  // Rows [row0, row0 + n) of a 2-D tensor as f32, converting only those: embedding lookups and
  // classifier chunks need no f32 copy of a whole 128k-row table.
  Matrix get_rows(const std::string& name, int64_t row0, int64_t n) const;
  std::vector<int64_t> shape(const std::string& name) const;
  DType stored_dtype(const std::string& name) const;
  // A 2-D tensor where it is, for kernels that read stored dtypes in place (the classifier's
  // GEMV): an owned f32 matrix, or a mapped tensor in its stored dtype. Valid while this lives.
  struct View {
    DType dtype;
    const void* data;
    int64_t rows, cols;
  };
  View view(const std::string& name) const;
  void set(const std::string& name, Matrix m);
  void erase(const std::string& name) { entries_.erase(name); }
  // Returns the mapped pages behind a tensor to the kernel (streaming layer by layer).
  void release(const std::string& name) const;
  std::vector<std::string> names() const;
  // A backend's packed form of a linear weight (the integer runtime's codes): the forward pass
  // runs it instead of the f32 tensor, which stays registered (shapes) but is not read.
  void set_packed(const std::string& name, std::shared_ptr<const PackedLinear> p) { packed_[name] = std::move(p); }
  std::shared_ptr<const PackedLinear> packed(const std::string& name) const;
  bool has_packed() const { return !packed_.empty(); }

 private:
  struct Entry {
    std::shared_ptr<const SafetensorsFile> file;
    const TensorInfo* info = nullptr;
    std::shared_ptr<const Matrix> owned;
  };
  const Entry& entry(const std::string& name) const;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::shared_ptr<const PackedLinear>> packed_;
};

// The HF name of a layer tensor, e.g. layer_name(3, "self_attn.q_proj.weight").
std::string layer_name(int layer, const std::string& suffix);

}  // namespace dq
