#include "pipeline/quantize.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "io/checkpoint.h"
#include "io/file.h"
#include "io/report.h"
#include "model/layerwise.h"
#include "model/save.h"
#include "tensor/kernels.h"

namespace dq {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

constexpr DType kOutDType = DType::F32;  // dequantized weights are exact in f32
constexpr int64_t kRowChunk = 4096;      // embedding / classifier rows converted at a time

std::string activations_file(int layers_done) { return "activations-" + std::to_string(layers_done) + ".bin"; }

Rotations make_rotations(const Model& m, const QuantizeJob& job, Checkpoint& ck, json& report,
                         const JobProgress& progress) {
  if (!job.rotations_file.empty()) return load_rotations(job.rotations_file, m.config);
  if (job.rotation == "quarot") return random_hadamard_rotations(m.config, job.calib_options.seed);
  CalibResult cr = calibrate(m, job.calib, job.windows, job.len, job.calib_options, progress, &ck);
  report = std::move(cr.report);
  return std::move(cr.rotations);
}

// Rows of `name` streamed into the writer as `dtype`, kRowChunk at a time, through `edit` (fusion,
// rotation).
void write_rows(const Model& m, const std::string& name, const std::string& out_name, DType dtype,
                SafetensorsStreamWriter& w, const std::function<void(Matrix&)>& edit) {
  const std::vector<int64_t> shape = m.weights.shape(name);
  for (int64_t r0 = 0; r0 < shape[0]; r0 += kRowChunk) {
    Matrix rows = m.weights.get_rows(name, r0, std::min(kRowChunk, shape[0] - r0));
    if (edit) edit(rows);
    const TensorBlob b = blob_from_matrix(out_name, rows, dtype);
    w.write_bytes(out_name, b.bytes.data(), b.bytes.size());
  }
  m.weights.release(name);
}

// A classifier written at 16 bits must fit the type: checked before any work, from the rows as they
// will be written. An orthogonal R1 keeps each row's norm, and a row's norm bounds its entries, so a
// rotated head (final-norm gain fused in) is bounded by its rows' norms, an unrotated one by its
// largest entry.
void check_head_range(const Model& m, const std::string& source, bool rotate, DType dtype) {
  if (dtype != DType::F16) return;  // bf16 has f32's range
  const Matrix gain = m.weights.get("model.norm.weight");
  const int64_t rows = m.weights.shape(source).at(0);
  double bound = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    Matrix part = m.weights.get_rows(source, r0, std::min(kRowChunk, rows - r0));
    if (rotate) scale_columns(part, gain);
    for (int64_t r = 0; r < part.rows; ++r) {
      double norm2 = 0, largest = 0;
      for (int64_t c = 0; c < part.cols; ++c) {
        norm2 += double(part(r, c)) * part(r, c);
        largest = std::max(largest, double(std::abs(part(r, c))));
      }
      bound = std::max(bound, rotate ? std::sqrt(norm2) : largest);
    }
  }
  m.weights.release(source);
  if (!(bound <= 65504.0))
    throw Error(m.source + ": the classifier's values may reach " + std::to_string(bound) +
                ", beyond f16's range (65504); use --lm-head-dtype bf16 or f32");
}

void write_tensor(const Model& m, const std::string& name, SafetensorsStreamWriter& w) {
  w.write(blob_from_matrix(name, m.weights.get(name), kOutDType, m.weights.shape(name)));
}

}  // namespace

