// Gradient checks for the training step: global L2 norm, clipping as
// torch.nn.utils.clip_grad_norm_, and a non-finite scan naming the first bad tensor/element.
#pragma once
#include <cstdint>
#include <vector>

#include "train/optimizer.hpp"

namespace qlora::train {

// sqrt(sum of squares) over all tensors. Squares of floats are exact in double and are summed in
// double in a fixed chunk order, so the result does not depend on the thread count. Non-finite
// inputs give inf/NaN.
double global_grad_norm(const std::vector<GradRef>& grads);

// Scales every gradient by max_norm / (norm + 1e-6) when that is < 1 (torch's rule); returns the
// pre-clip norm. A non-finite norm leaves the gradients untouched (the caller reports it via
// find_nonfinite). max_norm must be > 0 (+inf: never clip); ValueError otherwise.
double clip_grad_norm(const std::vector<ParamRef>& grads, double max_norm);

struct NonFinite {
  int64_t tensor = -1;  // index into the list, -1 when all values are finite
  int64_t index = -1;   // flat element index of the first non-finite value in that tensor
  float value = 0.0f;   // NaN, +inf or -inf
  bool found() const { return tensor >= 0; }
};
NonFinite find_nonfinite(const std::vector<GradRef>& grads);

}  // namespace qlora::train
