// Output safety through the CLI (io/output.h): existing outputs, --force and the marker, outputs
// that are or hold an input, the lock on OUT.partial, stale partials, FIFOs as inputs, the free-space
// check, signals, and one-line CLI errors. Each refusal is checked for its exit code, its one line,
// and for leaving every file as it was (contents hashed before and after) and nothing new behind.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <chrono>
#include <map>
#include <thread>

#include "test_helpers.h"

using namespace dq::test;

namespace {

// A work area W (inside the scratch dir, apart from the CLI's logs) holding the inputs: stories260K
// and its tokenizer, a converted HF directory, its GGUF, and a calibration text.
class OutputSafety : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(w_);
    fs::copy_file(kStories, w("stories.bin"));
    fs::copy_file(kTok512, w("tokenizer.bin"));
    spit(w("calib.txt"), slurp(kCalib).substr(0, 20000));
    ASSERT_EQ(cli("convert --model " + w("stories.bin") + " --out " + w("hf")).exit_code, 0);
    ASSERT_EQ(cli("export --model " + w("hf") + " --format gguf --out " + w("m.gguf")).exit_code, 0);
  }
  std::string w(const std::string& name) const { return (w_ / name).string(); }
  CliResult cli(const std::string& args) { return run_cli(args, dir_); }

  // Runs args and expects a refusal naming `names` and saying `problem`, with W unchanged.
  void expect_refused(const std::string& args, const std::string& names, const std::string& problem) {
    const auto before = tree_snapshot(w_);
    CliResult r = cli(args);
    expect_one_line_error(r, names, problem);
    EXPECT_EQ(tree_snapshot(w_), before) << "a refused run changed files: dartquant " << args;
  }

  ScratchDir dir_;
  fs::path w_ = dir_.path() / "w";
};

TEST_F(OutputSafety, ExistingOutputIsRefusedBeforeAnyWork) {
  fs::create_directories(w_ / "mine");
  spit(w("mine/precious.txt"), "user data");
  spit(w("mine.json"), "{\"mine\": 1}");
  spit(w("mine.html"), "<html>mine</html>");
  spit(w("mine.safetensors"), "mine");
  spit(w("mine.gguf"), "mine");
  const std::string model = " --model " + w("stories.bin");
  for (const std::string& args :
       {"convert" + model + " --out " + w("mine"), "synth --config " + w("hf/config.json") + " --out " + w("mine"),
        "export --model " + w("hf") + " --format hf --out " + w("mine"),
        "export --model " + w("hf") + " --format gguf --out " + w("mine.gguf"),
        "quantize" + model + " --w-bits 8 --out " + w("mine"),
        "calibrate" + model + " --calib " + w("calib.txt") + " --out " + w("mine.safetensors"),
        "eval" + model + " --ppl " + w("calib.txt") + " --json " + w("mine.json"),
        "stats" + model + " --calib " + w("calib.txt") + " --html " + w("mine.html"),
        "plan --model " + w("hf") + " --json " + w("mine.json")}) {
    const std::string out = args.substr(args.rfind(' ') + 1);
    expect_refused(args, out, "exists; pass --force");
  }
}

TEST_F(OutputSafety, ForceReplacesOnlyWhatDartquantWrote) {
  // Not ours: a user directory, a user JSON, a directory where a file is to go.
  fs::create_directories(w_ / "mine");
  spit(w("mine/precious.txt"), "user data");
  spit(w("mine.json"), "{\"mine\": 1}");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("mine") + " --force", w("mine"),
                 "was not written by dartquant");
  expect_refused("eval --model " + w("stories.bin") + " --ppl " + w("calib.txt") + " --max-windows 1 --json " +
                     w("mine.json") + " --force",
                 w("mine.json"), "was not written by dartquant");
  expect_refused("calibrate --model " + w("stories.bin") + " --calib " + w("calib.txt") + " --out " + w("mine") +
                     " --force",
                 w("mine"), "is a directory");
  // Ours, but a user file was added to it since: still refused.
  spit(w("hf/notes.txt"), "mine");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("hf") + " --force", w("hf"),
                 "was not written by dartquant");
  fs::remove(w("hf/notes.txt"));

  // Ours: replaced with --force, and the replacement carries the marker again.
  const std::string eval = "eval --model " + w("stories.bin") + " --ppl " + w("calib.txt") + " --max-windows 1 ";
  ASSERT_EQ(cli(eval + "--json " + w("r.json")).exit_code, 0);
  CliResult again = cli(eval + "--json " + w("r.json") + " --force");
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(w("r.json"))).value("written_by", ""), "dartquant");
  for (const std::string& args : {"convert --model " + w("stories.bin") + " --dtype f16 --out " + w("hf"),
                                  "export --model " + w("hf") + " --format gguf --gguf-type f16 --out " + w("m.gguf")}) {
    CliResult r = cli(args + " --force");
    EXPECT_EQ(r.exit_code, 0) << args << ": " << r.err;
  }
  EXPECT_TRUE(fs::exists(w("hf/.dartquant.json")));
  EXPECT_FALSE(fs::exists(w("hf.partial")));
  EXPECT_LT(fs::file_size(w("hf/model.safetensors")), fs::file_size(w("stories.bin")) * 3 / 4) << "f16 replaced f32";
}

