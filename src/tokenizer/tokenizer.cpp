#include "tokenizer/tokenizer.h"

#include "io/file.h"

#include "tensor/tensor.h"

namespace dq {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  const std::string text = read_file(path);  // a FIFO or a device is refused, not waited on
  char c = 0;
  // A UTF-8 byte-order mark may precede a tokenizer.json (JSON parsers skip it).
  const size_t start = text.starts_with("\xEF\xBB\xBF") ? 3 : 0;
  for (size_t i = start; i < text.size(); ++i)
    if ((c = text[i]) != ' ' && c != '\n' && c != '\r' && c != '\t') break;
  // A tokenizer.json is a JSON object; a llama2.c tokenizer.bin starts with a small int32.
  if (c == '{') return load_hf_tokenizer(path);
  return load_llama2c_tokenizer(path);
}

}  // namespace dq
