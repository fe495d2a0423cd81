// Machine-readable reports: JSON written atomically.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dq {

void write_json(const std::string& path, const nlohmann::json& j);

// Peak resident memory of this process so far, in MiB (from /proc/self/status VmHWM).
double peak_rss_mib();

}  // namespace dq
