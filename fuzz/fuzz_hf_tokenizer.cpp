// tokenizer.json: every component constructor (model, normalizers, pre-tokenizers, decoders,
// post-processor, added tokens), then encode/decode of fixed texts with every id checked against
// vocab_size(), and vocab_info() (what the GGUF exporter reads).
#include "fuzz_common.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

static const char* kTexts[] = {
    "Hello world! How are you?", "  two  spaces\tand\nnewlines\r\n", "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80",
    "bad \xFF\xC3 utf8 \xE2\x82", "<s> </s> <unk> <|endoftext|> [CLS] 12345 don't", ""};

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Private directory: the loader also reads tokenizer_config.json / config.json beside the file.
  static const bool made = std::filesystem::create_directories(dqfuzz::work_dir() + "/hf") || true;
  (void)made;
  const std::string path = dqfuzz::write_input("hf/tokenizer.json", data, size);
  try {
    auto tok = dq::load_hf_tokenizer(path);
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
    all.push_back(-1);
    all.push_back(int32_t(n));
    (void)tok->decode(all);
    dq::VocabInfo v = tok->vocab_info();
    if (v.tokens.size() != n) dqfuzz::finding("vocab_info size differs from vocab_size");
  } catch (const dq::Error&) {
  }
  return 0;
}
