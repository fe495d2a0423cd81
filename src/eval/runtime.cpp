#include "eval/runtime.h"

#include "quant/quantize_model.h"
#include "rotate/rotate.h"

namespace dq {

RuntimeHooks::RuntimeHooks(const Model& m) {
  const nlohmann::json& q = m.quantization;
  if (q.is_null()) return;
  try {
    const nlohmann::json online = q.value("online", nlohmann::json::object());
    bool r3 = online.value("r3", false), r4 = online.value("r4", false);
    if (r3 || r4) owned_.push_back(std::make_unique<OnlineHadamard>(m.config, r3, r4));
    ActQuantConfig a;
    const nlohmann::json act = q.value("activations", nlohmann::json::object());
    const nlohmann::json kv = q.value("kv_cache", nlohmann::json::object());
    a.bits = act.value("bits", 16);
    a.clip_ratio = act.value("clip_ratio", 0.9f);
    a.kv_bits = kv.value("bits", 16);
    a.kv_clip_ratio = kv.value("clip_ratio", 1.f);
    if (a.bits < 16 || a.kv_bits < 16) owned_.push_back(std::make_unique<ActQuantHook>(m.config, a));
  } catch (const nlohmann::json::exception& e) {
    throw Error(m.source + ": malformed dartquant_quantization section (" + e.what() + ")");
  }
  for (auto& h : owned_) hooks_.push_back(h.get());
}

RuntimeHooks::~RuntimeHooks() = default;

}  // namespace dq
