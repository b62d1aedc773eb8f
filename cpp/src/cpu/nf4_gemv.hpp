// NF4 GEMV for small M (decode): streams the packed weight once, decoding nibbles in registers.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {

// Largest M of one GEMV call; nf4_gemm_nt routes M <= 2 * this here in row groups. The AVX-512
// kernel streams W once for up to 8 rows; AVX2 and generic run groups of 4 (register budget).
constexpr int64_t kNf4GemvMaxM = 8;

// Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y, for 1 <= M <= kNf4GemvMaxM.
void nf4_gemv_nt(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy);

}  // namespace qlora::cpu
