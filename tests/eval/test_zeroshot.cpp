// Zero-shot scoring on the real stories260K model: the batched, prefix-sharing scorer against a
// reference that runs one sequence at a time, the metric definitions, and the task-file reader.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <unistd.h>

#include "eval/zeroshot.h"
#include "io/jsonl.h"
#include "quant/quantize_model.h"

namespace dq {
namespace {

const std::string kTasks = DQ_DATA_DIR "/zeroshot";

const Model& model() {
  static const Model m = load_model(DQ_DATA_DIR "/stories260K/stories260K.bin");
  return m;
}

// lm-eval's definition spelled out for one request (contexts here end without whitespace), run
// alone through the model at exactly its own length.
Loglikelihood naive(const Model& m, const Request& r, int window, const Hooks& hooks = {}) {
  std::vector<int32_t> ctx = m.tokenizer->encode(r.context, true);
  std::vector<int32_t> whole = m.tokenizer->encode(r.context + " " + r.continuation, true);
  std::vector<int32_t> full = ctx;
  full.insert(full.end(), whole.begin() + int64_t(ctx.size()), whole.end());
  if (full.size() > size_t(window) + 1) full.erase(full.begin(), full.end() - (window + 1));
  std::vector<int32_t> in(full.begin(), full.end() - 1);
  const int len = int(in.size());
  const size_t n_cont = std::min(whole.size() - ctx.size(), size_t(len));
  Matrix x = forward(m, in, 1, len, hooks);
  Matrix lp = log_probs(m, x, 0, len);
  Loglikelihood ll;
  ll.greedy = true;
  ll.tokens = int(n_cont);
  for (int t = len - int(n_cont); t < len; ++t) {
    const int32_t want = full[size_t(t) + 1];
    ll.logprob += lp(t, want);
    const float* row = lp.row(t);
    if (std::max_element(row, row + lp.cols) - row != want) ll.greedy = false;
  }
  return ll;
}

std::vector<Request> requests_of(const Task& t) {
  std::vector<Request> r;
  for (const TaskExample& e : t.examples) r.insert(r.end(), e.candidates.begin(), e.candidates.end());
  return r;
}

void expect_matches_naive(const std::string& task, int rows, const ZeroShotOptions& opt,
                          int window) {
  SCOPED_TRACE(task);
  const Model& m = model();
  const std::vector<Request> reqs = requests_of(load_task(task, kTasks + "/" + task + ".jsonl", rows));
  ScoreStats st;
  const std::vector<Loglikelihood> got = loglikelihoods(m, reqs, {}, opt, nullptr, &st);
  ASSERT_EQ(got.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Loglikelihood want = naive(m, reqs[i], window);
    EXPECT_NEAR(got[i].logprob, want.logprob, 1e-3 + 1e-5 * std::abs(want.logprob)) << "request " << i;
    EXPECT_EQ(got[i].greedy, want.greedy) << "request " << i;
    EXPECT_EQ(got[i].tokens, want.tokens) << "request " << i;
  }
  EXPECT_GT(st.forwards, 0);
}

TEST(ZeroShot, BatchedScoresEqualOneSequenceAtATime) {
  for (const char* task : {"arc_easy", "arc_challenge", "piqa", "openbook_qa", "copa", "winogrande",
                           "lambada_openai"})
    expect_matches_naive(task, 5, {}, model().config.max_seq);
}

TEST(ZeroShot, LongContextsAreTruncatedFromTheLeft) {
  ZeroShotOptions opt;
  opt.window = 40;
  opt.batch_tokens = 100;  // several forward passes
  expect_matches_naive("boolq", 3, opt, 40);
  expect_matches_naive("lambada_openai", 4, opt, 40);
  // A continuation longer than the window keeps the tokens predicted inside it.
  opt.window = 12;
  const std::vector<Request> reqs = {
      {"Lily", "went to the park and played with her friends all day long."}, {"Tom", "ran."}};
  ScoreStats st;
  const std::vector<Loglikelihood> got = loglikelihoods(model(), reqs, {}, opt, nullptr, &st);
  EXPECT_EQ(st.clipped, 1);
  EXPECT_EQ(got[0].tokens, 12);
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_NEAR(got[i].logprob, naive(model(), reqs[i], 12).logprob, 1e-4) << "request " << i;
}

TEST(ZeroShot, RequestsExtendedByAnotherShareItsPass) {
  // "was" and "a" are one token each, so their inputs are the bare context, a prefix of the
  // others' inputs; ctx + " was" tokenizes as ctx's tokens plus "was". All four requests are read
  // from the pass over the longest input.
  const Model& m = model();
  const std::string ctx = "Once upon a time there";
  const std::vector<Request> reqs = {
      {ctx, "was"}, {ctx, "was a little"}, {ctx + " was", "a"}, {ctx, "a"}};
  ScoreStats st;
  const std::vector<Loglikelihood> got = loglikelihoods(m, reqs, {}, {}, nullptr, &st);
  EXPECT_EQ(st.sequences, 1);
  EXPECT_EQ(st.forwards, 1);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Loglikelihood want = naive(m, reqs[i], m.config.max_seq);
    EXPECT_NEAR(got[i].logprob, want.logprob, 1e-4) << "request " << i;
    EXPECT_EQ(got[i].greedy, want.greedy) << "request " << i;
  }
}

TEST(ZeroShot, QuantizedHooksSeeTheSameRowsBatchedOrAlone) {
  // W16A4KV4 fake quantization is per token and per head, so padding and neighbours in the batch
  // leave each request's score unchanged.
  const Model& m = model();
  ActQuantConfig q;
  q.bits = 4;
  q.kv_bits = 4;
  ActQuantHook hook(m.config, q);
  const Hooks hooks = {&hook};
  const std::vector<Request> reqs = requests_of(load_task("piqa", kTasks + "/piqa.jsonl", 4));
  const std::vector<Loglikelihood> got = loglikelihoods(m, reqs, hooks);
  const std::vector<Loglikelihood> fp = loglikelihoods(m, reqs);
  double moved = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Loglikelihood want = naive(m, reqs[i], m.config.max_seq, hooks);
    EXPECT_NEAR(got[i].logprob, want.logprob, 1e-3 + 1e-5 * std::abs(want.logprob)) << "request " << i;
    moved += std::abs(got[i].logprob - fp[i].logprob);
  }
  EXPECT_GT(moved, 0.1);  // the hooks did act
}

