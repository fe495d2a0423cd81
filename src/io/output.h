// Output safety, one mechanism for every command that writes files: an OutputPlan names a
// command's inputs and outputs and, before any work, refuses
//   - an output that is, contains or is inside an input or another output (by device + inode),
//     or that is (or contains) the current directory, e.g. `--out .` or `--out ..`;
//   - an existing output, unless force; and even with force, anything dartquant did not write
//     (written_by_dartquant: a marker file in directories, a marker inside single files);
//   - an output another run is writing: each output OUT is built in OUT.partial/, a directory
//     locked (flock) by its run and holding that run's pid in OUT.partial/.owner.
// write(OUT, fn) has fn write the content to staging_path(OUT) = OUT.partial/<name of OUT>, then
// renames it onto OUT. A plan destroyed without commit, or a SIGINT/SIGTERM/SIGHUP, removes OUT.partial, except a
// resumable checkpoint (OUT.partial/state.json, see checkpoint.h), which is kept for --resume
// (its temporaries *.tmp-* are removed). An OUT.partial whose lock is free was left by a killed run:
// it is reused as a checkpoint when resuming, else removed.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace dq {

// What an output is; files carry their marker in their own format (see written_by_dartquant).
enum class OutputKind { Dir, Json, Html, Safetensors, Gguf };

// The marker: the file a dartquant output directory holds, listing the files dartquant wrote there.
inline constexpr const char* kOutputMarker = ".dartquant.json";
// The value of "written_by" in JSON reports and safetensors metadata, and of the GGUF key
// "dartquant.written_by"; HTML reports carry kHtmlGeneratorTag in their head.
inline constexpr const char* kWrittenBy = "dartquant";
inline constexpr const char* kHtmlGeneratorTag = "<meta name=\"generator\" content=\"dartquant\"/>";

// True when PATH was written by dartquant as an output of this kind: a directory of regular files
// all listed in its marker; a JSON object or safetensors file with "written_by": "dartquant"; a GGUF
// file with dartquant.written_by; an HTML report with dartquant's generator tag.
bool written_by_dartquant(const std::string& path, OutputKind kind);

// OUT.partial, the directory an output is built in, and staging(OUT) inside it.
std::string partial_dir(const std::string& out);
std::string staging_path(const std::string& out);

class OutputPlan {
 public:
  // inputs: every file or directory the command reads (empty strings are skipped).
  OutputPlan(std::vector<std::string> inputs, bool force);
  ~OutputPlan();
  OutputPlan(const OutputPlan&) = delete;
  OutputPlan& operator=(const OutputPlan&) = delete;

  // Checks OUT (skipped when empty) and claims OUT.partial; throws Error("OUT: problem") before
  // anything is created. resume: keep a checkpoint left in OUT.partial by a killed run.
  void add(const std::string& out, OutputKind kind, bool resume = false);
  // fn writes OUT's content to the path it is given (staging_path(OUT)); then that becomes OUT
  // (replacing OUT's previous dartquant output under force) and OUT.partial goes. Errors name OUT,
  // not the staging path.
  void write(const std::string& out, const std::function<void(const std::string& staging)>& fn);

 private:
  void commit(const std::string& out);
  struct Claim {
    std::string out;
    std::filesystem::path target;  // resolved
    OutputKind kind;
    int lock_fd;
    int slot;  // in the signal handler's table
    bool committed = false;
  };
  void release(Claim& c);
  std::vector<std::string> inputs_;
  bool force_;
  std::vector<Claim> claims_;
};

}  // namespace dq
