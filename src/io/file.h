// Files: whole reads, read-only memory maps, and atomic writes (temp name, then rename).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace dq {

std::string read_file(const std::string& path);  // throws Error("PATH: ...")
bool file_exists(const std::string& path);

// Opens PATH for reading, refusing anything but a regular file (a FIFO or a device would block or
// never end) without blocking on it. Every input file is opened through this. Throws Error("PATH: ...").
int open_regular_file(const std::string& path);

// Throws Error("PATH: needs N but its file system has M free") when writing `bytes` to PATH (a
// file about to be created) would not fit: writers call it before writing a large file.
void check_free_space(const std::string& path, double bytes);

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws Error("PATH: ...")
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Tells the kernel the range is no longer needed (streaming layer by layer).
  void release(size_t offset, size_t length) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Writes through `write` into PATH.tmp-XXXX, fsyncs, then renames onto PATH. On any failure the
// temp file is removed and Error is thrown ("PATH: disk full" when the device is full).
class OutStream;
void write_file_atomic(const std::string& path, const std::function<void(OutStream&)>& write);

class OutStream {
 public:
  OutStream(const OutStream&) = delete;
  OutStream& operator=(const OutStream&) = delete;
  void write(const void* p, size_t n);
  void write(const std::string& s) { write(s.data(), s.size()); }
  size_t written() const { return written_; }

 private:
  friend void write_file_atomic(const std::string&, const std::function<void(OutStream&)>&);
  friend class ResumableFile;
  OutStream(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
  size_t written_ = 0;
};

// A file written front to back across interruptions: opening it keeps the first `keep` bytes (what
// the last checkpoint made durable) and drops whatever a killed run wrote after them; sync() makes
// everything written so far durable. Not atomic by itself: callers keep it in a directory that is
// renamed into place when complete.
class ResumableFile {
 public:
  ResumableFile(const std::string& path, size_t keep);  // keep == 0: created empty
  ~ResumableFile();
  ResumableFile(const ResumableFile&) = delete;
  ResumableFile& operator=(const ResumableFile&) = delete;
  OutStream& out() { return out_; }
  size_t size() const { return keep_ + out_.written(); }
  void sync();

 private:
  size_t keep_;
  OutStream out_;
};

// Renames a finished file or directory onto `to`, replacing what was there.
void move_into_place(const std::string& from, const std::string& to);

// A directory built under a temporary name and renamed into place by commit(). Destroyed without
// commit(), it removes itself, so a failure never leaves a directory that looks complete.
class AtomicDir {
 public:
  explicit AtomicDir(const std::string& final_path);
  ~AtomicDir();
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  const std::string& path() const { return tmp_; }  // write files here
  std::string file(const std::string& name) const { return tmp_ + "/" + name; }
  void commit();  // replaces an existing final_path

 private:
  std::string final_, tmp_;
  bool committed_ = false;
};

}  // namespace dq
