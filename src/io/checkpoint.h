// A job's resumable progress: OUT.partial (the directory OutputPlan claims for OUT, see output.h)
// holds state.json (a fingerprint of every option and input that determines the result, plus what
// is done), the job's scratch files, and OUT's content as it grows in staging_path(OUT). A job
// resumes only from a checkpoint with its own fingerprint. Resuming survives kill -9 at any instant
// because jobs keep two rules: every file a state.json relies on is complete (written under a
// temporary name and renamed, or synced up to the length state.json records) before that
// state.json is renamed into place; and a file the last state.json relies on is never removed, nor
// replaced by anything but a file that agrees with it (the same bytes up to the recorded length, or
// a superset of what it records).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dq {

// " (progress kept in OUT.partial; rerun with --resume)" when OUT.partial holds a checkpoint, else
// "": appended to the error that stopped a job.
std::string resume_hint(const std::string& out);

class Checkpoint {
 public:
  // resume: continue from OUT.partial when it holds a checkpoint (Error when its fingerprint
  // differs); otherwise, or without resume, start over.
  Checkpoint(const std::string& out, const nlohmann::json& fingerprint, bool resume);
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  std::string file(const std::string& name) const { return dir_ + "/" + name; }  // scratch
  const std::string& output() const { return output_; }  // where OUT grows: staging_path(OUT)
  bool resumed() const { return resumed_; }
  nlohmann::json& state() { return state_; }
  // Makes state() durable (after the files it describes are). `label` names the point for the
  // DQ_KILL_AFTER=LABEL testing aid, which then kills the process (SIGKILL, no cleanup): the
  // harshest interruption a resume must survive.
  void save(const std::string& label);
  void remove(const std::string& name) const;  // a scratch file no longer needed

 private:
  std::string dir_, output_;
  nlohmann::json state_;
  bool resumed_ = false;
};

}  // namespace dq
