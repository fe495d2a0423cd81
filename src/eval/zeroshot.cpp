#include "eval/zeroshot.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "io/jsonl.h"

namespace dq {

EncodedRequest encode_request(const Model& m, const Request& r) {
  if (!m.tokenizer) throw Error(m.source + ": no tokenizer found; pass --tokenizer");
  std::string context = r.context, continuation = " " + r.continuation;
  size_t keep = context.find_last_not_of(" \t\n\r\f\v") + 1;  // npos + 1 == 0: all whitespace
  continuation = context.substr(keep) + continuation;
  context.resize(keep);
  std::vector<int32_t> ctx = m.tokenizer->encode(context, true);
  std::vector<int32_t> whole = m.tokenizer->encode(context + continuation, true);
  if (ctx.empty()) throw Error("zero-shot request with an empty context");
  if (whole.size() <= ctx.size())
    throw Error("continuation '" + r.continuation + "' adds no tokens to its context");
  EncodedRequest e;
  e.continuation = int(whole.size() - ctx.size());
  e.tokens = std::move(ctx);
  e.tokens.insert(e.tokens.end(), whole.end() - e.continuation, whole.end());
  return e;
}

std::vector<Loglikelihood> loglikelihoods(const Model& m, const std::vector<Request>& requests,
                                          const Hooks& hooks, const ZeroShotOptions& opt,
                                          const Progress& progress, ScoreStats* stats) {
  const int window = opt.window > 0 ? opt.window : m.config.max_seq;
  const size_t n = requests.size();
  ScoreStats st;
  // Model input (all but the last token, left-truncated to the window) and scored targets.
  std::vector<std::vector<int32_t>> input(n), target(n);
  for (size_t i = 0; i < n; ++i) {
    EncodedRequest e = encode_request(m, requests[i]);
    const size_t keep = std::min(e.tokens.size(), size_t(window) + 1);
    // A continuation longer than the window loses its first tokens with the context: only the
    // tokens predicted inside the window are scored (lm-eval has no rule for this case).
    const size_t scored = std::min(size_t(e.continuation), keep - 1);
    if (scored < size_t(e.continuation)) ++st.clipped;
    input[i].assign(e.tokens.end() - keep, e.tokens.end() - 1);
    target[i].assign(e.tokens.end() - scored, e.tokens.end());
  }

  // In lexicographic order, an input that is a prefix of any other is a prefix of its successor,
  // so one backward sweep maps every request onto the longest input that extends it.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return input[a] < input[b]; });
  std::vector<size_t> owner(n);  // the request whose input is run for this one
  for (size_t k = n; k-- > 0;) {
    size_t i = order[k];
    owner[i] = i;
    if (k + 1 < n) {
      const auto& next = input[order[k + 1]];
      if (input[i].size() <= next.size() && std::equal(input[i].begin(), input[i].end(), next.begin()))
        owner[i] = owner[order[k + 1]];
    }
  }
  std::vector<size_t> seqs;  // owners, longest first so each batch pads little
  std::vector<std::vector<size_t>> riders(n);
  for (size_t i = 0; i < n; ++i) {
    riders[owner[i]].push_back(i);
    if (owner[i] == i) seqs.push_back(i);
  }
  std::stable_sort(seqs.begin(), seqs.end(),
                   [&](size_t a, size_t b) { return input[a].size() > input[b].size(); });

  std::vector<Loglikelihood> out(n);
  st.sequences = int(seqs.size());
  for (size_t s0 = 0; s0 < seqs.size();) {
    const int len = int(input[seqs[s0]].size());
    const size_t per_batch = size_t(std::max<int64_t>(1, opt.batch_tokens / len));
    const size_t s1 = std::min(seqs.size(), s0 + per_batch);
    const int batch = int(s1 - s0);
    std::vector<int32_t> tokens(size_t(batch) * size_t(len), 0);
    for (int b = 0; b < batch; ++b) {
      const auto& in = input[seqs[s0 + size_t(b)]];
      std::copy(in.begin(), in.end(), tokens.begin() + int64_t(b) * len);
    }
    const Matrix x = forward(m, tokens, batch, len, hooks);
    // Every scored position of the batch's requests, gathered so that each pass over the
    // classifier (read as stored, never copied whole) serves up to kRowChunk of them.
    struct Scored {
      size_t request;
      int32_t want;
    };
    std::vector<Scored> scored;
    std::vector<int64_t> x_rows;
    for (int b = 0; b < batch; ++b)
      for (size_t i : riders[seqs[s0 + size_t(b)]]) {
        const int64_t nt = int64_t(target[i].size());
        const int64_t r0 = int64_t(b) * len + int64_t(input[i].size()) - nt;
        out[i].tokens = int(nt);
        out[i].greedy = true;
        for (int64_t t = 0; t < nt; ++t) {
          scored.push_back({i, target[i][size_t(t)]});
          x_rows.push_back(r0 + t);
        }
      }
    constexpr int64_t kRowChunk = 256;  // bounds the logits buffer (vocab can be 128k wide)
    for (int64_t c0 = 0; c0 < int64_t(scored.size()); c0 += kRowChunk) {
      const int64_t c = std::min<int64_t>(kRowChunk, int64_t(scored.size()) - c0);
      Matrix rows(c, x.cols);
      for (int64_t t = 0; t < c; ++t) std::copy_n(x.row(x_rows[size_t(c0 + t)]), x.cols, rows.row(t));
      const Matrix lp = log_probs(m, rows, 0, c);
      for (int64_t t = 0; t < c; ++t) {
        const Scored& sc = scored[size_t(c0 + t)];
        const float* row = lp.row(t);
        out[sc.request].logprob += double(row[sc.want]);
        if (std::max_element(row, row + lp.cols) - row != sc.want) out[sc.request].greedy = false;
      }
    }
    for (int b = 0; b < batch; ++b)
      for (size_t i : riders[seqs[s0 + size_t(b)]])
        if (!std::isfinite(out[i].logprob))
          fail_non_finite(m, "the log-likelihood of a zero-shot request", hooks,
                          [&](const Hooks& h) { forward(m, tokens, batch, len, h); });
    ++st.forwards;
    st.tokens += int64_t(tokens.size());
    s0 = s1;
    if (progress) progress(int(s0), int(seqs.size()));
  }
  if (stats) *stats = st;
  return out;
}

std::vector<std::string> list_tasks(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".jsonl") names.push_back(it->path().stem().string());
  if (ec) throw Error(dir + ": " + ec.message());
  if (names.empty()) throw Error(dir + ": no *.jsonl task files");
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::string> resolve_tasks(const std::string& spec, const std::string& dir) {
  if (spec == "all") return list_tasks(dir);
  std::vector<std::string> names;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t end = std::min(spec.find(',', pos), spec.size());
    std::string name = spec.substr(pos, end - pos);
    pos = end + 1;
    if (name.empty()) throw Error("--tasks: empty task name in '" + spec + "'");
    if (!std::filesystem::is_regular_file(dir + "/" + name + ".jsonl")) {
      std::string known;
      for (const auto& t : list_tasks(dir)) known += (known.empty() ? "" : ", ") + t;
      throw Error("unknown task '" + name + "': no " + dir + "/" + name + ".jsonl (have: " + known + ")");
    }
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  return names;
}

namespace {

// How a known task's rows become lm-eval's prompt.
enum class Prompt {
  AsIs,
  Answer,  // the query ends with "\nAnswer:" (ARC, PIQA, BoolQ)
  Copa,    // "premise, because" -> "premise because" (lm-eval drops the premise's period)
};

struct KnownTask {
  const char* name;
  Prompt prompt;
  std::vector<std::string> metrics;  // as lm-eval's task config reports them
};

const std::vector<KnownTask>& known_tasks() {
  static const std::vector<KnownTask> k = {
      {"arc_easy", Prompt::Answer, {"acc", "acc_norm"}},
      {"arc_challenge", Prompt::Answer, {"acc", "acc_norm"}},
      {"piqa", Prompt::Answer, {"acc", "acc_norm"}},
      {"openbook_qa", Prompt::AsIs, {"acc", "acc_norm"}},
      {"boolq", Prompt::Answer, {"acc"}},
      {"copa", Prompt::Copa, {"acc"}},
      {"winogrande", Prompt::AsIs, {"acc"}},
      {"lambada_openai", Prompt::AsIs, {"perplexity", "acc"}},
  };
  return k;
}

std::string apply_prompt(Prompt p, std::string q) {
  if (p == Prompt::Answer) {
    if (q.empty() || q.back() != '\n') q += '\n';
    q += "Answer:";
  } else if (p == Prompt::Copa) {
    for (const char* connective : {", because", ", therefore"}) {
      const std::string c = connective;
      if (q.size() >= c.size() && q.compare(q.size() - c.size(), c.size(), c) == 0) {
        q.erase(q.size() - c.size(), 1);
        break;
      }
    }
  }
  return q;
}

TaskFormat row_format(const JsonlRow& r) {
  if (r.has("context_options")) return TaskFormat::Schema;
  if (r.has("choices")) return TaskFormat::MultipleChoice;
  if (r.has("context")) return TaskFormat::LanguageModel;
  r.fail("not a task row: expected {query, choices, gold}, {context_options, continuation, gold} "
         "or {context, continuation}");
}

int gold_of(const JsonlRow& r, size_t options) {
  int64_t g = r.integer("gold");
  if (g < 0 || size_t(g) >= options)
    r.fail("gold " + std::to_string(g) + " outside 0.." + std::to_string(options - 1));
  return int(g);
}

}  // namespace

Task load_task(const std::string& name, const std::string& path, int limit) {
  const std::vector<JsonlRow> rows = read_jsonl(path);
  Task t;
  t.name = name;
  t.format = row_format(rows[0]);
  Prompt prompt = Prompt::AsIs;
  auto known = std::find_if(known_tasks().begin(), known_tasks().end(),
                            [&](const KnownTask& k) { return name == k.name; });
  if (known != known_tasks().end()) {
    prompt = known->prompt;
    t.metrics = known->metrics;
  } else {
    t.metrics = t.format == TaskFormat::MultipleChoice ? std::vector<std::string>{"acc", "acc_norm"}
                : t.format == TaskFormat::Schema        ? std::vector<std::string>{"acc"}
                                                        : std::vector<std::string>{"perplexity", "acc"};
  }
  for (const JsonlRow& r : rows) {
    if (row_format(r) != t.format) r.fail("row format differs from the file's first row");
    TaskExample e;
    if (t.format == TaskFormat::MultipleChoice) {
      r.only_keys({"query", "choices", "gold"});
      const std::string query = apply_prompt(prompt, r.str("query"));
      for (const std::string& c : r.strs("choices")) e.candidates.push_back({query, c});
      e.gold = gold_of(r, e.candidates.size());
    } else if (t.format == TaskFormat::Schema) {
      r.only_keys({"context_options", "continuation", "gold"});
      const std::string cont = r.str("continuation");
      for (const std::string& c : r.strs("context_options")) e.candidates.push_back({c, cont});
      e.gold = gold_of(r, e.candidates.size());
    } else {
      r.only_keys({"context", "continuation"});
      e.candidates.push_back({r.str("context"), r.str("continuation")});
    }
    t.examples.push_back(std::move(e));
  }
  if (limit > 0 && size_t(limit) < t.examples.size()) t.examples.resize(size_t(limit));
  return t;
}

int argmax(const std::vector<double>& scores) {
  return int(std::max_element(scores.begin(), scores.end()) - scores.begin());
}

double mean_stderr(const std::vector<double>& v) {
  const size_t n = v.size();
  if (n < 2) return 0;
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / double(n);
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return std::sqrt(ss / double(n - 1) / double(n));
}

TaskResult evaluate_task(const Model& m, const Task& t, const Hooks& hooks,
                         const ZeroShotOptions& opt, const Progress& progress) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<Request> requests;
  for (const TaskExample& e : t.examples)
    requests.insert(requests.end(), e.candidates.begin(), e.candidates.end());
  TaskResult r;
  r.task = t.name;
  r.examples = int(t.examples.size());
  const std::vector<Loglikelihood> ll = loglikelihoods(m, requests, hooks, opt, progress, &r.stats);