json run_quantize_job(Model& m, const QuantizeJob& job, const JobProgress& progress) {
  if (m.config.rope_interleaved)
    throw Error(job.out + ": model uses llama2.c's interleaved RoPE; convert it to HF order first");
  const ModelConfig& c = m.config;
  const bool rotate = job.rotation != "none", gptq_mode = job.weights.method == "gptq" && job.weights.spec.enabled();
  if (job.weights.spec.enabled()) check_weight_quant(job.weights);
  json report;
  json stages = json::object();
  auto stage_done = [&](const char* name, Clock::time_point t) {
    stages[name] = {{"seconds", since(t)}, {"peak_rss_mib", peak_rss_mib()}};
  };

  Checkpoint ck(job.out, job.fingerprint, job.resume);
  json& state = ck.state();
  for (const char* k : {"layers_done", "model_tensors", "code_tensors", "rtn_fallbacks"})
    if (!state.contains(k)) state[k] = 0;
  if (!state.contains("gptq_layers")) state["gptq_layers"] = json::array();
  const int resumed_at = state["layers_done"].get<int>();
  if (ck.resumed()) report["resumed_at_layer"] = resumed_at;
  std::error_code ec;
  fs::create_directories(ck.output(), ec);
  if (ec) throw Error(ck.output() + ": cannot create (" + ec.message() + ")");
  auto out_file = [&](const std::string& name) { return ck.output() + "/" + name; };

  // 1. The output's tensors, in the order they will be written: embedding, layers, final norm,
  // classifier (its own tensor once norms are fused into it), then anything else the input had.
  // The files are opened first, so a disk too small for them stops the job before any work.
  const std::string embed = "model.embed_tokens.weight", norm = "model.norm.weight";
  const bool has_head = m.weights.has("lm_head.weight"), write_head = has_head || rotate;
  const std::string head_source = has_head ? "lm_head.weight" : embed;
  std::vector<std::string> order{embed};
  for (int l = 0; l < c.num_layers; ++l)
    for (const std::string& n : layer_tensor_names(m, l)) order.push_back(n);
  order.push_back(norm);
  if (write_head) order.push_back("lm_head.weight");
  for (const std::string& n : m.weights.names())
    if (std::find(order.begin(), order.end(), n) == order.end()) order.push_back(n);
  std::vector<TensorLayout> model_layout, code_layouts;
  if (write_head) check_head_range(m, head_source, rotate, job.head_dtype);
  for (const std::string& n : order) {
    std::vector<int64_t> shape = m.weights.shape(n == "lm_head.weight" ? head_source : n);
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    const DType dtype = n == "lm_head.weight" ? job.head_dtype : kOutDType;
    model_layout.push_back({n, dtype, shape, size_t(count) * dtype_size(dtype)});
  }
  if (job.weights.spec.enabled())
    for (int l = 0; l < c.num_layers; ++l)
      for (const std::string& n : quantized_linears(c, l))
        for (TensorLayout& tl : code_layout(n, m.weights.shape(n), job.weights.spec)) code_layouts.push_back(tl);
  SafetensorsStreamWriter model_out(out_file("model.safetensors"), model_layout, {{"format", "pt"}},
                                    state["model_tensors"].get<size_t>());
  std::unique_ptr<SafetensorsStreamWriter> codes_out;
  if (!code_layouts.empty())
    codes_out = std::make_unique<SafetensorsStreamWriter>(out_file("quantized.safetensors"), code_layouts,
                                                         std::map<std::string, std::string>{},
                                                         state["code_tensors"].get<size_t>());

  // 2. Rotations, checkpointed as soon as they exist (DartQuant calibration is the costly part).
  auto t = Clock::now();
  Rotations rot;
  if (rotate) {
    if (state.value("rotations", false)) {
      rot = load_rotations(ck.file("rotations.safetensors"), c);
    } else {
      json calib_report;
      rot = make_rotations(m, job, ck, calib_report, progress);
      save_rotations(ck.file("rotations.safetensors"), rot);
      state["rotations"] = true;
      if (!calib_report.is_null()) state["calibration"] = calib_report;
      ck.save("rotations");
      drop_calibration_checkpoint(ck, c);
    }
    stage_done("rotations", t);
  }
  if (state.contains("calibration")) report["calibration"] = state["calibration"];

  // 3. Embedding, then layer after layer, a checkpoint after each.
  t = Clock::now();
  auto rotate_rows = [&](Matrix& rows) { rows = matmul(rows, rot.r1); };
  if (model_out.written() == 0) {
    write_rows(m, embed, embed, kOutDType, model_out, rotate ? std::function<void(Matrix&)>(rotate_rows) : nullptr);
    model_out.sync();
    state["model_tensors"] = model_out.written();
    ck.save("embedding");
  }
  LayerActivations x;
  if (gptq_mode) {
    x = LayerActivations(m, job.calib, job.windows, job.len);
    if (resumed_at > 0) x.load(ck.file(activations_file(resumed_at)));
    else if (rotate) x.transform(rotate_rows);
  }
  OnlineHadamard online(c, job.r3, job.r4);
  Hooks runtime;
  if (job.r3 || job.r4) runtime.push_back(&online);
  if (resumed_at > 0) ck.remove(activations_file(resumed_at - 1));  // a kill may precede its removal
  for (int l = resumed_at; l < c.num_layers; ++l) {
    if (rotate) {
      fuse_layer_norms(m, l);
      rotate_layer(m, rot, l);
      if (job.r4) fold_r4_layer(m, l);
    }
    LayerQuantResult q = quantize_layer(m, l, job.weights, gptq_mode ? &x : nullptr, runtime);
    for (const std::string& n : layer_tensor_names(m, l)) write_tensor(m, n, model_out);
    for (const TensorBlob& b : q.codes) codes_out->write(b);
    release_layer(m, l);
    for (const std::string& n : layer_tensor_names(m, l)) m.weights.erase(n);
    model_out.sync();
    if (codes_out) codes_out->sync();
    if (gptq_mode) x.save(ck.file(activations_file(l + 1)));
    state["layers_done"] = l + 1;
    state["model_tensors"] = model_out.written();
    state["code_tensors"] = codes_out ? codes_out->written() : 0;
    if (gptq_mode) state["gptq_layers"].push_back(q.report);
    state["rtn_fallbacks"] = state["rtn_fallbacks"].get<int>() + q.rtn_fallbacks;
    ck.save("layer-" + std::to_string(l));
    ck.remove(activations_file(l));
    if (progress) progress("layers", l + 1, c.num_layers);
  }
  stage_done("layers", t);

  // 4. Final norm, classifier, the rest; config and tokenizer.
  t = Clock::now();
  if (rotate) {
    const Matrix gain = m.weights.get(norm);
    model_out.write(blob_from_matrix(norm, Matrix(1, gain.cols, 1.f), kOutDType, {gain.cols}));
    write_rows(m, head_source, "lm_head.weight", job.head_dtype, model_out, [&](Matrix& rows) {
      scale_columns(rows, gain);
      rotate_rows(rows);
    });
  } else {
    write_tensor(m, norm, model_out);
    if (write_head) write_rows(m, head_source, "lm_head.weight", job.head_dtype, model_out, nullptr);
  }
  for (size_t i = model_out.written(); i < order.size(); ++i) write_tensor(m, order[i], model_out);
  model_out.finish();
  if (codes_out) codes_out->finish();

  ModelConfig out_config = c;
  if (write_head) out_config.tie_embeddings = false;
  json config = out_config.to_json();
  config["dartquant_quantization"] = job.section;
  write_file_atomic(out_file("config.json"), [&](OutStream& s) { s.write(config.dump(2) + "\n"); });
  if (!m.tokenizer_path.empty()) copy_tokenizer(m.tokenizer_path, out_file);
  stage_done("finish", t);

  if (gptq_mode) report["gptq_layers"] = state["gptq_layers"];
  if (state["rtn_fallbacks"].get<int>() > 0) report["expert_rtn_fallbacks"] = state["rtn_fallbacks"];
  report["stages"] = stages;
  return report;
}

}  // namespace dq
