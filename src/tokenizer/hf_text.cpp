#include "tokenizer/hf_text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <memory>
#include <stdexcept>

namespace dq::hf {

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

char32_t next_cp(std::string_view s, size_t& i) {
  auto c = uint8_t(s[i]);
  size_t n = utf8_len(c);
  if (n == 1 || i + n > s.size()) {
    ++i;
    return c;
  }
  char32_t cp = c & (0xFF >> (n + 1));
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

// Length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7), or 0 when ill-formed; in
// that case *bad is set to the length of the maximal subpart to replace by one U+FFFD.
static size_t valid_seq(std::string_view s, size_t i, size_t* bad) {
  auto at = [&](size_t k) -> int { return i + k < s.size() ? uint8_t(s[i + k]) : -1; };
  int c = at(0);
  if (c < 0x80) return 1;
  int n = 0, lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) n = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
  else if (c >= 0xF0 && c <= 0xF4) n = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
  else {
    *bad = 1;
    return 0;
  }
  for (int k = 1; k < n; ++k) {
    int b = at(size_t(k));
    bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *bad = size_t(k);
      return 0;
    }
  }
  return size_t(n);
}

bool sanitize_utf8(std::string_view s, std::string& out) {
  size_t i = 0, bad = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t n = valid_seq(s, i, &bad);
    if (n == 0) break;
    i += n;
  }
  if (i == s.size()) return false;
  out.assign(s.data(), i);
  while (i < s.size()) {
    size_t n = valid_seq(s, i, &bad);
    if (n) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return true;
}

namespace {
// Printable bytes map to themselves; the others, in byte order, to U+0100 onwards.
struct ByteMap {
  std::array<std::string, 256> to_char;
  std::array<int, 324> to_byte;
  ByteMap() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      char32_t cp = printable ? char32_t(b) : char32_t(256 + extra++);
      append_utf8(to_char[size_t(b)], cp);
      to_byte[cp] = b;
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}
}  // namespace

const std::string& byte_to_char(unsigned char b) { return byte_map().to_char[b]; }
int char_to_byte(char32_t cp) { return cp < 324 ? byte_map().to_byte[cp] : -1; }

// Oniguruma's \s also covers U+0085, its \h means a hex digit and its \w includes marks; PCRE2
// (with UCP) differs on all three, so those escapes become explicit classes.
static std::string onig_to_pcre2(const std::string& p) {
  static const char* kSpace = "\\s\\x{85}";
  static const char* kHex = "0-9a-fA-F";
  static const char* kWord = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
  std::string out;
  int depth = 0;  // character class nesting
  bool class_start = false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char e = p[++i];
      const char* set = e == 's' || e == 'S' ? kSpace : e == 'h' || e == 'H' ? kHex
                      : e == 'w' || e == 'W' ? kWord : nullptr;
      bool negated = e == 'S' || e == 'H' || e == 'W';
      if (!set) {
        out += c;
        out += e;
      } else if (depth == 0) {
        out += negated ? "[^" : "[";
        out += set;
        out += ']';
      } else if (!negated) {
        out += set;
      } else {  // a negated escape inside a class has no class spelling; keep PCRE2's
        out += c;
        out += e;
      }
      class_start = false;
      continue;
    }
    if (depth > 0 && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // POSIX [:alpha:]
      size_t end = p.find(":]", i + 2);
      if (end != std::string::npos) {
        out.append(p, i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    out += c;
    if (c == '[') {
      ++depth;
      class_start = true;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      continue;
    }
    if (c == ']' && depth > 0 && !class_start) --depth;
    class_start = false;
  }
  return out;
}

namespace {
struct MatchData {
  pcre2_match_data* md = pcre2_match_data_create(32, nullptr);
  ~MatchData() { pcre2_match_data_free(md); }
};
pcre2_match_data* thread_match_data() {
  thread_local MatchData m;
  return m.md;
}
}  // namespace

Regex::Regex(const std::string& onig_pattern) {
  std::string pat = onig_to_pcre2(onig_pattern);
  int err = 0;
  PCRE2_SIZE off = 0;
  auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), PCRE2_UTF | PCRE2_UCP,
                             &err, &off, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw std::runtime_error("bad regex '" + onig_pattern + "': " + reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  auto* code = static_cast<pcre2_code*>(code_);
  pcre2_match_data* md = thread_match_data();
  auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0;
  while (pos <= s.size()) {
    int rc = pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {  // a resource limit: refuse rather than split the text differently
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw std::runtime_error(std::string("regex match failed: ") + reinterpret_cast<char*>(msg));
    }
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    out.emplace_back(b, e);
    if (e > b) {
      pos = e;
    } else {
      if (e >= s.size()) break;
      pos = e + utf8_len(uint8_t(s[e]));
    }
  }
}

bool Regex::matches_at(std::string_view s, size_t pos) const {
  pcre2_match_data* md = thread_match_data();
  int rc = pcre2_match(static_cast<pcre2_code*>(code_), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                       PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, md, nullptr);
  return rc >= 0;
}

std::vector<Span> spans_from_matches(std::string_view s, const std::vector<std::pair<size_t, size_t>>& m) {
  std::vector<Span> spans;
  if (s.empty()) {
    spans.push_back({0, 0, false});
    return spans;
  }
  size_t prev = 0;
  for (auto [b, e] : m) {
    if (prev != b) spans.push_back({prev, b, false});
    spans.push_back({b, e, true});
    prev = e;
  }
  if (prev != s.size()) spans.push_back({prev, s.size(), false});
  return spans;
}

std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<Span>& spans, SplitBehavior b) {
  std::vector<Span> out;
  out.reserve(spans.size());
  bool prev_match = false;
  switch (b) {
    case SplitBehavior::Removed:
      for (const Span& s : spans)
        if (!s.is_match) out.push_back(s);
      break;
    case SplitBehavior::Isolated:
      out = spans;
      break;
    case SplitBehavior::MergedWithPrevious:  // a match joins the piece before it
      for (const Span& s : spans) {
        if (s.is_match && !prev_match && !out.empty()) out.back().end = s.end;
        else out.push_back(s);
        prev_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithNext:  // a match joins the piece after it
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !prev_match && !out.empty()) out.back().begin = it->begin;
        else out.push_back(*it);
        prev_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    case SplitBehavior::Contiguous:  // runs of matches (and of gaps) form one piece
      for (const Span& s : spans) {
        if (s.is_match == prev_match && !out.empty()) out.back().end = s.end;
        else out.push_back(s);
        prev_match = s.is_match;
      }
      break;
  }
  std::vector<std::pair<size_t, size_t>> ranges;
  ranges.reserve(out.size());
  for (const Span& s : out)
    if (s.end > s.begin) ranges.emplace_back(s.begin, s.end);
  return ranges;
}

}  // namespace dq::hf
