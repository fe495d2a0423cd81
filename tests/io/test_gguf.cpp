// GGUF writer/reader and ggml block codecs. Structural checks parse the written bytes with a small
// parser written here from the format definition (ggml docs/gguf.md), independent of GgufFile.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "io/gguf.h"
#include "tensor/tensor.h"

namespace fs = std::filesystem;
using namespace dq;

namespace {

class Gguf : public ::testing::Test {
 protected:
  void SetUp() override {
    static int counter = 0;
    dir_ = fs::temp_directory_path() /
           ("dq_gguf_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void spit(const std::string& path, const std::string& bytes) {
  fs::remove(path);  // a fresh file: truncating one in place makes ext4 flush it on close (slow)
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

template <class T>
void patch(std::string& b, size_t pos, T v) {
  ASSERT_LE(pos + sizeof(T), b.size());
  std::memcpy(b.data() + pos, &v, sizeof(T));
}

// ---- an independent reading of the format definition ----

// Value type codes and sizes from the spec's gguf_metadata_value_type table.
size_t spec_scalar_size(uint32_t t) {
  switch (t) {
    case 0: case 1: case 7: return 1;   // uint8, int8, bool
    case 2: case 3: return 2;           // uint16, int16
    case 4: case 5: case 6: return 4;   // uint32, int32, float32
    case 10: case 11: case 12: return 8;  // uint64, int64, float64
  }
  return 0;
}

struct SpecKv {
  std::string key;
  uint32_t type;
  size_t key_pos, value_pos;
};
struct SpecTensor {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type;
  uint64_t offset;
  size_t info_pos, ndims_pos, type_pos, offset_pos;
};
struct SpecFile {
  uint32_t version;
  uint64_t n_tensors, n_kv;
  std::vector<SpecKv> kvs;
  std::vector<SpecTensor> tensors;
  uint32_t alignment = 32;
  size_t infos_end, data_start;
};

struct SpecReader {
  const std::string& b;
  size_t p = 0;
  template <class T>
  T get() {
    if (p + sizeof(T) > b.size()) throw std::runtime_error("spec parser: truncated");
    T v;
    std::memcpy(&v, b.data() + p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  std::string str() {
    uint64_t n = get<uint64_t>();
    if (n > b.size() - p) throw std::runtime_error("spec parser: string too long");
    std::string s = b.substr(p, n);
    p += n;
    return s;
  }
  void skip_value(uint32_t type) {
    if (type == 8) {
      str();
    } else if (type == 9) {
      uint32_t elem = get<uint32_t>();
      uint64_t n = get<uint64_t>();
      for (uint64_t i = 0; i < n; ++i) skip_value(elem);
    } else {
      size_t s = spec_scalar_size(type);
      if (s == 0) throw std::runtime_error("spec parser: bad type");
      p += s;
    }
  }
};

SpecFile spec_parse(const std::string& b) {
  SpecReader r{b};
  SpecFile f;
  if (b.substr(0, 4) != "GGUF") throw std::runtime_error("spec parser: magic");
  r.p = 4;
  f.version = r.get<uint32_t>();
  f.n_tensors = r.get<uint64_t>();
  f.n_kv = r.get<uint64_t>();
  for (uint64_t i = 0; i < f.n_kv; ++i) {
    SpecKv kv;
    kv.key_pos = r.p;
    kv.key = r.str();
    kv.type = r.get<uint32_t>();
    kv.value_pos = r.p;
    r.skip_value(kv.type);
    if (kv.key == "general.alignment") std::memcpy(&f.alignment, b.data() + kv.value_pos, 4);
    f.kvs.push_back(kv);
  }
  for (uint64_t i = 0; i < f.n_tensors; ++i) {
    SpecTensor t;
    t.info_pos = r.p;
    t.name = r.str();
    t.ndims_pos = r.p;
    uint32_t nd = r.get<uint32_t>();
    for (uint32_t d = 0; d < nd; ++d) t.dims.push_back(r.get<uint64_t>());
    t.type_pos = r.p;
    t.type = r.get<uint32_t>();
    t.offset_pos = r.p;
    t.offset = r.get<uint64_t>();
    f.tensors.push_back(t);
  }
  f.infos_end = r.p;
  f.data_start = (r.p + f.alignment - 1) / f.alignment * f.alignment;
  return f;
}

// Bytes per tensor from the spec's type table: f32 4, f16/bf16 2, q4_0 18 per 32, q8_0 34 per 32.
uint64_t spec_nbytes(uint32_t type, uint64_t n) {
  switch (type) {
    case 0: return n * 4;
    case 1: case 30: return n * 2;
    case 2: return n / 32 * 18;
    case 8: return n / 32 * 34;
  }
  throw std::runtime_error("spec parser: ggml type");
}

// ---- a sample file ----

Matrix ramp(int64_t rows, int64_t cols, float scale) {
  Matrix m(rows, cols);
  for (size_t i = 0; i < m.size(); ++i) m.data[i] = scale * std::sin(0.37f * float(i) + 0.1f);
  return m;
}

void write_sample(const std::string& path, uint32_t alignment = 32) {
  GgufWriter w(path);
  w.set("general.architecture", GgufValue::string("llama"));
  if (alignment != 32) w.set_alignment(alignment);
  w.set("dup.aaa", GgufValue::u32(7));
  w.set("dup.bbb", GgufValue::boolean(true));
  w.set("tokenizer.ggml.tokens", GgufValue::strings_array({"<s>", "a", "\xe2\x96\x81" "b"}));
  w.set("tokenizer.ggml.scores", GgufValue::f32_array({0.f, -1.5f, 2.25f}));
  w.add_tensor("norm.weight", {5}, GgmlType::F32, ramp(1, 5, 1.f));
  w.add_tensor("q8.weight", {64, 2}, GgmlType::Q8_0, ramp(2, 64, 3.f));
  w.add_tensor("q4.weight", {32, 3}, GgmlType::Q4_0, ramp(3, 32, 0.5f));
  w.add_tensor("f16.weight", {3, 2}, GgmlType::F16, ramp(2, 3, 2.f));
  w.write();
}

// Expects an Error whose one-line message names the file.
#define EXPECT_GGUF_ERROR(stmt, path, fragment)                                     \
  do {                                                                              \
    try {                                                                           \
      stmt;                                                                         \
      ADD_FAILURE() << "no error for " #stmt;                                       \
    } catch (const dq::Error& e) {                                                  \
      std::string msg = e.what();                                                   \
      EXPECT_NE(msg.find(path), std::string::npos) << msg;                          \
      EXPECT_NE(msg.find(fragment), std::string::npos) << msg;                      \
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;                          \
    }                                                                               \
  } while (0)

}  // namespace

// ---- round trips ----

TEST_F(Gguf, MetadataRoundTrip) {
  std::string path = file("meta.gguf");
  GgufWriter w(path);
  w.set("u8", GgufValue::u8(200));
  w.set("i8", GgufValue::i8(-100));
  w.set("u16", GgufValue::u16(60000));
  w.set("i16", GgufValue::i16(-30000));
  w.set("u32", GgufValue::u32(4000000000u));
  w.set("i32", GgufValue::i32(-2000000000));
  w.set("u64", GgufValue::u64(1ull << 40));
  w.set("i64", GgufValue::i64(-(1ll << 40)));
  w.set("f32", GgufValue::f32(1.25f));
  w.set("f64", GgufValue::f64(-2.5));
  w.set("bool", GgufValue::boolean(true));
  w.set("str", GgufValue::string("h\xc3\xa9llo"));
  w.set("empty.str", GgufValue::string(""));
  w.set("strs", GgufValue::strings_array({"x", "", "yz"}));
  w.set("i32s", GgufValue::i32_array({1, -2, 3}));
  w.set("f32s", GgufValue::f32_array({0.5f, -0.25f}));
  uint8_t u8s[] = {1, 2, 255};
  w.set("u8s", GgufValue::numeric_array(GgufType::U8, u8s, 3));
  uint8_t bools[] = {1, 0};
  w.set("bools", GgufValue::numeric_array(GgufType::BOOL, bools, 2));
  w.set("empty.arr", GgufValue::i32_array({}));
  w.set("u32", GgufValue::u32(5));  // replaces in place
  w.write();

  GgufFile f(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  ASSERT_EQ(f.metadata().size(), 19u);
  EXPECT_EQ(f.metadata()[4].first, "u32");
  EXPECT_EQ(f.get_u32("u8"), 200u);
  EXPECT_EQ(f.get_i64("i8"), -100);
  EXPECT_EQ(f.get_u32("u16"), 60000u);
  EXPECT_EQ(f.get_i64("i16"), -30000);
  EXPECT_EQ(f.get_u32("u32"), 5u);
  EXPECT_EQ(f.get_i64("i32"), -2000000000);
  EXPECT_EQ(f.get_i64("u64"), 1ll << 40);
  EXPECT_EQ(f.get_i64("i64"), -(1ll << 40));
  EXPECT_EQ(f.get_f32("f32"), 1.25f);
  EXPECT_EQ(f.get_f32("f64"), -2.5f);
  EXPECT_TRUE(f.get_bool("bool"));
  EXPECT_EQ(f.get_string("str"), "h\xc3\xa9llo");
  EXPECT_EQ(f.get_string("empty.str"), "");
  EXPECT_EQ(f.get_strings("strs"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_EQ(f.get_i32s("i32s"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(f.get_f32s("f32s"), (std::vector<float>{0.5f, -0.25f}));
  EXPECT_EQ(f.get_i32s("u8s"), (std::vector<int32_t>{1, 2, 255}));
  EXPECT_EQ(f.find("bools")->elem, GgufType::BOOL);
  EXPECT_EQ(f.find("bools")->array_size(), 2u);
  EXPECT_TRUE(f.get_i32s("empty.arr").empty());
  EXPECT_EQ(*f.find("strs"), GgufValue::strings_array({"x", "", "yz"}));
  EXPECT_FALSE(f.has("missing"));
  EXPECT_TRUE(f.tensors().empty());
}

TEST_F(Gguf, GetterErrorsNameFileAndKey) {
  std::string path = file("get.gguf");
  GgufWriter w(path);
  w.set("s", GgufValue::string("x"));
  w.set("neg", GgufValue::i32(-1));
  w.set("big", GgufValue::u64(~0ull));
  w.set("i64s", GgufValue::numeric_array(GgufType::I64, std::vector<int64_t>{1ll << 40}.data(), 1));
  w.write();
  GgufFile f(path);
  EXPECT_GGUF_ERROR(f.get_u32("s"), path, "'s' is string, expected an integer");
  EXPECT_GGUF_ERROR(f.get_u32("neg"), path, "'neg' is out of range");
  EXPECT_GGUF_ERROR(f.get_i64("big"), path, "out of range");
  EXPECT_GGUF_ERROR(f.get_i32s("i64s"), path, "out of range");
  EXPECT_GGUF_ERROR(f.get_strings("s"), path, "expected array of string");
  EXPECT_GGUF_ERROR(f.get_string("nope"), path, "'nope' is missing");
  EXPECT_GGUF_ERROR(f.read_matrix("nope"), path, "no tensor 'nope'");
}

TEST_F(Gguf, TensorRoundTrip) {
  std::string path = file("t.gguf");
  Matrix a = ramp(3, 64, 2.f), v = ramp(1, 7, 1.f), c = ramp(4, 5, 100.f);
  Matrix big = ramp(2, 96, 1.f);
  GgufWriter w(path);
  w.add_tensor("f32", {64, 3}, GgmlType::F32, a);
  w.add_tensor("vec", {7}, GgmlType::F32, v);
  w.add_tensor("f16", {5, 4}, GgmlType::F16, c);
  w.add_tensor("bf16", {5, 2, 2}, GgmlType::BF16, c);
  w.add_tensor("q8", {64, 3}, GgmlType::Q8_0, a);
  w.add_tensor("q4", {96, 2}, GgmlType::Q4_0, big);
  w.add_tensor_lazy("lazy", {64, 3}, GgmlType::Q8_0,
                    [&] { return ggml_encode(GgmlType::Q8_0, a.data.data(), a.size()); });
  w.write();

  GgufFile f(path);
  ASSERT_EQ(f.tensors().size(), 7u);
  EXPECT_EQ(f.tensors()[0].name, "f32");
  EXPECT_EQ(f.tensor("bf16").shape, (std::vector<uint64_t>{5, 2, 2}));
  EXPECT_EQ(f.tensor("q4").type, GgmlType::Q4_0);
  EXPECT_EQ(f.tensor("q4").nbytes, 2u * 3 * 18);
  for (const GgufTensorInfo& t : f.tensors()) EXPECT_EQ(t.offset % 32, 0u) << t.name;

  Matrix r = f.read_matrix("f32");
  EXPECT_EQ(r.rows, 3);
  EXPECT_EQ(r.cols, 64);
  EXPECT_EQ(r.data, a.data);
  Matrix rv = f.read_matrix("vec");
  EXPECT_EQ(rv.rows, 1);
  EXPECT_EQ(rv.data, v.data);
  Matrix rb = f.read_matrix("bf16");
  EXPECT_EQ(rb.rows, 4);
  EXPECT_EQ(rb.cols, 5);
  Matrix rh = f.read_matrix("f16");
  for (size_t i = 0; i < c.size(); ++i) {
    EXPECT_EQ(rh.data[i], f16_to_f32(f32_to_f16(c.data[i])));
    EXPECT_EQ(rb.data[i], bf16_to_f32(f32_to_bf16(c.data[i])));
  }
  // Quantized tensors read back as the blocks' dequantized values.
  Matrix rq8 = f.read_matrix("q8"), rq4 = f.read_matrix("q4"), rl = f.read_matrix("lazy");
  for (int64_t i = 0; i < 3; ++i)
    for (int b = 0; b < 2; ++b) {
      float out[32];
      dequantize_q8_0(quantize_q8_0(a.row(i) + 32 * b), out);
      for (int j = 0; j < 32; ++j) {
        EXPECT_EQ(rq8(i, 32 * b + j), out[j]);
        EXPECT_EQ(rl(i, 32 * b + j), out[j]);
      }
    }
  for (int64_t i = 0; i < 2; ++i)
    for (int b = 0; b < 3; ++b) {
      float out[32];
      dequantize_q4_0(quantize_q4_0(big.row(i) + 32 * b), out);
      for (int j = 0; j < 32; ++j) EXPECT_EQ(rq4(i, 32 * b + j), out[j]);
    }
}

// ---- block codecs ----

TEST(GgufBlocks, Q8_0HandComputedBlock) {
  // amax = 127 gives d = 1 (exact in f16), so the codes are x rounded half away from zero.
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = float(j - 16);
  x[0] = 127.f, x[1] = -63.5f, x[2] = 0.5f, x[3] = -0.5f, x[4] = 2.5f, x[5] = 1.49f, x[6] = -126.6f;
  BlockQ8_0 b = quantize_q8_0(x);
  int8_t want[32];
  for (int j = 0; j < 32; ++j) want[j] = int8_t(j - 16);
  int8_t head[7] = {127, -64, 1, -1, 3, 1, -127};
  std::memcpy(want, head, 7);
  EXPECT_EQ(b.d, 0x3C00);
  EXPECT_EQ(std::memcmp(b.qs, want, 32), 0);
  float out[32];
  dequantize_q8_0(b, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], float(want[j]));

  // The on-disk bytes: little-endian f16 d, then the 32 codes.
  std::vector<uint8_t> bytes = ggml_encode(GgmlType::Q8_0, x, 32);
  ASSERT_EQ(bytes.size(), 34u);
  EXPECT_EQ(bytes[0], 0x00);
  EXPECT_EQ(bytes[1], 0x3C);
  EXPECT_EQ(std::memcmp(bytes.data() + 2, want, 32), 0);
}

TEST(GgufBlocks, Q4_0HandComputedBlockNegativeMax) {
  // The largest magnitude is -8, so d = -8 / -8 = 1 and code = min(15, trunc(x + 8.5)).
  float x[32] = {};
  x[0] = -8.f, x[1] = 7.f, x[2] = 7.9f, x[3] = 0.49f, x[4] = 0.5f, x[5] = -0.5f, x[6] = -0.51f;
  x[7] = -3.2f, x[16] = 3.f, x[17] = -7.5f, x[31] = -1.7f;
  uint8_t code[32];
  for (int j = 0; j < 32; ++j) code[j] = 8;  // zeros
  uint8_t head[8] = {0, 15, 15, 8, 9, 8, 7, 5};
  std::memcpy(code, head, 8);
  code[16] = 11, code[17] = 1, code[31] = 6;
  BlockQ4_0 b = quantize_q4_0(x);
  EXPECT_EQ(b.d, 0x3C00);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(b.qs[j] & 0x0F, code[j]) << j;
    EXPECT_EQ(b.qs[j] >> 4, code[j + 16]) << j;
  }
  float out[32];
  dequantize_q4_0(b, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], float(code[j]) - 8.f) << j;

  std::vector<uint8_t> bytes = ggml_encode(GgmlType::Q4_0, x, 32);
  ASSERT_EQ(bytes.size(), 18u);
  EXPECT_EQ(bytes[0], 0x00);
  EXPECT_EQ(bytes[1], 0x3C);
  EXPECT_EQ(bytes[2], 0x00 | (11 << 4));  // elements 0 and 16
  EXPECT_EQ(bytes[3], 15 | (1 << 4));     // elements 1 and 17
  EXPECT_EQ(bytes[17], 8 | (6 << 4));     // elements 15 and 31
}

TEST(GgufBlocks, Q4_0PositiveMaxClampsTheOppositeExtreme) {
  // max = 4: d = -0.5, 1/d = -2. x = -4 maps to 16.5 -> 16, clamped to 15 (value -3.5).
  float x[32] = {};
  x[0] = 4.f, x[1] = -4.f, x[2] = 1.f, x[3] = -1.f, x[4] = 0.25f;
  BlockQ4_0 b = quantize_q4_0(x);
  EXPECT_EQ(b.d, 0xB800);  // f16 -0.5
  uint8_t want[5] = {0, 15, 6, 10, 8};
  for (int j = 0; j < 5; ++j) EXPECT_EQ(b.qs[j] & 0x0F, want[j]) << j;
  float out[32];
  dequantize_q4_0(b, out);
  EXPECT_EQ(out[0], 4.f);
  EXPECT_EQ(out[1], -3.5f);
  EXPECT_EQ(out[2], 1.f);
  EXPECT_EQ(out[3], -1.f);
}

TEST(GgufBlocks, Q4_1HandComputedBlock) {
  // min -1, max 2: d = 3 / 15 = 0.2, code = min(15, trunc((x + 1) / 0.2 + 0.5)), value = d * code + min.
  float x[32];
  for (float& v : x) v = 0.f;  // code trunc(5.5) = 5
  x[0] = -1.f, x[1] = 2.f, x[2] = 0.09f, x[3] = 0.11f, x[16] = 1.f, x[31] = -0.95f;
  uint8_t code[32];
  for (int j = 0; j < 32; ++j) code[j] = 5;
  code[0] = 0, code[1] = 15, code[2] = 5, code[3] = 6, code[16] = 10, code[31] = 0;
  BlockQ4_1 b = quantize_q4_1(x);
  EXPECT_EQ(b.d, f32_to_f16(0.2f));
  EXPECT_EQ(b.m, 0xBC00);  // f16 -1
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(b.qs[j] & 0x0F, code[j]) << j;
    EXPECT_EQ(b.qs[j] >> 4, code[j + 16]) << j;
  }
  float out[32];
  dequantize_q4_1(b, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], float(code[j]) * f16_to_f32(b.d) - 1.f) << j;

  std::vector<uint8_t> bytes = ggml_encode(GgmlType::Q4_1, x, 32);
  ASSERT_EQ(bytes.size(), 20u);
  EXPECT_EQ(0, std::memcmp(bytes.data(), &b, 20));
  std::vector<float> back(32);
  ggml_decode(GgmlType::Q4_1, bytes.data(), 32, back.data());
  EXPECT_EQ(0, std::memcmp(back.data(), out, sizeof out));
  EXPECT_EQ(ggml_nbytes(GgmlType::Q4_1, 64), 40u);
  EXPECT_STREQ(ggml_type_name(GgmlType::Q4_1), "q4_1");
}

TEST(GgufBlocks, Q4_1FromCodesStoresThemAsGiven) {
  uint8_t q[32];
  for (int j = 0; j < 32; ++j) q[j] = uint8_t((j * 7) % 16);
  BlockQ4_1 b = q4_1_from_codes(q, 0.25f, -1.75f);  // both exact in f16
  float out[32];
  dequantize_q4_1(b, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.25f * float(q[j]) - 1.75f) << j;
  q[5] = 16;
  EXPECT_THROW(q4_1_from_codes(q, 1.f, 0.f), Error);
}

TEST(GgufBlocks, AllZeroBlocks) {
  float x[32] = {};
  float out[32];
  BlockQ8_0 b8 = quantize_q8_0(x);
  EXPECT_EQ(b8.d, 0);
  dequantize_q8_0(b8, out);
  for (float v : out) EXPECT_EQ(v, 0.f);
  BlockQ4_0 b4 = quantize_q4_0(x);
  EXPECT_EQ(b4.d, 0x8000);  // d = 0 / -8 is -0
  for (uint8_t q : b4.qs) EXPECT_EQ(q, 0x88);
}

TEST(GgufBlocks, QuantizationErrorBounds) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int trial = 0; trial < 200; ++trial) {
    float x[32], out[32];
    float scale = std::pow(10.f, float(trial % 9) - 4.f);
    for (float& v : x) v = nd(rng) * scale;
    float amax = 0.f, max = 0.f;
    for (float v : x)
      if (std::fabs(v) > amax) amax = std::fabs(v), max = v;

    // Q8_0: within half a step, plus what rounding d to f16 moves the largest code.
    float d8 = amax / 127.f, d8h = f16_to_f32(f32_to_f16(d8));
    dequantize_q8_0(quantize_q8_0(x), out);
    for (int j = 0; j < 32; ++j)
      EXPECT_LE(std::fabs(out[j] - x[j]), 0.5f * d8 + 127.f * std::fabs(d8h - d8) + 1e-6f * amax);

    // Q4_0: half a step, except the clamped opposite extreme (one step at most).
    float d4 = max / -8.f, d4h = f16_to_f32(f32_to_f16(d4));
    BlockQ4_0 b4 = quantize_q4_0(x);
    dequantize_q4_0(b4, out);
    for (int j = 0; j < 32; ++j) {
      float q = x[j] / d4 + 8.5f;
      float bound = (q >= 16.f ? 1.f : 0.5f) * std::fabs(d4) + 8.f * std::fabs(d4h - d4) +
                    1e-6f * amax;
      EXPECT_LE(std::fabs(out[j] - x[j]), bound) << trial << " " << j;
    }
  }
}

TEST(GgufBlocks, BlocksFromCodesKeepTheCodes) {
  int8_t q4[32], q8[32];
  for (int j = 0; j < 32; ++j) q4[j] = int8_t(j % 16 - 8), q8[j] = int8_t(j * 8 - 128);
  float scale = 0.0078125f;  // 2^-7: exact in f16, so values are exactly q * scale
  BlockQ4_0 b4 = q4_0_from_codes(q4, scale);
  BlockQ8_0 b8 = q8_0_from_codes(q8, scale);
  EXPECT_EQ(b4.d, f32_to_f16(scale));
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b4.qs[j], uint8_t((q4[j] + 8) | ((q4[j + 16] + 8) << 4)));
  float out[32];
  dequantize_q4_0(b4, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], float(q4[j]) * scale);
  dequantize_q8_0(b8, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], float(q8[j]) * scale);

