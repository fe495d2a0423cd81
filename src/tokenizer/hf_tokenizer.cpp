// Hugging Face tokenizer.json: the encode pipeline of the `tokenizers` library (added tokens,
// normalizer, pre-tokenizer, BPE model, post-processor) and its decoders, written from the format's
// definitions. Components outside the supported set are refused by name, never approximated.
//
// Input text that is not valid UTF-8 is first made valid by replacing each maximal ill-formed
// subsequence with U+FFFD, as a Rust String from String::from_utf8_lossy would be.
#include <algorithm>
#include <array>
#include <climits>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "io/file.h"
#include "io/json_limits.h"
#include "io/printable.h"
#include "tensor/tensor.h"
#include "tokenizer/hf_text.h"
#include "tokenizer/tokenizer.h"

namespace dq {
namespace {

using json = nlohmann::json;
using hf::Regex;
using hf::SplitBehavior;
using Ranges = std::vector<std::pair<size_t, size_t>>;

const char* kReplacementChar = "\xEF\xBF\xBD";

// A string-keyed map that can be probed with a string_view without building a string.
struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, SvHash, std::equal_to<>>;

// Where in tokenizer.json a component sits, for error messages.
struct Ctx {
  std::string file;
  [[noreturn]] void fail(const std::string& what) const { throw Error(file + ": " + what); }
  [[noreturn]] void unsupported(const std::string& component, const std::string& type) const {
    fail("unsupported " + component + " '" + type + "'");
  }
};

std::string type_of(const json& j, const Ctx& ctx, const char* component) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    ctx.fail(std::string(component) + " without a \"type\"");
  return j["type"].get<std::string>();
}

// Integer fields. nlohmann's get<int>() converts a float with a static_cast, undefined behaviour
// when it is out of range (found by fuzzing: an id of 6.7e46), so the type and range are checked.
int64_t get_integer(const json& v, const Ctx& ctx, const std::string& what, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) ctx.fail(what + " is not an integer");
  if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(hi) : (v.get<int64_t>() < lo || v.get<int64_t>() > hi))
    ctx.fail(what + " is out of range");
  return v.get<int64_t>();
}
int32_t get_id(const json& v, const Ctx& ctx, const std::string& what) {
  return int32_t(get_integer(v, ctx, what, INT32_MIN, INT32_MAX));
}

// {"String": "..."} or {"Regex": "..."}, as Replace and Split store their pattern.
class Pattern {
 public:
  Pattern(const json& j, const Ctx& ctx) {
    if (j.contains("String")) {
      literal_ = j["String"].get<std::string>();
    } else if (j.contains("Regex")) {
      try {
        regex_ = std::make_unique<Regex>(j["Regex"].get<std::string>());
      } catch (const std::runtime_error& e) {
        ctx.fail(e.what());
      }
    } else {
      ctx.fail("pattern is neither String nor Regex");
    }
  }
  void find_all(std::string_view s, Ranges& out) const {
    if (regex_) return regex_->find_all(s, out);
    out.clear();
    if (literal_.empty()) return;
    for (size_t p = s.find(literal_); p != std::string_view::npos; p = s.find(literal_, p + literal_.size()))
      out.emplace_back(p, p + literal_.size());
  }

 private:
  std::string literal_;
  std::unique_ptr<Regex> regex_;
};

std::string replace_all(std::string_view s, const Pattern& pat, std::string_view content) {
  Ranges m;
  pat.find_all(s, m);
  if (m.empty()) return std::string(s);
  std::string out;
  size_t prev = 0;
  for (auto [b, e] : m) {
    out.append(s.substr(prev, b - prev));
    out.append(content);
    prev = e;
  }
  out.append(s.substr(prev));
  return out;
}

// ---------------------------------------------------------------- normalizers

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

struct PrependNormalizer : Normalizer {
  std::string prepend;
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prepend);
  }
};

struct ReplaceNormalizer : Normalizer {
  std::unique_ptr<Pattern> pattern;
  std::string content;
  void normalize(std::string& s) const override { s = replace_all(s, *pattern, content); }
};

struct SequenceNormalizer : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> parts;
  void normalize(std::string& s) const override {
    for (const auto& n : parts) n->normalize(s);
  }
};

std::unique_ptr<Normalizer> make_normalizer(const json& j, const Ctx& ctx) {
  std::string type = type_of(j, ctx, "normalizer");
  if (type == "Prepend") {
    auto n = std::make_unique<PrependNormalizer>();
    n->prepend = j.at("prepend").get<std::string>();
    return n;
  }
  if (type == "Replace") {
    auto n = std::make_unique<ReplaceNormalizer>();
    n->pattern = std::make_unique<Pattern>(j.at("pattern"), ctx);
    n->content = j.at("content").get<std::string>();
    return n;
  }
  if (type == "Sequence") {
    auto n = std::make_unique<SequenceNormalizer>();
    for (const json& part : j.at("normalizers")) n->parts.push_back(make_normalizer(part, ctx));
    return n;
  }
  if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD")
    ctx.fail("unsupported normalizer '" + type + "' (Unicode normalization tables are not built in)");
  ctx.unsupported("normalizer", type);
}