TEST_F(OutputSafety, OutputThatIsContainsOrIsInsideAnInputIsRefused) {
  fs::create_symlink(w("hf"), w("hf-link"));
  fs::create_hard_link(w("stories.bin"), w("stories-hardlink.bin"));
  const std::string f = " --force";  // identity is checked whatever --force says
  expect_refused("quantize --model " + w("hf") + " --w-bits 8 --out " + w("hf") + f, w("hf"), "is the input");
  expect_refused("quantize --model " + w("hf") + " --w-bits 8 --out " + w("hf-link") + f, w("hf-link"), "is the input");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("stories.bin") + f, w("stories.bin"),
                 "is the input");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("stories-hardlink.bin") + f,
                 w("stories-hardlink.bin"), "is the input");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w_.string() + f, w_.string(),
                 "contains the input");
  expect_refused("export --model " + w("hf") + " --format hf --out " + w("hf") + f, w("hf"), "is the input");
  expect_refused("export --model " + w("m.gguf") + " --format gguf --out " + w("m.gguf") + f, w("m.gguf"),
                 "is the input");
  expect_refused("eval --model " + w("hf") + " --ppl " + w("calib.txt") + " --json " + w("hf/config.json") + f,
                 w("hf/config.json"), "is inside the input");
  expect_refused("calibrate --model " + w("hf") + " --calib " + w("calib.txt") + " --out " +
                     w("hf/model.safetensors") + f,
                 w("hf/model.safetensors"), "is inside the input");
  expect_refused("quantize --model " + w("hf") + " --w-bits 8 --out " + w("q") + " --json " + w("q/r.json"), w("q/r.json"),
                 "overlaps the other output");
  // `--out .` and `--out ..` (run from inside W).
  for (const char* out : {".", "..", "./", "sub/.."}) {
    const auto before = tree_snapshot(w_);
    const std::string cmd = "cd " + w_.string() + " && " + DQ_BINARY + " convert --model stories.bin --out " + out +
                            " --force 2>" + (dir_ / "err") + " >/dev/null";
    const int status = std::system(cmd.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << out;
    const std::string err = slurp(dir_ / "err");
    EXPECT_EQ(err.rfind("dartquant: error: ", 0), 0u) << err;
    EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
    EXPECT_EQ(tree_snapshot(w_), before) << out;
  }
}

