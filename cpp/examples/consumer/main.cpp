// A C++ app that embeds qlora_native through its installed CMake package and public header only:
// loads a model, turns the prompt into token ids, generates greedily and prints the result.
//
//   qlora_consumer MODEL [-n MAX_NEW] PROMPT_ID [PROMPT_ID ...]
//
// Prints "ids: <generated ids>" on one line. Exit status 0 on success, 1 on an engine error
// (its message on stderr), 2 on a usage error.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "qlora/qlora.hpp"

namespace {

struct Args {
  std::string model;
  int64_t max_new = 16;
  std::vector<std::string> prompt;
};

bool parse(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "-n" && i + 1 < argc) {
      char* end = nullptr;
      a.max_new = std::strtoll(argv[++i], &end, 10);
      if (*end || a.max_new < 0) return false;
    } else if (a.model.empty()) {
      a.model = s;
    } else {
      a.prompt.push_back(s);
    }
  }
  return !a.model.empty() && !a.prompt.empty();
}

// The prompt as token ids: given as numbers on the command line.
std::vector<int32_t> tokenize(const qlora::api::Model&, const std::vector<std::string>& words) {
  std::vector<int32_t> ids;
  for (const std::string& w : words) {
    char* end = nullptr;
    const long v = std::strtol(w.c_str(), &end, 10);
    if (*end) throw qlora::api::Error(QLORA_ERR_INVALID_ARGUMENT, "not a token id: " + w);
    ids.push_back(static_cast<int32_t>(v));
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, args)) {
    std::fprintf(stderr, "usage: %s MODEL [-n MAX_NEW] PROMPT_ID [PROMPT_ID ...]\n", argv[0]);
    return 2;
  }
  try {
    qlora::api::Model model = qlora::api::Model::load(args.model);  // NF4 quantized while loading
    const std::vector<int32_t> prompt = tokenize(model, args.prompt);

    qlora_sampling_params sp = qlora_sampling_default_params();  // greedy
    const std::vector<int32_t> eos = model.eos_tokens();
    sp.stop_ids = eos.data();
    sp.n_stop_ids = static_cast<int64_t>(eos.size());
    const std::vector<int32_t> out = model.generate(prompt, args.max_new, sp);

    std::printf("ids:");
    for (int32_t t : out) std::printf(" %d", t);
    std::printf("\n");
  } catch (const qlora::api::Error& e) {
    std::fprintf(stderr, "qlora_consumer: error %d: %s\n", e.code, e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_consumer: %s\n", e.what());
    return 1;
  }
  return 0;
}