TEST(ZeroShot, TrailingContextWhitespaceMovesToTheContinuation) {
  const Model& m = model();
  const EncodedRequest e = encode_request(m, {"Once upon a time ", "there"});
  std::vector<int32_t> want = m.tokenizer->encode("Once upon a time", true);
  const size_t n_ctx = want.size();
  std::vector<int32_t> whole = m.tokenizer->encode("Once upon a time  there", true);
  want.insert(want.end(), whole.begin() + int64_t(n_ctx), whole.end());
  EXPECT_EQ(e.tokens, want);
  EXPECT_EQ(size_t(e.continuation), whole.size() - n_ctx);
}

TEST(ZeroShot, TaskMetricsFollowFromTheScores) {
  const Model& m = model();
  const Task t = load_task("copa", kTasks + "/copa.jsonl", 12);
  const TaskResult r = evaluate_task(m, t);
  ASSERT_EQ(r.metrics.size(), 1u);
  EXPECT_EQ(r.metrics[0].name, "acc");
  std::vector<double> acc;
  for (const TaskExample& e : t.examples) {
    std::vector<double> ll;
    for (const Request& c : e.candidates) ll.push_back(naive(m, c, m.config.max_seq).logprob);
    acc.push_back(argmax(ll) == e.gold ? 1 : 0);
  }
  double mean = 0;
  for (double a : acc) mean += a / double(acc.size());
  EXPECT_DOUBLE_EQ(r.metrics[0].value, mean);
  EXPECT_DOUBLE_EQ(r.metrics[0].se, std::sqrt(mean * (1 - mean) / double(acc.size() - 1)));
  EXPECT_EQ(r.examples, 12);
  EXPECT_GT(r.examples_per_second, 0);
}

