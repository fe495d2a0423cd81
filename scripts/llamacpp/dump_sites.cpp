// dartquant's side of dump_tensors: runs one batch of tokens through dartquant's forward pass and
// writes the activations at every site (before any rounding) to DIR/SITE-LAYER.f32 in the same
// layout (int64 rows, int64 cols, then the floats), so compare_sites.py can set them against
// llama.cpp's. Built by scripts/check-llamacpp.sh against dartquant's static libraries.
// Usage: dump_sites MODEL.gguf ID,ID,... DIR
#include <cstdio>
#include <sstream>
#include <string>

#include "model/forward.h"
#include "rows_file.h"

using namespace dq;

struct SiteDump : Hook {
  std::string dir;
  void at(Site s, int layer, Matrix& x) override {
    write_rows(dir + "/" + site_name(s) + "-" + std::to_string(layer) + ".f32", x.data.data(), x.rows, x.cols);
  }
};

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: dump_sites MODEL.gguf ID,ID,... DIR\n");
    return 2;
  }
  const Model m = load_model(argv[1]);
  std::vector<int32_t> ids;
  std::stringstream list(argv[2]);
  for (std::string id; std::getline(list, id, ',');) ids.push_back(std::stoi(id));
  SiteDump dump;
  dump.dir = argv[3];
  forward(m, ids, 1, int(ids.size()), {&dump});
  return 0;
}
