#include "io/gguf.h"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <optional>
#include <string_view>

#include "io/file.h"
#include "io/half.h"
#include "io/printable.h"

namespace dq {

static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kVersion = 3;
constexpr size_t kMaxDims = 4;      // GGML_MAX_DIMS
constexpr size_t kMaxNameLen = 63;  // GGML_MAX_NAME is 64 including the terminating NUL

// Bytes of one element of a fixed-size value type; 0 for STRING, ARRAY and unknown codes.
size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    case GgufType::STRING: case GgufType::ARRAY: return 0;
  }
  return 0;
}

bool known_value_type(uint32_t code) { return code <= uint32_t(GgufType::F64); }

bool known_ggml_type(uint32_t code) {
  switch (GgmlType(code)) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::Q4_0: case GgmlType::Q4_1: case GgmlType::Q8_0:
    case GgmlType::BF16: return true;
  }
  return false;
}

bool is_int_type(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16:
    case GgufType::U32: case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
    default: return false;
  }
}

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// An integer element as int64, or nullopt for a U64 beyond INT64_MAX.
std::optional<int64_t> int_at(GgufType t, const uint8_t* p) {
  switch (t) {
    case GgufType::U8: return load<uint8_t>(p);
    case GgufType::I8: return load<int8_t>(p);
    case GgufType::U16: return load<uint16_t>(p);
    case GgufType::I16: return load<int16_t>(p);
    case GgufType::U32: return load<uint32_t>(p);
    case GgufType::I32: return load<int32_t>(p);
    case GgufType::I64: return load<int64_t>(p);
    case GgufType::U64: {
      uint64_t v = load<uint64_t>(p);
      if (v > uint64_t(INT64_MAX)) return std::nullopt;
      return int64_t(v);
    }
    default: return std::nullopt;
  }
}

double float_at(GgufType t, const uint8_t* p) {
  return t == GgufType::F32 ? double(load<float>(p)) : load<double>(p);
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

// Element count of a shape, or nullopt when it exceeds INT64_MAX (ggml's int64 limit).
std::optional<uint64_t> elem_count(const std::vector<uint64_t>& shape) {
  uint64_t n = 1;
  for (uint64_t d : shape)
    if (d > uint64_t(INT64_MAX) || mul_overflows(n, d, &n) || n > uint64_t(INT64_MAX))
      return std::nullopt;
  return n;
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

bool valid_alignment(const GgufValue& v) {
  if (v.type != GgufType::U32 || v.raw.size() != 4) return false;
  uint32_t a = load<uint32_t>(v.raw.data());
  return a != 0 && std::has_single_bit(a);
}

template <class T>
GgufValue scalar(GgufType t, T v) {
  GgufValue r;
  r.type = t;
  r.raw.resize(sizeof(T));
  std::memcpy(r.raw.data(), &v, sizeof(T));
  return r;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8: return "u8";
    case GgufType::I8: return "i8";
    case GgufType::U16: return "u16";
    case GgufType::I16: return "i16";
    case GgufType::U32: return "u32";
    case GgufType::I32: return "i32";
    case GgufType::F32: return "f32";
    case GgufType::BOOL: return "bool";
    case GgufType::STRING: return "string";
    case GgufType::ARRAY: return "array";
    case GgufType::U64: return "u64";
    case GgufType::I64: return "i64";
    case GgufType::F64: return "f64";
  }
  return "?";
}

const char* ggml_type_name(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::Q4_0: return "q4_0";
    case GgmlType::Q4_1: return "q4_1";
    case GgmlType::Q8_0: return "q8_0";
    case GgmlType::BF16: return "bf16";
  }
  return "?";
}

bool ggml_is_quantized(GgmlType t) {
  return t == GgmlType::Q4_0 || t == GgmlType::Q4_1 || t == GgmlType::Q8_0;
}

size_t ggml_block_elems(GgmlType t) { return ggml_is_quantized(t) ? 32 : 1; }