TEST(ZeroShot, AccAndAccNormDisagreeOnALongerBetterAnswer) {
  // A one-word answer has the larger total log-likelihood, but the long fluent answer is more
  // likely per byte: acc picks the first, acc_norm the second.
  const Model& m = model();
  Task t;
  t.name = "constructed";
  t.metrics = {"acc", "acc_norm"};
  TaskExample e;
  const std::string q = "Once upon a time, there was a little girl named Lily. She";
  e.candidates = {{q, "was"}, {q, "loved to play outside in the park with her friends."}};
  const double l0 = naive(m, e.candidates[0], 512).logprob, l1 = naive(m, e.candidates[1], 512).logprob;
  ASSERT_GT(l0, l1);
  ASSERT_LT(l0 / 3, l1 / double(e.candidates[1].continuation.size()));
  e.gold = 0;
  t.examples = {e};
  TaskResult r = evaluate_task(m, t);
  EXPECT_EQ(r.metrics[0].value, 1);  // acc
  EXPECT_EQ(r.metrics[1].value, 0);  // acc_norm
  t.examples[0].gold = 1;
  r = evaluate_task(m, t);
  EXPECT_EQ(r.metrics[0].value, 0);
  EXPECT_EQ(r.metrics[1].value, 1);
}

TEST(ZeroShot, ArgmaxTakesTheFirstOfTies) {
  EXPECT_EQ(argmax({-3, -1, -1, -2}), 1);
  EXPECT_EQ(argmax({-0.5}), 0);
  EXPECT_DOUBLE_EQ(mean_stderr({1, 0, 1, 0}), std::sqrt((4.0 / 3 * 0.25) / 4));
  EXPECT_EQ(mean_stderr({1}), 0);
}

TEST(ZeroShot, LambadaNeedsTheExactGreedyContinuation) {
  const Model& m = model();
  const std::string ctx = "Once upon a time, there was a little girl named Lily. She loved to";
  // The model's own greedy words after the context, read off a few greedy steps.
  std::vector<int32_t> ids = m.tokenizer->encode(ctx, true);
  const size_t n_ctx = ids.size();
  for (int step = 0; step < 8; ++step) {
    Matrix x = forward(m, ids, 1, int(ids.size()));
    Matrix lp = log_probs(m, x, int64_t(ids.size()) - 1, 1);
    ids.push_back(int32_t(std::max_element(lp.row(0), lp.row(0) + lp.cols) - lp.row(0)));
  }
  const std::string before = m.tokenizer->decode({ids.begin(), ids.begin() + int64_t(n_ctx)});
  std::string text = m.tokenizer->decode(ids).substr(before.size());
  ASSERT_EQ(text[0], ' ');
  const std::string word = text.substr(1, text.find_first_of(" .,!?", 1) - 1);
  ASSERT_FALSE(word.empty());

  Task t;
  t.name = "lambada_constructed";
  t.format = TaskFormat::LanguageModel;
  t.metrics = {"perplexity", "acc"};
  t.examples = {{{{ctx, word}}, 0}, {{{ctx, "zebra"}}, 0}};
  const std::vector<Loglikelihood> ll = loglikelihoods(m, requests_of(t));
  EXPECT_TRUE(ll[0].greedy) << "greedy word '" << word << "'";
  EXPECT_FALSE(ll[1].greedy);
  const TaskResult r = evaluate_task(m, t);
  ASSERT_EQ(r.metrics.size(), 2u);
  EXPECT_NEAR(r.metrics[0].value, std::exp(-(ll[0].logprob + ll[1].logprob) / 2), 1e-9);
  EXPECT_EQ(r.metrics[1].name, "acc");
  EXPECT_DOUBLE_EQ(r.metrics[1].value, 0.5);
}

TEST(ZeroShot, PromptsFollowLmEval) {
  auto first = [](const char* task) {
    return load_task(task, kTasks + "/" + task + ".jsonl", 1).examples.at(0);
  };
  auto ends_with = [](const std::string& s, const std::string& e) {
    return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
  };
  for (const char* task : {"arc_easy", "arc_challenge", "piqa", "boolq"}) {
    const std::string q = first(task).candidates[0].context;
    EXPECT_TRUE(ends_with(q, "\nAnswer:") && !ends_with(q, "\n\nAnswer:")) << task << ": " << q;
  }
  EXPECT_EQ(first("copa").candidates[0].context, "The man turned on the faucet therefore");
  const TaskExample w = first("winogrande");
  ASSERT_EQ(w.candidates.size(), 2u);
  EXPECT_EQ(w.candidates[0].continuation, w.candidates[1].continuation);
  EXPECT_EQ(first("openbook_qa").candidates.size(), 4u);

  const std::vector<std::string> all = resolve_tasks("all", kTasks);
  EXPECT_EQ(all.size(), 8u);
  EXPECT_EQ(resolve_tasks("piqa,copa,piqa", kTasks), (std::vector<std::string>{"piqa", "copa"}));
  EXPECT_THROW(resolve_tasks("piqa,hellaswag", kTasks), Error);
  EXPECT_THROW(resolve_tasks("piqa,", kTasks), Error);
}

