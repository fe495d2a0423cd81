// The checks every numeric option goes through, attached where the option is defined so that a
// bad value is refused while parsing, before anything is loaded or created. They read the text
// themselves: a 300-digit number is answered with the allowed range, not echoed back.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace dq::cli {

// An integer in [lo, hi].
CLI::Validator int_in(int64_t lo, int64_t hi);
// A finite number in [lo, hi], or (lo, hi] when lo_open.
CLI::Validator real_in(double lo, double hi, bool lo_open = false);
// Bit widths the quantizers and `eval` implement: 2..8, or 16 for "not quantized".
CLI::Validator quant_bits();
// A clip ratio: (0, 1].
inline CLI::Validator clip_ratio() { return real_in(0, 1, true); }

}  // namespace dq::cli
