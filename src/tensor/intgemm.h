// Integer matrix products for the quantized runtime: activation codes (unsigned, per token) times
// weight values (signed, per output channel or per group), accumulated exactly in int32, with
// scales and zero points applied afterwards in double: each block's exact integer sum times its two
// scales, added up with fused multiply-adds in block order and rounded once to f32 (per-head
// activation groups make several blocks per output; an f32 epilogue rounded every block's
// contribution). Every path does these same operations, so all give the same bits. Each block's
// term is exact when the scales have scale_bits significant bits (quant/quantizer.h: then
// sa·sw·(exact sum) needs at most 52 bits), so the output is then the exact dequantized product
// rounded once (blocks of different scales added in double); a longer scale rounds each term once.
//
// For a column block where one activation scale/zero (sa, za) and one weight scale/zero (sw, zw)
// hold, with activation codes q and stored weight values s (the weight code minus an offset o,
// so zw' = zw - o is the zero in the stored domain):
//   Σ sa(q - za) · sw(s - zw') = sa·sw · (Σ q·s − zw'·Σq − za·Σs + n·za·zw')
// Σq·s is the int32 kernel result, Σq is summed per token when its codes are made, Σs is
// precomputed per weight row and block when the weight is packed.
//
// Kernels (run-time dispatch; every path gives bit-identical int32 dot products):
//   scalar       portable loop, always available
//   avx2         _mm256_maddubs_epi16 (u8 × s8 → int16 pair sums) then _mm256_madd_epi16 by 1.
//                Exact only while a pair sum 2·q·s cannot leave int16: with activation codes
//                q ≤ 2^a − 1 and |s| ≤ 2^(b−1) (b = 4 for the nibble container below), the pair sum
//                is at most 2·(2^a − 1)·2^(b−1) = (2^a − 1)·2^b. So the route is taken only when
//                (2^a − 1)·2^b ≤ 32767: every a ≤ 8 with nibble weights (255·16 = 4080), and byte
//                weights of b ≤ 7 bits for a = 8 (255·128 = 32640), any b ≤ 8 for a ≤ 7
//                (127·256 = 32512). The one excluded case, a = 8 with b = 8 (255·256 = 65280),
//                goes through avx2-madd16: both operands widened to int16 and _mm256_madd_epi16,
//                whose pair sums (≤ 2·255·128) are exact in int32.
//   avx-vnni     _mm256_dpbusd_avx_epi32 (u8 × s8, four products summed into int32: no
//                intermediate saturation), compiled with a target attribute, used when CPUID says so
//   avx512-vnni  _mm512_dpbusd_epi32, likewise
// Accumulators are int32: |Σ q·s| ≤ n·255·128, exact for n ≤ 65536 columns (checked).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace dq {

enum class IntPath { Scalar, Avx2, AvxVnni, Avx512Vnni };
const char* int_path_name(IntPath p);
// The path of that name ("scalar", "avx2", "avx-vnni", "avx512-vnni"); an Error otherwise.
IntPath int_path_named(const std::string& name);
// The paths this CPU can run, scalar first; the last is the fastest.
std::vector<IntPath> supported_int_paths();
IntPath best_int_path();

// The column blocks of a product whose weights are grouped by `group` columns and activations by
// `act_group` (0: one group per row): a block starts wherever either group does, block b is
// [bounds[b], bounds[b + 1]). int_gemm and the fake-quant reference (quant/quantize_model.h) add
// the blocks' exact products in this order.
std::vector<int64_t> column_blocks(int64_t cols, int64_t group, int64_t act_group);

// Packed weight values, one row per output channel, in one of two containers:
// - nibbles (codes of 2..4 bits): value s = code − 8 ∈ [−8, 7]; each run of 32 columns is 16 bytes,
//   column j of the run in the low nibble of byte j (j < 16) or the high nibble of byte j − 16;
//   a row is padded with zero nibbles to a multiple of 32 columns.
// - bytes (codes of 5..8 bits): value s = code − 2^(bits−1) as int8, one per column.
struct IntWeights {
  int64_t rows = 0, cols = 0;
  int bits = 0;
  bool nibbles = false;
  int64_t row_bytes = 0;
  std::vector<uint8_t> values;  // rows * row_bytes
  int64_t group = 0;            // columns per weight group (cols when per channel)
  std::vector<float> scales;    // rows * weight groups
  std::vector<int32_t> zeros;   // rows * weight groups, in the stored domain (code zero − offset)
  // Column blocks over which both the weight group and the activation group are constant, and
  // each row's sum of stored values over each block.
  int64_t act_group = 0;        // columns per activation group (cols: one per token)
  std::vector<int64_t> bounds;  // block b is [bounds[b], bounds[b + 1])
  std::vector<int32_t> block_sums;  // rows * blocks