  // Re-quantizing values that came from codes with max code -8 gives the same codes back.
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = float(q4[j]) * scale;
  BlockQ4_0 again = quantize_q4_0(x);
  EXPECT_EQ(std::memcmp(&again, &b4, sizeof b4), 0);

  q4[3] = 8;
  EXPECT_THROW(q4_0_from_codes(q4, scale), Error);
}

// ---- the written bytes against the format definition ----

TEST_F(Gguf, LayoutMatchesTheFormatDefinition) {
  for (uint32_t align : {32u, 64u, 8u}) {
    std::string path = file("layout.gguf");
    write_sample(path, align);
    std::string b = slurp(path);
    SpecFile f = spec_parse(b);

    EXPECT_EQ(b.substr(0, 4), "GGUF");
    EXPECT_EQ(f.version, 3u);
    EXPECT_EQ(f.n_tensors, 4u);
    EXPECT_EQ(f.n_kv, align == 32 ? 5u : 6u);
    EXPECT_EQ(f.alignment, align);

    // The first KV, byte for byte: u64 key length, key, u32 type 8 (string), u64 length, text.
    std::string want("\x14\0\0\0\0\0\0\0", 8);
    want += "general.architecture";
    want += std::string("\x08\0\0\0", 4) + std::string("\x05\0\0\0\0\0\0\0", 8) + "llama";
    EXPECT_EQ(b.substr(24, want.size()), want);

    // A string array: u32 element type 8, u64 count, then length-prefixed strings.
    auto tok = std::find_if(f.kvs.begin(), f.kvs.end(),
                            [](const SpecKv& k) { return k.key == "tokenizer.ggml.tokens"; });
    ASSERT_NE(tok, f.kvs.end());
    EXPECT_EQ(tok->type, 9u);
    std::string arr = std::string("\x08\0\0\0", 4) + std::string("\x03\0\0\0\0\0\0\0", 8) +
                      std::string("\x03\0\0\0\0\0\0\0", 8) + "<s>" +
                      std::string("\x01\0\0\0\0\0\0\0", 8) + "a" +
                      std::string("\x04\0\0\0\0\0\0\0", 8) + "\xe2\x96\x81" "b";
    EXPECT_EQ(b.substr(tok->value_pos, arr.size()), arr);

    ASSERT_EQ(f.tensors.size(), 4u);
    EXPECT_EQ(f.tensors[0].name, "norm.weight");
    EXPECT_EQ(f.tensors[0].dims, (std::vector<uint64_t>{5}));
    EXPECT_EQ(f.tensors[0].type, 0u);
    EXPECT_EQ(f.tensors[1].dims, (std::vector<uint64_t>{64, 2}));
    EXPECT_EQ(f.tensors[1].type, 8u);
    EXPECT_EQ(f.tensors[2].type, 2u);
    EXPECT_EQ(f.tensors[3].type, 1u);

    // Padding up to the data section is zeros; offsets are aligned, increasing, non-overlapping
    // and inside the file.
    EXPECT_EQ(f.data_start % align, 0u);
    EXPECT_EQ(b.substr(f.infos_end, f.data_start - f.infos_end),
              std::string(f.data_start - f.infos_end, '\0'));
    EXPECT_EQ(f.tensors[0].offset, 0u);
    uint64_t end = 0;
    for (const SpecTensor& t : f.tensors) {
      uint64_t n = 1;
      for (uint64_t d : t.dims) n *= d;
      EXPECT_EQ(t.offset % align, 0u) << t.name;
      EXPECT_GE(t.offset, end) << t.name;
      end = t.offset + spec_nbytes(t.type, n);
      EXPECT_LE(f.data_start + end, b.size());
    }

    // Tensor payloads: raw f32, and a Q8_0 block computed here from the spec's definition.
    Matrix norm = ramp(1, 5, 1.f);
    EXPECT_EQ(std::memcmp(b.data() + f.data_start + f.tensors[0].offset, norm.data.data(), 20), 0);
    Matrix q8 = ramp(2, 64, 3.f);
    const float* x = q8.row(1) + 32;  // the last block: row 1, elements 32..63
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    float d = amax / 127.f;
    std::string blk(34, '\0');
    uint16_t dh = f32_to_f16(d);
    std::memcpy(blk.data(), &dh, 2);
    float id = 1.f / d;
    for (int j = 0; j < 32; ++j) {
      float v = x[j] * id;
      blk[2 + j] = char(int8_t(v >= 0 ? std::floor(v + 0.5f) : -std::floor(-v + 0.5f)));
    }
    EXPECT_EQ(b.substr(f.data_start + f.tensors[1].offset + 3 * 34, 34), blk);

    GgufFile g(path);
    EXPECT_EQ(g.alignment(), align);
    EXPECT_EQ(g.data_offset(), f.data_start);
    EXPECT_EQ(g.tensor("q4.weight").offset, f.data_start + f.tensors[2].offset);
  }
}

