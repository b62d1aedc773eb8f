// LoRA adapters on the frozen projections: y = W x (+ b) + scaling * B(A(dropout(x))), and the
// pieces of their backward pass. A and B (and their gradients) live in the backend's memory in
// fp32; the base weight is only read. PEFT semantics (peft/tuners/lora/layer.py).
#pragma once
#include <cstdint>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/buffer.hpp"
#include "train/lora_optimizer.hpp"
#include "train/optimizer.hpp"

namespace qlora::model {

struct Linear;
struct LayerWeights;
struct LoraBf16Copy;  // model/lora_infer.hpp

// The seven projections of a layer in application order (q, k, v, o, gate, up, down).
constexpr int kNumProj = 7;
const char* proj_name(int p);
int proj_index(const std::string& name);  // -1 when not a projection name
Linear& proj(LayerWeights& L, int p);

struct LoraModule {
  int64_t r = 0, in = 0, out = 0;
  float scaling = 1.0f;
  DeviceBuffer A, B;    // [r, in], [out, r]; once the adapter is added to a model: views into its param_arena
  // Accumulated gradients [r, in], [out, r]: views into the adapter's grad_arena (null until the
  // adapter first trains).
  float* dA = nullptr;
  float* dB = nullptr;
};

struct LoraAdapter {
  float dropout = 0.0f;
  uint64_t seed = 0;                                // keys the dropout masks
  int64_t micro_step = 0;                           // forward_backward calls so far (dropout key)
  // Data parallel: global index of the pass's first row in the global batch (this rank's first
  // row), so a row's dropout masks do not depend on which rank holds it. lora_train_step sets it
  // around each micro-batch; 0 otherwise.
  int64_t dropout_row0 = 0;
  std::vector<std::unique_ptr<LoraModule>> modules;  // [num_layers * kNumProj], null = not adapted
  // configure_lora_optimizer: AdamW over param_arena (every tensor, arena order) through the
  // backend's optimizer ops, moments in backend memory (lora_optimizer.hpp); its state() lists the
  // tensors in PEFT order (peft_order()).
  std::unique_ptr<train::FlatAdamW> opt;
  // Every module's A and B in arena order (params()) as ONE contiguous fp32 buffer (the layout of
  // grad_arena), filled by pack_lora_params when the adapter is added to a model; the modules' A/B
  // are views into it. The optimizer step runs over it as a whole.
  DeviceBuffer param_arena;
  // Every module's dA and dB in arena order as ONE contiguous fp32 buffer, so a data-parallel step
  // all-reduces one buffer and an optimizer can run over it as a whole. Allocated (zeroed) on the
  // first training use only, so a served adapter costs just A + B. grads_mu serializes that
  // allocation; grads_ready (release/acquire) lets readers such as memory_footprint see whether it
  // happened without touching the buffers.
  DeviceBuffer grad_arena;
  std::mutex grads_mu;
  std::atomic<bool> grads_ready{false};
  // bf16 inference copy (model/lora_infer.hpp): writes to A/B bump factors_version
  // (lora_factors_changed), so a copy made from older factors is rebuilt before any pass uses it.
  std::atomic<uint64_t> factors_version{0};
  mutable std::mutex bf16_mu;  // guards bf16
  std::shared_ptr<const LoraBf16Copy> bf16;

