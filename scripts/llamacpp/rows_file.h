// The file dump_tensors and dump_sites write one activation matrix to, and rows_file.py reads:
// int64 rows, int64 cols, then rows x cols floats, native byte order.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

inline void write_rows(const std::string& path, const float* data, int64_t rows, int64_t cols) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return;
  std::fwrite(&rows, sizeof rows, 1, f);
  std::fwrite(&cols, sizeof cols, 1, f);
  std::fwrite(data, sizeof(float), size_t(rows * cols), f);
  std::fclose(f);
}