size_t ggml_block_bytes(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 4;
    case GgmlType::F16: case GgmlType::BF16: return 2;
    case GgmlType::Q4_0: return sizeof(BlockQ4_0);
    case GgmlType::Q4_1: return sizeof(BlockQ4_1);
    case GgmlType::Q8_0: return sizeof(BlockQ8_0);
  }
  return 0;
}

size_t ggml_nbytes(GgmlType t, uint64_t n) {
  size_t be = ggml_block_elems(t);
  if (n % be != 0)
    throw Error(std::string(ggml_type_name(t)) + ": " + std::to_string(n) +
                " elements are not a whole number of blocks of " + std::to_string(be));
  uint64_t bytes;
  if (mul_overflows(n / be, ggml_block_bytes(t), &bytes)) throw Error("tensor size overflows");
  return size_t(bytes);
}

// ---- metadata values ----

GgufValue GgufValue::u8(uint8_t v) { return scalar(GgufType::U8, v); }
GgufValue GgufValue::i8(int8_t v) { return scalar(GgufType::I8, v); }
GgufValue GgufValue::u16(uint16_t v) { return scalar(GgufType::U16, v); }
GgufValue GgufValue::i16(int16_t v) { return scalar(GgufType::I16, v); }
GgufValue GgufValue::u32(uint32_t v) { return scalar(GgufType::U32, v); }
GgufValue GgufValue::i32(int32_t v) { return scalar(GgufType::I32, v); }
GgufValue GgufValue::u64(uint64_t v) { return scalar(GgufType::U64, v); }
GgufValue GgufValue::i64(int64_t v) { return scalar(GgufType::I64, v); }
GgufValue GgufValue::f32(float v) { return scalar(GgufType::F32, v); }
GgufValue GgufValue::f64(double v) { return scalar(GgufType::F64, v); }
GgufValue GgufValue::boolean(bool v) { return scalar(GgufType::BOOL, uint8_t(v ? 1 : 0)); }

GgufValue GgufValue::string(std::string v) {
  GgufValue r;
  r.type = GgufType::STRING;
  r.strings.push_back(std::move(v));
  return r;
}

GgufValue GgufValue::strings_array(std::vector<std::string> v) {
  GgufValue r;
  r.type = GgufType::ARRAY;
  r.elem = GgufType::STRING;
  r.strings = std::move(v);
  return r;
}

GgufValue GgufValue::numeric_array(GgufType elem, const void* data, size_t count) {
  size_t es = scalar_size(elem);
  if (es == 0) throw Error(std::string("GGUF array of ") + gguf_type_name(elem) + " is not numeric");
  GgufValue r;
  r.type = GgufType::ARRAY;
  r.elem = elem;
  r.raw.resize(count * es);
  if (count) std::memcpy(r.raw.data(), data, count * es);
  return r;
}

GgufValue GgufValue::i32_array(const std::vector<int32_t>& v) {
  return numeric_array(GgufType::I32, v.data(), v.size());
}

GgufValue GgufValue::f32_array(const std::vector<float>& v) {
  return numeric_array(GgufType::F32, v.data(), v.size());
}

size_t GgufValue::array_size() const {
  if (elem == GgufType::STRING) return strings.size();
  size_t es = scalar_size(elem);
  return es ? raw.size() / es : 0;
}

// ---- ggml blocks ----

// A block's scale, stored as f16: one too large for it is an error (the whole block would decode to Inf).
static uint16_t f16_scale(float d) {
  uint16_t h;
  encode_16bit(DType::F16, &d, 1, &h);
  return h;
}

BlockQ8_0 quantize_q8_0(const float* x) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  // The codes use the f32 scale; only the stored d is rounded to f16 (as llama.cpp does).
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  BlockQ8_0 b;
  b.d = f16_scale(d);
  for (int j = 0; j < 32; ++j) b.qs[j] = int8_t(std::round(x[j] * id));
  return b;
}

