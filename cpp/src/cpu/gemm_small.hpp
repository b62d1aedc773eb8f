// gemm_nt / gemm_tn's few-column paths (the rank-r LoRA shapes): kernels that read the wide operand
// in place or in small copied chunks instead of the blocked driver's packing (cpu/gemm.cpp). Same
// depth blocks and FMA chains as the blocked way: the same bits.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// C[M, N] = alpha * A·Bᵀ + beta * C when 32 < N <= 48 at AVX-512 (the grouped q/k/v LoRA shrink);
// false (nothing done) elsewhere.
bool gemm_nt_skinny48(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C[M, N] = alpha * Aᵀ·B + beta * C when one side has at most 48 rows / columns against at least 128
// of the other (the LoRA factor gradients dA = dtᵀ·x, dB = dyᵀ·t) at AVX-512 / AVX2; false elsewhere.
bool gemm_tn_small(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace qlora::cpu
