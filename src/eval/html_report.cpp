#include "eval/html_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "io/file.h"
#include "io/output.h"
#include "tensor/tensor.h"

namespace dq {
namespace {

using json = nlohmann::json;

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&') o += "&amp;";
    else if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}
std::string num(double v) { return fmt("%.4g", v); }  // table cells: 4 significant digits
std::string tick(double v) { return fmt("%.3g", std::abs(v) < 1e-12 ? 0.0 : v); }

// Colours are fixed per variant so every chart and table reads the same way.
std::string variant_colour(const std::string& v, size_t i) {
  if (v == "none") return "#7a7a7a";
  if (v == "quarot") return "#1f77b4";
  if (v == "learned") return "#e6550d";
  static const char* other[] = {"#2ca02c", "#9467bd", "#8c564b", "#d62728"};
  return other[i % 4];
}
std::string variant_label(const std::string& v) {
  if (v == "none") return "unrotated (norm-fused)";
  if (v == "quarot") return "random Hadamard (QuaRot)";
  if (v == "learned") return "learned (DartQuant)";
  return v;
}
std::string site_label(const std::string& s) {
  if (s == "attn_in") return "q/k/v input";
  if (s == "o_proj_in") return "o_proj input";
  if (s == "mlp_in") return "gate/up input";
  if (s == "down_in") return "down_proj input";
  return s;
}
const char* run_colours[] = {"#e6550d", "#6a3d9a", "#1b9e77", "#e7298a", "#1f77b4"};

struct Series {
  std::string label, colour;
  std::vector<double> x, y;
  bool step = false;  // histogram: horizontal runs over [x[i], x[i+1])
  bool markers = false;
};

struct Chart {
  std::string title, xlabel, ylabel;
  bool log_y = false;
  double y_floor = 0;  // log axes: values below this are drawn at it (empty histogram bins)
  bool legend = false;
  int w = 285, h = 215;
};

// Tick positions: about n "nice" steps (1, 2, 5 × 10^k) covering [lo, hi].
std::vector<double> lin_ticks(double lo, double hi, int n) {
  double raw = (hi - lo) / n, mag = std::pow(10, std::floor(std::log10(raw))), step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) t.push_back(v);
  return t;
}