// ---- corrupt files ----

TEST_F(Gguf, TruncationAtEveryPositionIsAnError) {
  std::string path = file("src.gguf"), bad = file("cut.gguf");
  write_sample(path);
  std::string b = slurp(path);
  SpecFile f = spec_parse(b);
  const SpecTensor& last = f.tensors.back();
  uint64_t data_end = f.data_start + last.offset + spec_nbytes(last.type, last.dims[0] * last.dims[1]);
  for (size_t n = 0; n < b.size(); ++n) {
    spit(bad, b.substr(0, n));
    try {
      GgufFile g(bad);
      EXPECT_GE(n, data_end) << "truncated at " << n << " of " << b.size() << " loads";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

TEST_F(Gguf, CorruptHeaderAndCounts) {
  std::string path = file("src.gguf"), bad = file("bad.gguf");
  write_sample(path);
  const std::string b = slurp(path);
  SpecFile f = spec_parse(b);
  auto expect_error = [&](auto mutate, const char* fragment) {
    std::string c = b;
    mutate(c);
    spit(bad, c);
    EXPECT_GGUF_ERROR(GgufFile g(bad), bad, fragment);
  };
  auto kv = [&](const std::string& key) {
    for (const SpecKv& k : f.kvs)
      if (k.key == key) return k;
    throw std::runtime_error("no key " + key);
  };

  expect_error([](std::string& c) { c[3] = 'X'; }, "bad magic");
  expect_error([](std::string& c) { patch<uint32_t>(c, 4, 1); }, "version 1");
  expect_error([](std::string& c) { patch<uint32_t>(c, 4, 4); }, "unsupported GGUF version 4");
  expect_error([](std::string& c) { patch<uint32_t>(c, 4, 3u << 24); }, "big-endian");
  expect_error([](std::string& c) { patch<uint64_t>(c, 8, 1ull << 62); }, "tensor count");
  expect_error([](std::string& c) { patch<uint64_t>(c, 16, 1ull << 60); }, "metadata count");
  expect_error([](std::string& c) { patch<uint64_t>(c, 16, 1000); }, "metadata count");
  expect_error([](std::string& c) { patch<uint64_t>(c, 24, ~0ull); }, "truncated");
  expect_error([&](std::string& c) { patch<uint64_t>(c, 24, c.size() - 31); }, "truncated");
  // The string value of general.architecture, then a string array's count and one element.
  expect_error([](std::string& c) { patch<uint64_t>(c, 56, 1ull << 50); }, "truncated");
  SpecKv tok = kv("tokenizer.ggml.tokens");
  expect_error([&](std::string& c) { patch<uint64_t>(c, tok.value_pos + 4, 1ull << 61); },
               "more than the file holds");
  expect_error([&](std::string& c) { patch<uint64_t>(c, tok.value_pos + 12, 1ull << 40); },
               "truncated");
  SpecKv scores = kv("tokenizer.ggml.scores");
  expect_error([&](std::string& c) { patch<uint64_t>(c, scores.value_pos + 4, (1ull << 62) + 1); },
               "more than the file holds");
  expect_error([&](std::string& c) { patch<uint32_t>(c, scores.value_pos, 9); }, "array of unsupported");
  expect_error([&](std::string& c) { patch<uint32_t>(c, scores.value_pos - 4, 13); },
               "unknown value type 13");
  expect_error([&](std::string& c) { patch<uint8_t>(c, kv("dup.bbb").value_pos, 2); }, "bool");
  expect_error([&](std::string& c) { c.replace(kv("dup.bbb").key_pos + 8, 7, "dup.aaa"); },
               "appears twice");
  // dup.aaa is a u32: renamed to general.alignment (same length) it sets a bad alignment.
  SpecKv dup = kv("dup.aaa");
  expect_error([&](std::string& c) {
    patch<uint64_t>(c, dup.key_pos, 17);
    c.replace(dup.key_pos + 8, 7, "general.alignment");  // later bytes shift, parsed after
    patch<uint32_t>(c, dup.key_pos + 8 + 17 + 4, 3);
  }, "general.alignment");
}

TEST_F(Gguf, CorruptTensorTable) {
  std::string path = file("src.gguf"), bad = file("bad.gguf");
  write_sample(path);
  const std::string b = slurp(path);
  SpecFile f = spec_parse(b);
  const SpecTensor &t0 = f.tensors[0], &q8 = f.tensors[1], &q4 = f.tensors[2];
  auto expect_error = [&](auto mutate, const char* fragment) {
    std::string c = b;
    mutate(c);
    spit(bad, c);
    EXPECT_GGUF_ERROR(GgufFile g(bad), bad, fragment);
  };
  expect_error([&](std::string& c) { patch<uint32_t>(c, t0.ndims_pos, 5); }, "5 dimensions");
  expect_error([&](std::string& c) { patch<uint32_t>(c, t0.ndims_pos, 0); }, "0 dimensions");
  expect_error([&](std::string& c) { patch<uint32_t>(c, t0.ndims_pos, 0xFFFFFFFF); }, "dimensions");
  expect_error([&](std::string& c) { patch<uint64_t>(c, t0.ndims_pos + 4, 0); }, "zero dimension");
  expect_error([&](std::string& c) { patch<uint32_t>(c, t0.type_pos, 99); },
               "unsupported ggml type 99");
  expect_error([&](std::string& c) {
    patch<uint64_t>(c, q8.ndims_pos + 4, 1ull << 33);
    patch<uint64_t>(c, q8.ndims_pos + 12, 1ull << 33);
  }, "overflows");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q8.ndims_pos + 4, 1ull << 63); },
               "overflows");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q8.ndims_pos + 12, 1ull << 40); },
               "past the end");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q4.ndims_pos + 4, 48); },
               "not a multiple of 32");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q4.offset_pos, q4.offset + 4); },
               "not a multiple of the alignment");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q4.offset_pos, 1ull << 40); },
               "past the end");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q4.offset_pos, ~0ull - 31); },
               "past the end");
  expect_error([&](std::string& c) { patch<uint64_t>(c, q4.offset_pos, q8.offset); }, "overlap");
  expect_error([&](std::string& c) { c.replace(q4.info_pos + 8, 9, "q8.weight"); },
               "appears twice");
}

