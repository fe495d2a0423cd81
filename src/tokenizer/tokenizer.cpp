#include "tokenizer/tokenizer.h"

#include "io/file.h"

#include "tensor/tensor.h"

namespace dq {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  const std::string text = read_file(path);  // a FIFO or a device is refused, not waited on
  char c = 0;
  for (char t : text)
    if ((c = t) != ' ' && t != '\n' && t != '\r' && t != '\t') break;
  // A tokenizer.json is a JSON object; a llama2.c tokenizer.bin starts with a small int32.
  if (c == '{') return load_hf_tokenizer(path);
  return load_llama2c_tokenizer(path);
}

}  // namespace dq