std::string svg_chart(const Chart& c, const std::vector<Series>& ss) {
  const double L = 56, R = 10, T = 24, B = 40, pw = c.w - L - R, ph = c.h - T - B;
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const Series& s : ss)
    for (size_t i = 0; i < s.y.size(); ++i) {
      x0 = std::min(x0, s.x[i]);
      x1 = std::max(x1, s.x[i + (s.step ? 1 : 0)]);
      double y = c.log_y ? std::max(s.y[i], c.y_floor) : s.y[i];
      if (c.log_y && y <= 0) continue;
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  std::string o = "<svg class=\"chart\" width=\"" + std::to_string(c.w) + "\" height=\"" + std::to_string(c.h) +
                  "\" viewBox=\"0 0 " + std::to_string(c.w) + " " + std::to_string(c.h) + "\" role=\"img\">";
  o += "<title>" + esc(c.title) + "</title>";
  o += "<text x=\"" + tick(L + pw / 2) + "\" y=\"15\" class=\"ct\">" + esc(c.title) + "</text>";
  if (!std::isfinite(x0) || !std::isfinite(y0)) return o + "<text x=\"60\" y=\"100\">no data</text></svg>";
  if (x1 <= x0) x1 = x0 + 1;
  std::vector<double> yt;
  auto Y = [&](double v) {
    if (c.log_y) v = std::log10(std::max(v, c.y_floor > 0 ? c.y_floor : y0));
    double a = c.log_y ? std::floor(std::log10(y0)) : y0, b = c.log_y ? std::ceil(std::log10(y1)) : y1;
    if (b <= a) b = a + 1;
    return T + ph - (v - a) / (b - a) * ph;
  };
  if (c.log_y) {
    for (double e = std::floor(std::log10(y0)); e <= std::ceil(std::log10(y1)) + 1e-9; e += 1) yt.push_back(std::pow(10, e));
  } else {
    if (y1 - y0 < 1e-12 * std::max(1.0, std::abs(y1))) {
      y0 -= 0.5 * std::max(1e-6, std::abs(y0));
      y1 += 0.5 * std::max(1e-6, std::abs(y1));
    }
    double pad = 0.05 * (y1 - y0);
    y0 = y0 >= 0 && y0 - pad < 0 ? 0 : y0 - pad;
    y1 += pad;
    yt = lin_ticks(y0, y1, 4);
  }
  auto X = [&](double v) { return L + (v - x0) / (x1 - x0) * pw; };
  for (double v : yt) {
    double y = Y(v);
    o += "<line x1=\"" + tick(L) + "\" x2=\"" + tick(L + pw) + "\" y1=\"" + tick(y) + "\" y2=\"" + tick(y) +
         "\" class=\"gl\"/>";
    const std::string lab = !c.log_y ? tick(v) : v >= 1e4 || v < 1e-2 ? fmt("1e%.0f", std::log10(v)) : fmt("%g", v);
    o += "<text x=\"" + tick(L - 4) + "\" y=\"" + tick(y + 3) + "\" class=\"yt\">" + lab + "</text>";
  }
  for (double v : lin_ticks(x0, x1, 5)) {
    double x = X(v);
    o += "<line x1=\"" + tick(x) + "\" x2=\"" + tick(x) + "\" y1=\"" + tick(T + ph) + "\" y2=\"" + tick(T + ph + 4) +
         "\" class=\"axis\"/>";
    o += "<text x=\"" + tick(x) + "\" y=\"" + tick(T + ph + 15) + "\" class=\"xt\">" + tick(v) + "</text>";
  }
  o += "<rect x=\"" + tick(L) + "\" y=\"" + tick(T) + "\" width=\"" + tick(pw) + "\" height=\"" + tick(ph) +
       "\" class=\"frame\"/>";
  o += "<text x=\"" + tick(L + pw / 2) + "\" y=\"" + tick(c.h - 6) + "\" class=\"al\">" + esc(c.xlabel) + "</text>";
  o += "<text transform=\"translate(13," + tick(T + ph / 2) + ") rotate(-90)\" class=\"al\">" + esc(c.ylabel) +
       "</text>";
  for (const Series& s : ss) {
    std::string pts;
    for (size_t i = 0; i < s.y.size(); ++i) {
      double y = Y(c.log_y ? std::max(s.y[i], c.y_floor) : s.y[i]);
      pts += tick(X(s.x[i])) + "," + tick(y) + " ";
      if (s.step) pts += tick(X(s.x[i + 1])) + "," + tick(y) + " ";
    }
    o += "<polyline points=\"" + pts + "\" fill=\"none\" stroke=\"" + s.colour +
         "\" stroke-width=\"1.6\" stroke-opacity=\"0.9\"/>";
    if (s.markers)
      for (size_t i = 0; i < s.y.size(); ++i)
        o += "<circle cx=\"" + tick(X(s.x[i])) + "\" cy=\"" + tick(Y(s.y[i])) + "\" r=\"2.5\" fill=\"" + s.colour +
             "\"/>";
  }
  if (c.legend && !ss.empty())
    o += "<rect x=\"" + tick(L + pw - 96) + "\" y=\"" + tick(T + 2) + "\" width=\"94\" height=\"" +
         tick(14 * double(ss.size()) + 4) + "\" class=\"lgbox\"/>";
  if (c.legend)
    for (size_t i = 0; i < ss.size(); ++i) {
      double y = T + 12 + 14 * double(i);
      o += "<line x1=\"" + tick(L + pw - 92) + "\" x2=\"" + tick(L + pw - 76) + "\" y1=\"" + tick(y - 4) + "\" y2=\"" +
           tick(y - 4) + "\" stroke=\"" + ss[i].colour + "\" stroke-width=\"2.5\"/>";
      o += "<text x=\"" + tick(L + pw - 72) + "\" y=\"" + tick(y) + "\" class=\"lg\">" + esc(ss[i].label) + "</text>";
    }
  return o + "</svg>";
}

std::string legend(const std::vector<std::pair<std::string, std::string>>& items) {
  std::string o = "<p class=\"legend\">";
  for (auto& [label, colour] : items)
    o += "<span class=\"key\"><span class=\"sw\" style=\"background:" + colour + "\"></span>" + esc(label) + "</span>";
  return o + "</p>";
}

const json* find_row(const json& stats, int layer, const std::string& site) {
  for (const json& r : stats["table"])
    if (r["layer"] == layer && r["site"] == site) return &r;
  return nullptr;
}

