// Activation statistics against a naive computation, and the HTML report: its numbers against the
// JSON of the same run, and its form (balanced tags, no scripts, nothing fetched).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <cstdlib>
#include <random>
#include <regex>
#include <unistd.h>

#include "eval/html_report.h"
#include "eval/stats.h"
#include "io/file.h"
#include "test_helpers.h"

namespace dq {
namespace {

ModelConfig tiny_config(int hidden) {
  ModelConfig c;
  c.num_layers = 2;
  c.hidden_size = hidden;
  c.intermediate_size = 2 * hidden;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = hidden / 2;
  return c;
}

Matrix random_matrix(int64_t rows, int64_t cols, uint64_t seed, float offset) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> heavy(3.f);  // heavy tails, so some entries pass 4·RMS
  Matrix x(rows, cols);
  for (float& v : x.data) v = offset + heavy(rng);
  x(1, 3) = 40.f + 10 * offset;  // an outlier channel entry, beyond 4·RMS of its row
  return x;
}

// The per-token 4-bit asymmetric quantizer written out from its definition (clip 0.9).
double naive_qerr(const Matrix& x) {
  double e = 0;
  for (int64_t r = 0; r < x.rows; ++r) {
    double mn = 0, mx = 0;
    for (int64_t j = 0; j < x.cols; ++j) mn = std::min(mn, double(x(r, j))), mx = std::max(mx, double(x(r, j)));
    const float lo = float(0.9 * mn), hi = float(0.9 * mx), scale = test::naive_round_up((hi - lo) / 15.f, 14);
    const float zero = std::nearbyint(-lo / scale);
    for (int64_t j = 0; j < x.cols; ++j) {
      float q = std::clamp(std::nearbyint(x(r, j) / scale) + zero, 0.f, 15.f);
      double d = double(scale * (q - zero)) - x(r, j);
      e += d * d;
    }
  }
  return e;
}

TEST(Stats, HookMatchesNaive) {
  for (float offset : {0.f, 50.f}) {  // a large mean must not spoil the higher moments
    const ModelConfig c = tiny_config(32);  // |x| / RMS ≤ √channels: 4·RMS needs over 16 channels
    StatsOptions o;
    o.hist_layers = {1};
    o.bins = 24;
    StatsHook hook(c, o);
    Matrix a = random_matrix(7, 32, 1, offset), b = random_matrix(5, 32, 2, offset);
    hook.at(Site::MlpIn, 1, a);  // two batches: the moment merge is exercised
    hook.at(Site::MlpIn, 1, b);
    hook.at(Site::Q, 1, a);      // not a statistics site: ignored

    std::vector<double> all;
    double qerr = naive_qerr(a) + naive_qerr(b), energy = 0, mx = 0;
    int64_t outliers = 0;
    std::vector<double> hist(24, 0);
    const double bound = 6;  // ceil(√32)
    for (const Matrix* m : {&a, &b})
      for (int64_t r = 0; r < m->rows; ++r) {
        double ss = 0;
        for (int64_t j = 0; j < m->cols; ++j) ss += double((*m)(r, j)) * (*m)(r, j);
        const double rms = std::sqrt(ss / 32);
        energy += ss;
        for (int64_t j = 0; j < m->cols; ++j) {
          const double v = (*m)(r, j);
          all.push_back(v);
          mx = std::max(mx, std::abs(v));
          outliers += std::abs(v) > 4 * rms;
          int bin = int(std::floor((v / rms + bound) / (2 * bound) * 24));
          hist[size_t(std::clamp(bin, 0, 23))] += 1;
        }
      }
    const double n = double(all.size());
    double mean = 0, m2 = 0, m4 = 0;
    for (double v : all) mean += v / n;
    for (double v : all) m2 += (v - mean) * (v - mean), m4 += std::pow(v - mean, 4);

    const SiteStats& s = hook.get(1, Site::MlpIn);
    EXPECT_EQ(s.moments.n, int64_t(n));
    EXPECT_NEAR(s.moments.mean, mean, 1e-9 * std::max(1.0, std::abs(mean)));
    EXPECT_NEAR(s.moments.variance(), m2 / n, 1e-9 * m2 / n);
    EXPECT_NEAR(s.moments.kurtosis(), n * m4 / (m2 * m2), 1e-9 * n * m4 / (m2 * m2));
    EXPECT_DOUBLE_EQ(s.max_abs, mx);
    EXPECT_GT(outliers, 0);
    EXPECT_DOUBLE_EQ(s.outlier_fraction(), double(outliers) / n);
    EXPECT_NEAR(s.quant_rel_mse(), qerr / energy, 1e-6 * qerr / energy);
    EXPECT_EQ(s.hist, hist);
    EXPECT_TRUE(hook.get(0, Site::MlpIn).hist.empty());  // layer 0 keeps no histogram
    EXPECT_EQ(hook.get(0, Site::MlpIn).moments.n, 0);
  }
}

TEST(Stats, JsonCarriesEveryVariant) {
  const ModelConfig c = tiny_config(8);
  StatsOptions o;
  o.hist_layers = {0};
  StatsHook h1(c, o), h2(c, o);
  Matrix x = random_matrix(4, 8, 3, 0);
  h1.at(Site::AttnIn, 0, x);
  x(0, 0) *= 2;
  h2.at(Site::AttnIn, 0, x);
  nlohmann::json j = stats_to_json({"none", "quarot"}, {&h1, &h2});
  EXPECT_EQ(j["table"].size(), 2u * 4u);  // layers x sites
  EXPECT_DOUBLE_EQ(j["table"][0]["quarot"]["max_abs"].get<double>(), h2.get(0, Site::AttnIn).max_abs);
  EXPECT_EQ(j["histograms"].size(), 4u);  // layer 0, every site
  EXPECT_THROW(StatsHook(c, [] { StatsOptions b; b.hist_layers = {5}; return b; }()), Error);
}

// A strict well-formedness check: every tag opened is closed in order (<x/> closes itself), nothing
// executes, nothing is fetched, and no raw '<' or '&' escapes into text.
void expect_well_formed(const std::string& html) {
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_EQ(html.find("url("), std::string::npos);
  ASSERT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
  std::vector<std::string> stack;
  size_t i = html.find('>') + 1;
  while (i < html.size()) {
    size_t lt = html.find('<', i);
    std::string text = html.substr(i, lt == std::string::npos ? std::string::npos : lt - i);
    for (size_t k = text.find('&'); k != std::string::npos; k = text.find('&', k + 1))
      EXPECT_TRUE(std::regex_search(text.substr(k), std::regex("^&(amp|lt|gt|quot|#[0-9]+);"))) << text;
    if (lt == std::string::npos) break;
    size_t gt = html.find('>', lt);
    ASSERT_NE(gt, std::string::npos) << "unterminated tag at " << lt;
    std::string tag = html.substr(lt + 1, gt - lt - 1);
    ASSERT_EQ(tag.find('<'), std::string::npos) << tag;
    EXPECT_EQ(tag.find(" on"), std::string::npos) << "event handler in " << tag;
    if (tag[0] == '/') {
      ASSERT_FALSE(stack.empty()) << "stray </" << tag << ">";
      EXPECT_EQ(stack.back(), tag.substr(1)) << "misnested at " << lt;
      stack.pop_back();
    } else if (tag.back() != '/') {
      stack.push_back(tag.substr(0, tag.find_first_of(" \n")));
    }
    i = gt + 1;
  }
  EXPECT_TRUE(stack.empty()) << "unclosed <" << (stack.empty() ? "" : stack.back()) << ">";
}

TEST(Html, EscapesAndBalances) {
  const ModelConfig c = tiny_config(8);
  StatsOptions o;
  o.hist_layers = {1};
  StatsHook h(c, o);
  for (int l = 0; l < 2; ++l)
    for (Site s : o.sites) {
      Matrix x = random_matrix(6, s == Site::DownIn ? 16 : 8, uint64_t(l + 7), 0);
      h.at(s, l, x);
    }
  ReportInput in;
  in.title = "a <b> & \"c\"";
  in.meta = {{"path", "/tmp/x&y<z>"}};
  in.stats = stats_to_json({"none"}, {&h});
  in.calibrations.push_back({{"r1_curve", {{{"step", 0}, {"epoch", 0}, {"loss", 9.0}, {"seconds", 0.1}}}}});
  in.evaluations.push_back({{"quantization", {{"rotation", {{"kind", "<none>"}}}}}});
  const std::string html = render_html_report(in);
  expect_well_formed(html);
  EXPECT_NE(html.find("a &lt;b&gt; &amp; &quot;c&quot;"), std::string::npos);
  EXPECT_NE(html.find("&lt;none&gt;"), std::string::npos);
}

std::string tmpdir() {
  char t[] = "/tmp/dq_stats_XXXXXX";
  return mkdtemp(t);
}

int sh(const std::string& cmd) { return std::system((cmd + " > /dev/null 2>&1").c_str()); }

// Cells the report tags with data-k="<key>": key -> the number shown.
std::map<std::string, double> cells(const std::string& html) {
  std::map<std::string, double> m;
  std::regex re("data-k=\"([^\"]+)\">([-+0-9.eE]+)<");
  for (auto it = std::sregex_iterator(html.begin(), html.end(), re); it != std::sregex_iterator(); ++it)
    m[(*it)[1]] = std::stod((*it)[2]);
  return m;
}

TEST(Html, ReportMatchesJsonOfSameRun) {
  const std::string model = DQ_DATA_DIR "/stories260K/stories260K.bin", text = DQ_DATA_DIR "/tinystories/calib.txt";
  if (!file_exists(model) || !file_exists(text)) GTEST_SKIP() << "stories260K data not present";
  const std::string d = tmpdir(), bin = std::string(DQ_BINARY) + " --threads 1 ";
  const std::string common = " --model " + model + " --calib " + text + " --calib-seqlen 64";
  ASSERT_EQ(sh(bin + "calibrate" + common + " --nsamples 8 --epochs 2 --batch 4 --out " + d + "/rot.safetensors" +
               " --json " + d + "/cal.json --html " + d + "/cal.html"), 0);
  ASSERT_EQ(sh(bin + "stats" + common + " --nsamples 4 --layers 0,4 --rotations " + d + "/rot.safetensors" +
               " --calib-json " + d + "/cal.json --json " + d + "/st.json --html " + d + "/st.html"), 0);
  ASSERT_EQ(sh(bin + "quantize --model " + model + " --out " + d + "/q --rotation quarot --ppl " + text +
               " --seqlen 64 --max-windows 2 --json " + d + "/q.json --html " + d + "/q.html"), 0);

  const nlohmann::json st = nlohmann::json::parse(read_file(d + "/st.json"));
  const std::string html = read_file(d + "/st.html");
  expect_well_formed(html);
  const auto shown = cells(html);
  ASSERT_EQ(st["variants"], nlohmann::json({"none", "quarot", "learned"}));
  int checked = 0;
  for (const auto& row : st["table"])
    for (const std::string v : {"none", "quarot", "learned"})
      for (const char* m : {"mean", "kurtosis", "max_abs", "outlier_fraction", "quant_rel_mse"}) {
        const std::string key = "L" + std::to_string(row["layer"].get<int>()) + "." +
                                row["site"].get<std::string>() + "." + v + "." + m;
        ASSERT_TRUE(shown.count(key)) << key;
        double want = row[v][m].get<double>() * (std::string(m) == "outlier_fraction" ? 100 : 1);
        EXPECT_NEAR(shown.at(key), want, 1e-3 * std::abs(want) + 1e-12) << key;
        ++checked;
      }
  EXPECT_EQ(checked, 5 * 4 * 3 * 5);  // stories260K: 5 layers, 4 sites
  EXPECT_EQ(st["histograms"].size(), 2u * 4u);
  EXPECT_NE(html.find("layer 4, down_proj input"), std::string::npos);
  EXPECT_NE(html.find("R1 loss per step"), std::string::npos);  // from --calib-json

  expect_well_formed(read_file(d + "/cal.html"));
  EXPECT_NE(read_file(d + "/cal.html").find("QR-Orth"), std::string::npos);
  const nlohmann::json q = nlohmann::json::parse(read_file(d + "/q.json"));
  const std::string qh = read_file(d + "/q.html");
  expect_well_formed(qh);
  ASSERT_TRUE(cells(qh).count("ppl"));
  EXPECT_NEAR(cells(qh).at("ppl"), q["ppl"]["ppl"].get<double>(), 1e-3 * q["ppl"]["ppl"].get<double>());
  sh("rm -rf " + d);
}

}  // namespace
}  // namespace dq
