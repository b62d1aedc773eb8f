// The backend ops a training pass needs (LlamaModel::forward_backward / eval_loss, llama_train.cpp),
// checked before the pass uploads anything, so a backend that cannot train (e.g. a GPU backend
// missing a backward kernel) is refused with one ValueError naming every missing op instead of
// failing halfway through the first layer. (Model construction checks only the forward ops:
// inference on such a backend stays possible.)
#pragma once
#include <string>
#include <vector>

#include "backend.hpp"
#include "model/config.hpp"

namespace qlora::model {

// backward: forward_backward (false: eval_loss); dropout: LoRA dropout > 0 in training mode.
std::vector<std::string> training_ops(const LlamaConfig& cfg, bool backward, bool dropout);
// ValueError "training: backend '<name>' does not implement ops a, b" (Backend::require_ops).
void require_training_ops(const Backend& be, const LlamaConfig& cfg, bool backward, bool dropout);

}  // namespace qlora::model