// Summary table, histograms and per-layer curves.
std::string stats_charts(const json& st) {
  std::vector<std::string> variants = st["variants"].get<std::vector<std::string>>();
  std::vector<std::string> sites = st["sites"].get<std::vector<std::string>>();
  const int layers = st["layers"].get<int>();
  std::vector<std::pair<std::string, std::string>> keys;
  for (size_t v = 0; v < variants.size(); ++v) keys.push_back({variant_label(variants[v]), variant_colour(variants[v], v)});
  std::string o;

  // At a glance: layer averages, the figures the paper's Table 19 compares.
  o += "<h2>At a glance (mean over layers)</h2><table><tr><th rowspan=\"2\">site</th><th colspan=\"" +
       std::to_string(variants.size()) + "\">kurtosis</th><th colspan=\"" + std::to_string(variants.size()) +
       "\">max |x|</th><th colspan=\"" + std::to_string(variants.size()) +
       "\">4-bit rel. MSE</th></tr><tr>";
  for (int k = 0; k < 3; ++k)
    for (size_t v = 0; v < variants.size(); ++v)
      o += "<th style=\"color:" + variant_colour(variants[v], v) + "\">" + esc(variants[v]) + "</th>";
  o += "</tr>";
  for (const std::string& s : sites) {
    o += "<tr><td>" + esc(site_label(s)) + "</td>";
    for (const char* metric : {"kurtosis", "max_abs", "quant_rel_mse"})
      for (const std::string& v : variants) {
        double sum = 0;
        for (int l = 0; l < layers; ++l) sum += (*find_row(st, l, s))[v][metric].get<double>();
        o += "<td data-k=\"mean." + esc(s) + "." + esc(v) + "." + metric + "\">" + num(sum / layers) + "</td>";
      }
    o += "</tr>";
  }
  o += "</table>";

  if (!st["histograms"].empty()) {
    o += "<h2>Histograms before and after rotation</h2>" + legend(keys) +
         "<p class=\"note\">x axis: each value divided by the RMS of its own token (a rotation keeps a token's "
         "RMS); y axis: count per bin, log scale. Flatter and narrower means fewer outliers for 4-bit "
         "per-token quantization. The down_proj input is computed from gate and up through SiLU, so R1 does "
         "not change it: QuaRot and learned share the same online Hadamard R4 there and their curves "
         "coincide.</p><div class=\"grid\">";
    for (const json& h : st["histograms"]) {
      const double bound = h["bound"].get<double>();
      const int bins = h["bins"].get<int>();
      int first = bins, last = -1;
      for (const std::string& v : variants)
        for (int b = 0; b < bins; ++b)
          if (h[v][size_t(b)].get<double>() > 0) {
            first = std::min(first, b);
            last = std::max(last, b);
          }
      // Only the occupied range is drawn, one empty bin either side.
      first = std::max(0, first - 1);
      last = std::min(bins - 1, last + 1);
      std::vector<Series> ss;
      for (size_t v = 0; v < variants.size(); ++v) {
        Series s{variants[v], variant_colour(variants[v], v), {}, {}, true, false};
        for (int b = first; b <= last; ++b) {
          s.x.push_back(-bound + 2 * bound * b / bins);
          s.y.push_back(h[variants[v]][size_t(b)].get<double>());
        }
        s.x.push_back(-bound + 2 * bound * (last + 1) / bins);
        ss.push_back(std::move(s));
      }
      Chart c;
      c.title = "layer " + std::to_string(h["layer"].get<int>()) + ", " + site_label(h["site"].get<std::string>());
      c.xlabel = "value / token RMS";
      c.ylabel = "count (log scale)";
      c.log_y = true;
      c.y_floor = 1;  // empty bins sit on the axis
      o += svg_chart(c, ss);
    }
    o += "</div>";
  }

  o += "<h2>Per-layer kurtosis and max |x|</h2>" + legend(keys) + "<div class=\"grid\">";
  for (const char* metric : {"kurtosis", "max_abs"})
    for (const std::string& s : sites) {
      std::vector<Series> ss;
      double lo = 1e300, hi = 0;
      for (size_t v = 0; v < variants.size(); ++v) {
        Series se{variants[v], variant_colour(variants[v], v), {}, {}, false, true};
        for (int l = 0; l < layers; ++l) {
          double y = (*find_row(st, l, s))[variants[v]][metric].get<double>();
          se.x.push_back(l);
          se.y.push_back(y);
          lo = std::min(lo, y);
          hi = std::max(hi, y);
        }
        ss.push_back(std::move(se));
      }
      Chart c;
      bool kurt = std::string(metric) == "kurtosis";
      c.title = std::string(kurt ? "kurtosis" : "max |x|") + ", " + site_label(s);
      c.xlabel = "layer";
      c.log_y = lo > 0 && hi / lo > 30;  // a few huge outliers would flatten the other curves
      c.ylabel = std::string(kurt ? "kurtosis (Gaussian = 3)" : "max |x| (activation units)") +
                 (c.log_y ? ", log" : "");
      o += svg_chart(c, ss);
    }
  o += "</div>";
  return o;
}

