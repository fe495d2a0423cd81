// One self-contained HTML report (inline SVG charts, inline CSS, no scripts, nothing fetched) for
// `stats`, `calibrate` and `quantize`: activation histograms before/after rotation, per-layer
// kurtosis and max |x| curves, calibration loss curves, and an evaluation table. Each section
// appears only when its data is present.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dq {

struct ReportInput {
  std::string title;
  nlohmann::json meta = nlohmann::json::object();  // key -> value lines under the title
  nlohmann::json stats;                             // stats_to_json output, or null
  // Calibration reports (r1_curve, r2_curves; "options": {"orth", "loss"} names the run); several
  // runs (QR-Orth and Cayley) are drawn on the same axes.
  std::vector<nlohmann::json> calibrations;
  // Quantize reports ("quantization", optional "ppl"): one table row each.
  std::vector<nlohmann::json> evaluations;
};

std::string render_html_report(const ReportInput& in);
// Renders and writes atomically.
void write_html_report(const std::string& path, const ReportInput& in);

}  // namespace dq
