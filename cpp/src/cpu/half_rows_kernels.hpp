// 16-bit-row GEMV kernels, one per SIMD level (cpu/half_rows_kernels_*.cpp: plain functions, see
// cpu/README.md). Declarations only: the level-neutral dispatcher (cpu/half_rows.cpp) picks one
// after checking the level.
#pragma once
#include <cstdint>

namespace qlora::cpu {

// Y[m, n] = X[m, :] · wide(W row n) for m < M, n in [n0, n1). W: rows of K 16-bit values (bf16 != 0:
// bf16, else fp16), any K >= 1; X [M, ldx]; Y [M, ldy]. M <= 8 (AVX-512, AVX2) or <= 4 (generic).
void half_gemv_generic(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                       const uint16_t* W, float* Y, int64_t ldy);
void half_gemv_avx2(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                    const uint16_t* W, float* Y, int64_t ldy);
void half_gemv_avx512(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                      const uint16_t* W, float* Y, int64_t ldy);
// out[i] = wide(h[i]) for i < n (the embedding gather and the chunked GEMMs' widening).
void half_widen_avx2(int bf16, const uint16_t* h, int64_t n, float* out);
void half_widen_avx512(int bf16, const uint16_t* h, int64_t n, float* out);

}  // namespace qlora::cpu
