// Tokenizes each line of a text file with llama.cpp's tokenizer for a GGUF (no BOS, special tokens
// not parsed) and prints one JSON array of ids per line, as `dartquant tokenize` does. Built by
// scripts/check-llamacpp.sh against a llama.cpp build: one process per file instead of one
// llama-tokenize per line. Usage: tokenize_lines MODEL.gguf LINES.txt
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "llama.h"

static void quiet(ggml_log_level, const char*, void*) {}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: tokenize_lines MODEL.gguf LINES.txt\n");
    return 2;
  }
  llama_log_set(quiet, nullptr);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.vocab_only = true;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) return 1;
  const llama_vocab* vocab = llama_model_get_vocab(model);
  std::ifstream in(argv[2]);
  std::vector<llama_token> ids;
  for (std::string line; std::getline(in, line);) {
    ids.resize(line.size() + 8);
    const int n = llama_tokenize(vocab, line.data(), line.size(), ids.data(), ids.size(), false, false);
    if (n < 0) return 1;
    std::printf("[");
    for (int i = 0; i < n; i++) std::printf(i ? ",%d" : "%d", ids[i]);
    std::printf("]\n");
  }
  llama_model_free(model);
  return 0;
}
