// A C++ app that embeds qlora_native through its installed CMake package and public header only
// (find_package(qlora), qlora::qlora): GGUF -> tokenize -> generate with a LoRA adapter -> text.
//
//   qlora_consumer MODEL PROMPT [--adapter DIR] [--scale S] [-n MAX_NEW]
//
// MODEL: a .gguf file (or an HF directory with tokenizer.json); its own tokenizer is used.
// --adapter: a PEFT adapter directory applied with scale S (default 1). Generation is greedy and
// stops at the vocabulary's end-of-turn ids. Prints the generated text (decoded as the Python
// Tokenizer.decode does) and a newline. Exit status 0, 1 on an engine error (message on stderr),
// 2 on a usage error.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "qlora/qlora.hpp"

namespace {

struct Args {
  std::string model, prompt, adapter;
  float scale = 1.0f;
  int64_t max_new = 32;
};

bool parse(int argc, char** argv, Args& a) {
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_val = i + 1 < argc;
    char* end = nullptr;
    if (s == "--adapter" && has_val) {
      a.adapter = argv[++i];
    } else if (s == "--scale" && has_val) {
      a.scale = std::strtof(argv[++i], &end);
    } else if (s == "-n" && has_val) {
      a.max_new = std::strtoll(argv[++i], &end, 10);
      if (a.max_new < 0) return false;
    } else {
      pos.push_back(s);
    }
    if (end && *end) return false;  // not a number
  }
  if (pos.size() != 2) return false;
  a.model = pos[0];
  a.prompt = pos[1];
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, args)) {
    std::fprintf(stderr, "usage: %s MODEL PROMPT [--adapter DIR] [--scale S] [-n MAX_NEW]\n", argv[0]);
    return 2;
  }
  try {
    // The model (NF4-quantized while loading) and its tokenizer, read from the same file.
    qlora::api::Model model = qlora::api::Model::load(args.model);
    const qlora::api::Tokenizer tok = model.tokenizer();

    // A context serves one request stream; its adapter set is the adapter at `scale`, or none.
    qlora::api::Context ctx = model.new_context();
    if (!args.adapter.empty()) {
      qlora::api::Adapter adapter = model.load_adapter(args.adapter);
      ctx.set_adapters({{&adapter, args.scale}});  // the context keeps its own copy
    }

    const std::vector<int32_t> prompt = tok.tokenize(args.prompt);  // BOS added as the vocabulary asks
    qlora_sampling_params sp = qlora_sampling_default_params();     // greedy
    const std::vector<int32_t> stop = tok.eos_tokens();
    sp.stop_ids = stop.data();
    sp.n_stop_ids = static_cast<int64_t>(stop.size());
    const std::vector<int32_t> out = ctx.generate(prompt, args.max_new, sp);

    const std::string text = tok.detokenize(out);
    std::fwrite(text.data(), 1, text.size(), stdout);
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
