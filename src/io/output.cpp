#include "io/output.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/file.h"
#include "io/gguf.h"
#include "io/report.h"
#include "io/safetensors.h"
#include "tensor/tensor.h"

namespace dq {
namespace fs = std::filesystem;

namespace {

constexpr const char* kOwner = ".owner";  // OUT.partial/.owner: the pid of the run holding the lock
constexpr const char* kState = "state.json";

std::string strip_slashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

struct Id {
  dev_t dev;
  ino_t ino;
  bool operator==(const Id&) const = default;
};

bool id_of(const fs::path& p, Id& id) {
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return false;
  id = {st.st_dev, st.st_ino};
  return true;
}

// p and every directory above it, resolved (symbolic links followed).
std::vector<fs::path> self_and_ancestors(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::canonical(p, ec);
  std::vector<fs::path> out;
  if (ec) return out;
  for (;;) {
    out.push_back(c);
    if (c == c.root_path()) break;
    c = c.parent_path();
  }
  return out;
}

bool any_is(const std::vector<fs::path>& paths, const Id& id) {
  Id x;
  for (const fs::path& p : paths)
    if (id_of(p, x) && x == id) return true;
  return false;
}

// Directory removal with system calls that are async-signal-safe, so the signal handler and the
// normal paths share it. Removes the entries of directory `dir` (recursively); with
// only_temporaries, only names containing ".tmp-" (what write_file_atomic and AtomicDir leave) at
// any depth. OUT.partial/.owner is left for the caller to remove last: an OUT.partial without it
// is not recognisably ours.
bool is_temporary(const char* name) { return std::strstr(name, ".tmp-") != nullptr; }

void remove_entries(int dir, bool only_temporaries, bool top) {
  for (int pass = 0; pass < 8; ++pass) {  // entries removed while reading can hide others: reread
    if (lseek(dir, 0, SEEK_SET) != 0) return;
    bool removed = false;
    char buf[4096];
    for (;;) {
      const ssize_t n = getdents64(dir, buf, sizeof buf);
      if (n <= 0) break;
      for (ssize_t off = 0; off < n;) {
        const auto* d = reinterpret_cast<const struct dirent64*>(buf + off);
        off += d->d_reclen;
        const char* name = d->d_name;
        if (!std::strcmp(name, ".") || !std::strcmp(name, "..") || (top && !std::strcmp(name, kOwner))) continue;
        const bool remove = !only_temporaries || is_temporary(name);
        struct stat st;
        if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
          const int sub = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
          if (sub >= 0) {
            remove_entries(sub, !remove, false);
            close(sub);
          }
          if (remove && unlinkat(dir, name, AT_REMOVEDIR) == 0) removed = true;
        } else if (remove && unlinkat(dir, name, 0) == 0) {
          removed = true;
        }
      }
    }
    if (!removed) return;
  }
}

// An unfinished OUT.partial: kept with only its temporaries removed when it holds a checkpoint
// (state.json, for --resume), else removed altogether. `partial` must be the directory `lock_fd` is.
void drop_partial(const char* partial, int lock_fd) {
  if (faccessat(lock_fd, kState, F_OK, 0) == 0) {
    remove_entries(lock_fd, true, true);
    return;
  }
  remove_entries(lock_fd, false, true);
  unlinkat(lock_fd, kOwner, 0);
  rmdir(partial);
}

// The signal handler's view of the claimed outputs: fixed storage, written before `state` is set.
struct Slot {
  std::atomic<int> state{0};  // 0 free, 1 claimed, 2 committing (left alone)
  int fd = -1;
  char partial[4096];
};
Slot g_slots[16];

void on_signal(int sig) {
  for (Slot& s : g_slots)
    if (s.state.load() == 1) drop_partial(s.partial, s.fd);
  std::raise(sig);  // SA_RESETHAND restored the default action: the process ends by this signal
}

void install_handlers() {
  static bool done = false;
  if (done) return;
  done = true;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

std::string owner_pid(const std::string& partial) {
  try {
    std::string s = read_file(partial + "/" + kOwner);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s.empty() ? "unknown" : s;
  } catch (const Error&) {
    return "unknown";
  }
}

bool json_marked(const std::string& path) {
  try {
    const nlohmann::json j = read_json(path);
    return j.is_object() && j.value("written_by", std::string()) == kWrittenBy;
  } catch (const Error&) {
    return false;
  }
}

bool dir_marked(const std::string& path) {
  if (!json_marked(path + "/" + kOutputMarker)) return false;
  const nlohmann::json j = read_json(path + "/" + kOutputMarker);
  if (!j.contains("files") || !j["files"].is_array()) return false;
  std::vector<std::string> listed;
  for (const auto& f : j["files"])
    if (f.is_string()) listed.push_back(f.get<std::string>());
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    const std::string name = e.path().filename().string();
    if (name == kOutputMarker) continue;
    if (!e.is_regular_file() || e.is_symlink() || std::find(listed.begin(), listed.end(), name) == listed.end())
      return false;
  }
  return !ec;
}

}  // namespace