  int64_t weight_groups() const { return (cols + group - 1) / group; }
  int64_t blocks() const { return int64_t(bounds.size()) - 1; }
  // The stored value of row r, column c (for tests and the scalar path).
  int value(int64_t r, int64_t c) const;
  // Packs unsigned codes (rows x cols, one per byte) with their per-group scales and code zeros
  // (rows x weight groups), and precomputes the blocks for activations grouped by act_group.
  static IntWeights pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int64_t group,
                         const float* scales, const float* zeros, int64_t act_group);
  size_t bytes() const;  // resident size of everything above
};

// Activation codes of a tokens x cols matrix, quantized per token (and per group of `group`
// columns): code q stands for scale · (q − zero).
struct IntActs {
  int64_t rows = 0, cols = 0;
  int bits = 0;
  int64_t group = 0;            // columns per group (cols: one per token)
  std::vector<uint8_t> codes;   // rows * cols
  std::vector<float> scales;    // rows * groups
  std::vector<int32_t> zeros;   // rows * groups
  // rows * groups: each group's sum of codes, when whoever made the codes summed them too (int_gemm
  // uses them where its blocks are the activation groups, else it sums the codes itself); or empty.
  std::vector<int32_t> sums;
  int64_t groups() const { return (cols + group - 1) / group; }
};

// Σ_{c in [c0, c1)} a[c]·s(w_row, c) on one path: a points at a token's codes (column 0), w at a
// packed row. The raw kernel the tests compare against a naive sum.
int32_t int_dot(IntPath p, int act_bits, const IntWeights& w, int64_t row, const uint8_t* a,
                int64_t c0, int64_t c1);

// How int_gemm walks the product on a vector path: register tiles of 4 tokens x 2 weight rows
// (AVX2, AVX-VNNI) or 6 tokens x 4 rows (AVX-512), smaller tiles for a chunk's last tokens, over
// int8 weights (nibble rows expanded once per chunk of 32 tiles), with a vector epilogue; column
// slices (AVX-512 and AVX2, where every block is whole groups of 4 columns): the weights rearranged
// so that a register holds 16 rows (AVX-512, 8 tokens at a time), two registers 8 rows each (AVX2
// maddubs, 3 tokens) or four registers 4 rows each widened to int16 (AVX2 madd16, 1 token), no
// horizontal sums per row; or one (token, row) dot at a time (the earlier kernels; kept to compare
// against, in tests and bench_gemm; single tokens, as in decoding, always go this way and read each
// packed byte once). Best: slices where they pay (AVX2 maddubs: wherever they apply; AVX-512 and
// AVX2 madd16: short blocks), else tiles. The scalar path is always row by row. All give the same bits.
enum class IntTiling { Best, Tiles, Slices, Rows };

// Y[t, r] = Σ_c deq(a)[t, c] · deq(w)[r, c], computed as above. a.group must be w.act_group.
void int_gemm(const IntActs& a, const IntWeights& w, IntPath p, Matrix& y, IntTiling tiling = IntTiling::Best);

// The kernel names int_gemm ran since start (e.g. "avx2-maddubs"), in a fixed order.
std::vector<std::string> int_kernels_used();

// An input converted to what a PackedLinear multiplies (the integer runtime's activation codes).
struct PackedInput {
  virtual ~PackedInput() = default;
};

// A linear layer whose weight a backend keeps in its own form (the integer runtime's packed codes):
// Y = X Wᵀ from an f32 input. Linears that read one input the same way (q/k/v, gate/up) can share
// its conversion: prepare() once, then apply() of each linear that shares_input() with the first.
struct PackedLinear {
  virtual ~PackedLinear() = default;
  virtual std::unique_ptr<PackedInput> prepare(const Matrix& x) const = 0;
  virtual bool shares_input(const PackedLinear& other) const = 0;
  // x must come from prepare() of this linear or of one it shares_input() with.
  virtual void apply(const PackedInput& x, Matrix& y) const = 0;
  void apply(const Matrix& x, Matrix& y) const { apply(*prepare(x), y); }
  virtual size_t bytes() const = 0;  // resident size
};

}  // namespace dq