BlockQ4_0 quantize_q4_0(const float* x) {
  // d comes from the signed value of largest magnitude, mapping it to code 0 (-8 * d); the
  // opposite extreme lands on 16 and is clamped to 15.
  float amax = 0.f, max = 0.f;
  for (int j = 0; j < 32; ++j)
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -8.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  BlockQ4_0 b;
  b.d = f16_scale(d);
  auto code = [&](float v) {  // truncation toward zero, as llama.cpp's (int8_t) cast
    return uint8_t(std::min(15, int(int8_t(v * id + 8.5f))));
  };
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(code(x[j]) | (code(x[j + 16]) << 4));
  return b;
}

BlockQ4_1 quantize_q4_1(const float* x) {
  float min = x[0], max = x[0];
  for (int j = 1; j < 32; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / 15.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  BlockQ4_1 b;
  b.d = f32_to_f16(d);
  b.m = f32_to_f16(min);
  auto code = [&](float v) {  // round half up by truncation, as llama.cpp's (int8_t)(x + 0.5f)
    return uint8_t(std::min(15, int(int8_t((v - min) * id + 0.5f))));
  };
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(code(x[j]) | (code(x[j + 16]) << 4));
  return b;
}

BlockQ8_0 q8_0_from_codes(const int8_t* q, float scale) {
  BlockQ8_0 b;
  b.d = f16_scale(scale);
  std::memcpy(b.qs, q, 32);
  return b;
}

BlockQ4_0 q4_0_from_codes(const int8_t* q, float scale) {
  for (int j = 0; j < 32; ++j)
    if (q[j] < -8 || q[j] > 7)
      throw Error("q4_0 code " + std::to_string(q[j]) + " outside [-8, 7]");
  BlockQ4_0 b;
  b.d = f16_scale(scale);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t((q[j] + 8) | ((q[j + 16] + 8) << 4));
  return b;
}

BlockQ4_1 q4_1_from_codes(const uint8_t* q, float scale, float min) {
  for (int j = 0; j < 32; ++j)
    if (q[j] > 15) throw Error("q4_1 code " + std::to_string(q[j]) + " outside [0, 15]");
  BlockQ4_1 b;
  b.d = f32_to_f16(scale);
  b.m = f32_to_f16(min);
  for (int j = 0; j < 16; ++j) b.qs[j] = uint8_t(q[j] | (q[j + 16] << 4));
  return b;
}

void dequantize_q8_0(const BlockQ8_0& b, float* out) {
  const float d = f16_to_f32(b.d);
  for (int j = 0; j < 32; ++j) out[j] = float(b.qs[j]) * d;
}

void dequantize_q4_0(const BlockQ4_0& b, float* out) {
  const float d = f16_to_f32(b.d);
  for (int j = 0; j < 16; ++j) {
    out[j] = float((b.qs[j] & 0x0F) - 8) * d;
    out[j + 16] = float((b.qs[j] >> 4) - 8) * d;
  }
}

void dequantize_q4_1(const BlockQ4_1& b, float* out) {
  const float d = f16_to_f32(b.d), m = f16_to_f32(b.m);
  for (int j = 0; j < 16; ++j) {
    out[j] = float(b.qs[j] & 0x0F) * d + m;
    out[j + 16] = float(b.qs[j] >> 4) * d + m;
  }
}

std::vector<uint8_t> ggml_encode(GgmlType t, const float* x, size_t n) {
  std::vector<uint8_t> out(ggml_nbytes(t, n));
  uint8_t* p = out.data();
  switch (t) {
    case GgmlType::F32:
      if (n) std::memcpy(p, x, n * 4);
      break;
    case GgmlType::F16:
    case GgmlType::BF16: {
      std::vector<uint16_t> h(n);
      encode_16bit(t == GgmlType::F16 ? DType::F16 : DType::BF16, x, n, h.data());
      if (n) std::memcpy(p, h.data(), n * 2);
      break;
    }
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
      for (size_t i = 0; i < n; ++i)  // the codes' float-to-int conversions need finite input
        if (!std::isfinite(x[i])) throw Error("non-finite value at element " + std::to_string(i));
      for (size_t b = 0; b < n / 32; ++b) {
        if (t == GgmlType::Q8_0) {
          BlockQ8_0 blk = quantize_q8_0(x + 32 * b);
          std::memcpy(p + b * sizeof blk, &blk, sizeof blk);
        } else if (t == GgmlType::Q4_0) {
          BlockQ4_0 blk = quantize_q4_0(x + 32 * b);
          std::memcpy(p + b * sizeof blk, &blk, sizeof blk);
        } else {
          BlockQ4_1 blk = quantize_q4_1(x + 32 * b);
          std::memcpy(p + b * sizeof blk, &blk, sizeof blk);
        }
      }
      break;
  }
  return out;
}

void ggml_decode(GgmlType t, const uint8_t* data, size_t n, float* out) {
  size_t nb = n / ggml_block_elems(t);
  switch (t) {
    case GgmlType::F32:
      if (n) std::memcpy(out, data, n * 4);
      break;
    case GgmlType::F16:
      for (size_t i = 0; i < n; ++i) out[i] = f16_to_f32(load<uint16_t>(data + 2 * i));
      break;
    case GgmlType::BF16:
      for (size_t i = 0; i < n; ++i) out[i] = bf16_to_f32(load<uint16_t>(data + 2 * i));
      break;
    case GgmlType::Q8_0:
      for (size_t b = 0; b < nb; ++b)
        dequantize_q8_0(load<BlockQ8_0>(data + b * sizeof(BlockQ8_0)), out + 32 * b);
      break;
    case GgmlType::Q4_0:
      for (size_t b = 0; b < nb; ++b)
        dequantize_q4_0(load<BlockQ4_0>(data + b * sizeof(BlockQ4_0)), out + 32 * b);
      break;
    case GgmlType::Q4_1:
      for (size_t b = 0; b < nb; ++b)
        dequantize_q4_1(load<BlockQ4_1>(data + b * sizeof(BlockQ4_1)), out + 32 * b);
      break;
  }
}

// ---- writer ----

GgufWriter::GgufWriter(std::string path) : path_(std::move(path)) {}

void GgufWriter::set(const std::string& key, GgufValue v) {
  auto fail = [&](const std::string& what) {
    throw Error(path_ + ": metadata '" + printable(key) + "': " + what);
  };
  if (key.empty()) fail("empty key");
  switch (v.type) {
    case GgufType::STRING:
      if (v.strings.size() != 1 || !v.raw.empty()) fail("malformed string value");
      break;
    case GgufType::ARRAY: {
      if (v.elem == GgufType::ARRAY) fail("nested arrays are not supported");
      if (v.elem == GgufType::STRING) {
        if (!v.raw.empty()) fail("malformed string array");
      } else if (!v.strings.empty() || v.raw.size() % scalar_size(v.elem) != 0) {
        fail("malformed array");
      }
      break;
    }
    default:
      if (!known_value_type(uint32_t(v.type))) fail("unknown value type");
      if (v.raw.size() != scalar_size(v.type) || !v.strings.empty()) fail("malformed value");
  }
  if ((v.type == GgufType::BOOL || (v.type == GgufType::ARRAY && v.elem == GgufType::BOOL)) &&
      std::any_of(v.raw.begin(), v.raw.end(), [](uint8_t b) { return b > 1; }))
    fail("bool bytes must be 0 or 1");
  if (key == "general.alignment") {
    if (!valid_alignment(v)) fail("must be a u32 power of two");
    alignment_ = load<uint32_t>(v.raw.data());
  }
  for (auto& [k, old] : kv_)
    if (k == key) {
      old = std::move(v);
      return;
    }
  kv_.emplace_back(key, std::move(v));
}

uint64_t GgufWriter::check_tensor(const std::string& name, const std::vector<uint64_t>& shape,
                                  GgmlType type) const {
  auto fail = [&](const std::string& what) {
    throw Error(path_ + ": tensor '" + printable(name) + "': " + what);
  };
  if (name.empty() || name.size() > kMaxNameLen)
    fail("name must have 1 to " + std::to_string(kMaxNameLen) + " bytes");
  for (const Tensor& t : tensors_)
    if (t.name == name) fail("added twice");
  if (!known_ggml_type(uint32_t(type))) fail("unsupported ggml type");
  if (shape.empty() || shape.size() > kMaxDims) fail("needs 1 to 4 dimensions");
  for (uint64_t d : shape)
    if (d == 0) fail("has a zero dimension");
  std::optional<uint64_t> n = elem_count(shape);
  if (!n) fail("element count overflows");
  if (shape[0] % ggml_block_elems(type) != 0)
    fail(std::string(ggml_type_name(type)) + " needs the innermost dimension (" +
         std::to_string(shape[0]) + ") to be a multiple of 32");
  return ggml_nbytes(type, *n);
}

void GgufWriter::add_tensor(const std::string& name, std::vector<uint64_t> shape, GgmlType type,
                            const Matrix& values) {
  uint64_t nbytes = check_tensor(name, shape, type);
  if (values.size() != *elem_count(shape))
    throw Error(path_ + ": tensor '" + printable(name) + "': " + std::to_string(values.size()) +
                " values for a shape of " + std::to_string(*elem_count(shape)) + " elements");
  std::vector<uint8_t> bytes;
  try {
    bytes = ggml_encode(type, values.data.data(), values.size());
  } catch (const Error& e) {
    throw Error(path_ + ": tensor '" + printable(name) + "': " + e.what());
  }
  auto shared = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  tensors_.push_back({name, std::move(shape), type, nbytes, [shared] { return *shared; }});
}

void GgufWriter::add_tensor_bytes(const std::string& name, std::vector<uint64_t> shape,
                                  GgmlType type, std::vector<uint8_t> bytes) {
  uint64_t nbytes = check_tensor(name, shape, type);
  if (bytes.size() != nbytes)
    throw Error(path_ + ": tensor '" + printable(name) + "': " + std::to_string(bytes.size()) +
                " bytes given, " + std::to_string(nbytes) + " expected");
  auto shared = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  tensors_.push_back({name, std::move(shape), type, nbytes, [shared] { return *shared; }});
}

void GgufWriter::add_tensor_lazy(const std::string& name, std::vector<uint64_t> shape,
                                 GgmlType type, std::function<std::vector<uint8_t>()> produce) {
  uint64_t nbytes = check_tensor(name, shape, type);
  tensors_.push_back({name, std::move(shape), type, nbytes, std::move(produce)});
}

namespace {

void put_u32(OutStream& o, uint32_t v) { o.write(&v, 4); }
void put_u64(OutStream& o, uint64_t v) { o.write(&v, 8); }
void put_str(OutStream& o, const std::string& s) {
  put_u64(o, s.size());
  o.write(s);
}

void put_value(OutStream& o, const GgufValue& v) {
  if (v.type == GgufType::STRING) return put_str(o, v.strings[0]);
  if (v.type != GgufType::ARRAY) return o.write(v.raw.data(), v.raw.size());
  put_u32(o, uint32_t(v.elem));
  put_u64(o, v.array_size());
  if (v.elem == GgufType::STRING)
    for (const std::string& s : v.strings) put_str(o, s);
  else
    o.write(v.raw.data(), v.raw.size());
}

void pad_to(OutStream& o, uint64_t alignment) {
  static const char zeros[256] = {};
  uint64_t n = align_up(o.written(), alignment) - o.written();
  while (n > 0) {
    uint64_t k = std::min<uint64_t>(n, sizeof zeros);
    o.write(zeros, k);
    n -= k;
  }
}

}  // namespace

void GgufWriter::write() const {
  // Offsets are relative to the data section; each tensor starts on an alignment boundary.
  std::vector<uint64_t> offsets;
  uint64_t next = 0;
  for (const Tensor& t : tensors_) {
    offsets.push_back(next);
    next = align_up(next + t.nbytes, alignment_);
  }
  check_free_space(path_, double(next));  // the data section; the header is small beside it
  write_file_atomic(path_, [&](OutStream& o) {
    o.write(kMagic, 4);
    put_u32(o, kVersion);
    put_u64(o, tensors_.size());
    put_u64(o, kv_.size());
    for (const auto& [key, v] : kv_) {
      put_str(o, key);
      put_u32(o, uint32_t(v.type));
      put_value(o, v);
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      put_str(o, t.name);
      put_u32(o, uint32_t(t.shape.size()));
      for (uint64_t d : t.shape) put_u64(o, d);
      put_u32(o, uint32_t(t.type));
      put_u64(o, offsets[i]);
    }
    pad_to(o, alignment_);
    for (const Tensor& t : tensors_) {
      std::vector<uint8_t> bytes;
      try {
        bytes = t.produce();
      } catch (const std::exception& e) {
        throw Error(path_ + ": tensor '" + printable(t.name) + "': " + e.what());
      }
      if (bytes.size() != t.nbytes)
        throw Error(path_ + ": tensor '" + printable(t.name) + "': produced " +
                    std::to_string(bytes.size()) + " bytes, " + std::to_string(t.nbytes) +
                    " expected");
      o.write(bytes.data(), bytes.size());
      pad_to(o, alignment_);
    }
  });
}

// ---- reader ----

uint64_t GgufTensorInfo::elems() const { return *elem_count(shape); }

namespace {

// Bounds-checked little-endian reads over the mapped file; every failure names the file.
struct Cursor {
  const uint8_t* p;
  size_t size;
  size_t pos = 0;
  const std::string& path;

  [[noreturn]] void fail(const std::string& what) const { throw Error(path + ": " + what); }
  size_t left() const { return size - pos; }
  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      fail("truncated: " + what + " at offset " + std::to_string(pos) + " needs " +
           std::to_string(n) + " bytes, " + std::to_string(left()) + " left");
  }
  template <class T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v = load<T>(p + pos);
    pos += sizeof(T);
    return v;
  }
  std::string str(const std::string& what) {
    uint64_t n = get<uint64_t>(what + " length");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
    pos += size_t(n);
    return s;
  }
};

