// Embedding qlora_native without Python: load an HF checkpoint directory through the C API and
// generate from token ids.
//
//   generate MODEL_DIR [-n MAX_NEW] [--fp32] [--temp T] [--seed S] ID [ID ...]
//   generate --selftest      (writes a tiny random checkpoint to a temp dir and runs on it; ctest)
//
// Prints the generated ids on one line, streaming them as they come.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include "qlora/qlora.h"
#include "tiny_checkpoint.hpp"  // --selftest only

namespace {

int print_token(int32_t token, void*) {
  std::printf("%d ", token);
  std::fflush(stdout);
  return 0;  // keep going
}

// Loads `dir`, generates; returns the tokens through `out`. 0 on success.
int run(const std::string& dir, bool nf4, const std::vector<int32_t>& prompt, int64_t max_new, float temp,
        uint64_t seed, std::vector<int32_t>& out) {
  qlora_model_params mp = qlora_model_default_params();
  mp.quantize = nf4 ? QLORA_QUANT_NF4 : QLORA_QUANT_NONE;
  qlora_model* model = qlora_model_load(dir.c_str(), &mp);  // owned here: freed below
  if (!model) {
    std::fprintf(stderr, "generate: %s\n", qlora_last_error());
    return 1;
  }
  int32_t eos[8];
  const int32_t n_eos = qlora_model_eos_tokens(model, eos, 8);
  qlora_sampling_params sp = qlora_sampling_default_params();
  sp.temperature = temp;
  sp.seed = seed;
  sp.stop_ids = eos;
  sp.n_stop_ids = n_eos < 8 ? n_eos : 8;
  out.assign(static_cast<size_t>(max_new), 0);
  int64_t n_out = 0;
  const int rc = qlora_generate(model, prompt.data(), static_cast<int64_t>(prompt.size()), &sp, out.data(), max_new,
                                &n_out, print_token, nullptr);
  std::printf("\n");
  if (rc != QLORA_OK) std::fprintf(stderr, "generate: error %d: %s\n", rc, qlora_last_error());
  out.resize(static_cast<size_t>(n_out));
  qlora_model_free(model);
  return rc == QLORA_OK ? 0 : 1;
}

int selftest() {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("qlora_generate_selftest_" + std::to_string(getpid()));
  int rc = 1;
  try {
    tiny::write_checkpoint(dir.string());
    std::vector<int32_t> a, b;
    const std::vector<int32_t> prompt = {1, 17, 42, 5};
    rc = run(dir.string(), true, prompt, 12, 0.0f, 0, a) || run(dir.string(), true, prompt, 12, 0.0f, 0, b);
    if (rc == 0 && (a.empty() || a != b)) {
      std::fprintf(stderr, "generate --selftest: greedy output is empty or not deterministic\n");
      rc = 1;
    }
    // An out-of-range id must fail cleanly.
    std::printf("(an out-of-range token id: an error is expected)\n");
    std::vector<int32_t> c;
    if (rc == 0 && run(dir.string(), false, {1, 1000}, 4, 0.0f, 0, c) == 0) {
      std::fprintf(stderr, "generate --selftest: an out-of-range token id was accepted\n");
      rc = 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate --selftest: %s\n", e.what());
    rc = 1;
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (rc == 0) std::printf("selftest OK\n");
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--selftest") == 0) return selftest();
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR [-n MAX_NEW] [--fp32] [--temp T] [--seed S] ID [ID ...]\n"
                 "       %s --selftest\n",
                 argv[0], argv[0]);
    return 2;
  }
  std::string dir = argv[1];
  int64_t max_new = 32;
  bool nf4 = true;
  float temp = 0.0f;
  uint64_t seed = 0;
  std::vector<int32_t> prompt;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_val = i + 1 < argc;
    char* end = nullptr;
    if (a == "-n" && has_val) max_new = std::strtoll(argv[++i], &end, 10);
    else if (a == "--fp32") nf4 = false;
    else if (a == "--temp" && has_val) temp = std::strtof(argv[++i], &end);
    else if (a == "--seed" && has_val) seed = std::strtoull(argv[++i], &end, 10);
    else prompt.push_back(static_cast<int32_t>(std::strtol(a.c_str(), &end, 10)));
    if (end && *end) {
      std::fprintf(stderr, "generate: not a number: %s\n", argv[i]);
      return 2;
    }
  }
  std::vector<int32_t> out;
  return run(dir, nf4, prompt, max_new, temp, seed, out);
}