  std::vector<double> acc, acc_norm, nll;
  size_t k = 0;
  for (const TaskExample& e : t.examples) {
    if (t.format == TaskFormat::LanguageModel) {
      acc.push_back(ll[k].greedy ? 1 : 0);
      nll.push_back(-ll[k].logprob);
      ++k;
      continue;
    }
    std::vector<double> total, per_byte;
    for (const Request& c : e.candidates) {
      total.push_back(ll[k].logprob);
      per_byte.push_back(ll[k].logprob / double(c.continuation.size()));
      ++k;
    }
    acc.push_back(argmax(total) == e.gold ? 1 : 0);
    acc_norm.push_back(argmax(per_byte) == e.gold ? 1 : 0);
  }
  auto mean = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  };
  for (const std::string& name : t.metrics) {
    if (name == "acc") {
      r.metrics.push_back({name, mean(acc), mean_stderr(acc)});
    } else if (name == "acc_norm") {
      r.metrics.push_back({name, mean(acc_norm), mean_stderr(acc_norm)});
    } else {
      const double ppl = std::exp(mean(nll));
      r.metrics.push_back({name, ppl, ppl * mean_stderr(nll)});
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.examples_per_second = r.seconds > 0 ? double(r.examples) / r.seconds : 0;
  return r;
}

nlohmann::json to_json(const TaskResult& r) {
  nlohmann::json metrics = nlohmann::json::object();
  for (const Metric& mt : r.metrics) metrics[mt.name] = {{"value", mt.value}, {"stderr", mt.se}};
  return {{"examples", r.examples},
          {"metrics", metrics},
          {"seconds", r.seconds},
          {"examples_per_second", r.examples_per_second},
          {"sequences", r.stats.sequences},
          {"forward_passes", r.stats.forwards},
          {"tokens", r.stats.tokens},
          {"clipped_continuations", r.stats.clipped}};
}

}  // namespace dq
