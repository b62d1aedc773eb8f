// The AVX512-BF16 micro-kernel of cpu/gemm_bf16_skinny.cpp (declarations only, see cpu/README.md).
// Panels as cpu/gemm_bf16_kernels.hpp: A panel Ap[p * kSkinnyMR + i], B panel Bp[p * 16 + j], one
// uint32 = a bf16 pair of k = 2p, 2p + 1; Bp 64-byte aligned.
#pragma once
#include <cstdint>

namespace qlora::cpu::bf16_k {

constexpr int kSkinnyMR = 28;  // 28 zmm accumulators of 16 columns

// C[mr, nr] (ld ldc) = alpha * Ap·Bp + beta * C over kp pairs; mr <= kSkinnyMR, nr <= 16;
// beta == 0 never reads C.
void ukernel16_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                          float beta, int mr, int nr);

}  // namespace qlora::cpu::bf16_k