// ---------------------------------------------------------------- pre-tokenizers

// A piece of the input on its way to the model; at_origin: it begins at offset 0 of the input
// (Metaspace's "first" prepend scheme only applies there).
struct Piece {
  std::string text;
  bool at_origin;
};
using Pieces = std::vector<Piece>;

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  virtual void split(Pieces& pieces) const = 0;
};

void split_ranges(const Piece& p, const Ranges& ranges, Pieces& out) {
  for (auto [b, e] : ranges) out.push_back({p.text.substr(b, e - b), p.at_origin && b == 0});
}

SplitBehavior behavior_from(const std::string& s, const Ctx& ctx) {
  if (s == "Removed") return SplitBehavior::Removed;
  if (s == "Isolated") return SplitBehavior::Isolated;
  if (s == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (s == "Contiguous") return SplitBehavior::Contiguous;
  ctx.unsupported("split behavior", s);
}

struct SplitPreTokenizer : PreTokenizer {
  std::unique_ptr<Pattern> pattern;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  void split(Pieces& pieces) const override {
    Pieces out;
    Ranges m;
    for (const Piece& p : pieces) {
      pattern->find_all(p.text, m);
      auto spans = hf::spans_from_matches(p.text, m);
      if (invert)
        for (auto& s : spans) s.is_match = !s.is_match;
      split_ranges(p, hf::apply_behavior(spans, behavior), out);
    }
    pieces = std::move(out);
  }
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct ByteLevelPreTokenizer : PreTokenizer {
  bool add_prefix_space = false;
  std::unique_ptr<Regex> regex;  // null when use_regex is false
  void split(Pieces& pieces) const override {
    Pieces out;
    Ranges m;
    for (Piece& p : pieces) {
      if (add_prefix_space && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, 1, ' ');
      Ranges ranges;
      if (regex) {
        regex->find_all(p.text, m);
        ranges = hf::apply_behavior(hf::spans_from_matches(p.text, m), SplitBehavior::Isolated);
      } else if (!p.text.empty()) {
        ranges.emplace_back(0, p.text.size());
      }
      for (auto [b, e] : ranges) {
        std::string mapped;
        mapped.reserve((e - b) * 2);
        for (size_t i = b; i < e; ++i) mapped += hf::byte_to_char(uint8_t(p.text[i]));
        out.push_back({std::move(mapped), p.at_origin && b == 0});
      }
    }
    pieces = std::move(out);
  }
};

enum class PrependScheme { Always, First, Never };

struct MetaspacePreTokenizer : PreTokenizer {
  std::string replacement;
  PrependScheme scheme = PrependScheme::Always;
  bool split_words = true;
  void split(Pieces& pieces) const override {
    Pieces out;
    Ranges m;
    for (const Piece& p : pieces) {
      std::string s;
      s.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ') s += replacement;
        else s += c;
      }
      bool prepend = scheme == PrependScheme::Always || (scheme == PrependScheme::First && p.at_origin);
      if (prepend && s.compare(0, replacement.size(), replacement) != 0) s.insert(0, replacement);
      Piece q{std::move(s), p.at_origin};
      if (!split_words) {
        if (!q.text.empty()) out.push_back(std::move(q));
        continue;
      }
      m.clear();
      for (size_t at = q.text.find(replacement); at != std::string::npos;
           at = q.text.find(replacement, at + replacement.size()))
        m.emplace_back(at, at + replacement.size());
      split_ranges(q, hf::apply_behavior(hf::spans_from_matches(q.text, m), SplitBehavior::MergedWithNext), out);
    }
    pieces = std::move(out);
  }
};

struct SequencePreTokenizer : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> parts;
  void split(Pieces& pieces) const override {
    for (const auto& p : parts) p->split(pieces);
  }
};

std::unique_ptr<Regex> make_regex(const std::string& pattern, const Ctx& ctx) {
  try {
    return std::make_unique<Regex>(pattern);
  } catch (const std::runtime_error& e) {
    ctx.fail(e.what());
  }
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const Ctx& ctx) {
  std::string type = type_of(j, ctx, "pre_tokenizer");
  if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPreTokenizer>();
    p->add_prefix_space = j.value("add_prefix_space", true);
    if (j.value("use_regex", true)) p->regex = make_regex(kGpt2Pattern, ctx);
    return p;
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<MetaspacePreTokenizer>();
    p->replacement = j.value("replacement", std::string("\xE2\x96\x81"));
    if (p->replacement.empty()) ctx.fail("Metaspace pre_tokenizer with an empty replacement");
    if (j.contains("prepend_scheme")) {
      std::string s = j["prepend_scheme"].get<std::string>();
      if (s == "always") p->scheme = PrependScheme::Always;
      else if (s == "first") p->scheme = PrependScheme::First;
      else if (s == "never") p->scheme = PrependScheme::Never;
      else ctx.unsupported("Metaspace prepend_scheme", s);
    } else {  // files written before prepend_scheme existed
      p->scheme = j.value("add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
    }
    p->split_words = j.value("split", true);
    return p;
  }
  if (type == "Split") {
    auto p = std::make_unique<SplitPreTokenizer>();
    p->pattern = std::make_unique<Pattern>(j.at("pattern"), ctx);
    p->behavior = behavior_from(j.at("behavior").get<std::string>(), ctx);
    p->invert = j.value("invert", false);
    return p;
  }
  if (type == "Digits") {
    // char::is_numeric is the N category; runs of it are one piece unless digits are individual.
    auto p = std::make_unique<SplitPreTokenizer>();
    json pat = {{"Regex", j.value("individual_digits", false) ? "\\p{N}" : "\\p{N}+"}};
    p->pattern = std::make_unique<Pattern>(pat, ctx);
    return p;
  }
  if (type == "Sequence") {
    auto p = std::make_unique<SequencePreTokenizer>();
    for (const json& part : j.at("pretokenizers")) p->parts.push_back(make_pre_tokenizer(part, ctx));
    return p;
  }
  ctx.unsupported("pre_tokenizer", type);
}

