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

// ---- the same computations on one contiguous buffer (the CPU backend's optimizer ops,
// Backend::sum_squares / scale_inplace / find_nonfinite; train/lora_optimizer.hpp).
// Chunk bounds of tensors of these sizes laid out back to back: each tensor split into chunks of
// kNormChunk elements from its start, as global_grad_norm splits a list of tensors, so the norm of
// the contiguous buffer equals global_grad_norm of the tensors bit for bit. [n_chunks + 1] entries.
constexpr int64_t kNormChunk = int64_t{1} << 15;
std::vector<int64_t> norm_chunk_bounds(const std::vector<int64_t>& sizes);
// partial[c] = sum of squares of x[bounds[c], bounds[c+1]) in double; *out = sum of partials in order.
void sum_squares_chunks(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out);
void scale_flat(int64_t n, float* x, float s);                 // x *= s (clip_grad_norm's loop)
int64_t first_nonfinite(int64_t n, const float* x);            // -1: all finite

}  // namespace qlora::train
