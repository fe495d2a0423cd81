// Subcommands register themselves: each cmd_*.cpp defines one static RegisterCommand.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>

namespace dq::cli {

// setup adds the subcommand's options (bound to state it owns) and returns the function that runs it.
using Setup = std::function<std::function<int()>(CLI::App&)>;

struct RegisterCommand {
  RegisterCommand(const char* name, const char* help, Setup setup);
};

// True when stderr is a terminal: progress lines are shown only then.
bool show_progress();

// "stage: done/total" on stderr (one line, rewritten in place), only when it is a terminal.
void progress_line(const std::string& stage, int done, int total);

// The integer kernels run so far, "avx2-maddubs+avx2-madd16" ("" when none).
std::string kernels_used();
// ", kernels " and kernels_used(), for a printed line ("" when none).
std::string kernels_note();

}  // namespace dq::cli