// ---------------------------------------------------------------- decoders

using Tokens = std::vector<std::string>;

struct Decoder {
  virtual ~Decoder() = default;
  virtual void decode(Tokens& toks) const = 0;
};

struct ByteLevelDecoder : Decoder {
  void decode(Tokens& toks) const override {
    std::string bytes;
    for (const std::string& t : toks) {
      size_t start = bytes.size();
      bool all_mapped = true;
      for (size_t i = 0; i < t.size();) {
        int b = hf::char_to_byte(hf::next_cp(t, i));
        if (b < 0) {
          all_mapped = false;
          break;
        }
        bytes += char(b);
      }
      if (!all_mapped) {  // a token outside the byte alphabet (an added token) is kept as written
        bytes.resize(start);
        bytes += t;
      }
    }
    std::string fixed;
    toks.assign(1, hf::sanitize_utf8(bytes, fixed) ? fixed : bytes);
  }
};

struct MetaspaceDecoder : Decoder {
  std::string replacement;
  bool drop_first = true;  // prepend_scheme is not "never": the first token loses its replacements
  void decode(Tokens& toks) const override {
    for (size_t i = 0; i < toks.size(); ++i) {
      std::string& t = toks[i];
      std::string out;
      for (size_t p = 0; p < t.size();) {
        if (t.compare(p, replacement.size(), replacement) == 0) {
          if (!(i == 0 && drop_first)) out += ' ';
          p += replacement.size();
        } else {
          out += t[p++];
        }
      }
      t = std::move(out);
    }
  }
};

struct ReplaceDecoder : Decoder {
  std::unique_ptr<Pattern> pattern;
  std::string content;
  void decode(Tokens& toks) const override {
    for (std::string& t : toks) t = replace_all(t, *pattern, content);
  }
};

// Runs of "<0xXX>" tokens become the text of their bytes; one U+FFFD per byte when not UTF-8.
struct ByteFallbackDecoder : Decoder {
  void decode(Tokens& toks) const override {
    Tokens out;
    std::string bytes;
    auto flush = [&] {
      if (bytes.empty()) return;
      std::string fixed;
      if (!hf::sanitize_utf8(bytes, fixed)) out.push_back(bytes);
      else
        for (size_t k = 0; k < bytes.size(); ++k) out.push_back(kReplacementChar);
      bytes.clear();
    };
    for (std::string& t : toks) {
      int v = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
        int hi = hex(t[3]), lo = hex(t[4]);
        if (hi >= 0 && lo >= 0) v = hi * 16 + lo;
      }
      if (v >= 0) {
        bytes += char(v);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    toks = std::move(out);
  }
};

struct FuseDecoder : Decoder {
  void decode(Tokens& toks) const override {
    std::string all;
    for (const std::string& t : toks) all += t;
    toks.assign(1, std::move(all));
  }
};

struct StripDecoder : Decoder {
  std::string content;  // one character
  size_t start = 0, stop = 0;
  void decode(Tokens& toks) const override {
    const size_t n = content.size();
    for (std::string& t : toks) {
      size_t b = 0, e = t.size();
      for (size_t k = 0; k < start && e - b >= n && t.compare(b, n, content) == 0; ++k) b += n;
      for (size_t k = 0; k < stop && e - b >= n && t.compare(e - n, n, content) == 0; ++k) e -= n;
      t = t.substr(b, e - b);
    }
  }
};

struct SequenceDecoder : Decoder {
  std::vector<std::unique_ptr<Decoder>> parts;
  void decode(Tokens& toks) const override {
    for (const auto& d : parts) d->decode(toks);
  }
};

std::unique_ptr<Decoder> make_decoder(const json& j, const Ctx& ctx) {
  std::string type = type_of(j, ctx, "decoder");
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    auto d = std::make_unique<MetaspaceDecoder>();
    d->replacement = j.value("replacement", std::string("\xE2\x96\x81"));
    if (d->replacement.empty()) ctx.fail("Metaspace decoder with an empty replacement");
    if (j.contains("prepend_scheme")) d->drop_first = j["prepend_scheme"].get<std::string>() != "never";
    else d->drop_first = j.value("add_prefix_space", true);
    return d;
  }
  if (type == "Replace") {
    auto d = std::make_unique<ReplaceDecoder>();
    d->pattern = std::make_unique<Pattern>(j.at("pattern"), ctx);
    d->content = j.at("content").get<std::string>();
    return d;
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    auto d = std::make_unique<StripDecoder>();
    d->content = j.at("content").get<std::string>();
    if (d->content.empty()) ctx.fail("Strip decoder with empty content");
    d->start = j.contains("start") ? size_t(get_integer(j["start"], ctx, "Strip start", 0, INT64_MAX)) : 0;
    d->stop = j.contains("stop") ? size_t(get_integer(j["stop"], ctx, "Strip stop", 0, INT64_MAX)) : 0;
    return d;
  }
  if (type == "Sequence") {
    auto d = std::make_unique<SequenceDecoder>();
    for (const json& part : j.at("decoders")) d->parts.push_back(make_decoder(part, ctx));
    return d;
  }
  ctx.unsupported("decoder", type);
}

