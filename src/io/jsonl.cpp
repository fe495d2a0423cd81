#include "io/jsonl.h"

#include <algorithm>

#include "io/file.h"
#include "tensor/tensor.h"

namespace dq {

void JsonlRow::fail(const std::string& problem) const {
  throw Error(path + ":" + std::to_string(line) + ": " + problem);
}

std::string JsonlRow::str(const char* key) const {
  auto it = value.find(key);
  if (it == value.end()) fail(std::string("missing field '") + key + "'");
  if (!it->is_string()) fail(std::string("field '") + key + "' is not a string");
  const std::string& s = it->get_ref<const std::string&>();
  if (s.empty()) fail(std::string("field '") + key + "' is empty");
  return s;
}

std::vector<std::string> JsonlRow::strs(const char* key) const {
  auto it = value.find(key);
  if (it == value.end()) fail(std::string("missing field '") + key + "'");
  if (!it->is_array() || it->empty()) fail(std::string("field '") + key + "' is not a non-empty array");
  std::vector<std::string> out;
  for (const auto& e : *it) {
    if (!e.is_string() || e.get_ref<const std::string&>().empty())
      fail(std::string("field '") + key + "' has an element that is not a non-empty string");
    out.push_back(e.get<std::string>());
  }
  return out;
}

int64_t JsonlRow::integer(const char* key) const {
  auto it = value.find(key);
  if (it == value.end()) fail(std::string("missing field '") + key + "'");
  if (!it->is_number_integer()) fail(std::string("field '") + key + "' is not an integer");
  return it->get<int64_t>();
}

void JsonlRow::only_keys(const std::vector<std::string>& allowed) const {
  for (const auto& [k, v] : value.items())
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
      fail("unexpected field '" + k + "'");
}

std::vector<JsonlRow> read_jsonl(const std::string& path) {
  const std::string text = read_file(path);
  std::vector<JsonlRow> rows;
  size_t pos = 0;
  for (int line = 1; pos < text.size(); ++line) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    JsonlRow row{path, line, {}};
    std::string_view s(text.data() + pos, end - pos);
    pos = end + 1;
    if (s.find_first_not_of(" \t\r") == std::string_view::npos) row.fail("empty line");
    try {
      row.value = nlohmann::json::parse(s);
    } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
      // nlohmann's message counts lines within the string it parsed; keep only the column part.
      std::string msg = e.what();
      size_t col = msg.find("column ");
      row.fail("invalid JSON at " + (col == std::string::npos ? msg : msg.substr(col)));
    }
    if (!row.value.is_object()) row.fail("not a JSON object");
    rows.push_back(std::move(row));
  }
  if (rows.empty()) throw Error(path + ": no rows");
  return rows;
}

}  // namespace dq
