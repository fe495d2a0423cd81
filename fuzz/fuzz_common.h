// Shared helpers for the libFuzzer harnesses: every parser reads a path, so each input is written
// to a file in a private per-process directory first. A harness accepts success or dq::Error; any
// other exception escapes to libFuzzer (reported as a crash), as do sanitizer reports.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace dqfuzz {

// A directory unique to this process, created once and removed at exit.
inline const std::string& work_dir() {
  // Never destroyed: the atexit handler below runs after static destructors would.
  static const std::string* dir = [] {
    const char* base = std::getenv("TMPDIR");
    auto* d = new std::string(std::string(base && *base ? base : "/tmp") + "/dq-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(*d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(work_dir(), ec);
    });
    return d;
  }();
  return *dir;
}

inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  std::string path = work_dir() + "/" + name;
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), std::streamsize(size));
  f.close();
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

inline std::string write_input(const std::string& name, const std::string& s) {
  return write_input(name, reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// A violated invariant (not an exception): report and abort so libFuzzer keeps the input.
[[noreturn]] inline void finding(const char* what) {
  std::fprintf(stderr, "dq-fuzz invariant violated: %s\n", what);
  std::abort();
}

}  // namespace dqfuzz
