// llama2.c's tokenizer.bin: int32 max_token_length, then per token {f32 score, int32 len, bytes}.
// Encoding follows llama2.c: dummy-prefix space, code points (byte fallback to ids 3..258), then
// repeatedly merge the adjacent pair whose concatenation is the best-scoring piece.
#include <cmath>
#include <cstring>
#include <queue>
#include <unordered_map>

#include "io/file.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

namespace dq {
namespace {

constexpr int32_t kUnk = 0, kBos = 1, kEos = 2, kByteBase = 3;
constexpr size_t kMaxVocab = size_t(1) << 22;  // as for llama2.c checkpoints

class Llama2cTokenizer : public Tokenizer {
 public:
  explicit Llama2cTokenizer(const std::string& path) {
    std::string buf = read_file(path);
    size_t pos = 0;
    auto take = [&](void* dst, size_t n) {
      if (pos + n > buf.size()) throw Error(path + ": truncated llama2.c tokenizer file");
      std::memcpy(dst, buf.data() + pos, n);
      pos += n;
    };
    int32_t max_len = 0;
    take(&max_len, 4);
    if (max_len <= 0 || max_len > 4096) throw Error(path + ": not a llama2.c tokenizer (bad header)");
    while (pos < buf.size()) {
      float score;
      int32_t len;
      take(&score, 4);
      take(&len, 4);
      if (len < 0 || len > max_len) throw Error(path + ": token length out of range");
      if (std::isnan(score)) throw Error(path + ": token score is NaN");  // would break the merge order
      if (pieces_.size() >= kMaxVocab) throw Error(path + ": more than " + std::to_string(kMaxVocab) + " tokens");
      std::string piece(size_t(len), '\0');
      take(piece.data(), size_t(len));
      index_.emplace(piece, int32_t(pieces_.size()));
      pieces_.push_back(std::move(piece));
      scores_.push_back(score);
    }
    if (pieces_.size() < size_t(kByteBase + 256))
      throw Error(path + ": vocabulary too small for byte fallback");
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int32_t> ids;
    if (add_special) ids.push_back(kBos);
    // The dummy prefix; a vocabulary without a " " piece gets none (-1 is no token id).
    if (!text.empty() && lookup(" ") >= 0) ids.push_back(lookup(" "));
    for (size_t i = 0; i < text.size();) {
      size_t n = 1;  // one UTF-8 code point: lead byte plus its continuation bytes (at most 4)
      while (i + n < text.size() && n < 4 && (uint8_t(text[i + n]) & 0xC0) == 0x80) ++n;
      int32_t id = lookup(text.substr(i, n));
      if (id >= 0) {
        ids.push_back(id);
      } else {
        for (size_t k = 0; k < n; ++k) ids.push_back(kByteBase + uint8_t(text[i + k]));
      }
      i += n;
    }
    size_t first = add_special ? 1 : 0;
    merge(ids, first);
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    int32_t prev = -1;
    for (int32_t id : ids) {
      if (id < 0 || size_t(id) >= pieces_.size()) throw Error("token id " + std::to_string(id) + " out of range");
      if (id == kBos || id == kEos) { prev = id; continue; }
      if (id >= kByteBase && id < kByteBase + 256) {
        out.push_back(char(id - kByteBase));
      } else {
        const std::string& p = pieces_[size_t(id)];
        // The dummy prefix: the first piece after BOS (or at the start) drops its leading space.
        out += ((prev == kBos || prev == -1) && !p.empty() && p[0] == ' ') ? p.substr(1) : p;
      }
      prev = id;
    }
    return out;
  }

  int32_t bos_id() const override { return kBos; }
  int32_t eos_id() const override { return kEos; }
  size_t vocab_size() const override { return pieces_.size(); }

  VocabInfo vocab_info() const override {
    VocabInfo v;
    v.model = "llama";
    v.bos = kBos;
    v.eos = kEos;
    v.unk = kUnk;
    v.add_bos = true;
    v.scores = scores_;
    for (size_t i = 0; i < pieces_.size(); ++i) {
      int32_t id = int32_t(i), type = 1;
      std::string piece = pieces_[i];
      if (id == kUnk) type = 2;
      else if (id == kBos || id == kEos) type = 3;
      else if (id >= kByteBase && id < kByteBase + 256) type = 6;
      // llama2.c stores its control pieces as "\n<s>\n" / "\n</s>\n"; SentencePiece (and llama.cpp,
      // which prints them) spells them "<s>" / "</s>".
      if (id == kBos) piece = "<s>";
      if (id == kEos) piece = "</s>";
      if (type == 1) {  // llama.cpp's SentencePiece vocabularies spell spaces as U+2581
        std::string s;
        for (char c : piece) s += c == ' ' ? std::string("\xE2\x96\x81") : std::string(1, c);
        piece = s;
      }
      v.tokens.push_back(piece);
      v.token_types.push_back(type);
    }
    return v;
  }

 private:
  // Repeatedly merges the adjacent pair whose concatenation is the best-scoring piece (leftmost on
  // ties), as llama2.c does, in O(n log n): symbols form a linked list, candidate pairs a heap, and
  // a popped pair is used only if both of its symbols are unchanged since it was pushed.
  void merge(std::vector<int32_t>& ids, size_t first) const {
    const size_t n = ids.size();
    std::vector<int64_t> prev(n), next(n);
    std::vector<uint32_t> version(n, 0);
    for (size_t i = 0; i < n; ++i) {
      prev[i] = int64_t(i) - 1;
      next[i] = i + 1 < n ? int64_t(i + 1) : -1;
    }
    struct Cand {
      float score;
      int64_t left, right;
      uint32_t vl, vr;
      int32_t id;
      bool operator<(const Cand& o) const {
        return score != o.score ? score < o.score : left > o.left;
      }
    };
    std::priority_queue<Cand> heap;
    auto push = [&](int64_t l, int64_t r) {
      if (l < int64_t(first) || r < 0) return;
      int32_t id = lookup(pieces_[size_t(ids[size_t(l)])] + pieces_[size_t(ids[size_t(r)])]);
      if (id >= 0) heap.push({scores_[size_t(id)], l, r, version[size_t(l)], version[size_t(r)], id});
    };
    for (size_t i = first; i + 1 < n; ++i) push(int64_t(i), int64_t(i + 1));
    std::vector<bool> dead(n, false);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      size_t l = size_t(c.left), r = size_t(c.right);
      if (dead[l] || dead[r] || next[l] != c.right || version[l] != c.vl || version[r] != c.vr) continue;
      ids[l] = c.id;
      ++version[l];
      dead[r] = true;
      next[l] = next[r];
      if (next[r] >= 0) prev[size_t(next[r])] = int64_t(l);
      push(prev[l], int64_t(l));
      push(int64_t(l), next[l]);
    }
    std::vector<int32_t> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i)
      if (!dead[i]) out.push_back(ids[i]);
    ids.swap(out);
  }

  int32_t lookup(std::string_view s) const {
    auto it = index_.find(std::string(s));
    return it == index_.end() ? -1 : it->second;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> index_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path) {
  return std::make_unique<Llama2cTokenizer>(path);
}

}  // namespace dq
