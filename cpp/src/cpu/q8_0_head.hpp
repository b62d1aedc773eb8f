// fp32 lm_head GEMMs over Q8_0 rows standing in for their fp32 dequantization (a GGUF's tied
// token_embd under head_format "float32" and compute_dtype float32): no V x D fp32 table and no
// decoded copy of it, the SAME bits as gemm_nt / gemm_nn over that table (CpuBackend::lm_head_begin
// for model/lm_loss.hpp's lm_cross_entropy_q8_0_as_f32).
// How: the rows are decoded (exactly: fp16 scale x int8) straight into the B panels of one call of
// the blocked GEMM driver (gemm_packed_b, as nf4_gemm_nt / nf4_gemm_nn decode NF4): the same depth
// blocks, panels and micro-kernel calls as gemm_nt / gemm_nn over the table, so the same bits.
// logits with M <= kGemvF32MaxM take gemm_nt's GEMV route as gemm_nt would, over small blocks of
// decoded rows (it computes each column the same way wherever it sits).
// Not at SimdLevel::Scalar (its reference GEMMs accumulate all of K in double); the caller widens
// the table there.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// level != Scalar, D a positive multiple of 32, and QLORA_F32_HEAD_Q8 is not "0" (read per call:
// A/B runs and tests make the caller widen the table instead).
bool q8_0_head_f32_applies(SimdLevel level, int64_t D);
// logits[M, V] (ld ldl) = h[M, D] · deq(E)ᵀ, E = V Q8_0 rows of D; == gemm_nt(level, M, V, D, 1, h, ldh,
// deq(E), D, 0, logits, ldl).
void q8_0_head_logits_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh,
                          const void* E, float* logits, int64_t ldl);
// dh[M, D] (ld lddh) = dlogits[M, V] · deq(E); == gemm_nn(level, M, D, V, 1, dlogits, ldl, deq(E), D, 0, dh,
// lddh).
void q8_0_head_dh_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* dlogits, int64_t ldl,
                      const void* E, float* dh, int64_t lddh);

}  // namespace qlora::cpu
