// AdamW on host fp32 parameters, numerically the same algorithm as torch.optim.AdamW
// (foreach=False, amsgrad=False, maximize=False): per element, in this order,
//   p *= 1 - lr*wd                       (decoupled weight decay, before the Adam update; skipped when wd == 0)
//   m += (1-beta1) * (g - m)             (torch: exp_avg.lerp_(grad, 1-beta1))
//   v  = v*beta2 + (1-beta2)*g*g         (torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1-beta2))
//   p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps),   bc_i = 1 - beta_i^t
// Scalars are formed in double and rounded to float once, as torch does with Python floats.
// Defaults are transformers' Trainer defaults (adam_beta1/2, adam_epsilon, weight_decay).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora::train {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  void validate() const;  // torch's checks: 0 <= beta < 1, eps >= 0, wd >= 0, all finite; ValueError
};

// A parameter tensor the optimizer updates in place (host memory, fp32, contiguous).
struct ParamRef {
  float* data = nullptr;  // [numel]
  int64_t numel = 0;
};

// Its gradient, same numel.
struct GradRef {
  const float* data = nullptr;  // [numel]
  int64_t numel = 0;
};

// What a checkpoint holds to resume bit-exactly (hyperparameters are restored too, as torch's
// load_state_dict restores param_groups).
struct AdamWState {
  int64_t step = 0;                            // optimizer steps taken (torch's state["step"])
  AdamWConfig config;
  std::vector<std::vector<float>> exp_avg;     // [n_params][numel]  first moment m
  std::vector<std::vector<float>> exp_avg_sq;  // [n_params][numel]  second moment v
};

// Checks a state against parameter sizes as AdamW::load_state does (ValueError naming the problem):
// config valid, step >= 0, one exp_avg / exp_avg_sq per parameter with its numel, m finite, v finite >= 0.
void validate_adamw_state(const AdamWState& s, const std::vector<int64_t>& numels);

class AdamW {
 public:
  // Params must not overlap each other (ValueError); m and v start at zero, owned here.
  explicit AdamW(std::vector<ParamRef> params, AdamWConfig config = {});

  // One step with learning rate lr (finite, >= 0) for every parameter; grads[i] matches params[i].
  // Non-finite gradients propagate into params as in torch: check them first (grad_utils.hpp).
  void step(const std::vector<GradRef>& grads, double lr);

  int64_t step_count() const { return step_; }
  const AdamWConfig& config() const { return config_; }
  size_t num_params() const { return params_.size(); }
  int64_t numel(size_t i) const { return params_.at(i).numel; }
  const std::vector<float>& exp_avg(size_t i) const { return m_.at(i); }     // [numel]
  const std::vector<float>& exp_avg_sq(size_t i) const { return v_.at(i); }  // [numel]

  AdamWState state() const;           // a copy
  void load_state(AdamWState state);  // validates counts, sizes, step >= 0, finite m, finite v >= 0

 private:
  std::vector<ParamRef> params_;
  std::vector<std::vector<float>> m_, v_;  // [n_params][numel]
  int64_t step_ = 0;
  AdamWConfig config_;
};

// The per-element kernel on one contiguous range (exposed for tests and other backends' parity).
struct AdamWScalars {
  float decay;        // 1 - lr*wd (1 when wd == 0: the multiply is skipped)
  float one_minus_b1; // 1 - beta1
  float beta2;
  float one_minus_b2; // 1 - beta2
  float bc2_sqrt;     // sqrt(1 - beta2^t)
  float eps;
  float neg_step;     // -lr / (1 - beta1^t)
  bool apply_decay;   // wd != 0
};
AdamWScalars adamw_scalars(const AdamWConfig& c, int64_t t, double lr);  // t >= 1: step after increment
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);
// adamw_update over n elements split into fixed chunks on the CPU thread pool (AdamW::step's split;
// element-wise, so the result does not depend on the split): the CPU backend's adamw_update op.
void adamw_update_parallel(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);

}  // namespace qlora::train