bool written_by_dartquant(const std::string& path, OutputKind kind) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return false;
  if (kind == OutputKind::Dir) return S_ISDIR(st.st_mode) && dir_marked(path);
  if (!S_ISREG(st.st_mode)) return false;
  try {
    switch (kind) {
      case OutputKind::Json:  // reports are small: a large file is not one
        return st.st_size < (64 << 20) && json_marked(path);
      case OutputKind::Html: {
        const MappedFile f(path);
        const std::string_view head(reinterpret_cast<const char*>(f.data()), std::min<size_t>(f.size(), 4096));
        return head.find(kHtmlGeneratorTag) != std::string_view::npos;
      }
      case OutputKind::Safetensors: {
        const SafetensorsFile f(path);
        auto it = f.metadata().find("written_by");
        return it != f.metadata().end() && it->second == kWrittenBy;
      }
      case OutputKind::Gguf: {
        const GgufFile f(path);
        const GgufValue* v = f.find("dartquant.written_by");
        return v && v->type == GgufType::STRING && f.get_string("dartquant.written_by") == kWrittenBy;
      }
      case OutputKind::Dir:
        break;
    }
  } catch (const Error&) {
  }
  return false;
}

std::string partial_dir(const std::string& out) { return strip_slashes(out) + ".partial"; }

std::string staging_path(const std::string& out) {
  return partial_dir(out) + "/" + fs::path(strip_slashes(out)).filename().string();
}

OutputPlan::OutputPlan(std::vector<std::string> inputs, bool force) : force_(force) {
  for (std::string& i : inputs)
    if (!i.empty()) inputs_.push_back(std::move(i));
}

OutputPlan::~OutputPlan() {
  for (Claim& c : claims_) release(c);
}