// ---------------------------------------------------------------- BPE model

class BpeModel {
 public:
  static constexpr int32_t kMaxVocab = 1 << 22;  // ids beyond this are refused (largest real: ~2^18)
  BpeModel(const json& j, const Ctx& ctx) {
    std::string type = type_of(j, ctx, "model");
    if (type != "BPE") ctx.unsupported("model", type);
    if (j.contains("dropout") && !j["dropout"].is_null() && j["dropout"].get<double>() != 0.0)
      ctx.fail("unsupported model option 'dropout' (it makes encoding random)");
    for (const char* opt : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (j.contains(opt) && !j[opt].is_null() && !j[opt].get<std::string>().empty())
        ctx.fail(std::string("unsupported model option '") + opt + "'");
    byte_fallback_ = j.value("byte_fallback", false);
    ignore_merges_ = j.value("ignore_merges", false);
    fuse_unk_ = j.value("fuse_unk", false);

    const json& vocab = j.at("vocab");
    if (!vocab.is_object()) ctx.fail("model.vocab is not an object");
    vocab_.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      int32_t id = get_id(it.value(), ctx, "model.vocab id of '" + it.key() + "'");
      if (id < 0) ctx.fail("model.vocab has a negative id for '" + it.key() + "'");
      if (id >= kMaxVocab)  // checked before tokens_ grows to it
        ctx.fail("model.vocab id " + std::to_string(id) + " for '" + it.key() + "' exceeds the limit " +
                 std::to_string(kMaxVocab));
      vocab_.emplace(it.key(), id);
      if (size_t(id) >= tokens_.size()) tokens_.resize(size_t(id) + 1);
      // Two tokens with one id: which text decodes from it is arbitrary (in the reference too).
      if (!tokens_[size_t(id)].empty())
        ctx.fail("model.vocab gives '" + printable(tokens_[size_t(id)]) + "' and '" + printable(it.key()) +
                 "' the same id " + std::to_string(id));
      tokens_[size_t(id)] = it.key();
    }
    if (j.contains("unk_token") && !j["unk_token"].is_null()) {
      std::string unk = j["unk_token"].get<std::string>();
      auto it = vocab_.find(unk);
      if (it == vocab_.end()) ctx.fail("model.unk_token '" + unk + "' is not in the vocabulary");
      unk_ = it->second;
    }
    if (byte_fallback_) {
      static const char* hex = "0123456789ABCDEF";
      for (int b = 0; b < 256; ++b) {
        std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
        auto it = vocab_.find(name);
        byte_ids_[size_t(b)] = it == vocab_.end() ? -1 : it->second;
      }
    }
    const json& merges = j.at("merges");
    merges_.reserve(merges.size());
    merge_text_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const json& m = merges[rank];
      std::string a, b;
      if (m.is_string()) {  // "a b"
        const std::string& s = m.get_ref<const std::string&>();
        size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          ctx.fail("model.merges[" + std::to_string(rank) + "] is not \"a b\": '" + s + "'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2) {  // ["a", "b"]
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        ctx.fail("model.merges[" + std::to_string(rank) + "] is neither \"a b\" nor [\"a\", \"b\"]");
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
        ctx.fail("model.merges[" + std::to_string(rank) + "] '" + a + " " + b + "' uses a token missing from the vocabulary");
      merges_.emplace(pair_key(ia->second, ib->second), Merge{int32_t(rank), iab->second});
      merge_text_.push_back(a + " " + b);
    }
    // '▁' must be a token itself too: otherwise it could fuse with an unknown character before it.
    split_at_marker_ = vocab_.count(kMarker) && std::none_of(tokens_.begin(), tokens_.end(), [](const std::string& t) {
      for (size_t p = t.find(kMarker, 1); p != std::string::npos; p = t.find(kMarker, p + 1))
        if (!ends_with_marker(std::string_view(t).substr(0, p))) return true;
      return false;
    });
  }

  // Appends the ids of one pre-tokenized word.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      auto it = vocab_.find(word);
      if (it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    if (!split_at_marker_) return encode_chunk(word, out);
    // No merge can span a position where '▁' follows another character, so a long SentencePiece
    // "word" (often a whole line) is encoded, and cached, piece by piece.
    size_t b = 0;
    for (size_t p = 1; p + kMarker.size() <= word.size(); ++p) {
      if (word.compare(p, kMarker.size(), kMarker) == 0 && !ends_with_marker(word.substr(0, p))) {
        encode_chunk(word.substr(b, p - b), out);
        b = p;
      }
    }
    encode_chunk(word.substr(b), out);
  }

  const std::vector<std::string>& tokens() const { return tokens_; }
  const TokenMap& vocab() const { return vocab_; }
  const std::vector<std::string>& merges() const { return merge_text_; }
  // For each of n ids, minus the rank of the first merge that makes it (kNoMerge when none does):
  // a SentencePiece-style runtime that merges the pair whose result scores highest then merges
  // in this model's order.
  static constexpr float kNoMerge = -1e9f;
  std::vector<float> merge_scores(size_t n) const {
    std::vector<float> s(n, kNoMerge);
    for (const auto& [pair, m] : merges_)
      if (size_t(m.id) < n) s[size_t(m.id)] = std::max(s[size_t(m.id)], -float(m.rank));
    return s;
  }
  int32_t unk() const { return unk_; }
  bool byte_fallback() const { return byte_fallback_; }
  bool is_byte_token(int32_t id) const {
    return byte_fallback_ && std::find(byte_ids_.begin(), byte_ids_.end(), id) != byte_ids_.end();
  }

 private:
  struct Merge {
    int32_t rank, id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  static constexpr std::string_view kMarker = "\xE2\x96\x81";  // U+2581, SentencePiece's space
  static bool ends_with_marker(std::string_view s) {
    return s.size() >= kMarker.size() && s.compare(s.size() - kMarker.size(), kMarker.size(), kMarker) == 0;
  }

  void encode_chunk(std::string_view word, std::vector<int32_t>& out) const {
    constexpr size_t kCacheMaxWord = 256;  // longer words are rarely seen twice
    const bool cacheable = word.size() <= kCacheMaxWord;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = cache_.find(word);
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    size_t first = out.size();
    merge_word(word, out);
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      if (cache_.size() >= kCacheCapacity) cache_.clear();
      cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + std::ptrdiff_t(first), out.end()));
    }
  }

  // The initial symbols are the word's characters (bytes via <0xXX> when a character is not in the
  // vocabulary and byte fallback is on, else the unknown token, consecutive ones fused when
  // fuse_unk). Then the lowest-ranked adjacent pair is merged until none is mergeable; ties go to
  // the leftmost pair. A heap keeps this O(n log n) on long words.
  void merge_word(std::string_view word, std::vector<int32_t>& out) const {
    struct Sym {
      int32_t id;
      int32_t prev, next;  // -1 at the ends
      bool alive;
    };
    std::vector<Sym> syms;
    syms.reserve(word.size());
    auto add = [&](int32_t id) {
      int32_t n = int32_t(syms.size());
      syms.push_back({id, n - 1, -1, true});
      if (n > 0) syms[size_t(n - 1)].next = n;
    };
    bool pending_unk = false;
    for (size_t i = 0; i < word.size();) {
      size_t n = std::min(hf::utf8_len(uint8_t(word[i])), word.size() - i);
      std::string_view ch = word.substr(i, n);
      i += n;
      auto it = vocab_.find(ch);
      if (it != vocab_.end()) {
        if (pending_unk) add(unk_);
        pending_unk = false;
        add(it->second);
        continue;
      }
      if (byte_fallback_ &&
          std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids_[uint8_t(c)] >= 0; })) {
        for (char c : ch) add(byte_ids_[uint8_t(c)]);
        continue;
      }
      if (unk_ < 0) continue;  // no unknown token: the character is dropped
      if (pending_unk && !fuse_unk_) add(unk_);
      pending_unk = true;
    }
    if (pending_unk) add(unk_);

    struct Cand {
      int32_t rank, pos, id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto consider = [&](int32_t pos) {
      if (pos < 0) return;
      int32_t nx = syms[size_t(pos)].next;
      if (nx < 0) return;
      auto it = merges_.find(pair_key(syms[size_t(pos)].id, syms[size_t(nx)].id));
      if (it != merges_.end()) heap.push({it->second.rank, pos, it->second.id});
    };
    for (int32_t p = 0; p + 1 < int32_t(syms.size()); ++p) consider(p);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      Sym& left = syms[size_t(c.pos)];
      if (!left.alive || left.next < 0) continue;
      Sym& right = syms[size_t(left.next)];
      auto it = merges_.find(pair_key(left.id, right.id));
      if (it == merges_.end() || it->second.id != c.id) continue;  // stale candidate
      left.id = c.id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) syms[size_t(right.next)].prev = c.pos;
      consider(left.prev);
      consider(c.pos);
    }
    for (const Sym& s : syms)
      if (s.alive) out.push_back(s.id);
  }

  static constexpr size_t kCacheCapacity = 1 << 16;
  TokenMap vocab_;
  std::vector<std::string> tokens_;  // by id; "" for ids the vocabulary skips
  std::unordered_map<uint64_t, Merge> merges_;
  std::vector<std::string> merge_text_;
  std::array<int32_t, 256> byte_ids_{};
  int32_t unk_ = -1;
  bool byte_fallback_ = false, ignore_merges_ = false, fuse_unk_ = false;
  bool split_at_marker_ = false;  // no token has '▁' after another character
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, SvHash, std::equal_to<>> cache_;
};