// Holds the lock on OUT.partial as a running dartquant would; the second run must name our pid.
TEST_F(OutputSafety, SecondRunOnTheSameOutputFailsNamingTheFirst) {
  fs::create_directories(w("busy.partial"));
  spit(w("busy.partial/.owner"), std::to_string(getpid()) + "\n");
  const int fd = ::open(w("busy.partial").c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("busy"), w("busy"),
                 "another dartquant run (pid " + std::to_string(getpid()) + ")");
  ::close(fd);
  // Unlocked, it is a stale partial of a killed run: removed, and the run succeeds.
  spit(w("busy.partial/model.safetensors.tmp-123"), "half written");
  CliResult r = cli("convert --model " + w("stories.bin") + " --out " + w("busy"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("left by a killed run"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(w("busy.partial")));
  EXPECT_TRUE(fs::exists(w("busy/model.safetensors")));
  // A directory of that name dartquant did not make is left alone.
  fs::create_directories(w("other.partial"));
  spit(w("other.partial/mine.txt"), "user data");
  expect_refused("convert --model " + w("stories.bin") + " --out " + w("other"), w("other.partial"),
                 "was not made by dartquant");
}

TEST_F(OutputSafety, TwoRealRunsOnOneOutput) {
  const std::string args = std::string(DQ_BINARY) + " --threads 1 quantize --model " + w("hf") + " --calib " +
                           w("calib.txt") + " --nsamples 8 --calib-seqlen 64 --rotation dartquant --w-method gptq " +
                           "--epochs 20 --out " + w("q");
  const pid_t first = fork();
  if (first == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + args + " >/dev/null 2>&1").c_str(), nullptr);
    _exit(127);
  }
  // Waits until the first run holds the lock.
  for (int i = 0; i < 2000 && !fs::exists(w("q.partial/.owner")); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CliResult second = cli(args.substr(args.find(" quantize ")));
  int status = 0;
  waitpid(first, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the first run must not be disturbed";
  expect_one_line_error(second, w("q"), "another dartquant run (pid " + std::to_string(first) + ")");
  EXPECT_TRUE(fs::exists(w("q/.dartquant.json")));
  EXPECT_FALSE(fs::exists(w("q.partial")));
}

TEST_F(OutputSafety, FifoInputsAreRefusedInsteadOfBlocking) {
  ASSERT_EQ(mkfifo(w("fifo").c_str(), 0644), 0);
  // `timeout` turns a hang into exit 124, which fails the exit-code check.
  auto run = [&](const std::string& args) {
    const std::string cmd = "timeout 30 " + std::string(DQ_BINARY) + " " + args + " >/dev/null 2>" + (dir_ / "err");
    const int status = std::system(cmd.c_str());
    CliResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.err = slurp(dir_ / "err");
    return r;
  };
  for (const std::string& args : {"eval --model " + w("stories.bin") + " --ppl " + w("fifo"),
                                  "eval --model " + w("fifo") + " --tokenizer " + w("tokenizer.bin") + " --ppl " + w("calib.txt"),
                                  "eval --model " + w("m.gguf") + " --tokenizer " + w("fifo") + " --ppl " + w("calib.txt"),
                                  "tokenize --tokenizer " + w("tokenizer.bin") + " --text-file " + w("fifo")}) {
    const auto before = tree_snapshot(w_);
    expect_one_line_error(run(args), w("fifo"), "not a regular file");
    EXPECT_EQ(tree_snapshot(w_), before);
  }
  // The optional files read beside a tokenizer.json, too.
  fs::create_directories(w("tok"));
  fs::copy_file(kData + "/hf/smollm2-135m-instruct/tokenizer.json", w("tok/tokenizer.json"));
  ASSERT_EQ(mkfifo(w("tok/tokenizer_config.json").c_str(), 0644), 0);
  const auto before = tree_snapshot(w_);
  expect_one_line_error(run("tokenize --tokenizer " + w("tok/tokenizer.json") + " --text-file " + w("calib.txt")),
                        w("tok/tokenizer_config.json"), "not a regular file");
  EXPECT_EQ(tree_snapshot(w_), before);
}

TEST_F(OutputSafety, OutputLargerThanTheFreeSpaceIsRefusedBeforeWriting) {
  nlohmann::json c = nlohmann::json::parse(slurp(w("hf/config.json")));
  c["hidden_size"] = 1 << 24;
  c["intermediate_size"] = 1 << 24;
  c["num_attention_heads"] = 1 << 16;
  c["num_key_value_heads"] = 1 << 16;
  fs::create_directories(w("huge"));
  spit(w("huge/config.json"), c.dump());
  expect_refused("synth --config " + w("huge/config.json") + " --out " + w("big"), w("big"), "PiB but its file system has");
}

// Starts `dartquant ARGS`, sends `sig` once `ready` exists, and returns the exit status.
int interrupt_when(const std::string& args, const std::string& ready, int sig) {
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + std::string(DQ_BINARY) + " --threads 1 " + args + " >/dev/null 2>&1").c_str(),
          nullptr);
    _exit(127);
  }
  int status = 0;
  // A deadline, not a count of polls: on a loaded machine the run may take minutes to get there.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;  // finished before `ready` was seen
    bool seen = false;
    std::error_code ec;
    const fs::path r(ready);
    for (const auto& e : fs::directory_iterator(r.parent_path(), ec))
      if (e.path().filename().string().rfind(r.filename().string(), 0) == 0) seen = true;
    if (seen) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  kill(pid, sig);
  waitpid(pid, &status, 0);
  return status;
}

