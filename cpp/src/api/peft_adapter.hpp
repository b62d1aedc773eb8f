// Reading a PEFT LoRA adapter directory in C++: the one reader behind qlora_adapter_load (C API)
// and qlora_native.Model.load_adapter / adapter_io.load_adapter (Python, through _core.io).
// The rules of PEFT's LoraConfig (target_modules, layers_to_transform / layers_pattern,
// exclude_modules, rank_pattern / alpha_pattern, rsLoRA scaling) with lora_config.py's messages.
// Patterns that are plain names ([A-Za-z0-9_-.] and "\.") are matched here as Python's re would;
// any other regex needs a PatternMatcher from the caller (Python's face passes lora_config.py's
// time-bounded matcher); without one it is refused with a ValueError (the C API).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "model/llama.hpp"
#include "model/lora.hpp"

namespace qlora::capi {

// Matches one config regex as PEFT applies it: kind "fullmatch" (target_modules / exclude_modules
// strings), "pattern" (rank_pattern / alpha_pattern keys: (.*\.)?(p)$), "layers" (layers_pattern:
// (?:^|.*?\.)p\.(\d+)\.). `what` names the field for messages. Returns -1 for no match, else 0
// (for "layers": the captured layer index). May throw (a bad or too slow regex).
using PatternMatcher =
    std::function<int64_t(const std::string& pattern, const char* kind, const std::string& what, const std::string& key)>;

struct PeftReadOptions {
  std::string api = "qlora_adapter_load";  // the caller's name in messages
  int64_t num_layers = 0;                  // <= 0: the highest layer index in the tensor names + 1
  // {out, in} of the model's projection p of `layer`; empty: no model to check against.
  std::function<std::pair<int64_t, int64_t>(int64_t layer, int p)> model_shape;
  std::map<int, std::pair<int64_t, int64_t>> module_shapes;  // projection -> {out, in}, checked when given
  PatternMatcher re;                                         // empty: regex patterns are refused
};

struct PeftRead {
  json::Value config;                         // adapter_config.json as read
  std::shared_ptr<io::SafetensorsFile> file;  // holds the tensors' bytes
  std::vector<std::vector<float>> owned;      // float32 copies of F16 / BF16 / F64 / unaligned tensors
  struct Module {
    int64_t layer;
    int p;  // model::proj_name(p)
    int64_t r, in, out;
    float scaling;       // alpha / r, or alpha / sqrt(r) with rsLoRA (float32, as the engine keeps it)
    const float *a, *b;  // [r, in], [out, r]: into `file` or `owned`, checked finite
  };
  std::vector<Module> modules;  // layer, then projection order
};

// LoraConfig.resolve: the adapted projections of a num_layers-layer Llama model for PEFT config
// object `d`, in layer then projection order; ValueError (prefixed "where: " unless empty) for an
// invalid or unsupported config. The one implementation of the targeting / rank / alpha / scaling
// rules, for both faces (lora_config.py's resolve calls it through _core.io.resolve_peft_config).
struct PeftModulePlan {
  int64_t layer;
  int p;
  int64_t r;
  double alpha, scaling;  // scaling: model::lora_scaling(alpha, r, use_rslora)
  float scaling_f32;      // as the engine keeps it (checked finite)
};
std::vector<PeftModulePlan> resolve_peft_config(const json::Value& d, int64_t num_layers, const std::string& where,
                                                const PatternMatcher& re);

// The adapter in `dir`. FileError for a missing directory / file, FormatError when corrupt,
// ValueError for unsupported or mismatched content (a tensor whose shape does not fit the model's
// projection names the module and both shapes). A killed save is first finished or rolled back.
PeftRead read_peft_adapter(const std::string& dir, const PeftReadOptions& opt);

// read_peft_adapter checked against model `m` (nothing of the model changes), as backend buffers.
std::shared_ptr<model::LoraAdapter> load_peft_adapter(model::LlamaModel& m, const std::string& dir);

}  // namespace qlora::capi
