// Text helpers for the tokenizer.json implementation: UTF-8 handling, the GPT-2 byte<->char map
// and a PCRE2 regex that behaves like the Oniguruma regexes tokenizer.json patterns are written for.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dq::hf {

// Byte length of the UTF-8 sequence starting with lead byte c (1 for stray continuation bytes).
inline size_t utf8_len(unsigned char c) {
  return c < 0x80 ? 1 : c < 0xE0 ? (c < 0xC0 ? 1 : 2) : c < 0xF0 ? 3 : 4;
}
void append_utf8(std::string& out, char32_t cp);
// Decodes the (valid) UTF-8 character at s[i], advancing i.
char32_t next_cp(std::string_view s, size_t& i);
// Replaces each maximal ill-formed subsequence with U+FFFD (Rust's from_utf8_lossy, WHATWG).
// Returns false and leaves out untouched when s is already valid.
bool sanitize_utf8(std::string_view s, std::string& out);

// GPT-2's reversible map from bytes to printable code points, and back (-1: not a mapped char).
const std::string& byte_to_char(unsigned char b);
int char_to_byte(char32_t cp);

// A match span inside a string; is_match false marks the text between matches.
struct Span {
  size_t begin, end;
  bool is_match;
};

// A PCRE2 regex compiled (UTF + UCP, JIT) from an Oniguruma (Ruby syntax) pattern: escapes whose
// meaning differs between the two engines are rewritten so that matches agree.
class Regex {
 public:
  explicit Regex(const std::string& onig_pattern);  // throws std::runtime_error with PCRE2's message
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches left to right, iterated as Oniguruma does: after an empty match the
  // search resumes one character later.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
  bool matches_at(std::string_view s, size_t pos) const;  // an anchored match at pos

 private:
  void* code_ = nullptr;  // pcre2_code_8*
};

// Spans covering all of s: the matches (is_match) and the gaps between them, as tokenizers'
// Pattern::find_matches lists them (an empty s gives one empty gap).
std::vector<Span> spans_from_matches(std::string_view s, const std::vector<std::pair<size_t, size_t>>& m);

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
// Applies a split behaviour to spans; returns the non-empty ranges that become pieces.
std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<Span>& spans, SplitBehavior b);

}  // namespace dq::hf
