#include "cli/validators.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

namespace dq::cli {

namespace {

// %g without trailing noise: 1, 0.5, 1e+06.
std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

bool parse_int(const std::string& s, int64_t& v) {
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  return ec == std::errc() && p == end;
}

bool parse_real(const std::string& s, double& v) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
  char* end = nullptr;
  v = std::strtod(s.c_str(), &end);  // overflow gives ±HUGE_VAL, refused below as not finite
  return end == s.c_str() + s.size();
}

}  // namespace

CLI::Validator int_in(int64_t lo, int64_t hi) {
  const std::string range = "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, range](std::string& s) -> std::string {
        int64_t v = 0;
        if (!parse_int(s, v) || v < lo || v > hi) return "must be " + range;
        return "";
      },
      "INT in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

CLI::Validator real_in(double lo, double hi, bool lo_open) {
  const std::string interval = (lo_open ? "(" : "[") + number_text(lo) + ", " + number_text(hi) + "]";
  return CLI::Validator(
      [lo, hi, lo_open, interval](std::string& s) -> std::string {
        double v = 0;
        if (!parse_real(s, v) || !std::isfinite(v) || v < lo || (lo_open && v == lo) || v > hi)
          return "must be a finite number in " + interval;
        return "";
      },
      "NUMBER in " + interval);
}

CLI::Validator quant_bits() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        int64_t v = 0;
        if (!parse_int(s, v) || (v != 16 && (v < 2 || v > 8))) return "must be 2..8, or 16 for not quantized";
        return "";
      },
      "2..8 or 16");
}

}  // namespace dq::cli