TEST_F(Gguf, RandomByteCorruptionNeverCrashes) {
  std::string path = file("src.gguf"), bad = file("fuzz.gguf");
  write_sample(path);
  const std::string b = slurp(path);
  SpecFile f = spec_parse(b);
  std::mt19937 rng(11);
  std::uniform_int_distribution<size_t> pos(0, f.infos_end - 1);  // the header and tables
  std::uniform_int_distribution<int> byte(0, 255);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string c = b;
    for (int k = 0; k < 1 + trial % 3; ++k) c[pos(rng)] = char(byte(rng));
    spit(bad, c);
    try {
      GgufFile g(bad);
      for (const GgufTensorInfo& t : g.tensors()) g.read_matrix(t.name);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "trial " << trial << ": non-dq exception " << e.what();
    }
  }
}

TEST_F(Gguf, Version2HasTheSameLayoutAndIsAccepted) {
  std::string path = file("v2.gguf");
  write_sample(path);
  std::string b = slurp(path);
  patch<uint32_t>(b, 4, 2);
  spit(path, b);
  GgufFile g(path);
  EXPECT_EQ(g.version(), 2u);
  EXPECT_EQ(g.get_string("general.architecture"), "llama");
  EXPECT_EQ(g.read_matrix("norm.weight").data, ramp(1, 5, 1.f).data);
}

