// Machine-readable reports: JSON written atomically, and JSON files read with errors naming them.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dq {

// A JSON object gets "written_by": "dartquant" (the marker OutputPlan recognises under --force).
void write_json(const std::string& path, const nlohmann::json& j);
// Parses a JSON file; Error("PATH: invalid JSON") (or nested too deep, or unreadable) otherwise.
nlohmann::json read_json(const std::string& path);

// A "Name:  N kB" field of /proc/self/status in bytes (0 when absent): VmHWM (peak resident),
// VmRSS (resident now), RssAnon (heap), RssFile (pages of mapped files touched).
double proc_status_bytes(const std::string& field);
// Peak resident memory of this process so far, in MiB (VmHWM).
double peak_rss_mib();
// CPU seconds this process has used, all threads: on a shared machine a stage's wall time says
// more about the neighbours than about the stage.
double process_cpu_seconds();
// CPU seconds the calling thread has used (benchmarks of one-thread work on a loaded machine).
double thread_cpu_seconds();

}  // namespace dq
