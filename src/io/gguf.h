// GGUF v3 (ggml's single-file model format): a writer, a validating memory-mapped reader, and the
// ggml Q8_0 / Q4_0 / Q4_1 block codecs, following ggml's docs/gguf.md and llama.cpp's block definitions.
// All multi-byte fields are little-endian; this code assumes a little-endian host.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace dq {

class MappedFile;

// Metadata value types (gguf_type); the numbers are the on-disk codes.
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// Tensor element types (ggml_type) this project reads and writes; the numbers are the on-disk codes.
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30 };
const char* ggml_type_name(GgmlType t);
size_t ggml_block_elems(GgmlType t);  // elements per block: 1, or 32 for the quantized types
bool ggml_is_quantized(GgmlType t);   // Q4_0, Q4_1, Q8_0
size_t ggml_block_bytes(GgmlType t);  // bytes per block
// Bytes of n elements; throws Error when n is not a whole number of blocks.
size_t ggml_nbytes(GgmlType t, uint64_t n);

// One metadata value. Numbers and bools (scalar or array) are kept as their on-disk little-endian
// bytes in `raw`; strings (one, or an array of them) in `strings`.
struct GgufValue {
  GgufType type = GgufType::U32;
  GgufType elem = GgufType::U8;  // element type when type == ARRAY
  std::vector<uint8_t> raw;
  std::vector<std::string> strings;

  static GgufValue u8(uint8_t v);
  static GgufValue i8(int8_t v);
  static GgufValue u16(uint16_t v);
  static GgufValue i16(int16_t v);
  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue u64(uint64_t v);
  static GgufValue i64(int64_t v);
  static GgufValue f32(float v);
  static GgufValue f64(double v);
  static GgufValue boolean(bool v);
  static GgufValue string(std::string v);
  static GgufValue strings_array(std::vector<std::string> v);
  static GgufValue i32_array(const std::vector<int32_t>& v);
  static GgufValue f32_array(const std::vector<float>& v);
  // Any numeric/bool element type; `data` holds count elements in on-disk form.
  static GgufValue numeric_array(GgufType elem, const void* data, size_t count);

  bool is_array() const { return type == GgufType::ARRAY; }
  size_t array_size() const;  // element count of an array
  bool operator==(const GgufValue&) const = default;
};

// ggml blocks of 32 values: a f16 scale d and the codes; value = d * code (Q4_0: d * (nibble - 8)).
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // byte j: element j in the low nibble, element j + 16 in the high nibble
};
// Asymmetric: value = d * code + m, code in [0, 15], nibbles laid out as in Q4_0.
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20, "ggml block layouts");

// llama.cpp's reference quantizers (quantize_row_q8_0_ref / _q4_0_ref / _q4_1_ref), bit for bit.
BlockQ8_0 quantize_q8_0(const float* x);  // 32 values
BlockQ4_0 quantize_q4_0(const float* x);  // 32 values
BlockQ4_1 quantize_q4_1(const float* x);  // 32 values
// Blocks from integer codes already chosen by a symmetric group-32 quantizer, so that exporting
// them does not round again: Q8_0 stores q (in [-128, 127]); Q4_0 stores q + 8 (q in [-8, 7],
// else Error). d = f16(scale): the dequantized values equal q * scale exactly only when scale is
// representable in f16.
BlockQ8_0 q8_0_from_codes(const int8_t* q, float scale);
BlockQ4_0 q4_0_from_codes(const int8_t* q, float scale);
// Q4_1 from an asymmetric quantizer's codes (in [0, 15], else Error): value = scale * code + min,
// d = f16(scale), m = f16(min).
BlockQ4_1 q4_1_from_codes(const uint8_t* q, float scale, float min);
void dequantize_q8_0(const BlockQ8_0& b, float* out);  // 32 values
void dequantize_q4_0(const BlockQ4_0& b, float* out);  // 32 values
void dequantize_q4_1(const BlockQ4_1& b, float* out);  // 32 values

