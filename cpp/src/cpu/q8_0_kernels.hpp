// Q8_0 GEMV and decode kernels, one per SIMD level (cpu/q8_0_kernels_*.cpp: plain functions, see cpu/README.md).
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

// Rows [r0, r0 + rows) x columns [c0, c0 + n) of E (rows of D / 32 Q8_0 blocks, D % 32 == 0)
// dequantized into out[r * ldo + j] (exact: fp16 scale x int8, the bits of q8_0_rows), and
// out[r * ldo + j] = 0 for n <= j < width: the fused lm_head GEMMs' B panels (cpu/q8_0_head.cpp).
using Q8DecodeTileFn = void (*)(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                                int64_t width, float* out, int64_t ldo);
void q8_0_decode_tile_generic(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                              int64_t width, float* out, int64_t ldo);
void q8_0_decode_tile_avx2(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                           int64_t width, float* out, int64_t ldo);
void q8_0_decode_tile_avx512(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                             int64_t width, float* out, int64_t ldo);

}  // namespace qlora::cpu
