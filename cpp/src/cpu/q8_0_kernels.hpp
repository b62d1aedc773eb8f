// Q8_0 GEMV kernels, one per SIMD level (cpu/q8_0_kernels_*.cpp: plain functions, see cpu/README.md).
// Declarations only: the level-neutral dispatcher (cpu/q8_0.cpp) picks one after checking the level.
#pragma once
#include <cstdint>

namespace qlora::cpu {

// Y[m, n] = X[m, :] · deq(W row n) for m < M, n in [n0, n1). W: rows of K/32 Q8_0 blocks of 34
// bytes back to back (K % 32 == 0); X [M, ldx]; Y [M, ldy]. M <= 8 (AVX-512, AVX2) or <= 4 (generic).
void q8_0_gemv_generic(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                       const uint8_t* W, float* Y, int64_t ldy);
void q8_0_gemv_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint8_t* W,
                    float* Y, int64_t ldy);
void q8_0_gemv_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                      const uint8_t* W, float* Y, int64_t ldy);

}  // namespace qlora::cpu
