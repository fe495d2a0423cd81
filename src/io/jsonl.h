// JSON-lines files (one JSON object per line), read strictly: every problem is an Error naming
// the file and the 1-based line, "PATH:LINE: problem", so a bad row in a 5000-row task file is
// found at once.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dq {

// One line of a JSON-lines file with typed accessors that fail with the row's location.
struct JsonlRow {
  std::string path;
  int line = 0;
  nlohmann::json value;  // always an object

  bool has(const char* key) const { return value.contains(key); }
  std::string str(const char* key) const;                // required non-empty string
  std::vector<std::string> strs(const char* key) const;  // required non-empty array of non-empty strings
  int64_t integer(const char* key) const;                // required integer
  // Fails unless every key of the object is one of `allowed`.
  void only_keys(const std::vector<std::string>& allowed) const;
  [[noreturn]] void fail(const std::string& problem) const;  // throws Error("PATH:LINE: problem")
};

// Every line must be a JSON object; blank lines are errors (a final newline is not a line).
std::vector<JsonlRow> read_jsonl(const std::string& path);

}  // namespace dq
