// dartquant: rotational calibration (DartQuant) and quantization of LLaMA-family models.
#include <malloc.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <unistd.h>

#include "cli/command.h"
#include "cli/validators.h"
#include "tensor/intgemm.h"
#include "tensor/kernels.h"
#include "tensor/tensor.h"

namespace dq::cli {

struct Entry {
  const char* help;
  Setup setup;
};

static std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;
  return r;
}

RegisterCommand::RegisterCommand(const char* name, const char* help, Setup setup) {
  registry()[name] = {help, std::move(setup)};
}

bool show_progress() { return isatty(STDERR_FILENO); }

void progress_line(const std::string& stage, int done, int total) {
  if (!show_progress()) return;
  std::fprintf(stderr, "\r%s: %d/%d", stage.c_str(), done, total);
  if (done == total) std::fprintf(stderr, "\n");
}

std::string kernels_used() {
  std::string s;
  for (const std::string& k : dq::int_kernels_used()) s += (s.empty() ? "" : "+") + k;
  return s;
}

std::string kernels_note() {
  const std::string used = kernels_used();
  return used.empty() ? "" : ", kernels " + used;
}

}  // namespace dq::cli

int main(int argc, char** argv) {
  using namespace dq::cli;
  // Matrices up to 32 MiB (a layer's weights, a pass's activations) come from the heap and are
  // reused, instead of being mapped fresh and faulted in again on every token. glibc reaches this
  // state itself, but only after some earlier free of a chunk that size; fixed here so speed does not
  // depend on what happened to be freed first (it halved f32 decoding once). Its own dynamic rule
  // pairs the trim threshold with twice the mapping threshold, as here.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  CLI::App app{"dartquant: learn rotations (DartQuant), quantize and evaluate LLaMA-family models"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "threads for BLAS and our own loops (default: all cores)")
      ->check(int_in(1, 1024));
  std::map<CLI::App*, std::function<int()>> runs;
  for (auto& [name, entry] : registry()) {
    CLI::App* sub = app.add_subcommand(name, entry.help);
    runs[sub] = entry.setup(*sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One line like every other error, naming the command when the first word is not one.
    std::string what = e.what(), word;  // word: the first argument that is not an option or its value
    for (int i = 1; i < argc && word.empty(); ++i) {
      if (std::string(argv[i]) == "--threads") ++i;
      else if (argv[i][0] != '-') word = argv[i];
    }
    if (!word.empty() && !registry().count(word)) {
      what = "unknown command '" + word + "'; commands:";
      for (const auto& [name, entry] : registry()) what += " " + name;
    } else if (dynamic_cast<const CLI::RequiredError*>(&e) && app.get_subcommands().empty()) {
      what = "no command given; run dartquant --help";
    }
    for (char& c : what)
      if (c == '\n') c = ' ';
    std::fprintf(stderr, "dartquant: error: %s\n", what.c_str());
    return e.get_exit_code();
  }
  if (threads > 0) dq::set_num_threads(threads);
  try {
    for (auto& [sub, run] : runs)
      if (sub->parsed()) return run();
  } catch (const dq::Error& e) {
    std::fprintf(stderr, "dartquant: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "dartquant: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dartquant: error: %s\n", e.what());
    return 1;
  }
  return 1;
}
