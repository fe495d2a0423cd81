#include "io/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>

#include "tensor/tensor.h"

namespace dq {
namespace fs = std::filesystem;

static std::string errno_text(int e) { return e == ENOSPC ? "disk full" : std::strerror(e); }

int open_regular_file(const std::string& path) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open (" + errno_text(errno) + ")");
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const bool dir = S_ISDIR(st.st_mode);
    ::close(fd);
    throw Error(path + (dir ? ": is a directory, not a file" : ": not a regular file"));
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return fd;
}

std::string read_file(const std::string& path) {
  const int fd = open_regular_file(path);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      throw Error(path + ": read error (" + errno_text(errno) + ")");
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  ::close(fd);
  return out;
}

static std::string human_bytes(double b) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (b >= 1024 && u < 6) b /= 1024, ++u;
  char s[64];
  std::snprintf(s, sizeof s, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return s;
}

void check_free_space(const std::string& path, double bytes) {
  const fs::path dir = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : fs::path(".");
  struct statvfs v;
  if (statvfs(dir.c_str(), &v) != 0) return;  // no figure to check against
  const double free = double(v.f_bavail) * double(v.f_frsize);
  if (bytes > free)
    throw Error(path + ": needs " + human_bytes(bytes) + " but its file system has " + human_bytes(free) + " free");
}

bool file_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = open_regular_file(path);
  struct stat st;
  fstat(fd, &st);
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
  // A read fault maps the cached pages of its whole 64 KiB-aligned window (Linux's fault-around),
  // neighbouring tensors' included: the window around the range goes back too, or each small
  // tensor read (a layer's norms) would leave its neighbours' pages resident. The mapping is
  // read-only: a page handed back is read again from the page cache when next touched.
  constexpr size_t kFaultAround = size_t(64) << 10;
  const size_t window = std::max(kFaultAround, size_t(sysconf(_SC_PAGESIZE)));
  size_t start = offset / window * window;
  size_t end = std::min(size_, (offset + length + window - 1) / window * window);
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
