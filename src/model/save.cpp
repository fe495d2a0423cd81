#include "model/save.h"

#include <filesystem>

#include "io/file.h"

namespace dq {
namespace fs = std::filesystem;

void save_model(const Model& m, const std::string& dir, const SaveOptions& opts) {
  if (m.config.rope_interleaved)
    throw Error(dir + ": model uses llama2.c's interleaved RoPE; convert it to HF order first");
  AtomicDir out(dir);
  nlohmann::json config = m.config.to_json();
  if (!m.quantization.is_null()) config["dartquant_quantization"] = m.quantization;
  else config.erase("dartquant_quantization");
  write_file_atomic(out.file("config.json"), [&](OutStream& s) { s.write(config.dump(2) + "\n"); });
  std::vector<TensorBlob> blobs;
  for (const std::string& name : m.weights.names()) {
    std::vector<int64_t> shape = m.weights.shape(name);
    try {
      blobs.push_back(blob_from_matrix(name, m.weights.get(name), opts.dtype, shape));
    } catch (const Error& e) {  // a value the output dtype cannot hold
      throw Error(m.source + ": " + e.what());
    }
  }
  write_safetensors(out.file("model.safetensors"), blobs, {{"format", "pt"}});
  if (!opts.extra.empty()) write_safetensors(out.file("quantized.safetensors"), opts.extra);
  if (!m.tokenizer_path.empty()) copy_tokenizer(m.tokenizer_path, [&](const std::string& n) { return out.file(n); });
  out.commit();
}

void copy_tokenizer(const std::string& tokenizer_path, const std::function<std::string(const std::string&)>& dest) {
  const fs::path tok(tokenizer_path);
  const fs::path config = tok.parent_path() / "tokenizer_config.json";
  std::vector<std::pair<fs::path, std::string>> files = {
      {tok, tok.extension() == ".bin" ? "tokenizer.bin" : tok.filename().string()}};
  if (tok.extension() != ".bin" && fs::exists(config)) files.push_back({config, "tokenizer_config.json"});
  for (const auto& [from, name] : files) {
    std::error_code ec;
    fs::copy_file(from, dest(name), fs::copy_options::overwrite_existing, ec);
    if (ec) throw Error(from.string() + ": cannot copy tokenizer (" + ec.message() + ")");
  }
}

}  // namespace dq