void OutputPlan::add(const std::string& out_arg, OutputKind kind, bool resume) {
  if (out_arg.empty()) return;
  const std::string out = strip_slashes(out_arg);
  const fs::path name = fs::path(out).filename();
  if (name.empty() || name == "." || name == ".." || out == "/")
    throw Error(out_arg + ": not a name dartquant can write to (name a new file or directory)");
  const fs::path parent = fs::path(out).has_parent_path() ? fs::path(out).parent_path() : fs::path(".");
  std::error_code ec;
  const fs::path target = fs::weakly_canonical(fs::absolute(parent)) / name;
  for (const Claim& c : claims_) {
    const auto [a, b] = std::mismatch(target.begin(), target.end(), c.target.begin(), c.target.end());
    if (a == target.end() || b == c.target.end()) throw Error(out_arg + ": overlaps the other output " + c.out);
  }
  if (!fs::is_directory(parent, ec)) throw Error(out_arg + ": parent directory does not exist");
  const std::vector<fs::path> target_and_above = self_and_ancestors(target.parent_path());

  // The current directory, the inputs and the other outputs: by identity where they exist.
  Id tid{}, x{};
  const bool exists = id_of(target, tid);
  if (exists && any_is(self_and_ancestors(fs::current_path()), tid))
    throw Error(out_arg + ": is or contains the current directory");
  for (const std::string& in : inputs_) {
    if (!id_of(in, x)) continue;
    if (exists && x == tid) throw Error(out_arg + ": is the input " + in);
    if (exists && any_is(self_and_ancestors(in), tid)) throw Error(out_arg + ": contains the input " + in);
    if (any_is(target_and_above, x)) throw Error(out_arg + ": is inside the input " + in);
  }

  // An existing output: only under force, and only what dartquant wrote itself.
  struct stat st;
  if (lstat(target.c_str(), &st) == 0) {
    if (!force_) throw Error(out_arg + ": exists; pass --force to replace it");
    if ((kind == OutputKind::Dir) != S_ISDIR(st.st_mode))
      throw Error(out_arg + (S_ISDIR(st.st_mode) ? ": is a directory; not replacing it with a file"
                                                 : ": exists and is not a directory; not replacing it"));
    if (!written_by_dartquant(out, kind))
      throw Error(out_arg + ": was not written by dartquant (no " +
                  (kind == OutputKind::Dir ? std::string(kOutputMarker) + " listing its files" : "dartquant marker") +
                  "); not replacing it even with --force");
  }

  // OUT.partial: created or reused, then locked; a lock held elsewhere is another run.
  const std::string partial = partial_dir(out);
  if (partial.size() >= sizeof(g_slots[0].partial)) throw Error(out_arg + ": path too long");
  if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
    throw Error(partial + ": cannot create (" + std::strerror(errno) + ")");
  const int fd = ::open(partial.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw Error(partial + ": exists and is not a directory dartquant made; remove it");
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    throw Error(out_arg + ": another dartquant run (pid " + owner_pid(partial) + ") is writing it (lock on " +
                partial + ")");
  }
  struct stat now, held;
  if (::stat(partial.c_str(), &now) != 0 || fstat(fd, &held) != 0 || now.st_ino != held.st_ino ||
      now.st_dev != held.st_dev) {
    ::close(fd);
    throw Error(out_arg + ": another dartquant run is writing it (" + partial + " changed)");
  }
  const bool empty = fs::is_empty(partial, ec);
  const bool ours = faccessat(fd, kOwner, F_OK, 0) == 0 || faccessat(fd, kState, F_OK, 0) == 0;
  if (!empty && !ours) {
    ::close(fd);
    throw Error(partial + ": exists and was not made by dartquant; remove it");
  }
  if (!empty && !(resume && faccessat(fd, kState, F_OK, 0) == 0)) {
    std::fprintf(stderr, "note: removing %s, left by a killed run (pid %s)\n", partial.c_str(),
                 owner_pid(partial).c_str());
    remove_entries(fd, false, true);
  } else if (!empty) {
    remove_entries(fd, true, true);  // a checkpoint to resume: a killed run's temporaries go
  }
  // Written in place, not through a temporary: a kill at any instant leaves either no .owner (an
  // empty OUT.partial) or one, so OUT.partial stays recognisably ours.
  const int owner = openat(fd, kOwner, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const std::string pid = std::to_string(getpid()) + "\n";
  const bool written = owner >= 0 && ::write(owner, pid.data(), pid.size()) == ssize_t(pid.size());
  if (owner >= 0) ::close(owner);
  if (!written) {
    ::close(fd);
    throw Error(partial + ": cannot write (" + std::strerror(errno) + ")");
  }

  int slot = 0;
  while (slot < int(std::size(g_slots)) && g_slots[slot].state.load() != 0) ++slot;
  if (slot == int(std::size(g_slots))) throw Error(out_arg + ": too many outputs");
  std::snprintf(g_slots[slot].partial, sizeof(g_slots[slot].partial), "%s", partial.c_str());
  g_slots[slot].fd = fd;
  install_handlers();
  g_slots[slot].state.store(1);
  claims_.push_back({out, target, kind, fd, slot});
}

void OutputPlan::release(Claim& c) {
  if (c.committed) return;
  g_slots[c.slot].state.store(2);
  drop_partial(g_slots[c.slot].partial, c.lock_fd);
  ::close(c.lock_fd);
  c.committed = true;
  g_slots[c.slot].state.store(0);
}

void OutputPlan::write(const std::string& out_arg, const std::function<void(const std::string&)>& fn) {
  const std::string staged = staging_path(out_arg);
  try {
    fn(staged);
  } catch (const Error& e) {
    // "OUT.partial/OUT" or "OUT.partial/OUT.tmp-NNN" in the message is OUT to the user.
    std::string msg = e.what();
    size_t at = msg.find(staged);
    if (at != std::string::npos) {
      size_t end = at + staged.size();
      if (msg.compare(end, 5, ".tmp-") == 0) {
        end += 5;
        while (end < msg.size() && std::isdigit(static_cast<unsigned char>(msg[end]))) ++end;
      }
      msg.replace(at, end - at, strip_slashes(out_arg));
    }
    throw Error(msg);
  }
  commit(out_arg);
}

void OutputPlan::commit(const std::string& out_arg) {
  const std::string out = strip_slashes(out_arg);
  auto it = std::find_if(claims_.begin(), claims_.end(), [&](const Claim& c) { return c.out == out; });
  if (it == claims_.end() || it->committed) throw Error(out_arg + ": not an output of this run");
  Claim& c = *it;
  const std::string partial = partial_dir(out), staged = staging_path(out);
  if (c.kind == OutputKind::Dir) {
    nlohmann::json files = nlohmann::json::array();
    for (const auto& e : fs::directory_iterator(staged)) files.push_back(e.path().filename().string());
    std::sort(files.begin(), files.end());
    write_json(staged + "/" + kOutputMarker, {{"files", files}});
  }
  if (!written_by_dartquant(staged, c.kind)) throw Error(out_arg + ": internal error: written without its marker");
  g_slots[c.slot].state.store(2);
  unlinkat(c.lock_fd, kState, 0);  // from here on a kill leaves nothing to resume
  struct stat st;
  if (lstat(out.c_str(), &st) == 0) {
    if (!force_ || !written_by_dartquant(out, c.kind))
      throw Error(out_arg + ": appeared while dartquant was writing it; not replacing it");
    if (c.kind == OutputKind::Dir && std::rename(out.c_str(), (partial + "/replaced").c_str()) != 0)
      throw Error(out_arg + ": cannot move the previous output aside (" + std::strerror(errno) + ")");
  }
  if (std::rename(staged.c_str(), out.c_str()) != 0)
    throw Error(out_arg + ": rename failed (" + std::strerror(errno) + ")");
  const fs::path parent = fs::path(out).has_parent_path() ? fs::path(out).parent_path() : fs::path(".");
  if (int d = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); d >= 0) {
    fsync(d);  // the rename itself durable
    ::close(d);
  }
  drop_partial(partial.c_str(), c.lock_fd);
  ::close(c.lock_fd);
  c.committed = true;
  g_slots[c.slot].state.store(0);
}

}  // namespace dq
