// LoRA adapter and training methods of _core.model.LlamaModel (bind_lora.cpp); called by bind_model.
#pragma once
#include <pybind11/pybind11.h>

#include "model/llama.hpp"

namespace qlora::py_bind {
void bind_lora_methods(pybind11::class_<model::LlamaModel>& cls);
}  // namespace qlora::py_bind
