// dartquant tokenize: text -> token ids (one JSON array per input line) or, with --decode, back.
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "io/file.h"
#include "tensor/tensor.h"
#include "tokenizer/tokenizer.h"

namespace {

struct Options {
  std::string tokenizer, text_file;
  bool add_special = false, decode = false;
};

int run(const Options& o) {
  auto tok = dq::load_tokenizer(o.tokenizer);
  std::istringstream in(dq::read_file(o.text_file));
  std::string line, out;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (o.decode) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_array())
        throw dq::Error(o.text_file + ":" + std::to_string(lineno) + ": not a JSON array of ids");
      std::vector<int32_t> ids;
      for (const auto& v : j) {
        // get<int32_t>() would wrap 4294967296 to 0 and decode a token that was never asked for.
        if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT32_MAX)) ||
            (!v.is_number_unsigned() && (v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX)))
          throw dq::Error(o.text_file + ":" + std::to_string(lineno) + ": not a JSON array of 32-bit ids");
        ids.push_back(v.get<int32_t>());
      }
      out = tok->decode(ids);
    } else {
      out = "[";
      for (int32_t id : tok->encode(line, o.add_special)) {
        if (out.size() > 1) out += ',';
        out += std::to_string(id);
      }
      out += ']';
    }
    out += '\n';
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  if (std::fflush(stdout) != 0) throw dq::Error("stdout: write failed");
  return 0;
}

dq::cli::RegisterCommand reg("tokenize", "print token ids (a JSON array per line) of a text file, or decode them",
                             [](CLI::App& app) -> std::function<int()> {
  auto o = std::make_shared<Options>();
  app.add_option("--tokenizer", o->tokenizer, "tokenizer.json (Hugging Face) or llama2.c tokenizer.bin")->required();
  app.add_option("--text-file", o->text_file, "input: text lines, or JSON id arrays with --decode")->required();
  app.add_flag("--add-special", o->add_special, "add the tokenizer's special tokens (BOS for Llama-2)");
  app.add_flag("--decode", o->decode, "read one JSON array of ids per line and print the text");
  return [o] { return run(*o); };
});

}  // namespace
