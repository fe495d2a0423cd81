#include "io/checkpoint.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "io/file.h"
#include "io/output.h"
#include "io/report.h"
#include "tensor/tensor.h"

namespace dq {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string resume_hint(const std::string& out) {
  const std::string dir = partial_dir(out);
  return file_exists(dir + "/state.json") ? " (progress kept in " + dir + "; rerun with --resume)" : "";
}

Checkpoint::Checkpoint(const std::string& out, const json& fingerprint, bool resume)
    : dir_(partial_dir(out)), output_(staging_path(out)) {
  if (resume && file_exists(file("state.json"))) {
    try {
      state_ = read_json(file("state.json"));
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + "; rerun without --resume to start over");
    }
    if (!state_.is_object() || state_.value("fingerprint", json()) != fingerprint)
      throw Error(dir_ + ": checkpoint made with other options or inputs; rerun without --resume to start over");
    resumed_ = true;
  } else {
    if (resume) std::fprintf(stderr, "note: no checkpoint in %s; starting from the beginning\n", dir_.c_str());
    remove("state.json");  // a stale one must not outlive the files this run replaces
    state_ = {{"fingerprint", fingerprint}};
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw Error(dir_ + ": cannot create (" + ec.message() + ")");
}

void Checkpoint::save(const std::string& label) {
  write_file_atomic(file("state.json"), [&](OutStream& s) { s.write(state_.dump() + "\n"); });
  const char* kill = std::getenv("DQ_KILL_AFTER");
  if (kill && label == kill) std::raise(SIGKILL);
}

void Checkpoint::remove(const std::string& name) const {
  std::error_code ec;
  fs::remove(file(name), ec);
}

}  // namespace dq
