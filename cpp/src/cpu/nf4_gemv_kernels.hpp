// Per-SIMD-level entry points of the NF4 GEMV (nf4_gemv.cpp dispatches to them). Plain
// declarations only (no inline functions): the *_avx2.cpp / *_avx512.cpp files include this.
#pragma once
#include <cstdint>

namespace qlora::cpu::nf4_gemv_detail {

// A plain aggregate (no member initializers: no implicit inline constructor in SIMD files).
// Everything a kernel needs for rows [r0, r1) of Y[M, N] = alpha * X · deq(W)ᵀ + beta * Y.
struct Args {
  int64_t M;               // 1 <= M <= kNf4GemvMaxM
  int64_t K;               // W.cols
  const uint8_t* packed;  // [(N*K+1)/2], first element of a pair in the high nibble
  const float* absmax;    // decoded block scales; absmax[b - block0] is block b's
  int64_t block0;
  int bs_shift;            // blocksize = 1 << bs_shift
  const float* codes;     // [16] NF4 code values
  const float* x;    // [M, ldx]; SIMD kernels: X regrouped (see group_size), generic: X itself
  int64_t ldx;
  float alpha, beta;  // beta == 0: Y is not read
  float* y;          // [M, ldy]
  int64_t ldy;
  // From the cache sizes (nf4_gemv.cpp, cpu/cache_info.hpp): software prefetch distances in bytes
  // of packed W (to L1 and to L2) and the bytes of X a column chunk of the wide kernels may use.
  int64_t pf_l1, pf_l2, x_chunk;
  // Other bytes to bring into L2 while the rows [r0, r1) of this call are computed (the fused LoRA
  // factors, GemvTail::prefetch_ranges), spread evenly over the rows; null: none. The AVX-512
  // kernels only (the others ignore them).
  const char* pf_lo;
  const char* pf_hi;
  // Nonzero: the bf16-compute contract on the fp32 kernels (nf4_gemv_bf16.hpp's fp32-FMA variant):
  // each block's scaled code table is rounded to bf16 (x comes rounded), so every product is exact
  // in fp32. rows_avx512 / rows_avx512_m1 only; the other levels' kernels are never given it.
  int round_bf16;
  // Nonzero: rows_avx2 (every M) decodes whole blocks with byte-table lookups (vpshufb), same bits
  // as its vpermps decode; nf4_gemv.cpp picks by a measurement per machine (cpu/tuning.hpp) or
  // QLORA_NF4_GEMV_AVX2_LOOKUP=0 / 1.
  int avx2_lookup;
};

// Columns per group of the SIMD kernels (G/2 bytes of W decoded together); they take X
// regrouped per group (order: regroup_x in nf4_gemv.cpp) and require K % G == 0.
constexpr int64_t kGroupAvx512 = 32;
constexpr int64_t kGroupAvx2 = 16;

// Any K, odd element counts, rows starting mid-byte; X in natural layout.
void rows_generic(const Args& a, int64_t r0, int64_t r1);
void rows_avx2(const Args& a, int64_t r0, int64_t r1);    // K % kGroupAvx2 == 0
void rows_avx512(const Args& a, int64_t r0, int64_t r1);  // K % kGroupAvx512 == 0

// The per-call preparation at AVX-512, same results as the level-neutral loops in nf4_gemv.cpp:
// X[M, K] regrouped for rows_avx512 into Xg[M, K] (K % kGroupAvx512 == 0), and the double-quant
// block scales out[b - b0] = map[code[b]] * nested[b >> 8] + offset for b in [b0, b1) (a multiply
// then an add, never fused, so every level decodes bit-identical scales).
void regroup_x_avx512(int64_t M, int64_t K, const float* X, int64_t ldx, float* Xg);
// X[M, K] regrouped for rows_avx2 into Xg (M * K floats, K % kGroupAvx2 == 0), returns the ldx to
// pass it with: [M, K] (ldx K) for M <= 4; [K/16][M][16] (ldx 16) for M > 4, where the kernel
// reads row m of the group at column k at Xg + M * k + 16 * m.
int64_t regroup_x_avx2(int64_t M, int64_t K, const float* X, int64_t ldx, float* Xg);
// M = 1 at AVX-512 (the decode step): X[K] regrouped in its own order (per 32 columns the 16 even
// columns, then the 16 odd ones) for rows_avx512_m1 (K % kGroupAvx512 == 0).
void regroup_x_avx512_m1(int64_t K, const float* X, float* Xg);
void rows_avx512_m1(const Args& a, int64_t r0, int64_t r1);
// The same rows two at a time (each X vector loaded once for both; bits of rows_avx512_m1), for
// blocksize >= 64 and K % blocksize == 0 (else it runs rows_avx512_m1).
void rows_avx512_m1_pairs(const Args& a, int64_t r0, int64_t r1);
// Four rows at a time (then a pair, then the odd row: each X vector loaded once per group; bits of
// rows_avx512_m1), under the conditions of rows_avx512_m1_pairs.
void rows_avx512_m1_quads(const Args& a, int64_t r0, int64_t r1);
void decode_scales_avx512(const uint8_t* code, const float* map, const float* nested, float offset, int64_t b0,
                          int64_t b1, float* out);
void decode_scales_avx2(const uint8_t* code, const float* map, const float* nested, float offset, int64_t b0,
                        int64_t b1, float* out);  // the same at AVX2

}  // namespace qlora::cpu::nf4_gemv_detail
