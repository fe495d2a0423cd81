// quantize (and calibrate) killed mid-way (SIGKILL right after a checkpoint) and resumed with
// --resume write the same bytes as an uninterrupted run; a checkpoint made with other options is refused; a run
// without --resume starts over.
#include <gtest/gtest.h>

#include <algorithm>
#include <csignal>

#include "test_helpers.h"

using namespace dq::test;

namespace {

const std::string kArgs = "quantize --model " + kStories + " --calib " + kCalib +
                          " --nsamples 8 --calib-seqlen 128 --epochs 2 --a-bits 4 --kv-bits 4 ";

// Runs the command with DQ_KILL_AFTER=label (SIGKILL right after that checkpoint): it must die by
// the signal, leaving only OUT.partial.
void run_killed(const std::string& args, const std::string& label, const std::string& out) {
  const std::string cmd = "DQ_KILL_AFTER=" + label + " " + DQ_BINARY + " --threads 1 " + args + " --out " + out +
                          " >/dev/null 2>&1";
  const int status = std::system(cmd.c_str());
  ASSERT_NE(status, -1);
  // system() runs a shell; the shell reports its child's SIGKILL as exit status 128 + 9.
  EXPECT_TRUE((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) ||
              (WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGKILL))
      << "status " << status;
  EXPECT_FALSE(fs::exists(out)) << "a killed run must not leave OUT";
  EXPECT_TRUE(fs::exists(out + ".partial/state.json"));
}

void expect_same_output(const std::string& a, const std::string& b) {
  for (const char* f : {"model.safetensors", "quantized.safetensors", "config.json", "tokenizer.bin"}) {
    ASSERT_TRUE(fs::exists(a + "/" + f)) << f;
    EXPECT_TRUE(slurp(a + "/" + f) == slurp(b + "/" + f)) << f << " differs after resume";
  }
  std::vector<std::string> names_a, names_b;
  for (const auto& e : fs::directory_iterator(a)) names_a.push_back(e.path().filename().string());
  for (const auto& e : fs::directory_iterator(b)) names_b.push_back(e.path().filename().string());
  std::sort(names_a.begin(), names_a.end());
  std::sort(names_b.begin(), names_b.end());
  EXPECT_EQ(names_a, names_b) << "resume must not leave checkpoint files in the output";
}

struct Variant {
  const char* name;
  const char* args;
  const char* kill_after;  // checkpoint label
};

class Resume : public ::testing::TestWithParam<Variant> {};

TEST_P(Resume, KilledRunResumesToIdenticalBytes) {
  ScratchDir dir;
  const std::string args = kArgs + GetParam().args;
  CliResult whole = run_cli(args + " --out " + (dir / "whole"), dir);
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  run_killed(args, GetParam().kill_after, dir / "resumed");
  CliResult resumed = run_cli(args + " --out " + (dir / "resumed") + " --resume", dir);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_FALSE(fs::exists(dir / "resumed.partial"));
  expect_same_output(dir / "whole", dir / "resumed");
}

INSTANTIATE_TEST_SUITE_P(
    Quantize, Resume,
    ::testing::Values(Variant{"dartquant_gptq_after_layer3", "--rotation dartquant --w-method gptq", "layer-3"},
                      Variant{"dartquant_gptq_after_embedding", "--rotation dartquant --w-method gptq", "embedding"},
                      Variant{"dartquant_gptq_after_capture", "--rotation dartquant --w-method gptq", "capture"},
                      Variant{"dartquant_gptq_after_r1", "--rotation dartquant --w-method gptq", "r1"},
                      Variant{"dartquant_gptq_after_r2_layer2", "--rotation dartquant --w-method gptq", "r2-2"},
                      Variant{"quarot_rtn_after_layer1", "--rotation quarot --w-method rtn", "layer-1"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(ResumeRefusal, CheckpointOfOtherOptionsIsRefusedAndKept) {
  ScratchDir dir;
  const std::string args = kArgs + "--rotation quarot --w-method gptq";
  run_killed(args, "layer-2", dir / "q");
  CliResult r = run_cli(args + " --w-bits 3 --out " + (dir / "q") + " --resume", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("checkpoint made with other options"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(dir / "q.partial/state.json")) << "a refused resume must not destroy the checkpoint";
  EXPECT_FALSE(fs::exists(dir / "q"));
}

TEST(ResumeRefusal, RunWithoutResumeStartsOver) {
  ScratchDir dir;
  const std::string args = kArgs + "--rotation quarot --w-method rtn";
  run_killed(args, "layer-2", dir / "q");
  CliResult r = run_cli(args + " --out " + (dir / "q"), dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir / "q.partial"));
  CliResult fresh = run_cli(args + " --out " + (dir / "fresh"), dir);
  ASSERT_EQ(fresh.exit_code, 0) << fresh.err;
  expect_same_output(dir / "fresh", dir / "q");
}

TEST(ResumeCalibrate, KilledCalibrationResumesToIdenticalRotations) {
  ScratchDir dir;
  const std::string args = "calibrate --model " + kStories + " --calib " + kCalib +
                           " --nsamples 8 --calib-seqlen 128 --epochs 2";
  CliResult whole = run_cli(args + " --out " + (dir / "whole.safetensors"), dir);
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  for (const char* label : {"capture", "r1", "r2-3"}) {
    const std::string out = dir / (std::string(label) + ".safetensors");
    run_killed(args, label, out);
    CliResult resumed = run_cli(args + " --out " + out + " --resume", dir);
    ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
    EXPECT_TRUE(slurp(out) == slurp(dir / "whole.safetensors")) << "resumed after " << label;
    EXPECT_FALSE(fs::exists(out + ".partial"));
  }
}

}  // namespace

namespace {

TEST(ResumeRefusal, CorruptCheckpointIsAnErrorNamingIt) {
  ScratchDir dir;
  const std::string args = kArgs + "--rotation quarot --w-method rtn";
  run_killed(args, "layer-1", dir / "q");
  spit(dir / "q.partial/state.json", "{\"fingerprint\": ");
  CliResult r = run_cli(args + " --out " + (dir / "q") + " --resume", dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("q.partial/state.json: invalid JSON"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "q"));
}

}  // namespace
