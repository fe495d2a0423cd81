// Limits on JSON read from files. nlohmann parses iteratively, but copying, dumping and our own
// component builders (tokenizer.json "Sequence"s) recurse once per nesting level, so a hostile file
// nested a million levels deep would overflow the stack: refuse such text before parsing it.
#pragma once
#include <cstddef>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "tensor/tensor.h"
#include "io/printable.h"

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

// Parses JSON text read from a file, strictly: nesting bounded as above, and a key repeated within
// one object is an error (nlohmann would keep the last value; another reader may keep the first, so
// the file has no one meaning). Throws Error("SOURCE: invalid JSON") or "...: duplicate key 'K'".
inline nlohmann::json parse_json_strict(std::string_view text, const std::string& source) {
  using json = nlohmann::json;
  check_json_depth(text, source);
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  bool found = false;
  auto track = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    else if (event == json::parse_event_t::object_end) keys.pop_back();
    else if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second && !found) {
      found = true;
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), track);
  } catch (const json::exception&) {
    throw Error(source + ": invalid JSON");
  }
  if (found) throw Error(source + ": duplicate key '" + printable(duplicate) + "' in a JSON object");
  return j;
}

// nlohmann's exception text without its "[json.exception.type_error.302] " tag, for messages that
// name the file: "type must be string, but is number".
inline std::string json_error_text(const nlohmann::json::exception& e) {
  std::string what = e.what();
  if (what.rfind("[json.exception.", 0) == 0 && what.find("] ") != std::string::npos)
    what = what.substr(what.find("] ") + 2);
  return what;
}

}  // namespace dq
