// Runs one batch of tokens through llama.cpp and writes every contiguous f32 tensor of its graph
// (ggml's names: attn_norm-0, kqv_out-0, ffn_swiglu-0, result_norm, ...) and the logits to
// DIR/NAME.f32 (int64 rows, int64 cols, then the floats). Built by scripts/check-llamacpp.sh against
// a llama.cpp build, so check_products.py can recompute llama.cpp's products from its own inputs.
// Usage: dump_tensors MODEL.gguf ID,ID,... DIR
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "llama.h"
#include "rows_file.h"

static std::string g_dir;

static bool on_tensor(ggml_tensor* t, bool ask, void*) {
  if (ask) return true;  // observe every node
  if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) return true;
  std::vector<float> v(ggml_nelements(t));
  ggml_backend_tensor_get(t, v.data(), 0, v.size() * sizeof(float));
  std::string name = t->name;
  for (char& c : name)
    if (c == ' ' || c == '/' || c == '(' || c == ')') c = '_';
  write_rows(g_dir + "/" + name + ".f32", v.data(), ggml_nelements(t) / t->ne[0], t->ne[0]);
  return true;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: dump_tensors MODEL.gguf ID,ID,... DIR\n");
    return 2;
  }
  g_dir = argv[3];
  std::vector<llama_token> ids;
  std::stringstream list(argv[2]);
  for (std::string id; std::getline(list, id, ',');) ids.push_back(std::stoi(id));

  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = cp.n_batch = cp.n_ubatch = ids.size();
  cp.n_threads = cp.n_threads_batch = 1;
  cp.type_k = cp.type_v = GGML_TYPE_F32;  // as scripts/check-llamacpp.sh runs llama-perplexity
  cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  cp.cb_eval = on_tensor;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) return 1;

  llama_batch batch = llama_batch_init(ids.size(), 0, 1);
  for (size_t i = 0; i < ids.size(); i++) {
    batch.token[i] = ids[i];
    batch.pos[i] = i;
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = 0;
    batch.logits[i] = true;
  }
  batch.n_tokens = ids.size();
  if (llama_decode(ctx, batch) != 0) return 1;
  write_rows(g_dir + "/logits.f32", llama_get_logits(ctx), ids.size(), llama_vocab_n_tokens(llama_model_get_vocab(model)));
  llama_batch_free(batch);
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