// The full numbers; data-k names each cell so tests can check them against the JSON.
std::string stats_numbers(const json& st) {
  std::vector<std::string> variants = st["variants"].get<std::vector<std::string>>();
  std::vector<std::string> sites = st["sites"].get<std::vector<std::string>>();
  const int layers = st["layers"].get<int>();
  const json& defs = st["definitions"];
  std::string o;
  o += "<h2>Numbers per layer</h2><p class=\"note\">kurtosis: " + esc(defs.value("kurtosis", "")) +
       ". &gt;4·RMS: " + esc(defs.value("outlier_fraction", "")) + ", in %. 4-bit rel. MSE: " +
       esc(defs.value("quant_rel_mse", "")) + ".</p>";
  const char* metrics[] = {"mean", "variance", "kurtosis", "max_abs", "outlier_fraction", "quant_rel_mse"};
  const char* heads[] = {"mean", "variance", "kurtosis", "max |x|", "&gt;4·RMS (%)", "4-bit rel. MSE"};
  for (const std::string& s : sites) {
    o += "<h3>" + esc(site_label(s)) + "</h3><table><tr><th rowspan=\"2\">layer</th>";
    for (const char* hd : heads) o += "<th colspan=\"" + std::to_string(variants.size()) + "\">" + hd + "</th>";
    o += "</tr><tr>";
    for (size_t k = 0; k < std::size(metrics); ++k)
      for (size_t v = 0; v < variants.size(); ++v)
        o += "<th style=\"color:" + variant_colour(variants[v], v) + "\">" + esc(variants[v]) + "</th>";
    o += "</tr>";
    for (int l = 0; l < layers; ++l) {
      const json& r = *find_row(st, l, s);
      o += "<tr><td>" + std::to_string(l) + "</td>";
      for (const char* m : metrics)
        for (const std::string& v : variants) {
          double x = r[v][m].get<double>();
          if (std::string(m) == "outlier_fraction") x *= 100;
          o += "<td data-k=\"L" + std::to_string(l) + "." + esc(s) + "." + esc(v) + "." + m + "\">" + num(x) + "</td>";
        }
      o += "</tr>";
    }
    o += "</table>";
  }
  return o;
}

std::string run_label(const json& cal, size_t i) {
  const json opts = cal.value("options", json::object());
  std::string orth = opts.value("orth", "");
  std::string name = orth == "qr" ? "QR-Orth" : orth == "cayley" ? "Cayley" : "run " + std::to_string(i + 1);
  if (opts.contains("loss")) name += " (" + opts["loss"].get<std::string>() + ")";
  return name;
}

std::string loss_section(const std::vector<json>& cals) {
  std::vector<Series> by_step, by_time, r2;
  for (size_t i = 0; i < cals.size(); ++i) {
    const json& c = cals[i];
    std::string colour = run_colours[i % std::size(run_colours)], label = run_label(c, i);
    Series a{label, colour, {}, {}, false, false}, b = a, m = a;
    for (const json& p : c.value("r1_curve", json::array())) {
      a.x.push_back(p["step"].get<double>());
      a.y.push_back(p["loss"].get<double>());
      b.x.push_back(p["seconds"].get<double>());
      b.y.push_back(p["loss"].get<double>());
    }
    // R2 trains one rotation set per layer; the mean over layers per step summarises them.
    const json r2c = c.value("r2_curves", json::array());
    size_t steps = r2c.empty() ? 0 : r2c[0].size();
    for (const json& layer : r2c) steps = std::min(steps, layer.size());
    for (size_t k = 0; k < steps; ++k) {
      double s = 0;
      for (const json& layer : r2c) s += layer[k]["loss"].get<double>();
      m.x.push_back(double(k));
      m.y.push_back(s / double(r2c.size()));
    }
    if (!a.y.empty()) {
      by_step.push_back(a);
      by_time.push_back(b);
    }
    if (!m.y.empty()) r2.push_back(m);
  }
  std::string o = "<h2>Calibration loss curves</h2><div class=\"grid\">";
  Chart c;
  c.w = 380;
  c.h = 250;
  c.legend = true;
  c.ylabel = "Whip loss (per token)";
  c.title = "R1 loss per step";
  c.xlabel = "optimizer step";
  o += svg_chart(c, by_step);
  c.title = "R1 loss over time";
  c.xlabel = "wall time (s)";
  o += svg_chart(c, by_time);
  if (!r2.empty()) {
    c.title = "R2 loss per step (mean over layers)";
    c.xlabel = "optimizer step";
    o += svg_chart(c, r2);
  }
  o += "</div>";
  if (!cals.empty() && cals[0].contains("options") && cals[0]["options"].contains("loss") &&
      cals[0]["options"]["loss"] != "whip")
    o += "<p class=\"note\">The y axis is the loss named in the legend, not necessarily Whip.</p>";
  return o;
}

