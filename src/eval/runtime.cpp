#include "eval/runtime.h"

#include <cmath>
#include <filesystem>

#include "quant/intlinear.h"
#include "quant/quantize_model.h"
#include "rotate/rotate.h"

namespace dq {

namespace {

using json = nlohmann::json;

// The section is read from a file someone else wrote: every field is type- and range-checked here
// (nlohmann's own conversions would turn 1e30 into an int with undefined behaviour).
struct SectionReader {
  const std::string& source;

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(source + ": dartquant_quantization: " + what);
  }
  const json& object(const json& parent, const char* key) const {
    static const json empty = json::object();
    if (!parent.contains(key)) return empty;
    if (!parent[key].is_object()) fail(std::string("'") + key + "' is not an object");
    return parent[key];
  }
  bool flag(const json& o, const char* key) const {
    if (!o.contains(key)) return false;
    if (!o[key].is_boolean()) fail(std::string("'") + key + "' is not true/false");
    return o[key].get<bool>();
  }
  int bits(const json& o, const char* what) const {
    if (!o.contains("bits")) return 16;
    const json& b = o["bits"];
    if (!b.is_number_integer()) fail(std::string(what) + ".bits is not an integer");
    const int64_t v = b.get<int64_t>();
    if (v != 16 && (v < 2 || v > 8)) fail(std::string(what) + ".bits must be 2..8 or 16, got " + b.dump());
    return int(v);
  }
  float clip(const json& o, const char* what, float fallback) const {
    if (!o.contains("clip_ratio")) return fallback;
    const json& c = o["clip_ratio"];
    const double v = c.is_number() ? c.get<double>() : NAN;
    if (!(v > 0 && v <= 1)) fail(std::string(what) + ".clip_ratio must be a number in (0, 1], got " + c.dump());
    return float(v);
  }
};

}  // namespace

ActQuantConfig quant_config(const Model& m) {
  const json& q = m.quantization;
  const SectionReader r{m.source};
  if (!q.is_object()) r.fail("not an object");
  const json& w = r.object(q, "weights");
  const json& act = r.object(q, "activations");
  const json& kv = r.object(q, "kv_cache");
  ActQuantConfig a;
  a.bits = r.bits(act, "activations");
  a.clip_ratio = r.clip(act, "activations", 0.9f);
  a.kv_bits = r.bits(kv, "kv_cache");
  a.kv_clip_ratio = r.clip(kv, "kv_cache", 1.f);
  a.weight_bits = r.bits(w, "weights");
  if (w.contains("group")) {
    if (!w["group"].is_number_integer() || w["group"].get<int64_t>() < 0 || w["group"].get<int64_t>() > (1 << 20))
      r.fail("weights.group is not a group size");
    a.weight_group = int(w["group"].get<int64_t>());
  }
  return a;
}

std::string use_integer_runtime(Model& m, IntPath path) {
  if (m.quantization.is_null()) return "not a quantized model";
  const ActQuantConfig a = quant_config(m);
  if (a.weight_bits == 16) return "weights are not quantized";
  if (a.bits == 16) return "activations are not quantized";
  for (int l = 0; l < m.config.num_layers; ++l)
    if (!router_name(m.config, l).empty()) return "mixture-of-experts models run on the fake-quant path";
  const std::string codes = (std::filesystem::path(m.source) / "quantized.safetensors").string();
  if (!std::filesystem::is_regular_file(codes)) return "no quantized.safetensors beside the model";
  load_integer_weights(m, codes, a, path);
  return "";
}

RuntimeHooks::RuntimeHooks(const Model& m, const std::vector<Site>& fp_sites) {
  if (m.quantization.is_null()) return;
  ActQuantConfig a = quant_config(m);
  a.fp_sites = fp_sites;
  const SectionReader r{m.source};
  const bool integer = m.weights.has_packed();
  path_ = integer ? "integer" : "fake-quant";
  const json& online = r.object(m.quantization, "online");
  const bool r3 = r.flag(online, "r3"), r4 = r.flag(online, "r4");
  if (r3 || r4) owned_.push_back(std::make_unique<OnlineHadamard>(m.config, r3, r4));
  if (integer) a.bits = 16;  // integer linears quantize their inputs
  if (a.bits < 16 || a.kv_bits < 16) {
    owned_.push_back(std::make_unique<ActQuantHook>(m.config, a));
    if (a.kv_bits < 16) kv_quantizer_ = static_cast<const ActQuantHook*>(owned_.back().get());
  }
  for (auto& h : owned_) hooks_.push_back(h.get());
}

RuntimeHooks::~RuntimeHooks() = default;

}  // namespace dq