// ---------------------------------------------------------------- added tokens

struct AddedToken {
  int32_t id;
  std::string content;  // as matched: normalized first for normalized tokens
  bool single_word, lstrip, rstrip, normalized, special;
};

// Finds added tokens in text the way tokenizers' AddedVocabulary does: leftmost-longest
// non-overlapping matches, single_word ones only between non-word characters, lstrip/rstrip ones
// swallowing the whitespace beside them.
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    if (t->content.empty()) return;
    by_first_[uint8_t(t->content[0])].push_back(t);
  }
  bool empty() const {
    return std::all_of(by_first_.begin(), by_first_.end(), [](const auto& v) { return v.empty(); });
  }

  struct Hit {
    size_t begin, end;
    int32_t id;
  };
  std::vector<Hit> find(std::string_view s) const {
    std::vector<Hit> hits;
    size_t done = 0;  // end of the previous hit
    for (size_t i = 0; i < s.size();) {
      const auto& cands = by_first_[uint8_t(s[i])];
      const AddedToken* best = nullptr;
      for (const AddedToken* t : cands)
        if (s.compare(i, t->content.size(), t->content) == 0 && (!best || t->content.size() > best->content.size()))
          best = t;
      if (!best) {
        ++i;
        continue;
      }
      size_t b = i, e = i + best->content.size();
      i = e;
      if (best->single_word && !(word_boundary_before(s, b) && word_boundary_after(s, e))) {
        // A refused single_word match still consumes its text, as the automaton moves past it.
        continue;
      }
      if (best->lstrip) b = std::max(done, b - trailing_space(s.substr(0, b)));
      if (best->rstrip) e += leading_space(s.substr(e));
      hits.push_back({b, e, best->id});
      done = e;
      i = e;
    }
    return hits;
  }

 private:
  static bool is_word_char(std::string_view s, size_t at, bool before) {
    static const Regex word(R"([\p{Alphabetic}\p{N}])");
    if (before) {  // step back to the start of the previous character
      size_t p = at;
      do --p;
      while (p > 0 && (uint8_t(s[p]) & 0xC0) == 0x80);
      return word.matches_at(s, p);
    }
    return word.matches_at(s, at);
  }
  static bool word_boundary_before(std::string_view s, size_t b) { return b == 0 || !is_word_char(s, b, true); }
  static bool word_boundary_after(std::string_view s, size_t e) { return e == s.size() || !is_word_char(s, e, false); }
  static const Regex& space() {
    static const Regex r(R"(\p{White_Space})");
    return r;
  }
  static size_t leading_space(std::string_view s) {
    size_t n = 0;
    while (n < s.size() && space().matches_at(s, n)) n += hf::utf8_len(uint8_t(s[n]));
    return n;
  }
  static size_t trailing_space(std::string_view s) {
    size_t e = s.size();
    while (e > 0) {
      size_t p = e;
      do --p;
      while (p > 0 && (uint8_t(s[p]) & 0xC0) == 0x80);
      if (!space().matches_at(s, p)) break;
      e = p;
    }
    return s.size() - e;
  }
  std::array<std::vector<const AddedToken*>, 256> by_first_;
};

