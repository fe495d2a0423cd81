// The dartquant_quantization section a quantized model carries: a well-formed one yields the hooks
// it names (checked by their effect on the logits), a malformed one an Error naming the model.
#include <gtest/gtest.h>

#include "eval/runtime.h"
#include "model/model.h"
#include "test_helpers.h"

using namespace dq;
using json = nlohmann::json;

namespace {

Model stories() { return load_model(dq::test::kStories); }

TEST(RuntimeSection, MalformedSectionsAreErrorsNamingTheModel) {
  for (const char* text : {R"({"activations": {"bits": 1e30}})", R"({"activations": {"bits": 1}})",
                           R"({"kv_cache": {"bits": 4, "clip_ratio": -1}})", R"({"kv_cache": {"clip_ratio": "x"}})",
                           R"({"online": {"r3": 1}})", R"({"online": []})", R"([1, 2])"}) {
    Model m = stories();
    m.quantization = json::parse(text);
    try {
      RuntimeHooks h(m);
      ADD_FAILURE() << "accepted " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(m.source), std::string::npos) << e.what();
    }
  }
}

TEST(RuntimeSection, AcceptedSectionsChangeTheForwardPassAsNamed) {
  Model m = stories();
  const std::vector<int32_t> tokens{1, 403, 407, 261, 378, 275, 3, 9};
  const Matrix fp = forward(m, tokens, 1, 8);
  auto run = [&](const char* text) {
    m.quantization = json::parse(text);
    RuntimeHooks h(m);
    const Matrix x = forward(m, tokens, 1, 8, h.hooks());
    double d = 0;
    for (size_t i = 0; i < x.size(); ++i) d = std::max(d, double(std::fabs(x.data[i] - fp.data[i])));
    return d;
  };
  EXPECT_EQ(run(R"({"activations": {"bits": 16}, "kv_cache": {"bits": 16}})"), 0.0);
  EXPECT_GT(run(R"({"activations": {"bits": 4}})"), 1e-3);
  EXPECT_GT(run(R"({"kv_cache": {"bits": 3, "clip_ratio": 0.8}})"), 1e-3);
  EXPECT_GT(run(R"({"online": {"r4": true}})"), 1e-3) << "R4 without its fold changes the function";
}

}  // namespace
