// Helpers shared by the test programs: scratch directories, file I/O, and running the dartquant CLI.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "tensor/tensor.h"

namespace dq::test {

namespace fs = std::filesystem;

inline const std::string kData = DQ_DATA_DIR;
inline const std::string kStories = kData + "/stories260K/stories260K.bin";
inline const std::string kTok512 = kData + "/stories260K/tok512.bin";
inline const std::string kValid = kData + "/tinystories/valid.txt";
inline const std::string kCalib = kData + "/tinystories/calib.txt";

// A fresh directory per test, removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    // Parameterised suites are named "Prefix/Suite": one directory level, not two (the removal of
    // the inner one left the outer one behind).
    std::string name = "dq_test_" + std::to_string(getpid()) + "_" + info->test_suite_name() + "_" + info->name();
    std::replace(name.begin(), name.end(), '/', '_');
    path_ = fs::temp_directory_path() / name;
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

struct CliResult {
  int exit_code = -1;  // -1 when the process did not exit normally (a signal)
  std::string out, err;
};

// Runs `dartquant ARGS` (one thread: the test machines are shared) through the shell; its stdout
// and stderr go to OUTPUT_PREFIX.stdout / .stderr.
inline CliResult run_cli_logged(const std::string& args, const std::string& output_prefix) {
  const std::string out = output_prefix + ".stdout", err = output_prefix + ".stderr";
  const std::string cmd = std::string(DQ_BINARY) + " --threads 1 " + args + " >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  CliResult r;
  if (status != -1 && WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

inline CliResult run_cli(const std::string& args, const ScratchDir& scratch) {
  return run_cli_logged(args, scratch / "cli");
}

// A failed command: exit code 1 (not a signal) and one line on stderr, "dartquant: error: ...",
// naming the file and saying the problem.
inline void expect_one_line_error(const CliResult& r, const std::string& file, const std::string& problem) {
  EXPECT_EQ(r.exit_code, 1) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "more than one line:\n" << r.err;
  EXPECT_EQ(r.err.rfind("dartquant: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(file), std::string::npos) << "does not name " << file << ": " << r.err;
  EXPECT_NE(r.err.find(problem), std::string::npos) << "does not say '" << problem << "': " << r.err;
}

// Every file under dir (relative path -> bytes), the run_cli logs (cli.*) left out: equal
// snapshots before and after a command mean it created, changed and removed nothing there.
inline std::map<std::string, std::string> tree_snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string rel = fs::relative(e.path(), dir).string();
    if (rel.rfind("cli.", 0) == 0) continue;
    if (e.is_symlink()) files[rel] = "<link " + fs::read_symlink(e.path()).string() + ">";
    else if (e.is_directory()) files[rel] = "<dir>";
    else if (e.is_regular_file()) files[rel] = slurp(e.path().string());
    else files[rel] = "<special>";  // a FIFO or device: never opened (it could block)
  }
  return files;
}

// A rows x cols matrix of seeded N(0, scale²) entries.
inline Matrix gaussian_matrix(int64_t rows, int64_t cols, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  Matrix m(rows, cols);
  for (float& v : m.data) v = nd(rng);
  return m;
}

// A real model's config.json (kData/hf/MODEL) with `changes` applied, written as DIR/NAME/config.json
// with the model's tokenizer.json beside it when it has one (synth copies it); returns the path.
inline std::string cut_config(const ScratchDir& dir, const std::string& model, const nlohmann::json& changes,
                              const std::string& name) {
  nlohmann::json j = nlohmann::json::parse(slurp(kData + "/hf/" + model + "/config.json"));
  j.merge_patch(changes);
  fs::create_directories(dir.path() / name);
  spit(dir / name + "/config.json", j.dump(2));
  if (fs::exists(kData + "/hf/" + model + "/tokenizer.json"))
    fs::copy_file(kData + "/hf/" + model + "/tokenizer.json", dir / name + "/tokenizer.json");
  return dir / name + "/config.json";
}

// Qwen2.5-0.5B's config with its sizes cut down (biases, GQA and rope_theta kept) and the llama2.c
// 512-token vocabulary, so a synthetic model of it runs in milliseconds; written into dir.
inline std::string small_qwen_config(const ScratchDir& dir) {
  return cut_config(dir, "qwen2.5-0.5b", {{"hidden_size", 128}, {"intermediate_size", 320}, {"num_attention_heads", 8},
                                          {"num_key_value_heads", 2}, {"num_hidden_layers", 2}, {"vocab_size", 512}},
                    "qwen_small");
}

// `dartquant eval ... --json` of a model on a text; the parsed report.
inline nlohmann::json cli_eval(const std::string& args, const ScratchDir& scratch) {
  const std::string report = scratch / "eval.json";
  CliResult r = run_cli("eval " + args + " --json " + report + " --force", scratch);  // the last report is ours
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.exit_code == 0 ? nlohmann::json::parse(slurp(report)) : nlohmann::json::object();
}

// The smallest value >= s (a positive normal float) with at most m significant bits, by search: the
// scale a quantizer stores (quant/quantizer.h), written independently of it.
inline float naive_round_up(float s, int m) {
  double step = 1;  // brought to s in [2^(m-1), 2^m) * step, where steps of `step` are m-bit values
  while (double(s) >= std::ldexp(step, m)) step *= 2;
  while (double(s) < std::ldexp(step, m - 1)) step /= 2;
  return float(std::ceil(double(s) / step) * step);
}

}  // namespace dq::test
