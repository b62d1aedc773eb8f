// bf16-compute GEMMs with few output columns (N <= 16): LoRA's shrink x·Aᵀ, its dt = dy·B and
// dB = dyᵀ·t in training under compute_dtype="bfloat16" (r = 16). The blocked kernel's 14x32 tile
// would leave half its lanes idle there; this path runs a 28x16 vdpbf16ps tile (28 zmm
// accumulators) over the same bf16-pair panels (cpu/gemm_bf16_kernels.hpp packers), so it rounds
// the operands exactly as the blocked kernel does (RNE) and accumulates in fp32; only the
// summation order may differ. cpu/gemm_bf16.cpp calls it on the AVX512-BF16 path only.
#pragma once
#include <cstdint>

namespace qlora::cpu {

enum class SkinnyLayout { NT, NN, TN };  // as gemm_nt / gemm_nn / gemm_tn (cpu/gemm.hpp)
constexpr int64_t kSkinnyMaxN = 16;

// C[M, N] = alpha * op(A)·op(B) + beta * C (beta == 0 never reads C) when N <= kSkinnyMaxN and the
// path is on (QLORA_GEMM_BF16_SKINNY=0 turns it off for A/B runs): returns true; else (also for
// empty or inconsistent dimensions, which the caller checks) false and C is untouched.
bool gemm_bf16_skinny(SkinnyLayout layout, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace qlora::cpu