GgufValue read_value(Cursor& c, uint32_t type_code, const std::string& key) {
  const std::string what = "value of '" + printable(key) + "'";
  if (!known_value_type(type_code))
    c.fail("metadata '" + printable(key) + "' has unknown value type " + std::to_string(type_code));
  GgufValue v;
  v.type = GgufType(type_code);
  size_t es = 0;
  uint64_t count = 1;
  if (v.type == GgufType::STRING) {
    v.strings.push_back(c.str(what));
    return v;
  }
  if (v.type == GgufType::ARRAY) {
    uint32_t elem = c.get<uint32_t>(what + " element type");
    if (!known_value_type(elem) || GgufType(elem) == GgufType::ARRAY)
      c.fail("metadata '" + printable(key) + "' is an array of unsupported type " +
             std::to_string(elem));
    v.elem = GgufType(elem);
    count = c.get<uint64_t>(what + " count");
    if (v.elem == GgufType::STRING) {
      // Each string takes at least its 8-byte length: bound the count before reserving.
      if (count > c.left() / 8)
        c.fail("metadata '" + printable(key) + "' claims " + std::to_string(count) +
               " strings, more than the file holds");
      v.strings.reserve(size_t(count));
      for (uint64_t i = 0; i < count; ++i) v.strings.push_back(c.str(what));
      return v;
    }
    es = scalar_size(v.elem);
    if (count > c.left() / es)
      c.fail("metadata '" + printable(key) + "' claims " + std::to_string(count) +
             " elements, more than the file holds");
  } else {
    es = scalar_size(v.type);
  }
  c.need(count * es, what);
  v.raw.assign(c.p + c.pos, c.p + c.pos + count * es);
  c.pos += size_t(count * es);
  if ((v.type == GgufType::BOOL || v.elem == GgufType::BOOL) &&
      std::any_of(v.raw.begin(), v.raw.end(), [](uint8_t b) { return b > 1; }))
    c.fail("metadata '" + printable(key) + "' has a bool that is neither 0 nor 1");
  return v;
}

}  // namespace

