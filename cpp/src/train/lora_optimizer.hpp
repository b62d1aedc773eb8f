// AdamW, global-norm clipping and the non-finite check on ONE contiguous fp32 buffer of all LoRA
// parameters (and one gradient buffer laid out the same way), through the backend's optimizer ops
// (Backend::adamw_update / sum_squares / scale_inplace / find_nonfinite), with the moments m, v
// kept contiguous in the backend's memory (on the GPU for CUDA). On the CPU backend every result is
// bit-identical to the host AdamW / global_grad_norm / clip_grad_norm over the same tensors (the
// same code and the same chunk split); the CUDA kernels do the AdamW and clipping arithmetic
// bit-identically too, and sum the norm deterministically (fixed two-pass reduction).
// The state (state() / load_state) is AdamWState, the host AdamW's format: one exp_avg /
// exp_avg_sq vector per tensor, so a run resumes on any backend.
#pragma once
#include <cstdint>
#include <vector>

#include "backend.hpp"
#include "model/buffer.hpp"
#include "train/grad_utils.hpp"
#include "train/optimizer.hpp"

namespace qlora::train {

// The gradient checks alone (no optimizer state): global norm, clipping and the non-finite scan
// on a contiguous gradient buffer of tensors of `numels` laid out back to back. Holds the norm's
// chunk bounds and scratch in backend memory (a few KiB).
class FlatGradOps {
 public:
  // The backend must implement sum_squares / scale_inplace / find_nonfinite (ValueError otherwise).
  FlatGradOps(Backend& be, std::vector<int64_t> numels);

  // sqrt(sum of squares) of grads [numel_total] (backend memory); synchronizes. Non-finite values
  // give inf / NaN.
  double grad_norm(const float* grads);
  // torch.nn.utils.clip_grad_norm_'s rule (grad_utils.hpp clip_grad_norm): scales grads by
  // max_norm / (norm + 1e-6) when that is < 1; returns the pre-clip norm; a non-finite norm leaves
  // the gradients untouched. max_norm > 0 (+inf: never clip), ValueError otherwise.
  double clip_grad_norm(float* grads, double max_norm);
  // The first non-finite gradient: tensor index and element within it (found() false when none).
  NonFinite find_nonfinite(const float* grads);

  size_t num_params() const { return numels_.size(); }
  int64_t numel(size_t i) const { return numels_.at(i); }
  int64_t numel_total() const { return total_; }
  const std::vector<int64_t>& numels() const { return numels_; }

 private:
  Backend& be_;
  std::vector<int64_t> numels_;
  int64_t total_ = 0, n_chunks_ = 0;
  model::DeviceBuffer bounds_;   // int64 [n_chunks + 1] norm chunk bounds (norm_chunk_bounds)
  model::DeviceBuffer partial_;  // double [n_chunks] per-chunk sums
  model::DeviceBuffer scalar_;   // 8 bytes: the norm's double sum / the non-finite index
};

class FlatAdamW {
 public:
  // params: backend memory holding the tensors of `numels` back to back (sum(numels) floats);
  // m and v start at zero. The backend must implement the optimizer ops (ValueError otherwise).
  // state_order (empty: 0, 1, ...): the buffer's tensor index of state()'s / load_state()'s i-th
  // tensor, for a buffer laid out in another order than the state lists (LoraAdapter::peft_order).
  FlatAdamW(Backend& be, float* params, std::vector<int64_t> numels, AdamWConfig config = {},
            std::vector<size_t> state_order = {});

  // The gradient checks over the same layout (grads [numel_total], backend memory).
  double grad_norm(const float* grads) { return checks_.grad_norm(grads); }
  double clip_grad_norm(float* grads, double max_norm) { return checks_.clip_grad_norm(grads, max_norm); }
  NonFinite find_nonfinite(const float* grads) { return checks_.find_nonfinite(grads); }
  // One AdamW step with lr (finite, >= 0) on the parameters from grads [numel_total].
  void step(const float* grads, double lr);

  int64_t step_count() const { return step_; }
  const AdamWConfig& config() const { return config_; }
  size_t num_params() const { return checks_.num_params(); }
  int64_t numel(size_t i) const { return checks_.numel(i); }
  int64_t numel_total() const { return checks_.numel_total(); }
  float* params() const { return params_; }
  FlatGradOps& checks() { return checks_; }

  AdamWState state() const;           // downloaded, one vector per tensor (the host AdamW's format)
  void load_state(AdamWState state);  // validate_adamw_state, then uploaded

 private:
  Backend& be_;
  float* params_;
  FlatGradOps checks_;
  AdamWConfig config_;
  int64_t step_ = 0;
  model::DeviceBuffer m_, v_;  // [total] fp32 moments
  std::vector<size_t> order_;    // state tensor i = buffer tensor order_[i]
  std::vector<int64_t> offset_;  // buffer tensor j starts at offset_[j]
};

}  // namespace qlora::train
