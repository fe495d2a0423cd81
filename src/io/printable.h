// Text taken from a file (a key, a tensor name) as an error message may quote it.
#pragma once
#include <string>

namespace dq {

// Printable ASCII, at most 80 characters: a corrupt file cannot break the one-line message.
inline std::string printable(const std::string& s) {
  std::string r;
  for (char c : s.substr(0, 80)) r += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 80) r += "...";
  return r;
}

}  // namespace dq