// n f32 values encoded as t (quantized types: n % 32 == 0). A non-finite value, or one the type (or
// a block scale) cannot hold, is an Error.
std::vector<uint8_t> ggml_encode(GgmlType t, const float* x, size_t n);
// n values of type t at data (ggml_nbytes(t, n) bytes) decoded to f32.
void ggml_decode(GgmlType t, const uint8_t* data, size_t n, float* out);

// Collects metadata and tensors, then writes the file atomically. Keys and tensors keep the order
// in which they were first added. Errors name the output path.
class GgufWriter {
 public:
  explicit GgufWriter(std::string path);

  // Adds or replaces a key. "general.alignment" must be a U32 power of two; it sets the alignment.
  void set(const std::string& key, GgufValue v);
  void set_alignment(uint32_t a) { set("general.alignment", GgufValue::u32(a)); }
  uint32_t alignment() const { return alignment_; }

  // shape is in GGUF order, innermost (contiguous) dimension first: a row-major rows x cols matrix
  // is {cols, rows}, a vector {n}. 1 to 4 dimensions; quantized types need shape[0] % 32 == 0.
  // Encodes f32 values (all of `values`' elements, in memory order) as `type`.
  void add_tensor(const std::string& name, std::vector<uint64_t> shape, GgmlType type,
                  const Matrix& values);
  // Bytes already in ggml layout (e.g. Q4_0 blocks from q4_0_from_codes).
  void add_tensor_bytes(const std::string& name, std::vector<uint64_t> shape, GgmlType type,
                        std::vector<uint8_t> bytes);
  // Bytes produced during write(), so a large model is not held encoded in memory all at once.
  void add_tensor_lazy(const std::string& name, std::vector<uint64_t> shape, GgmlType type,
                       std::function<std::vector<uint8_t>()> produce);

  void write() const;

 private:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> shape;
    GgmlType type;
    uint64_t nbytes;
    std::function<std::vector<uint8_t>()> produce;
  };
  uint64_t check_tensor(const std::string& name, const std::vector<uint64_t>& shape,
                        GgmlType type) const;
  std::string path_;
  uint32_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Tensor> tensors_;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> shape;  // GGUF order, innermost first
  GgmlType type;
  uint64_t offset;  // absolute position of the data in the file
  uint64_t nbytes;
  uint64_t elems() const;
};

// Whether the regular file PATH starts with GGUF's magic (by content: the extension may be .GGUF,
// or none). Throws Error("PATH: ...") when PATH is not a regular file (a FIFO is refused, not
// waited on).
bool has_gguf_magic(const std::string& path);

// A GGUF file (version 3, or 2 which has the same layout), memory-mapped and fully validated on
// open: every count, length, dimension and offset is checked against the file before use.
class GgufFile {
 public:
  explicit GgufFile(const std::string& path);  // throws Error("PATH: problem")
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const;
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;  // nullptr when absent
  bool has(const std::string& key) const { return find(key) != nullptr; }
  // Typed getters throw Error naming the file and key when it is absent or of another type.
  // Integer getters accept any integer type whose value fits; float getters F32 or F64.
  std::string get_string(const std::string& key) const;
  uint32_t get_u32(const std::string& key) const;
  int64_t get_i64(const std::string& key) const;
  float get_f32(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_strings(const std::string& key) const;
  std::vector<int32_t> get_i32s(const std::string& key) const;
  std::vector<float> get_f32s(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;  // nullptr when absent
  const GgufTensorInfo& tensor(const std::string& name) const;       // throws when absent
  const uint8_t* tensor_data(const GgufTensorInfo& t) const;
  // The tensor as f32: cols = shape[0], rows = product of the other dimensions.
  Matrix read_matrix(const std::string& name) const;

 private:
  const GgufValue& need(const std::string& key) const;
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace dq
