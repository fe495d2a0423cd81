// llama2.c tokenizer.bin: the vocabulary reader, then encode/decode of fixed strings (spaces,
// multi-byte and invalid UTF-8) with every id checked against the vocabulary.
#include "fuzz_common.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

static const char* kTexts[] = {"Once upon a time, there was a little girl.", " leading  spaces ",
                               "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80", "bad \xFF\xC3 utf8 \xE2\x82",
                               ""};

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("tok.bin", data, size);
  try {
    auto tok = dq::load_llama2c_tokenizer(path);
    const size_t n = tok->vocab_size();
    for (const char* text : kTexts) {
      for (bool special : {false, true}) {
        std::vector<int32_t> ids = tok->encode(text, special);
        for (int32_t id : ids)
          if (id < 0 || size_t(id) >= n) dqfuzz::finding("encode produced an id outside the vocabulary");
        (void)tok->decode(ids);
      }
    }
    std::vector<int32_t> all;
    for (size_t i = 0; i < n && i < 1024; ++i) all.push_back(int32_t(i));
    (void)tok->decode(all);
    dq::VocabInfo v = tok->vocab_info();
    if (v.tokens.size() != n) dqfuzz::finding("vocab_info size differs from vocab_size");
  } catch (const dq::Error&) {
  }
  return 0;
}