TEST_F(Gguf, MissingAndEmptyFiles) {
  std::string missing = file("none.gguf"), empty = file("empty.gguf");
  EXPECT_GGUF_ERROR(GgufFile g(missing), missing, "cannot open");
  spit(empty, "");
  EXPECT_GGUF_ERROR(GgufFile g(empty), empty, "bad magic");
}

// ---- writer validation ----

TEST_F(Gguf, WriterRejectsInvalidInput) {
  std::string path = file("w.gguf");
  GgufWriter w(path);
  Matrix m(1, 32);
  EXPECT_GGUF_ERROR(w.add_tensor(std::string(64, 'n'), {32}, GgmlType::F32, m), path, "name");
  w.add_tensor("a", {32}, GgmlType::F32, m);
  EXPECT_GGUF_ERROR(w.add_tensor("a", {32}, GgmlType::F32, m), path, "added twice");
  EXPECT_GGUF_ERROR(w.add_tensor("b", {16, 2}, GgmlType::Q4_0, m), path, "multiple of 32");
  EXPECT_GGUF_ERROR(w.add_tensor("b", {33}, GgmlType::F32, m), path, "33 elements");
  EXPECT_GGUF_ERROR(w.add_tensor("b", {1, 1, 1, 1, 32}, GgmlType::F32, m), path, "dimensions");
  EXPECT_GGUF_ERROR(w.add_tensor("b", {0}, GgmlType::F32, Matrix()), path, "zero dimension");
  EXPECT_GGUF_ERROR(w.add_tensor_bytes("b", {32}, GgmlType::Q8_0, std::vector<uint8_t>(33)), path,
                    "33 bytes given, 34 expected");
  m.data[5] = NAN;
  EXPECT_GGUF_ERROR(w.add_tensor("b", {32}, GgmlType::Q8_0, m), path, "non-finite");
  EXPECT_GGUF_ERROR(w.set_alignment(48), path, "power of two");
  EXPECT_GGUF_ERROR(w.set("general.alignment", GgufValue::u64(64)), path, "power of two");
  EXPECT_GGUF_ERROR(w.set("", GgufValue::u32(1)), path, "empty key");
  uint8_t two = 2;
  EXPECT_GGUF_ERROR(w.set("b", GgufValue::numeric_array(GgufType::BOOL, &two, 1)), path, "bool");
  EXPECT_EQ(w.alignment(), 32u);
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(Gguf, FailedWriteLeavesNothingBehind) {
  std::string path = file("fail.gguf");
  GgufWriter w(path);
  w.set("general.architecture", GgufValue::string("llama"));
  w.add_tensor_lazy("t", {32}, GgmlType::F32, [] { return std::vector<uint8_t>(12); });
  EXPECT_GGUF_ERROR(w.write(), path, "produced 12 bytes, 128 expected");
  GgufWriter w2(path);
  w2.add_tensor_lazy("t", {32}, GgmlType::F32,
                     []() -> std::vector<uint8_t> { throw std::runtime_error("source gone"); });
  EXPECT_GGUF_ERROR(w2.write(), path, "source gone");
  EXPECT_TRUE(fs::is_empty(dir_));
}
