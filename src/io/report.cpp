#include "io/report.h"

#include "io/json_limits.h"

#include <ctime>
#include <fstream>

#include "io/file.h"
#include "io/output.h"

namespace dq {

void write_json(const std::string& path, const nlohmann::json& j) {
  nlohmann::json marked = j;
  if (marked.is_object()) marked["written_by"] = kWrittenBy;
  write_file_atomic(path, [&](OutStream& out) { out.write(marked.dump(2) + "\n"); });
}

nlohmann::json read_json(const std::string& path) {
  return parse_json_strict(read_file(path), path);
}

double proc_status_bytes(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) * 1024.0;
  return 0;
}

double peak_rss_mib() { return proc_status_bytes("VmHWM") / 1048576.0; }

static double cpu_seconds(clockid_t clock) {
  timespec t{};
  clock_gettime(clock, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double process_cpu_seconds() { return cpu_seconds(CLOCK_PROCESS_CPUTIME_ID); }

double thread_cpu_seconds() { return cpu_seconds(CLOCK_THREAD_CPUTIME_ID); }

}  // namespace dq