GgufFile::GgufFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  Cursor c{file_->data(), file_->size(), 0, file_->path()};
  if (c.size < 4 || std::memcmp(c.p, kMagic, 4) != 0) c.fail("not a GGUF file (bad magic)");
  c.pos = 4;
  version_ = c.get<uint32_t>("version");
  if (version_ == 1) c.fail("GGUF version 1 is not supported");
  // A big-endian file's version reads byte-swapped here.
  if (version_ == (2u << 24) || version_ == (3u << 24)) c.fail("big-endian GGUF is not supported");
  if (version_ != 2 && version_ != 3) c.fail("unsupported GGUF version " + std::to_string(version_));
  uint64_t n_tensors = c.get<uint64_t>("tensor count");
  uint64_t n_kv = c.get<uint64_t>("metadata count");
  // Smallest encodings: a KV is key length + type + 1 byte; a tensor info is name length + n_dims
  // + one dimension + type + offset. Counts beyond what the file could hold are rejected here,
  // before anything is reserved.
  if (n_kv > c.left() / 13)
    c.fail("metadata count " + std::to_string(n_kv) + " exceeds what the file can hold");
  if (n_tensors > c.left() / 32)
    c.fail("tensor count " + std::to_string(n_tensors) + " exceeds what the file can hold");

  kv_.reserve(size_t(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.str("metadata key " + std::to_string(i));
    uint32_t type = c.get<uint32_t>("type of '" + printable(key) + "'");
    GgufValue v = read_value(c, type, key);
    if (!kv_index_.emplace(key, kv_.size()).second)
      c.fail("metadata key '" + printable(key) + "' appears twice");
    kv_.emplace_back(std::move(key), std::move(v));
  }
  if (const GgufValue* a = find("general.alignment")) {
    if (!valid_alignment(*a)) c.fail("general.alignment must be a u32 power of two");
    alignment_ = load<uint32_t>(a->raw.data());
  }

  tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.str("tensor name " + std::to_string(i));
    const std::string tn = "tensor '" + printable(t.name) + "'";
    uint32_t n_dims = c.get<uint32_t>(tn + " dimension count");
    if (n_dims == 0 || n_dims > kMaxDims)
      c.fail(tn + " has " + std::to_string(n_dims) + " dimensions (1 to 4 allowed)");
    for (uint32_t d = 0; d < n_dims; ++d) t.shape.push_back(c.get<uint64_t>(tn + " shape"));
    if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end())
      c.fail(tn + " has a zero dimension");
    uint32_t type = c.get<uint32_t>(tn + " type");
    if (!known_ggml_type(type)) c.fail(tn + " has unsupported ggml type " + std::to_string(type));
    t.type = GgmlType(type);
    t.offset = c.get<uint64_t>(tn + " offset");
    std::optional<uint64_t> n = elem_count(t.shape);
    if (!n) c.fail(tn + " element count overflows");
    if (t.shape[0] % ggml_block_elems(t.type) != 0)
      c.fail(tn + " of type " + ggml_type_name(t.type) + " has a row of " +
             std::to_string(t.shape[0]) + " elements, not a multiple of 32");
    if (mul_overflows(*n / ggml_block_elems(t.type), ggml_block_bytes(t.type), &t.nbytes))
      c.fail(tn + " size overflows");
    if (t.offset % alignment_ != 0)
      c.fail(tn + " offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
             std::to_string(alignment_));
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) c.fail(tn + " appears twice");
    tensors_.push_back(std::move(t));
  }

  data_offset_ = align_up(c.pos, alignment_);
  if (!tensors_.empty() && data_offset_ > c.size)
    c.fail("tensor data section starts at " + std::to_string(data_offset_) + ", past the end (" +
           std::to_string(c.size) + " bytes)");
  for (GgufTensorInfo& t : tensors_) {
    uint64_t room = c.size - data_offset_;
    if (t.offset > room || t.nbytes > room - t.offset)
      c.fail("tensor '" + printable(t.name) + "' data (" + std::to_string(t.nbytes) +
             " bytes at data offset " + std::to_string(t.offset) + ") extends past the end of the file");
    t.offset += data_offset_;
  }
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i - 1]->offset + by_offset[i - 1]->nbytes > by_offset[i]->offset)
      c.fail("tensors '" + printable(by_offset[i - 1]->name) + "' and '" +
             printable(by_offset[i]->name) + "' overlap");
}

