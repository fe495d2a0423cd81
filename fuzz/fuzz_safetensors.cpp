// safetensors: the header JSON (duplicate keys refused) and every size/offset claim in it, the
// rule that accepted data ranges tile the buffer exactly, aligned, and every float tensor read as f32.
#include <algorithm>
#include <vector>

#include "fuzz_common.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("model.safetensors", data, size);
  try {
    dq::SafetensorsFile f(path);
    std::vector<std::pair<size_t, size_t>> ranges;  // [offset, end)
    for (const auto& [name, t] : f.tensors()) {
      if (t.offset + t.nbytes > f.file().size() || t.offset < 8) dqfuzz::finding("tensor outside the file");
      if (uint64_t(t.numel()) * dq::dtype_size(t.dtype) != t.nbytes) dqfuzz::finding("size mismatch accepted");
      if (t.offset % dq::dtype_size(t.dtype) != 0) dqfuzz::finding("misaligned tensor accepted");
      ranges.push_back({t.offset, t.offset + t.nbytes});
      volatile uint8_t sink = 0;  // touch the first and last byte the reader vouched for
      if (t.nbytes) sink = uint8_t(t.data[0] ^ t.data[t.nbytes - 1]);
      (void)sink;
      if (t.dtype == dq::DType::F32 || t.dtype == dq::DType::F16 || t.dtype == dq::DType::BF16 ||
          t.dtype == dq::DType::F64) {
        std::vector<float> out(size_t(t.numel()));
        (void)dq::convert_to_f32(t.dtype, t.data, out.size(), out.data());
      }
    }
    // Sorted by start (zero-length ones first at a tie), each range begins where the last ended,
    // and the last ends at the end of the file: no gap, no overlap, nothing after.
    std::sort(ranges.begin(), ranges.end());
    size_t next = ranges.empty() ? f.file().size() : ranges.front().first;
    for (const auto& [b, e] : ranges) {
      if (b != next) dqfuzz::finding("data ranges with a gap or an overlap accepted");
      next = e;
    }
    if (next != f.file().size()) dqfuzz::finding("bytes after the last tensor accepted");
  } catch (const dq::Error&) {
  }
  return 0;
}
