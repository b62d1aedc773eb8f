// Building blocks of the bf16-compute GEMM (cpu/gemm_bf16.cpp drives them). Declarations and
// constants only (no inline functions), so gemm_bf16_avx512bf16.cpp may include it (cpu/README.md).
//
// Operands are rounded to bf16 (round-to-nearest-even, denormals flushed as the hardware does) when
// packed; products of bf16 are exact in fp32 and accumulate in fp32 (vdpbf16ps). Packed layouts
// hold k in pairs, one uint32 = {bf16 of k = 2p (low half), bf16 of k = 2p + 1 (high half)}, as
// vdpbf16ps reads them; an odd tail pairs with zero, missing rows/columns are zero:
//   A panel: Ap[p * MR + i], i < MR, p < ceil(kc / 2)   (MR rows of op(A))
//   B panel: Bp[p * NR + j], j < NR, p < ceil(kc / 2)   (NR columns of op(B))
#pragma once
#include <cstdint>

namespace qlora::cpu::bf16_k {

constexpr int kMR = 14, kNR = 32;  // 28 zmm accumulators, as the fp32 AVX-512 kernel

// C[mr, nr] (ld ldc) = alpha * Ap·Bp + beta * C over kp pairs of k; beta == 0 never reads C.
void ukernel_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                        float beta, int mr, int nr);
// Panel of width W (kMR or kNR) from n <= W rows of a row-major [*, kc] fp32 source (k along a row):
//   P[p * W + i] = pair(src[i * ld + 2p], src[i * ld + 2p + 1])
void pack_rows_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, int W, uint32_t* P);
// pack_rows_avx512bf16 with W = kMR (an A panel), the same values; whole 32-k steps stored as 14
// whole vectors.
void pack_a_panel_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, uint32_t* P);
// Panel of width W from n <= W columns of a row-major [kc, *] fp32 source (k down a column):
//   P[p * W + i] = pair(src[2p * ld + i], src[(2p + 1) * ld + i])
void pack_cols_avx512bf16(const float* src, int64_t ld, int n, int64_t kc, int W, uint32_t* P);
// ceil(n / kNR) panels of width kNR (the last zero-padded) from n columns of a row-major [kc, *]
// fp32 source, panel q at P + q * panel_stride (kNR * ceil(kc / 2) for whole panels; larger when
// filling a few pairs of taller panels); sweeps each row pair across all n columns (sequential
// reads, where one panel at a time reads 128 bytes of every row).
void pack_cols_panels_avx512bf16(const float* src, int64_t ld, int64_t n, int64_t kc, uint32_t* P,
                                 int64_t panel_stride);
// One NT B panel (the same values as pack_rows_avx512bf16 with W = kNR on the fp32 decode) straight
// from NF4: nr <= kNR weight rows, row r's run = flat elements [f0 + r * K, + kc), kc a multiple of
// 32 (the caller packs a ragged tail the old way). Needs f0 and K multiples of the blocksize's
// alignment so every row meets its block boundaries at the same k (K % blocksize == 0, f0 even):
// scl[b * kNR + r] = absmax of row r's b-th block from its first (b = ((f0 + k) >> bs_log2) -
// (f0 >> bs_log2)). Element = codes[nibble] * absmax in fp32, then RNE to bf16 (vcvtne2ps2bf16).
// One row pair of NN B panels (pack_cols_panels_avx512bf16's values on the fp32 decode) straight
// from NF4: row 2p's n columns = flat elements [f0, f0 + n), row 2p + 1's = [f1, + n) (s1 null: no
// second row, zeros), n, f0 and f1 multiples of 16 (16-element chunks never straddle a block,
// blocksize >= 32); s0 / s1 the rows' block absmax from their first (RunScales::fill). Pairs go to
// P + q * panel_stride + j for column q * kNR + j, the last panel zero-padded.
void pack_nf4_nn_pair_avx512bf16(const uint8_t* packed, int64_t f0, int64_t f1, int64_t n, const float* s0,
                                 const float* s1, int bs_log2, const float* codes, uint32_t* P, int64_t panel_stride);
void pack_nf4_nt_avx512bf16(const uint8_t* packed, int64_t f0, int64_t K, int nr, int64_t kc, const float* scl,
                            int bs_log2, const float* codes, uint32_t* P);

}  // namespace qlora::cpu::bf16_k
