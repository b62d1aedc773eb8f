// Reading a PEFT LoRA adapter directory in C++ for qlora_adapter_load: the rules of
// python/qlora_native/adapter_io.py load_adapter + lora_config.py (LoraConfig.from_peft_dict,
// resolve) with the same messages, except that the regular expressions a config may hold
// (target_modules / exclude_modules as a string, layers_pattern, rank_pattern / alpha_pattern
// keys) are read only when they are plain names ([A-Za-z0-9_-.] and "\."), matched as Python's re
// would; any other regex is refused with a ValueError (the Python loader reads them).
#pragma once
#include <memory>
#include <string>

#include "model/llama.hpp"
#include "model/lora.hpp"

namespace qlora::capi {

// The adapter in `dir` for model `m` (nothing of the model changes). FileError for a missing
// directory / file, FormatError when corrupt, ValueError for unsupported or mismatched content:
// a tensor whose shape does not fit the model's projection names the module and both shapes.
std::shared_ptr<model::LoraAdapter> load_peft_adapter(model::LlamaModel& m, const std::string& dir);

}  // namespace qlora::capi