std::string eval_section(const std::vector<json>& evals) {
  std::string o = "<h2>Evaluation</h2><table><tr><th>rotation</th><th>weights</th><th>activations</th>"
                  "<th>KV cache</th><th>online R3/R4</th><th>perplexity</th><th>text (windows × tokens)</th></tr>";
  for (const json& e : evals) {
    const json q = e.value("quantization", json::object());
    const json w = q.value("weights", json::object()), a = q.value("activations", json::object()),
               kv = q.value("kv_cache", json::object()), on = q.value("online", json::object());
    auto bits = [](const json& x) { return x.contains("bits") ? std::to_string(x["bits"].get<int>()) + "-bit" : "?"; };
    std::string wdesc = bits(w) + " " + w.value("method", "") +
                        (w.value("group", 0) > 0 ? ", group " + std::to_string(w["group"].get<int>()) : ", per channel");
    o += "<tr><td>" + esc(q.value("rotation", json::object()).value("kind", "?")) + "</td><td>" + esc(wdesc) +
         "</td><td>" + bits(a) + "</td><td>" + bits(kv) + "</td><td>" +
         std::string(on.value("r3", false) ? "R3 " : "") + (on.value("r4", false) ? "R4" : "") + "</td>";
    if (e.contains("ppl"))
      o += "<td data-k=\"ppl\">" + num(e["ppl"]["ppl"].get<double>()) + "</td><td>" +
           esc(e["ppl"].value("text", "")) + " (" + std::to_string(e["ppl"].value("windows", 0)) + " × " +
           std::to_string(e["ppl"].value("seqlen", 0)) + ")</td>";
    else
      o += "<td>not evaluated</td><td></td>";
    o += "</tr>";
  }
  return o + "</table>";
}

const char* kStyle =
    "body{font-family:'DejaVu Sans',Arial,sans-serif;margin:16px 20px;color:#222;max-width:1180px}"
    "h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ccc}"
    "h3{font-size:14px;margin:12px 0 4px}.meta{font-size:12px;color:#444;margin:0}"
    ".note{font-size:12px;color:#444;margin:4px 0}.grid{display:flex;flex-wrap:wrap;gap:4px}"
    "table{border-collapse:collapse;font-size:11px;margin:4px 0}"
    "td,th{border:1px solid #ccc;padding:2px 5px;text-align:right}th{background:#f2f2f2}"
    ".legend{font-size:13px;margin:4px 0}.key{margin-right:18px}"
    ".sw{display:inline-block;width:22px;height:4px;margin:0 6px 3px 0;vertical-align:middle}"
    ".chart{background:#fff}.ct{font-size:12px;font-weight:bold;text-anchor:middle}"
    ".al{font-size:11px;text-anchor:middle;fill:#333}.xt{font-size:10px;text-anchor:middle;fill:#444}"
    ".yt{font-size:10px;text-anchor:end;fill:#444}.lg{font-size:10px;fill:#222}"
    ".gl{stroke:#e4e4e4;stroke-width:1}.axis{stroke:#666}"
    ".frame{fill:none;stroke:#999}.lgbox{fill:#fff;fill-opacity:0.85;stroke:#ccc}";

}  // namespace

std::string render_html_report(const ReportInput& in) {
  std::string o = std::string("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>") + kHtmlGeneratorTag + "<title>" + esc(in.title) +
                  "</title><style>" + kStyle + "</style></head><body><h1>" + esc(in.title) + "</h1>";
  if (in.meta.is_object())
    for (auto it = in.meta.begin(); it != in.meta.end(); ++it)
      o += "<p class=\"meta\"><b>" + esc(it.key()) + ":</b> " +
           esc(it->is_string() ? it->get<std::string>() : it->dump()) + "</p>";
  if (!in.stats.is_null()) o += stats_charts(in.stats);
  if (!in.calibrations.empty()) o += loss_section(in.calibrations);
  if (!in.evaluations.empty()) o += eval_section(in.evaluations);
  if (!in.stats.is_null()) o += stats_numbers(in.stats);  // long tables last: the charts come first
  return o + "</body></html>\n";
}

void write_html_report(const std::string& path, const ReportInput& in) {
  const std::string html = render_html_report(in);
  write_file_atomic(path, [&](OutStream& out) { out.write(html); });
}

}  // namespace dq