TEST_F(OutputSafety, SignalsLeaveNoLitter) {
  // A model big enough (about 55 MB) that the writes take a while.
  nlohmann::json c = nlohmann::json::parse(slurp(w("hf/config.json")));
  c.update({{"hidden_size", 512}, {"intermediate_size", 1536}, {"num_attention_heads", 8}, {"num_key_value_heads", 8},
            {"num_hidden_layers", 4}, {"vocab_size", 512}});
  fs::create_directories(w("cfg"));
  spit(w("cfg/config.json"), c.dump());
  ASSERT_EQ(cli("synth --config " + w("cfg/config.json") + " --out " + w("big") + " --dtype f32").exit_code, 0);
  const auto inputs = tree_snapshot(w_);
  struct Case {
    std::string args, ready;
    int sig;
  };
  const std::vector<Case> cases = {
      {"synth --config " + w("cfg/config.json") + " --out " + w("s"), w("s.partial/s.tmp-"), SIGINT},
      {"convert --model " + w("big") + " --dtype bf16 --out " + w("c"), w("c.partial/c.tmp-"), SIGTERM},
      {"export --model " + w("big") + " --format hf --dtype bf16 --out " + w("e"), w("e.partial/e.tmp-"), SIGINT},
      {"export --model " + w("big") + " --tokenizer " + w("tokenizer.bin") + " --format gguf --gguf-type q8_0 --out " +
           w("g.gguf"),
       w("g.gguf.partial/g.gguf.tmp-"), SIGTERM}};
  for (const Case& k : cases) {
    const int status = interrupt_when(k.args, k.ready, k.sig);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == k.sig) << k.args << ": status " << status;
    EXPECT_EQ(tree_snapshot(w_), inputs) << "litter or changes after signal " << k.sig << ": " << k.args;
  }
}

TEST_F(OutputSafety, InterruptedQuantizeKeepsItsCheckpointAndResumes) {
  const std::string args = "quantize --model " + w("hf") + " --calib " + w("calib.txt") +
                           " --nsamples 4 --calib-seqlen 64 --rotation quarot --w-method gptq --out " + w("q");
  const int status = interrupt_when(args, w("q.partial/activations-1.bin"), SIGINT);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT) << status;
  EXPECT_TRUE(fs::exists(w("q.partial/state.json")));
  EXPECT_FALSE(fs::exists(w("q")));
  for (const auto& e : fs::recursive_directory_iterator(w("q.partial")))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  // Temporaries a kill -9 would leave (no handler runs then) must not reach the resumed output.
  fs::create_directories(w("q.partial/q"));
  spit(w("q.partial/q/config.json.tmp-12"), "half");
  spit(w("q.partial/activations-9.bin.tmp-34"), "half");
  CliResult r = cli(args + " --resume");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(w("q.partial")));
  for (const auto& e : fs::directory_iterator(w("q")))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  // An option refused late (here: --calib missing for GPTQ) leaves no OUT.partial.
  const auto before = tree_snapshot(w_);
  CliResult late = cli("quantize --model " + w("hf") + " --w-method gptq --out " + w("late"));
  EXPECT_EQ(late.exit_code, 1);
  EXPECT_EQ(tree_snapshot(w_), before);
}

TEST(CliErrors, ParseErrorsAndUnknownCommandsAreOneLine) {
  ScratchDir dir;
  struct Case {
    std::string args, says;
  };
  for (const Case& c : {Case{"", "no command given"}, Case{"frobnicate --model x", "unknown command 'frobnicate'"},
                        Case{"--threads 2 frob", "unknown command 'frob'"}, Case{"eval", "--model is required"},
                        Case{"eval --model x --bogus 1", "bogus"}, Case{"export --model x --format pdf --out y", "pdf"}}) {
    CliResult r = run_cli(c.args, dir);
    EXPECT_NE(r.exit_code, 0) << c.args;
    EXPECT_EQ(r.err.rfind("dartquant: error: ", 0), 0u) << c.args << ": " << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << c.args << ": not one line:\n" << r.err;
    EXPECT_NE(r.err.find(c.says), std::string::npos) << c.args << ": " << r.err;
  }
  CliResult help = run_cli("eval --help", dir);
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--model"), std::string::npos);
}

}  // namespace
