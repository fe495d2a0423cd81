// Zero-shot tasks scored the way lm-evaluation-harness scores them, so numbers are comparable with
// the accuracy tables of the quantization papers.
//
// A request asks for the log-likelihood of a continuation given a context. As lm-eval does, the
// continuation is prefixed with one space (the target delimiter), trailing whitespace of the
// context moves onto the continuation, the context and the whole string are tokenized separately
// and the continuation's tokens are the whole string's tokens past the context's count. Unlike
// lm-eval's Hugging Face backend, the sequence starts with BOS when the tokenizer adds one
// (encode(..., add_special = true)): the llama2.c models here only ever saw text after BOS.
// Sequences longer than the window keep their last window + 1 tokens (truncation from the left).
// Were the continuation itself that long, only its tokens predicted inside the window are scored.
//
// Task files are MosaicML local-eval JSON lines; the file's rows decide the format:
//   multiple choice {query, choices, gold}: one request per choice after the query;
//   schema {context_options, continuation, gold}: the shared continuation after each context;
//   language modelling {context, continuation}: correct when the greedy continuation is exact.
// Known task names get lm-eval's prompt (e.g. "Question: ...\nAnswer:" for ARC) and its metrics.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/perplexity.h"

namespace dq {

struct Request {
  std::string context, continuation;  // continuation without the delimiter
};

struct Loglikelihood {
  double logprob = 0;   // summed over the continuation's tokens
  bool greedy = false;  // every continuation token is the argmax at its position
  int tokens = 0;       // continuation tokens scored (fewer when it overflows the window)
};

// A request's tokens as described above, before truncation: the last `continuation` are scored.
struct EncodedRequest {
  std::vector<int32_t> tokens;
  int continuation = 0;
};
EncodedRequest encode_request(const Model& m, const Request& r);

struct ZeroShotOptions {
  int window = 0;               // tokens per sequence; 0: the model's max_position_embeddings
  int64_t batch_tokens = 8192;  // padded tokens per forward pass
};

struct ScoreStats {
  int sequences = 0;    // forward-pass rows after prefix sharing
  int forwards = 0;     // forward passes
  int64_t tokens = 0;   // tokens run, padding included
  int clipped = 0;      // requests whose continuation alone overflowed the window
};

// Scores requests in batches: a request whose input is a prefix of another's is read from that
// one's pass (one-token answers to the same context share a sequence), the rest are sorted by
// length and padded on the right, which causal attention never looks at. Hooks must therefore
// treat token rows independently (per-token activation and KV quantizers do). progress counts
// sequences.
std::vector<Loglikelihood> loglikelihoods(const Model& m, const std::vector<Request>& requests,
                                          const Hooks& hooks = {}, const ZeroShotOptions& opt = {},
                                          const Progress& progress = nullptr,
                                          ScoreStats* stats = nullptr);

enum class TaskFormat { MultipleChoice, Schema, LanguageModel };

struct TaskExample {
  std::vector<Request> candidates;  // a single one for language modelling
  int gold = 0;
};

struct Task {
  std::string name;
  TaskFormat format = TaskFormat::MultipleChoice;
  std::vector<TaskExample> examples;
  std::vector<std::string> metrics;  // among acc, acc_norm, perplexity
};

// The task names in dir (its *.jsonl files, sorted).
std::vector<std::string> list_tasks(const std::string& dir);
// "all" or a comma list of names; throws Error for a name without dir/NAME.jsonl.
std::vector<std::string> resolve_tasks(const std::string& spec, const std::string& dir);
// Reads and validates a whole task file; limit > 0 keeps the first `limit` examples.
Task load_task(const std::string& name, const std::string& path, int limit = 0);

// The index of the largest score, the first on ties (as numpy.argmax, which lm-eval uses).
int argmax(const std::vector<double>& scores);
// Standard error of the mean: sample standard deviation / sqrt(n) (lm-eval's mean_stderr).
double mean_stderr(const std::vector<double>& values);

struct Metric {
  std::string name;
  double value = 0, se = 0;  // perplexity's se by the delta method, ppl * se(per-example NLL)
};

struct TaskResult {
  std::string task;
  int examples = 0;
  std::vector<Metric> metrics;
  double seconds = 0, examples_per_second = 0;
  ScoreStats stats;
};

// acc: the candidate with the largest log-likelihood is gold (greedy exact match for language
// modelling); acc_norm: the same with log-likelihood divided by the candidate's byte length;
// perplexity: exp of the mean per-example continuation NLL.
TaskResult evaluate_task(const Model& m, const Task& t, const Hooks& hooks = {},
                         const ZeroShotOptions& opt = {}, const Progress& progress = nullptr);

nlohmann::json to_json(const TaskResult& r);

}  // namespace dq
