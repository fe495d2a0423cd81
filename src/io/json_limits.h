// Limits on JSON read from files. nlohmann parses iteratively, but copying, dumping and our own
// component builders (tokenizer.json "Sequence"s) recurse once per nesting level, so a hostile file
// nested a million levels deep would overflow the stack: refuse such text before parsing it.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

#include "tensor/tensor.h"

namespace dq {

constexpr int kMaxJsonDepth = 512;  // real config/tokenizer/index files nest fewer than 10 levels

// Throws Error("SOURCE: JSON nested deeper than N levels") when text nests arrays/objects deeper
// than max_depth. Brackets inside strings do not count. Does not validate anything else.
inline void check_json_depth(std::string_view text, const std::string& source, int max_depth = kMaxJsonDepth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        throw Error(source + ": JSON nested deeper than " + std::to_string(max_depth) + " levels");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

}  // namespace dq
