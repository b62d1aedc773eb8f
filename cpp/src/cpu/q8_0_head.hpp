// fp32 lm_head GEMMs over Q8_0 rows standing in for their fp32 dequantization (a GGUF's tied
// token_embd under head_format "float32" and compute_dtype float32): no V x D fp32 table, the SAME
// bits as gemm_nt / gemm_nn over that table (ops_loss.cpp, lm_cross_entropy_q8_0_as_f32).
// How: the rows are decoded (exactly: fp16 scale x int8) a block at a time into fp32 scratch
//   logits: one gemm_nt per block of rows = columns of the logits. Every output's depth order is
//     that of the one-call GEMM (its K = D is unchanged; the micro-kernels and the GEMV route compute
//     each column the same way wherever it sits in a tile or a task);
//   dh (K = V): one gemm_nn per depth block of the one-call GEMM (gemm_depth_block(level, V)), the
//     first with beta = 0, the rest with beta = 1: the one-call driver runs exactly these depth
//     blocks, each as acc-from-zero then C = 1 * acc + 1 * C, so the chain is the same arithmetic.
// Not at SimdLevel::Scalar (its reference GEMMs accumulate all of K in double: a chain of calls
// would round between blocks); the caller widens the table there.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// level != Scalar, D a positive multiple of 32, and QLORA_F32_HEAD_Q8 is not "0" (read per call:
// A/B runs and tests make the caller widen the table instead).
bool q8_0_head_f32_applies(SimdLevel level, int64_t D);
// Rows per decoded block (both GEMMs): gemm_depth_block(level, V).
int64_t q8_0_head_f32_block_rows(SimdLevel level, int64_t V);
// The fp32 scratch both GEMMs share: [block_rows, D] floats.
size_t q8_0_head_f32_scratch_bytes(SimdLevel level, int64_t V, int64_t D);
// logits[M, V] (ld ldl) = h[M, D] · deq(E)ᵀ, E = V Q8_0 rows of D; == gemm_nt(level, M, V, D, 1, h, ldh,
// deq(E), D, 0, logits, ldl).
void q8_0_head_logits_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh,
                          const void* E, float* logits, int64_t ldl, float* scratch);
// dh[M, D] (ld lddh) = dlogits[M, V] · deq(E); == gemm_nn(level, M, D, V, 1, dlogits, ldl, deq(E), D, 0, dh,
// lddh).
void q8_0_head_dh_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* dlogits, int64_t ldl,
                      const void* E, float* dh, int64_t lddh, float* scratch);
// Rows [r0, r0 + n) of E dequantized into out[n, D] (threads share the rows).
void q8_0_decode_rows(int64_t r0, int64_t n, int64_t D, const void* E, float* out);

}  // namespace qlora::cpu
