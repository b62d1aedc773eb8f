// The bf16 training forward of NF4 projections with fp32 LoRA: the LoRA expand fused into the base
// GEMM (Backend::nf4_gemm_nt_many_expand_bf16), so y is written once instead of written by the base
// GEMM and then re-read and re-written by the expand.
#pragma once
#include <cstdint>

#include "backend.hpp"
#include "model/lora.hpp"

namespace qlora::model {

// y_i = x·deq(W_i)ᵀ (bf16 compute) + scale * m_i.scaling * (xl·A_iᵀ)·B_iᵀ for n <= kMaxLoraGroup NF4
// projections without bias sharing the input x (m[i] null: no LoRA on output i). The modules' A
// factors must be adjacent (lora_group_adjacent; one module trivially is): one shrink
// t[M, R] = xl·[A_0; ...]ᵀ into t (M * R floats) as lora_forward_group's, then the base GEMMs with
// each expand added to the output tiles; same bits as the bases followed by lora_forward(_group).
// Returns false and does nothing where it does not apply: QLORA_BF16_LORA_EPILOGUE not "1" (opt-in:
// measured neutral on Zen 4, /work/notes/readme-bf16-nf4-epilogue.md), scale 0, a
// bf16 expand (QLORA_LORA_BF16 with expand), no module, A factors not adjacent.
bool lora_nf4_forward_bf16(Backend& be, int n, const Nf4Ref* const* W, const LoraModule* const* m, int64_t M,
                           const float* x, int64_t ldx, const float* xl, int64_t ldxl, float* const* y,
                           const int64_t* ldy, float* t, float scale, LoraBf16 bf16);

}  // namespace qlora::model
