// LoRA set-up and one training step entirely in C++ (used by the C API; Python builds its
// adapters in lora_model.py / lora_config.py with the same init and scaling rules).
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/llama.hpp"
#include "model/lora.hpp"
#include "train/rng.hpp"

namespace qlora::model {

struct LoraInitSpec {
  int64_t r = 16;
  float alpha = 32.0f;
  float dropout = 0.0f;
  bool use_rslora = false;      // scaling alpha / sqrt(r) instead of alpha / r
  uint32_t target_mask = 0x7F;  // bit p = projection p (q, k, v, o, gate, up, down)
  uint64_t seed = 0;            // A init and dropout masks
};

// LoRA scaling, PEFT's rule: alpha / r, or alpha / sqrt(r) with rsLoRA (use_rslora), in double
// (the engine keeps it as float32). The one rule for both faces: Python's LoraConfig.resolve and
// the C API's new_lora_adapter / adapter loader.
inline double lora_scaling(double alpha, int64_t r, bool rslora) {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

// PEFT's reset_lora_parameters for one module [A r x in, B out x r], drawing from `rng` (A first,
// then B): init_lora_weights=True (KaimingUniform: A ~ U(+-1/sqrt(in)), nn.Linear's default
// kaiming_uniform(a=sqrt(5)); B = 0), "gaussian" (A ~ N(0, std 1/r); B = 0) or False (both keep
// nn.Linear's default: A ~ U(+-1/sqrt(in)), B ~ U(+-1/sqrt(r))). The one init of both faces
// (Python's LoraConfig.init_weights / add_adapter call it through _core.train.lora_init_factors).
enum class LoraInit { KaimingUniform, Gaussian, LinearDefault };
void init_lora_factors(train::Philox& rng, LoraInit how, int64_t r, int64_t in, int64_t out, float* A, float* B);
// The init stream of an adapter created with `seed` (distinct from its dropout-mask key `seed`).
inline train::Philox lora_init_rng(uint64_t seed) { return train::Philox(seed ^ 0x9E3779B97F4A7C15ull); }

// Configures (or replaces) adapter a's AdamW over its param_arena with fresh state: the one
// optimizer set-up of both faces (Python's configure_optimizer, the C API's qlora_train_configure).
void configure_lora_optimizer(Backend& be, LoraAdapter& a, const train::AdamWConfig& c);

// PEFT default init (lora_config.init_weights, init_lora_weights=True): A ~ U(+-1/sqrt(in)) [r, in],
// B = 0 [out, r], on every targeted projection of every layer. ValueError on a bad spec.
std::unique_ptr<LoraAdapter> new_lora_adapter(LlamaModel& m, const LoraInitSpec& s);

// One optimizer step of the active adapter over micro-batches (gradient accumulation), the one
// step rule of both faces (Python's Trainer through Model.train_step, the C API's
// qlora_train_step): zero the gradients; forward_backward of each micro-batch with grad scale
// (n_i / N) / n_i (N = counted tokens of all micro-batches: the gradient of the mean loss over
// every counted token, transformers' num_items_in_batch rule); clip_grad_norm to max_grad_norm
// (<= 0 or inf: none; the pre-clip norm is returned); AdamW step with lr. A non-finite micro-batch
// loss or gradient norm stops before the optimizer step (stepped = false, bad_micro says which).
struct MicroBatch {
  const int32_t* ids;     // [B, T]
  const int32_t* mask;    // [B, T] or null
  const int32_t* labels;  // [B, T], already shifted (labels[b, t] is the target of position t)
  int64_t B, T;           // B = 0: this rank holds no row of the micro-batch (data parallel only)
  int64_t count;          // labels != -100
  int64_t row0 = 0;       // data parallel: global index of row 0 in the global micro-batch (dropout key)
};

// Data-parallel hook of lora_train_step: in-place sums over every rank (an all-reduce: MPI for
// CPU ranks, NCCL for GPU ranks). Each rank holds its own shard of every global micro-batch and
// all ranks make the same calls in the same order: sum_scalars(counted tokens per micro-batch),
// then sum_scalars(loss sum per micro-batch; NaN/inf stays non-finite in the sum, so a bad loss
// on one rank stops the step on all), then, unless stopped, sum_grads(the adapter's contiguous
// gradient arena, in the backend's memory). Each micro-batch is back-propagated with the global
// scale 1 / N_global, so after sum_grads every rank holds the gradient of the mean loss over the
// whole global batch and takes the identical clip + AdamW step.
struct StepReducer {
  std::function<void(double* v, int n)> sum_scalars;
  std::function<void(float* g, int64_t n)> sum_grads;
};
struct TrainStepResult {
  double loss = 0.0;    // mean loss over the step's counted tokens
  double norm = 0.0;    // global gradient norm before clipping
  int64_t count = 0;    // N
  size_t peak_train_bytes = 0;
  bool stepped = false;
  int bad_micro = -1;   // the micro-batch with a non-finite loss (then bad_loss)
  double bad_loss = 0.0;
};
// dp: null for one process (then the result is bit-identical to the same step without the hook).
// activation_budget: activation_memory_budget of every pass (LlamaModel::forward_backward).
TrainStepResult lora_train_step(LlamaModel& m, const std::vector<MicroBatch>& micro, double lr, double max_grad_norm,
                                bool training, bool checkpointing, const StepReducer* dp = nullptr,
                                double activation_budget = 0.0);

// One optimizer step on the active adapter (its AdamW must be configured): zero grads,
// forward_backward of the mean causal-LM loss (labels [B, T] unshifted, transformers
// convention, -100 ignored), clip to max_grad_norm when > 0, AdamW step with lr. Returns the mean loss.
double lora_train_step(LlamaModel& m, const int32_t* ids, const int32_t* labels, int64_t B, int64_t T, double lr,
                       double max_grad_norm);

// Writes `dir`/adapter_model.safetensors (PEFT names, A [r, in], B [out, r], F32) and
// adapter_config.json (peft_type LORA) for adapter `a` created from spec `s`; atomic per file.
void save_lora_adapter(LlamaModel& m, const LoraAdapter& a, const LoraInitSpec& s, const std::string& dir);

}  // namespace qlora::model
