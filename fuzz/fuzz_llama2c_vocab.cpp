// llama2.c tokenizer.bin: the vocabulary reader, then encode/decode of fixed strings (spaces,
// multi-byte and invalid UTF-8) with every id checked against the vocabulary.
#include "fuzz_tokenizer.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

static const char* kTexts[] = {"Once upon a time, there was a little girl.", " leading  spaces ",
                               "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80", "bad \xFF\xC3 utf8 \xE2\x82",
                               ""};

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("tok.bin", data, size);
  try {
    auto tok = dq::load_llama2c_tokenizer(path);
    dqfuzz::exercise_tokenizer(*tok, kTexts);
  } catch (const dq::Error&) {
  }
  return 0;
}
