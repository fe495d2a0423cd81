#include "tokenizer/tokenizer.h"

#include <fstream>

#include "tensor/tensor.h"

namespace dq {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open tokenizer");
  char c = 0;
  char bom[3] = {};
  // A UTF-8 byte-order mark may precede a tokenizer.json (JSON parsers skip it).
  if (!(f.read(bom, 3) && std::string_view(bom, 3) == "\xEF\xBB\xBF")) {
    f.clear();
    f.seekg(0);
  }
  while (f.get(c) && (c == ' ' || c == '\n' || c == '\r' || c == '\t')) {}
  // A tokenizer.json is a JSON object; a llama2.c tokenizer.bin starts with a small int32.
  if (c == '{') return load_hf_tokenizer(path);
  return load_llama2c_tokenizer(path);
}

}  // namespace dq