// ---------------------------------------------------------------- the tokenizer

class HfTokenizer : public Tokenizer {
 public:
  HfTokenizer(const std::string& path, const json& j) : path_(path) {
    Ctx ctx{path};
    if (!j.is_object()) ctx.fail("not a tokenizer.json (not a JSON object)");
    if (!j.contains("model")) ctx.fail("not a tokenizer.json (no \"model\")");
    model_ = std::make_unique<BpeModel>(j["model"], ctx);
    if (j.contains("normalizer") && !j["normalizer"].is_null()) normalizer_ = make_normalizer(j["normalizer"], ctx);
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null())
      pre_tokenizer_ = make_pre_tokenizer(j["pre_tokenizer"], ctx);
    if (j.contains("decoder") && !j["decoder"].is_null()) decoder_ = make_decoder(j["decoder"], ctx);
    if (j.contains("post_processor") && !j["post_processor"].is_null()) parse_post(j["post_processor"], ctx);
    for (const char* opt : {"truncation", "padding"})
      if (j.contains(opt) && !j[opt].is_null()) ctx.fail(std::string("unsupported option '") + opt + "' (must be null)");

    if (j.contains("added_tokens")) {
      // The reference ignores the ids written in the file: a token already in the vocabulary keeps
      // that id, others get the next id after the model's vocabulary and earlier added tokens.
      const int32_t model_size = int32_t(model_->vocab().size());
      int32_t max_added = -1;
      std::unordered_map<std::string, int32_t> seen;
      for (const json& a : j["added_tokens"]) {
        std::string content = a.at("content").get<std::string>();
        const int32_t written = get_id(a.at("id"), ctx, "added_tokens id");  // required by the format
        if (seen.count(content)) continue;
        auto in_vocab = model_->vocab().find(content);
        int32_t id = in_vocab != model_->vocab().end() ? in_vocab->second
                     : max_added < 0                  ? model_size
                     : max_added >= model_size        ? max_added + 1
                                                      : model_size;
        // The id the reference assigns may differ from the one written (it warns; the fixtures'
        // added_* variants pin that behaviour), but an id no vocabulary can have is refused.
        if (written < 0 || written >= BpeModel::kMaxVocab)
          ctx.fail("added token '" + printable(content) + "' has the invalid id " + std::to_string(written));
        max_added = std::max(max_added, id);
        seen.emplace(content, id);
        AddedToken t{id, content, a.value("single_word", false), a.value("lstrip", false), a.value("rstrip", false),
                     a.value("normalized", false), a.value("special", false)};
        added_content_[t.id] = t.content;
        if (t.normalized && normalizer_) normalizer_->normalize(t.content);
        added_.push_back(std::move(t));
      }
    }
    for (const AddedToken& t : added_) (t.normalized ? normalized_added_ : raw_added_).add(&t);

