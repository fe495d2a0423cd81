// SafetensorsStreamWriter: the same bytes as write_safetensors for the same tensors, whether written
// whole, in parts, or resumed after a crash that left garbage past the last checkpoint; tensors
// out of the announced order or size are refused.
#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "test_helpers.h"

using namespace dq;
using dq::test::ScratchDir;
using dq::test::slurp;

namespace {

std::vector<TensorBlob> three_tensors() {
  Matrix a(3, 4), b(2, 5), c(1, 7);
  for (size_t i = 0; i < a.size(); ++i) a.data[i] = float(i) * 0.5f - 2.f;
  for (size_t i = 0; i < b.size(); ++i) b.data[i] = float(i * i) - 3.f;
  for (size_t i = 0; i < c.size(); ++i) c.data[i] = 1.f / float(i + 1);
  return {blob_from_matrix("a", a, DType::F32), blob_from_matrix("b", b, DType::BF16),
          blob_from_matrix("c", c, DType::F32, {7})};
}

std::vector<TensorLayout> layout_of(const std::vector<TensorBlob>& ts) {
  std::vector<TensorLayout> l;
  for (const TensorBlob& t : ts) l.push_back({t.name, t.dtype, t.shape, t.bytes.size()});
  return l;
}

TEST(StreamWriter, MatchesWriteSafetensorsWholeAndInParts) {
  ScratchDir dir;
  const auto ts = three_tensors();
  write_safetensors(dir / "ref.safetensors", ts, {{"format", "pt"}});
  {
    SafetensorsStreamWriter w(dir / "s.safetensors", layout_of(ts), {{"format", "pt"}});
    w.write(ts[0]);
    const auto& bytes = ts[1].bytes;  // in two parts
    w.write_bytes("b", bytes.data(), 6);
    w.write_bytes("b", bytes.data() + 6, bytes.size() - 6);
    w.write(ts[2]);
    w.finish();
  }
  EXPECT_EQ(slurp(dir / "s.safetensors"), slurp(dir / "ref.safetensors"));
  SafetensorsFile f(dir / "s.safetensors");
  EXPECT_EQ(f.at("c").shape, std::vector<int64_t>{7});
}

TEST(StreamWriter, ResumeDropsWhatFollowsTheCheckpoint) {
  ScratchDir dir;
  const auto ts = three_tensors();
  write_safetensors(dir / "ref.safetensors", ts);
  {
    SafetensorsStreamWriter w(dir / "s.safetensors", layout_of(ts), {});
    w.write(ts[0]);
    w.write(ts[1]);
    w.sync();
    EXPECT_EQ(w.written(), 2u);
  }
  // A killed run wrote part of tensor c, and more, after the checkpoint of two tensors.
  std::string partial = slurp(dir / "s.safetensors") + std::string(1000, '\x7f');
  dq::test::spit(dir / "s.safetensors", partial);
  {
    SafetensorsStreamWriter w(dir / "s.safetensors", layout_of(ts), {}, 2);
    EXPECT_THROW(w.write(ts[1]), Error) << "b is already written";
    w.write(ts[2]);
    w.finish();
  }
  EXPECT_EQ(slurp(dir / "s.safetensors"), slurp(dir / "ref.safetensors"));
}

TEST(StreamWriter, RefusesWrongOrderSizeAndMissingTensors) {
  ScratchDir dir;
  const auto ts = three_tensors();
  SafetensorsStreamWriter w(dir / "s.safetensors", layout_of(ts), {});
  EXPECT_THROW(w.write(ts[1]), Error);
  EXPECT_THROW(w.write_bytes("a", ts[0].bytes.data(), ts[0].bytes.size() + 1), Error);
  w.write(ts[0]);
  EXPECT_THROW(w.finish(), Error);
}

TEST(StreamWriter, ResumingPastTheFileEndIsAnError) {
  ScratchDir dir;
  const auto ts = three_tensors();
  dq::test::spit(dir / "short.safetensors", "12345");
  EXPECT_THROW(SafetensorsStreamWriter(dir / "short.safetensors", layout_of(ts), {}, 2), Error);
}

}  // namespace