GgufFile::~GgufFile() = default;

const std::string& GgufFile::path() const { return file_->path(); }

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufValue& GgufFile::need(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(path() + ": metadata key '" + key + "' is missing");
  return *v;
}

namespace {

[[noreturn]] void wrong_type(const std::string& path, const std::string& key, const GgufValue& v,
                             const char* wanted) {
  std::string got = v.is_array() ? std::string("array of ") + gguf_type_name(v.elem)
                                 : gguf_type_name(v.type);
  throw Error(path + ": metadata '" + key + "' is " + got + ", expected " + wanted);
}

int64_t int_in_range(const std::string& path, const std::string& key, GgufType t,
                     const uint8_t* p, int64_t lo, int64_t hi) {
  std::optional<int64_t> v = int_at(t, p);
  if (!v || *v < lo || *v > hi) throw Error(path + ": metadata '" + key + "' is out of range");
  return *v;
}

}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = need(key);
  if (v.type != GgufType::STRING) wrong_type(path(), key, v, "string");
  return v.strings[0];
}

uint32_t GgufFile::get_u32(const std::string& key) const {
  const GgufValue& v = need(key);
  if (!is_int_type(v.type)) wrong_type(path(), key, v, "an integer");
  return uint32_t(int_in_range(path(), key, v.type, v.raw.data(), 0, UINT32_MAX));
}

