// The training pass's allocation plan (LlamaModel::train_pass, llama_train.cpp): the size of every
// buffer a forward_backward / eval_loss pass allocates, by part, and the peak its MemCounter reports
// (LossResult::peak_train_bytes). One rule for both: train_pass allocates its buffers from this plan's
// float counts, and memory_model.py (through _core.train.memory_plan) reports the same plan, so the
// estimate and the allocations cannot drift apart.
//
// Adding a buffer to the pass: give it a float count here (a field of TrainMemoryPlan or of
// LayerActsFloats / BackwardFloats, set in train_memory_plan from the shape), book its bytes to a part
// and to the peak timeline in train_memory_plan, and allocate it in train_pass from that field.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "backend.hpp"

namespace qlora::model {

// How the loss reads the lm_head (LlamaWeights' head format).
enum class HeadRows { F32, Half, Q8_0 };

// "float32", "bf16", "f16", "q8_0" (head_format's names; bf16 and f16 are both HeadRows::Half).
const std::vector<std::string>& head_format_names();
HeadRows head_rows_from_name(const std::string& name);  // ValueError naming the choices

// Everything a pass's buffer sizes depend on.
struct TrainShape {
  int64_t batch = 0, seq = 0;
  int64_t hidden = 0, intermediate = 0, vocab = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, num_layers = 0;
  int64_t max_rank = 1;     // the adapter's largest LoRA rank (1 without an adapter)
  bool backward = true;     // forward_backward; false: eval_loss
  bool checkpointing = true;
  bool offload = false;     // offload_checkpoints (counts only with checkpointing and a backward)
  bool dropout = false;     // LoRA dropout runs (training and dropout > 0)
  bool bf16 = false;        // compute_dtype bfloat16 in use
  bool device = false;      // !Backend::host_memory() (the loss uploads its labels)
  HeadRows head = HeadRows::F32;
  // head F32 that is a GGUF's tied Q8_0 token_embd, its fp32 table not made: the loss reads the Q8_0
  // rows where the backend can (lm_head.q8_0_rows), else the table is made
  bool f32_from_q8_0 = false;
  // The backend's answer for this pass's loss call (be.lm_head_extras(lm_head_call(shape))); the
  // default: nothing beyond the ops (a device backend's answer).
  Backend::LmHeadExtras lm_head;
  // activation_memory_budget (PyTorch's torch._functorch.config name and scale, 0..1): with
  // checkpointing and a backward, the share of the memory between recomputing every layer (one
  // LayerActs, plain checkpointing) and recomputing none (L of them, checkpointing off) spent on
  // keeping intermediates, spent where it saves the most recompute per byte (kept_parts): first the
  // attention halves of the checkpointed layers (q, k, v, attention output, logsumexp, mid residual:
  // their recompute skips the q/k/v/o GEMMs and the attention, ~0.28 GFLOP/MiB at SmolLM2's shapes),
  // the highest layers first; then whole layers, the last ones (their MLP half adds the gate/up
  // GEMMs, ~0.16 GFLOP/MiB). 0: plain checkpointing; 1: the memory and work of checkpointing off.
  double activation_budget = 0.0;
  void validate() const;    // ValueError naming the first bad field
  // The loss reads a tied Q8_0 token_embd's rows in place of the fp32 table.
  bool loss_reads_q8_0_rows() const { return head == HeadRows::F32 && f32_from_q8_0 && lm_head.q8_0_rows; }
};

// The loss call of a pass of this shape (what TrainShape::lm_head answers).
Backend::LmHeadCall lm_head_call(const TrainShape& s);

// One layer's intermediates kept for its backward (LayerActs), floats each.
struct LayerActsFloats {
  int64_t h1 = 0;     // [M, D] input_norm(x_in)
  int64_t q = 0;      // [M, Hq*hd] after RoPE
  int64_t k = 0;      // [M, Hkv*hd] after RoPE
  int64_t v = 0;      // [M, Hkv*hd]
  int64_t att = 0;    // [M, Hq*hd] attention output
  int64_t lse = 0;    // [B, Hq, T] attention logsumexp
  int64_t x_mid = 0;  // [M, D] residual after attention
  int64_t h2 = 0;     // [M, D] post_norm(x_mid)
  int64_t g = 0;      // [M, I] gate (its gradient in the backward)
  int64_t u = 0;      // [M, I] up (its gradient in the backward)
  int64_t a = 0;      // [M, I] silu(g) * u
  int64_t total() const { return h1 + q + k + v + att + lse + x_mid + h2 + g + u + a; }
  // The attention half (AttentionActs): what a checkpointed layer's recompute skips the q/k/v/o
  // projections and the attention with.
  int64_t attention() const { return q + k + v + att + lse + x_mid; }
};

// The backward's scratch (layer_backward), floats each; all zero without a backward.
struct BackwardFloats {
  int64_t da = 0, dh = 0, datt = 0, dq = 0, dk = 0, dv = 0;  // [M, I], [M, D], [M, QD] x2, [M, KD] x2
  int64_t total() const { return da + dh + datt + dq + dk + dv; }
};

struct TrainMemoryPlan {
  // Float counts of the buffers, as train_pass allocates them.
  int64_t lora_t = 0;        // t and dt, each [M, r_max]
  int64_t dropout_buf = 0;   // xdrop and dtmp, each [M, max(D, I, QD)]; 0 without dropout
  int64_t x = 0;             // one residual-stream buffer / checkpoint [M, D]
  int64_t num_x = 0;         // how many: L + 1 with a backward (unless offloaded), else 2
  LayerActsFloats layer;     // one set of layer intermediates
  // LayerActs sets: the last num_layer_acts layers keep their forward's intermediates (no recompute),
  // layers below share the lowest kept set for their forward and recompute. L without checkpointing
  // (with a backward), 1 + the budget's whole layers with it (kept_parts), 1 without a backward.
  int64_t num_layer_acts = 0;
  // Attention halves (layer.attention() floats each): the num_attention_kept layers right below the
  // whole kept ones keep theirs; their recompute runs only the norms and the MLP half.
  int64_t num_attention_kept = 0;
  int64_t final_norm = 0;    // hF [M, D]: the final norm's output, then dL/d(residual)
  BackwardFloats bwd;
  // Bytes by part (device memory) and the pass's peak (MemCounter's high-water mark).
  // layer_activations: the kept LayerActs sets and attention halves.
  size_t checkpoints = 0, layer_activations = 0, lora_scratch = 0, dropout = 0, final_norm_bytes = 0,
         backward_scratch = 0, cross_entropy = 0, peak = 0;
  size_t offload_host = 0;   // host staging of offloaded checkpoints (not device memory, not in peak)
};

TrainMemoryPlan train_memory_plan(const TrainShape& s);

// What the budget keeps (see TrainShape): whole LayerActs sets (the plan's num_layer_acts, the last
// layers) and attention halves (num_attention_kept, the layers right below them).
struct KeptParts {
  int64_t layers = 1, attention = 0;
};
KeptParts kept_parts(const TrainShape& s);

// ValueError unless budget is a number in [0, 1] (activation_memory_budget).
void check_activation_budget(double budget);

// The scratch the chunked LM loss (lm_cross_entropy*, model/lm_loss.cpp) allocates for N rows: the
// [chunk, V] logits, per-row loss (+ labels on a device), and with 16-bit / Q8_0 rows the widened
// chunk of the lm_head backward (or of the bf16 forward); with head F32, what the backend adds
// (extras: Backend::lm_head_extras of this call; q8_0_rows: it reads Q8_0 rows for the table).
size_t lm_loss_workspace_bytes(int64_t N, int64_t D, int64_t V, int64_t chunk_rows, HeadRows head, bool want_grad,
                               bool bf16, bool device, const Backend::LmHeadExtras& extras, bool q8_0_rows);

}  // namespace qlora::model
