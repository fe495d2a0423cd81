#include "io/checkpoint.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "io/file.h"
#include "io/report.h"
#include "tensor/tensor.h"

namespace dq {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string resume_hint(const std::string& out) {
  return file_exists(out + ".partial/state.json") ? " (progress kept in " + out + ".partial; rerun with --resume)" : "";
}

Checkpoint::Checkpoint(const std::string& out, const json& fingerprint, bool resume) : dir_(out + ".partial") {
  if (resume && file_exists(file("state.json"))) {
    try {
      state_ = read_json(file("state.json"));
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + "; rerun without --resume to start over");
    }
    if (!state_.is_object() || state_.value("fingerprint", json()) != fingerprint)
      throw Error(dir_ + ": checkpoint made with other options or inputs; rerun without --resume to start over");
    keep_ = resumed_ = true;
    return;
  }
  if (resume) std::fprintf(stderr, "note: no checkpoint in %s; starting from the beginning\n", dir_.c_str());
  std::error_code ec;
  fs::remove_all(dir_, ec);
  if (!fs::create_directories(dir_, ec) || ec) throw Error(dir_ + ": cannot create (" + ec.message() + ")");
  state_ = {{"fingerprint", fingerprint}};
}

Checkpoint::~Checkpoint() {
  std::error_code ec;
  if (!keep_) fs::remove_all(dir_, ec);
}

void Checkpoint::save(const std::string& label) {
  write_file_atomic(file("state.json"), [&](OutStream& s) { s.write(state_.dump() + "\n"); });
  keep_ = true;
  const char* kill = std::getenv("DQ_KILL_AFTER");
  if (kill && label == kill) std::raise(SIGKILL);
}

void Checkpoint::remove(const std::string& name) const {
  std::error_code ec;
  fs::remove(file(name), ec);
}

void Checkpoint::commit_dir(const std::string& out, const std::vector<std::string>& scratch) {
  for (const std::string& f : scratch) remove(f);
  remove("state.json");
  move_into_place(dir_, out);
  keep_ = true;
}

void Checkpoint::commit_file(const std::string& name, const std::string& out) {
  move_into_place(file(name), out);
  keep_ = false;  // the rest of the directory goes with this object
}

}  // namespace dq
