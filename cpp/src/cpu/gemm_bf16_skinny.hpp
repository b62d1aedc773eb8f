// bf16-compute GEMMs with few output columns: LoRA's shrink x·Aᵀ (N = r or the grouped sum of
// ranks), its dt = dy·B and dB = dyᵀ·t in training under compute_dtype="bfloat16". The blocked
// kernel's 14x32 tile leaves half its lanes idle at N = 16 and packs A with a 28-row transpose
// that streams a cold A slowly; here gemm_nt / gemm_nn (N <= 64) run a row-dot kernel over A as
// it lies, gemm_tn (N <= 16) a 28x16 tile. Both round the operands as the blocked kernel does
// (RNE) and accumulate in fp32; only the summation order differs. CpuBackend::gemm_*_bf16 calls
// it on the AVX512-BF16 path only.
#pragma once
#include <cstdint>

namespace qlora::cpu {

enum class SkinnyLayout { NT, NN, TN };  // as gemm_nt / gemm_nn / gemm_tn (cpu/gemm.hpp)
constexpr int64_t kSkinnyMaxN = 64;      // gemm_nt / gemm_nn (row-dot, 16 columns per pass)
constexpr int64_t kSkinnyMaxNTile = 16;  // gemm_tn (28x16 tiles)

// C[M, N] = alpha * op(A)·op(B) + beta * C (beta == 0 never reads C) when N <= kSkinnyMaxN
// (gemm_tn: kSkinnyMaxNTile) and the
// path is on (QLORA_GEMM_BF16_SKINNY=0 turns it off for A/B runs): returns true; else (also for
// empty or inconsistent dimensions, which the caller checks) false and C is untouched.
bool gemm_bf16_skinny(SkinnyLayout layout, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace qlora::cpu