// --- the task-file reader ---

struct TempFile {
  std::string path;
  explicit TempFile(const std::string& text) {
    char tmpl[] = "/tmp/dq_jsonl_XXXXXX";
    int fd = mkstemp(tmpl);
    path = tmpl;
    std::ofstream(path) << text;
    close(fd);
  }
  ~TempFile() { std::remove(path.c_str()); }
};

// The Error message for loading `text` as a task file.
std::string load_error(const std::string& text) {
  TempFile f(text);
  try {
    load_task("t", f.path);
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_EQ(msg.rfind(f.path + ":", 0), 0u) << msg;
    return msg.substr(f.path.size());
  }
  ADD_FAILURE() << "no error for: " << text;
  return "";
}

TEST(Jsonl, MalformedRowsNameFileAndLine) {
  const std::string ok = R"({"query": "Q", "choices": ["a", "b"], "gold": 1})" "\n";
  EXPECT_EQ(load_error(ok + "{\"query\": \"Q\", \"choices\": [\"a\"\n"),
            ":2: invalid JSON at column 31: syntax error while parsing array - unexpected end of input; expected ']'");
  EXPECT_EQ(load_error(ok + "[1, 2]\n"), ":2: not a JSON object");
  EXPECT_EQ(load_error(ok + "\n" + ok), ":2: empty line");
  EXPECT_EQ(load_error(ok + ok + R"({"query": "Q", "choices": ["a", "b"]})"), ":3: missing field 'gold'");
  EXPECT_EQ(load_error(ok + R"({"query": "Q", "choices": ["a", "b"], "gold": 2})"), ":2: gold 2 outside 0..1");
  EXPECT_EQ(load_error(R"({"query": "Q", "choices": ["a", "b"], "gold": "1"})"), ":1: field 'gold' is not an integer");
  EXPECT_EQ(load_error(R"({"query": 3, "choices": ["a"], "gold": 0})"), ":1: field 'query' is not a string");
  EXPECT_EQ(load_error(R"({"query": "Q", "choices": [], "gold": 0})"), ":1: field 'choices' is not a non-empty array");
  EXPECT_EQ(load_error(R"({"query": "Q", "choices": ["a", ""], "gold": 0})"),
            ":1: field 'choices' has an element that is not a non-empty string");
  EXPECT_EQ(load_error(R"({"query": "Q", "choices": ["a"], "gold": 0, "label": 1})"), ":1: unexpected field 'label'");
  EXPECT_EQ(load_error(ok + R"({"context": "c", "continuation": "x"})"), ":2: row format differs from the file's first row");
  EXPECT_EQ(load_error(R"({"text": "c"})"),
            ":1: not a task row: expected {query, choices, gold}, {context_options, continuation, gold} or {context, continuation}");
  EXPECT_EQ(load_error(""), ": no rows");
}

TEST(Jsonl, WellFormedRowsOfEachFormat) {
  TempFile f(R"({"context_options": ["A went", "B went"], "continuation": "home.", "gold": 1})" "\r\n"
             R"({"context_options": ["C", "D"], "continuation": "ran.", "gold": 0})");
  const Task t = load_task("wino_like", f.path);
  EXPECT_EQ(t.format, TaskFormat::Schema);
  ASSERT_EQ(t.examples.size(), 2u);
  EXPECT_EQ(t.examples[0].candidates[1].context, "B went");
  EXPECT_EQ(t.examples[0].candidates[1].continuation, "home.");
  EXPECT_EQ(t.examples[0].gold, 1);
  EXPECT_EQ(t.metrics, std::vector<std::string>{"acc"});
  const std::vector<JsonlRow> rows = read_jsonl(f.path);
  EXPECT_EQ(rows[1].line, 2);
  EXPECT_EQ(load_task("wino_like", f.path, 1).examples.size(), 1u);
}

}  // namespace
}  // namespace dq
