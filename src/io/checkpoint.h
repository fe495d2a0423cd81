// A job's resumable progress: a directory OUT.partial holding state.json (a fingerprint of every
// option and input that determines the result, plus what is done) and the files the job wrote so
// far. A job resumes only from a checkpoint with its own fingerprint. Until the first save() there
// is nothing worth resuming, so a checkpoint destroyed before it removes its directory.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dq {

// " (progress kept in OUT.partial; rerun with --resume)" when OUT.partial holds a checkpoint, else
// "": appended to the error that stopped a job.
std::string resume_hint(const std::string& out);

class Checkpoint {
 public:
  // resume: continue from OUT.partial when it holds a checkpoint (Error when its fingerprint
  // differs); otherwise, or without resume, start over in an empty OUT.partial.
  Checkpoint(const std::string& out, const nlohmann::json& fingerprint, bool resume);
  ~Checkpoint();
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  std::string file(const std::string& name) const { return dir_ + "/" + name; }
  bool resumed() const { return resumed_; }
  nlohmann::json& state() { return state_; }
  // Makes state() durable (after the files it describes are). `label` names the point for the
  // DQ_KILL_AFTER=LABEL testing aid, which then kills the process (SIGKILL, no cleanup): the
  // harshest interruption a resume must survive.
  void save(const std::string& label);
  void remove(const std::string& name) const;  // a file no longer needed

  // Finishing: the directory itself becomes OUT (after `scratch` files are removed), or one file
  // in it becomes OUT and the directory goes.
  void commit_dir(const std::string& out, const std::vector<std::string>& scratch);
  void commit_file(const std::string& name, const std::string& out);

 private:
  std::string dir_;
  nlohmann::json state_;
  bool keep_ = false, resumed_ = false;
};

}  // namespace dq