int64_t GgufFile::get_i64(const std::string& key) const {
  const GgufValue& v = need(key);
  if (!is_int_type(v.type)) wrong_type(path(), key, v, "an integer");
  return int_in_range(path(), key, v.type, v.raw.data(), INT64_MIN, INT64_MAX);
}

float GgufFile::get_f32(const std::string& key) const {
  const GgufValue& v = need(key);
  if (v.type != GgufType::F32 && v.type != GgufType::F64) wrong_type(path(), key, v, "a float");
  return float(float_at(v.type, v.raw.data()));
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = need(key);
  if (v.type != GgufType::BOOL) wrong_type(path(), key, v, "bool");
  return v.raw[0] != 0;
}

std::vector<std::string> GgufFile::get_strings(const std::string& key) const {
  const GgufValue& v = need(key);
  if (!v.is_array() || v.elem != GgufType::STRING) wrong_type(path(), key, v, "array of string");
  return v.strings;
}

std::vector<int32_t> GgufFile::get_i32s(const std::string& key) const {
  const GgufValue& v = need(key);
  if (!v.is_array() || !is_int_type(v.elem)) wrong_type(path(), key, v, "array of integers");
  size_t es = scalar_size(v.elem);
  std::vector<int32_t> out(v.array_size());
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = int32_t(int_in_range(path(), key, v.elem, v.raw.data() + i * es, INT32_MIN, INT32_MAX));
  return out;
}

