// The one PEFT adapter writer (C API qlora_adapter_save and Python's adapter_io.save_adapter):
// adapter_model.safetensors (metadata {"format": "pt"}) and adapter_config.json (the caller's JSON
// text, written as given) saved as a unit through io::DirSaver (atomic_io.py's protocol): a kill at
// any point leaves the complete old or the complete new adapter under `dir` once recovered, never a
// config of one save with the weights of another; files of other tools in `dir` are kept.
#pragma once
#include <string>
#include <vector>

#include "io/safetensors.hpp"

namespace qlora::io {

void write_peft_adapter(const std::string& dir, const std::vector<TensorToWrite>& tensors,
                        const std::string& config_json);

}  // namespace qlora::io
