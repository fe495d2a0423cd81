// quantize killed (SIGKILL) at random instants, not only at the labelled checkpoints of
// test_resume.cpp: each kill is followed by `--resume`, itself killed at a random instant, and so
// on; every chain must end in output byte-identical to an uninterrupted run's, never in a
// checkpoint that cannot be resumed. Bounded in time for the suite; scripts/kill-resume-soak.sh
// runs the same for hundreds of kills. DQ_KILL_SEED=N replays a seed (printed on failure).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <map>
#include <random>
#include <thread>

#include "test_helpers.h"

using namespace dq::test;

namespace {

using Clock = std::chrono::steady_clock;

// DartQuant calibration and GPTQ: the job with the most kinds of checkpoint files.
std::vector<std::string> quantize_args(const std::string& out, const std::string& calib) {
  return {DQ_BINARY, "--threads", "1", "quantize", "--model", kStories, "--calib", calib,
          "--nsamples", "8", "--calib-seqlen", "128", "--epochs", "2", "--rotation", "dartquant",
          "--w-method", "gptq", "--a-bits", "4", "--out", out, "--resume"};
}

// Runs args with stderr to `err`.
pid_t spawn(const std::vector<std::string>& args, const std::string& err) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (!freopen("/dev/null", "w", stdout) || !freopen(err.c_str(), "w", stderr)) _exit(127);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

// Every file of a finished output directory, by name.
std::map<std::string, std::string> files_of(const std::string& dir) {
  std::map<std::string, std::string> f;
  for (const auto& e : fs::directory_iterator(dir)) f[e.path().filename().string()] = slurp(e.path().string());
  return f;
}

TEST(KillAtRandomInstants, ResumeAlwaysFinishesWithIdenticalBytes) {
  ScratchDir dir;
  const std::string calib = dir / "calib.txt";  // short: a run's time goes to the job, not tokenizing
  spit(calib, slurp(kCalib).substr(0, 100000));
  const auto t0 = Clock::now();
  int status = 0;
  waitpid(spawn(quantize_args(dir / "whole", calib), dir / "err"), &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const double whole_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto expected = files_of(dir / "whole");

  const char* env = std::getenv("DQ_KILL_SEED");
  const uint64_t seed = env ? std::stoull(env) : std::random_device{}();
  SCOPED_TRACE("DQ_KILL_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // A resumed run has less left to do than a whole one: delays up to a third of a whole run give
  // several kills per chain before it finishes.
  std::uniform_real_distribution<double> delay(0.0, whole_seconds / 3);
  const double budget = 25.0;  // seconds of kills, then the chains in progress finish
  int kills = 0, chains = 0;
  while (std::chrono::duration<double>(Clock::now() - t0).count() < budget) {
    const std::string out = dir / ("chain" + std::to_string(chains++));
    bool done = false;
    for (int k = 0; k < 6 && !done; ++k) {  // up to six kills per chain
      const pid_t pid = spawn(quantize_args(out, calib), dir / "err");
      std::this_thread::sleep_for(std::chrono::duration<double>(delay(rng)));
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      if (WIFEXITED(status)) {  // finished (or failed) before the kill
        ASSERT_EQ(WEXITSTATUS(status), 0) << "a resumed run failed after " << kills << " kills in " << out << ": "
                                          << slurp(dir / "err");
        done = true;
      } else {
        ++kills;
        done = fs::exists(out);  // killed after OUT was renamed into place: the run was complete
      }
    }
    if (!done) {
      waitpid(spawn(quantize_args(out, calib), dir / "err"), &status, 0);
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "resume failed in " << out << ": " << slurp(dir / "err");
    }
    ASSERT_TRUE(fs::exists(out));
    EXPECT_TRUE(files_of(out) == expected) << out << " differs from the uninterrupted run";
    EXPECT_FALSE(fs::exists(out + ".partial/state.json")) << "a finished output kept a checkpoint";
    fs::remove_all(out);
    fs::remove_all(out + ".partial");  // left only when a kill hit the final cleanup
  }
  std::printf("%d kills at random instants in %d chains (one run %.2f s): all resumed to identical bytes\n", kills,
              chains, whole_seconds);
  EXPECT_GE(kills, 5);
}

}  // namespace