  LoraModule* at(int64_t layer, int p) const { return modules[layer * kNumProj + p].get(); }
  int64_t max_rank() const;
  // Gradient tensors / parameters in arena order (arena_tensors()); grads() allocates the (zero)
  // gradients first if the adapter has not trained yet.
  std::vector<train::ParamRef> params() const;
  std::vector<train::ParamRef> grads(Backend& be);
  int64_t num_params() const;  // elements of every A and B (= of grad_arena)
  // For the k-th tensor in PEFT order (layer, projection, A then B: the saved adapter's and the
  // optimizer state's order), its index in params() order.
  std::vector<size_t> peft_order() const;
};

// The arena order of an adapter's tensors. Per layer, per group of projections sharing one input
// ({q, k, v}, {o}, {gate, up}, {down}): the A factors of the group's adapted modules back to back,
// then their B factors. So [A_q; A_k; A_v] (and [dA_q; dA_k; dA_v]) is one [r_q + r_k + r_v, in]
// matrix that the grouped LoRA calls (lora_forward_group / lora_backward_group) read in one GEMM.
// A lone module is A then B, as in PEFT order.
struct ArenaTensor {
  LoraModule* m;
  bool is_b;  // false: A [r, in], true: B [out, r]
  int64_t numel() const { return is_b ? m->out * m->r : m->r * m->in; }
};
std::vector<ArenaTensor> arena_tensors(const LoraAdapter& a);

// Moves every module's A and B into one new param_arena (arena order) and makes them views into
// it; idempotent. LlamaModel::add_adapter calls it before the adapter is visible to any request.
void pack_lora_params(Backend& be, LoraAdapter& a);

// A module with factors copied from host A[r, in], B[out, r]; no gradient buffers yet.
std::unique_ptr<LoraModule> make_lora_module(Backend& be, int64_t r, int64_t in, int64_t out, float scaling,
                                             const float* A_host, const float* B_host);
void set_lora_factors(Backend& be, LoraModule& m, const float* A_host, const float* B_host);
// Allocates the zeroed gradient arena and points every module's dA/dB into it unless already done
// (idempotent, thread-safe).
void ensure_lora_grads(Backend& be, LoraAdapter& a);
void zero_lora_grads(Backend& be, LoraAdapter& a);

// Which LoRA GEMMs of the training pass (compute_dtype="bfloat16") run as the backend's bf16-compute
// GEMM: both operands rounded to bf16 (RNE), fp32 accumulation, as PEFT's LoRA matmuls under
// torch.autocast(bfloat16). The others are the fp32 GEMMs. A, B, their gradients and every output
// stay fp32. One bit per GEMM:
enum LoraBf16Op : unsigned {
  kLoraShrink = 1u << 0,     // forward (and checkpoint recompute) t = x·Aᵀ
  kLoraExpand = 1u << 1,     // forward (and recompute) y += s t·Bᵀ
  kLoraBwdShrink = 1u << 2,  // backward's recomputed t = x·Aᵀ (feeds dB)
  kLoraDt = 1u << 3,         // dt = s dy·B (feeds dA and dx)
  kLoraDB = 1u << 4,         // dB += s dyᵀ·t
  kLoraDA = 1u << 5,         // dA += dtᵀ·x
  kLoraDx = 1u << 6,         // dx += dt·A
};
constexpr unsigned kLoraBf16All = 0x7Fu;
// Named splits (QLORA_LORA_BF16=forward / backward). Measured per GEMM over 24-96 seeds of
// test_bf16's 2-layer model vs float64 (README, bf16 compute: LoRA-gradient error / fp32-LoRA's):
// the forward GEMMs' roundings scale with the LoRA output against the base output (x2.2 where the
// adapter's output is twice the base's, x1.14 at half, x1.007 at a tenth: harmless while an adapter
// is young), the gradient GEMMs' roundings are 2u-level errors in dA / dB themselves (x1.02-1.09,
// visible wherever the LoRA term is small). No split with a speed gain matches fp32 in every regime,
// so the default stays fp32 and these are opt-in.
constexpr unsigned kLoraBf16Forward = kLoraShrink | kLoraExpand;
constexpr unsigned kLoraBf16Backward = kLoraBwdShrink | kLoraDt | kLoraDB | kLoraDA | kLoraDx;
struct LoraBf16 {
  unsigned ops = 0;
  constexpr LoraBf16() = default;
  constexpr LoraBf16(bool all) : ops(all ? kLoraBf16All : 0u) {}  // NOLINT: true = every LoRA GEMM
  static constexpr LoraBf16 mask(unsigned o) {
    LoraBf16 b;
    b.ops = o & kLoraBf16All;
    return b;
  }
  constexpr bool operator[](unsigned op) const { return (ops & op) != 0; }
};
// The mode from QLORA_LORA_BF16 (read per call, so tests and A/B benches can flip it): unset or "0":
// every LoRA GEMM fp32 (the default); "1" or "all": every one bf16; "forward", "backward": the
// splits above; or a comma list of shrink, expand, bwd_shrink, dt, db, da, dx (per-GEMM
// measurement). Anything else throws ValueError naming the variable.
LoraBf16 lora_bf16_ops();

// Forward of the LoRA branch: y[M, out] (row stride ldy) += scale * scaling * (x·Aᵀ)·Bᵀ, x[M, in]
// (row stride ldx) being the (dropped-out) input; `scale` is the request's runtime adapter scale
// (set_adapter_scale; 0: nothing is added, y is left bit-identical). t[M, r] is scratch (null:
// allocated here).
void lora_forward(Backend& be, const LoraModule& m, int64_t M, const float* x, int64_t ldx, float* y, int64_t ldy,
                  float* t = nullptr, float scale = 1.0f, LoraBf16 bf16 = {});

// Backward of the LoRA branch for dy[M, out] with s = scale * scaling: recomputes t = x·Aᵀ,
// accumulates dB += s * dyᵀ·t and dA += dtᵀ·x with dt = s * dy·B, and writes
// dx[M, in] = beta * dx + dt·A (dx may be null: no input gradient). t, dt: [M, r] scratch.
// t_ready: t already holds x·Aᵀ as this call's shrink would write it (the checkpointed recompute's
// forward shrink, same GEMM on the same x: same bits), so the shrink is skipped.
void lora_backward(Backend& be, LoraModule& m, int64_t M, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                   float* dx, int64_t lddx, float beta, float* t, float* dt, float scale = 1.0f,
                   LoraBf16 bf16 = {}, bool t_ready = false);
// QLORA_LORA_KEEP_T (default on; "0" off, read per call): the training pass keeps the checkpointed
// recompute's LoRA t for the backward instead of recomputing it (model/llama_train.cpp).
bool lora_keep_t_enabled();

// Grouped LoRA of n modules m[0..n) (n <= kMaxLoraGroup) that share one input x[M, in]
// (q/k/v, gate/up; dropout 0), the training pass's form of Unsloth's fused LoRA: the shrinks are
// one GEMM x·[A_0; ...; A_n-1]ᵀ, the input gradient one GEMM with K = R = sum of ranks, dA one
// GEMM dtᵀ·x, so x and dx are read once instead of n times. Each module keeps its own rank,
// scaling and output. Results equal n lora_forward / lora_backward calls up to the summation order.
constexpr int kMaxLoraGroup = 3;
// True when m[0..n)'s A factors lie back to back (the arena order) with the same `in`, and with
// grads their dA too, so the grouped calls apply.
bool lora_group_adjacent(const LoraModule* const* m, int n, bool grads);
int64_t lora_rank_sum(const LoraModule* const* m, int n);
// y_i[M, out_i] (row stride ldy[i]) += scale * scaling_i * (x·A_iᵀ)·B_iᵀ; t[M, R] scratch.
void lora_forward_group(Backend& be, int n, const LoraModule* const* m, int64_t M, const float* x, int64_t ldx,
                        float* const* y, const int64_t* ldy, float* t, float scale = 1.0f, LoraBf16 bf16 = {});
// lora_backward of each module for dy_i (row stride lddy[i]), the input-gradient terms summed:
// dx[M, in] = beta * dx + sum_i dt_i·A_i (one GEMM). t, dt: [M, R] scratch.
void lora_backward_group(Backend& be, int n, LoraModule* const* m, int64_t M, const float* x, int64_t ldx,
                         const float* const* dy, const int64_t* lddy, float* dx, int64_t lddx, float beta, float* t,
                         float* dt, float scale = 1.0f, LoraBf16 bf16 = {}, bool t_ready = false);

// LoRA dropout (inverted, as torch.nn.Dropout): the keep mask of one (micro step, layer,
// projection) is regenerated from a Philox stream keyed by them, so it is never stored. Element
// (token i, feature j) of the pass's [M, in] input takes stream position (token0 + i) * in + j:
// token0 = the global row offset x T of a data-parallel shard (0 otherwise), so a row sees the same
// mask on any rank. Backend ops (Backend::lora_dropout / lora_dropout_backward): the same masks on
// every backend.
struct DropoutKey {
  uint64_t seed;
  int64_t step, layer;
  int proj;
  int64_t token0 = 0;
};
// out[M, in] = x * keep / (1 - p)
void dropout_forward(Backend& be, const DropoutKey& k, float p, int64_t M, int64_t in, const float* x, int64_t ldx,
                     float* out);
// dx[M, in] (row stride lddx) += g[M, in] * keep / (1 - p)
void dropout_backward_add(Backend& be, const DropoutKey& k, float p, int64_t M, int64_t in, const float* g,
                          float* dx, int64_t lddx);

}  // namespace qlora::model
