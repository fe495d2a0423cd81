// Task files: the JSON-lines reader and the zero-shot task loader on top of it (the three row
// formats, known task prompts, gold ranges).
#include "eval/zeroshot.h"
#include "fuzz_common.h"
#include "io/jsonl.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dqfuzz::write_input("task.jsonl", data, size);
  try {
    std::vector<dq::JsonlRow> rows = dq::read_jsonl(path);
    if (rows.empty()) dqfuzz::finding("read_jsonl returned no rows without an error");
    for (const auto& r : rows)
      if (!r.value.is_object()) dqfuzz::finding("a row that is not an object");
  } catch (const dq::Error&) {
  }
  // A known task (prompt rewriting) and an unknown one (generic metrics).
  for (const char* name : {"arc_easy", "copa", "lambada_openai", "winogrande", "custom"}) {
    try {
      dq::Task t = dq::load_task(name, path, size % 3 == 0 ? 2 : 0);
      for (const auto& e : t.examples) {
        if (e.candidates.empty()) dqfuzz::finding("an example without candidates");
        if (t.format != dq::TaskFormat::LanguageModel && (e.gold < 0 || size_t(e.gold) >= e.candidates.size()))
          dqfuzz::finding("gold outside the candidates");
      }
    } catch (const dq::Error&) {
    }
  }
  return 0;
}
