// fp32 GEMV-shaped gemm_nt for small M (decode: the fp32 lm_head over a few rows): streams each
// row of B once and applies it to all M rows of A; no packing (packing a [V, D] lm_head per
// decoded token would triple its memory traffic).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

constexpr int64_t kGemvF32MaxM = 16;  // gemm_nt routes 1 <= M <= this here

// C[M, N] = alpha * A[M, K] · B[N, K]ᵀ + beta * C, 1 <= M <= kGemvF32MaxM; level != Scalar.
// Kernels take up to 8 rows (AVX-512, AVX2) or 4 (generic); larger M runs in row groups.
void gemv_nt_f32(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Kernels over the output columns [n0, n1) (cpu/gemv_f32_*.cpp: plain functions, see cpu/README.md).
void gemv_nt_f32_generic(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemv_nt_f32_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemv_nt_f32_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace qlora::cpu