std::vector<float> GgufFile::get_f32s(const std::string& key) const {
  const GgufValue& v = need(key);
  if (!v.is_array() || (v.elem != GgufType::F32 && v.elem != GgufType::F64))
    wrong_type(path(), key, v, "array of floats");
  size_t es = scalar_size(v.elem);
  std::vector<float> out(v.array_size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = float(float_at(v.elem, v.raw.data() + i * es));
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::tensor(const std::string& name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) throw Error(path() + ": no tensor '" + name + "'");
  return *t;
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& t) const {
  return file_->data() + t.offset;
}

Matrix GgufFile::read_matrix(const std::string& name) const {
  const GgufTensorInfo& t = tensor(name);
  int64_t rows = 1;
  for (size_t d = 1; d < t.shape.size(); ++d) rows *= int64_t(t.shape[d]);
  Matrix m(rows, int64_t(t.shape[0]));
  ggml_decode(t.type, tensor_data(t), m.size(), m.data.data());
  return m;
}

bool has_gguf_magic(const std::string& path) {
  const int fd = open_regular_file(path);
  char magic[4] = {};
  const bool gguf = ::read(fd, magic, 4) == 4 && std::string_view(magic, 4) == "GGUF";
  ::close(fd);
  return gguf;
}

}  // namespace dq