    size_t n = model_->tokens().size();
    for (const AddedToken& t : added_) n = std::max(n, size_t(t.id) + 1);
    if (n == 0) ctx.fail("empty vocabulary (model.vocab and added_tokens are both empty)");
    vocab_size_ = n;
    for (int32_t id : prefix_) check_special_id(id, ctx);
    for (int32_t id : suffix_) check_special_id(id, ctx);
    find_bos_eos(path);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    try {
      return encode_text(text, add_special);
    } catch (const Error&) {
      throw;
    } catch (const std::runtime_error& e) {  // a regex hitting PCRE2's match limit
      throw Error(path_ + ": " + e.what());
    }
  }

  std::vector<int32_t> encode_text(std::string_view text, bool add_special) const {
    std::string fixed;
    if (hf::sanitize_utf8(text, fixed)) text = fixed;
    std::vector<int32_t> ids;
    if (add_special) ids.insert(ids.end(), prefix_.begin(), prefix_.end());
    // Added tokens matched on the raw text come first; the rest is normalized, then searched for
    // the added tokens that are matched after normalization.
    size_t prev = 0;
    for (const auto& h : raw_added_.find(text)) {
      encode_segment(text.substr(prev, h.begin - prev), prev == 0, ids);
      ids.push_back(h.id);
      prev = h.end;
    }
    encode_segment(text.substr(prev), prev == 0, ids);
    if (add_special) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    Tokens toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      auto it = added_content_.find(id);
      if (it != added_content_.end()) toks.push_back(it->second);
      else if (id >= 0 && size_t(id) < model_->tokens().size() && !model_->tokens()[size_t(id)].empty())
        toks.push_back(model_->tokens()[size_t(id)]);
      else  // the reference skips it; an id with no token is an error, as for llama2.c vocabularies
        throw Error(path_ + ": token id " + std::to_string(id) + " is not in the vocabulary (size " +
                    std::to_string(vocab_size_) + ")");
    }
    std::string out;
    if (decoder_) {
      decoder_->decode(toks);
      for (const std::string& t : toks) out += t;
    } else {
      for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
    }
    return out;
  }

  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  size_t vocab_size() const override { return vocab_size_; }

  VocabInfo vocab_info() const override {
    VocabInfo v;
    // SentencePiece-style vocabularies (byte fallback, '▁' for spaces) are llama.cpp's "llama";
    // byte-level ones are its "gpt2" with merges.
    bool spm = model_->byte_fallback();
    v.model = spm ? "llama" : "gpt2";
    v.tokens.resize(vocab_size_);
    v.token_types.assign(vocab_size_, 1);
    const auto& toks = model_->tokens();
    for (size_t i = 0; i < vocab_size_; ++i) {
      if (i < toks.size() && !toks[i].empty()) v.tokens[i] = toks[i];
      else v.tokens[i] = "[PAD" + std::to_string(i) + "]";
      if (model_->is_byte_token(int32_t(i))) v.token_types[i] = 6;
    }
    for (const AddedToken& t : added_) {
      v.tokens[size_t(t.id)] = added_content_.at(t.id);
      v.token_types[size_t(t.id)] = t.special ? 3 : 4;
    }
    if (model_->unk() >= 0) v.token_types[size_t(model_->unk())] = 2;
    if (spm) {
      v.scores = model_->merge_scores(vocab_size_);
      for (size_t i = 0; i < vocab_size_; ++i)
        if (v.token_types[i] != 1) v.scores[i] = 0.f;
    } else {
      v.merges = model_->merges();
    }
    v.bos = bos_;
    v.eos = eos_;
    v.unk = model_->unk();
    v.add_bos = std::find(prefix_.begin(), prefix_.end(), bos_) != prefix_.end() && bos_ >= 0;
    v.add_eos = std::find(suffix_.begin(), suffix_.end(), eos_) != suffix_.end() && eos_ >= 0;
    return v;
  }

 private:
  void encode_segment(std::string_view seg, bool at_origin, std::vector<int32_t>& ids) const {
    if (seg.empty()) return;
    std::string s(seg);
    if (normalizer_) normalizer_->normalize(s);
    if (normalized_added_.empty()) return encode_normalized(s, at_origin, ids);
    size_t prev = 0;
    for (const auto& h : normalized_added_.find(s)) {
      encode_normalized(s.substr(prev, h.begin - prev), at_origin && prev == 0, ids);
      ids.push_back(h.id);
      prev = h.end;
    }
    encode_normalized(s.substr(prev), at_origin && prev == 0, ids);
  }

  void encode_normalized(std::string s, bool at_origin, std::vector<int32_t>& ids) const {
    if (s.empty()) return;
    Pieces pieces;
    pieces.push_back({std::move(s), at_origin});
    if (pre_tokenizer_) pre_tokenizer_->split(pieces);
    for (const Piece& p : pieces) model_->encode_word(p.text, ids);
  }

  // TemplateProcessing's single-sequence template; the special ids before the sequence form the
  // prefix added with add_special, those after it the suffix.
  void parse_post(const json& j, const Ctx& ctx) {
    std::string type = type_of(j, ctx, "post_processor");
    if (type == "ByteLevel") return;  // only adjusts offsets
    if (type == "Sequence") {
      for (const json& p : j.at("processors")) parse_post(p, ctx);
      return;
    }
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      prefix_.push_back(get_id(j.at("cls").at(1), ctx, "post_processor cls id"));
      suffix_.push_back(get_id(j.at("sep").at(1), ctx, "post_processor sep id"));
      return;
    }
    if (type != "TemplateProcessing") ctx.unsupported("post_processor", type);
    const json& specials = j.value("special_tokens", json::object());
    bool seen_seq = false;
    for (const json& item : j.at("single")) {
      if (item.contains("Sequence")) {
        seen_seq = true;
        continue;
      }
      if (!item.contains("SpecialToken")) ctx.fail("post_processor: bad template item " + item.dump());
      std::string name = item["SpecialToken"].at("id").get<std::string>();
      if (!specials.contains(name)) ctx.fail("post_processor: template uses undefined special token '" + name + "'");
      for (const json& id : specials[name].at("ids")) (seen_seq ? suffix_ : prefix_).push_back(get_id(id, ctx, "post_processor special token id"));
    }
  }

  // encode() emits these ids as they are: each must be a token of this vocabulary.
  void check_special_id(int32_t id, const Ctx& ctx) const {
    if (id < 0 || size_t(id) >= vocab_size_)
      ctx.fail("post_processor: special token id " + std::to_string(id) + " outside the vocabulary (size " +
               std::to_string(vocab_size_) + ")");
  }

  int32_t id_of(const std::string& tok) const {
    for (const AddedToken& t : added_)
      if (added_content_.at(t.id) == tok) return t.id;
    auto it = model_->vocab().find(tok);
    return it == model_->vocab().end() ? -1 : it->second;
  }

  // BOS/EOS as transformers sees them: tokenizer_config.json, else config.json's ids, else the
  // template's first special token and a conventional end-of-text token.
  void find_bos_eos(const std::string& path) {
    namespace fs = std::filesystem;
    fs::path dir = fs::path(path).parent_path();
    // Optional files: a missing one is no error, one that is there is opened as every input is (a
    // FIFO is refused, not waited on).
    auto load = [](const fs::path& p) -> json {
      if (!file_exists(p.string())) return nullptr;
      return json::parse(read_file(p.string()), nullptr, false);
    };
    json tc = load(dir / "tokenizer_config.json");
    auto token_field = [&](const char* key) -> int32_t {
      if (!tc.is_object() || !tc.contains(key)) return -1;
      const json& v = tc[key];
      if (v.is_string()) return id_of(v.get<std::string>());
      if (v.is_object() && v.contains("content") && v["content"].is_string()) return id_of(v["content"].get<std::string>());
      return -1;
    };
    bos_ = token_field("bos_token");
    eos_ = token_field("eos_token");
    json cfg = load(dir / "config.json");
    auto id_field = [&](const char* key) -> int32_t {
      if (!cfg.is_object() || !cfg.contains(key)) return -1;
      const json& v = cfg[key];
      if (v.is_number_integer()) return v.get<int32_t>();
      if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int32_t>();
      return -1;
    };
    if (bos_ < 0) bos_ = id_field("bos_token_id");
    if (eos_ < 0) eos_ = id_field("eos_token_id");
    if (bos_ < 0 && !prefix_.empty()) bos_ = prefix_[0];
    for (const char* name : {"</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>"})
      if (eos_ < 0) eos_ = id_of(name);
  }

  std::string path_;
  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  std::vector<AddedToken> added_;
  std::unordered_map<int32_t, std::string> added_content_;  // as written, for decoding
  AddedMatcher raw_added_, normalized_added_;
  std::vector<int32_t> prefix_, suffix_;
  size_t vocab_size_ = 0;
  int32_t bos_ = -1, eos_ = -1;
};

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path) {
  std::string text = read_file(path);
  json j = parse_json_strict(text, path);  // depth-bounded: component builders recurse per "Sequence" level
  try {
    return std::make_unique<HfTokenizer>(path, j);
  } catch (const json::exception& e) {  // a field of the wrong type or missing
    throw Error(path + ": malformed tokenizer.json: " + json_error_text(e));
  }
}

}  // namespace dq
