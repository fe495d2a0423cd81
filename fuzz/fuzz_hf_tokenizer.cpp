// tokenizer.json: every component constructor (model, normalizers, pre-tokenizers, decoders,
// post-processor, added tokens), then encode/decode of fixed texts with every id checked against
// vocab_size(), and vocab_info() (what the GGUF exporter reads).
#include "fuzz_tokenizer.h"
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
    dqfuzz::exercise_tokenizer(*tok, kTexts);
  } catch (const dq::Error&) {
  }
  return 0;
}
