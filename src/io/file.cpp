#include "io/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "tensor/tensor.h"

namespace dq {
namespace fs = std::filesystem;

static std::string errno_text(int e) { return e == ENOSPC ? "disk full" : std::strerror(e); }

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open (" + errno_text(errno) + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error(path + ": read error");
  return ss.str();
}

bool file_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot open (" + errno_text(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw Error(path + ": mmap failed (" + errno_text(errno) + ")");
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
}

void MappedFile::release(size_t offset, size_t length) const {
  if (!data_) return;
  long page = sysconf(_SC_PAGESIZE);
  size_t start = offset / size_t(page) * size_t(page);
  size_t end = std::min(size_, offset + length);
  if (end > start) madvise(const_cast<uint8_t*>(data_) + start, end - start, MADV_DONTNEED);
}

void OutStream::write(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd_, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(path_ + ": write failed (" + errno_text(errno) + ")");
    }
    c += w;
    n -= size_t(w);
    written_ += size_t(w);
  }
}

static int open_for_resume(const std::string& path, size_t keep) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | (keep == 0 ? O_TRUNC : 0), 0644);
  if (fd < 0) throw Error(path + ": cannot open for writing (" + errno_text(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0 || size_t(st.st_size) < keep || ftruncate(fd, off_t(keep)) != 0 ||
      lseek(fd, off_t(keep), SEEK_SET) != off_t(keep)) {
    ::close(fd);
    throw Error(path + ": shorter than its checkpoint says (" + std::to_string(keep) + " bytes); cannot resume");
  }
  return fd;
}

ResumableFile::ResumableFile(const std::string& path, size_t keep)
    : keep_(keep), out_(open_for_resume(path, keep), path) {}

ResumableFile::~ResumableFile() { ::close(out_.fd_); }

void ResumableFile::sync() {
  if (fsync(out_.fd_) != 0) throw Error(out_.path_ + ": sync failed (" + errno_text(errno) + ")");
}

static std::string temp_name(const std::string& path) {
  std::random_device rd;
  return path + ".tmp-" + std::to_string(rd() % 1000000);
}

void write_file_atomic(const std::string& path, const std::function<void(OutStream&)>& write) {
  std::string tmp = temp_name(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error(path + ": cannot create (" + errno_text(errno) + ")");
  try {
    OutStream out(fd, path);
    write(out);
    if (fsync(fd) != 0) throw Error(path + ": sync failed (" + errno_text(errno) + ")");
    if (::close(fd) != 0) {
      fd = -1;
      throw Error(path + ": close failed (" + errno_text(errno) + ")");
    }
    fd = -1;
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      throw Error(path + ": rename failed (" + errno_text(errno) + ")");
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
}

AtomicDir::AtomicDir(const std::string& final_path) : final_(final_path) {
  fs::path p(final_path);
  if (p.has_parent_path() && !fs::is_directory(p.parent_path()))
    throw Error(final_path + ": parent directory does not exist");
  tmp_ = temp_name(final_path);
  std::error_code ec;
  fs::create_directory(tmp_, ec);
  if (ec) throw Error(final_path + ": cannot create (" + ec.message() + ")");
}

AtomicDir::~AtomicDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

void AtomicDir::commit() {
  move_into_place(tmp_, final_);
  committed_ = true;
}

void move_into_place(const std::string& from, const std::string& to) {
  std::error_code ec;
  if (fs::exists(to)) fs::remove_all(to, ec);
  if (ec) throw Error(to + ": cannot replace (" + ec.message() + ")");
  fs::rename(from, to, ec);
  if (ec) throw Error(to + ": rename failed (" + ec.message() + ")");
}

}  // namespace dq
