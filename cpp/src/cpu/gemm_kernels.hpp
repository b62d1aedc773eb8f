// Per-SIMD-level building blocks of the blocked GEMM (cpu/gemm.cpp drives them). Only constants
// and declarations live here (no inline functions), so the *_avx2.cpp / *_avx512.cpp kernel files
// may include it without leaking code compiled for their ISA (cpu/README.md).
//
// Packed layouts (zero-padded to full panels):
//   A panel: Ap[k * MR + i], i < MR, k < kc   (MR rows of op(A), k-major)
//   B panel: Bp[k * NR + j], j < NR, k < kc   (NR columns of op(B), k-major)
#pragma once
#include <cstdint>

namespace qlora::cpu::gemm_k {

// Micro-tile sizes per level: MR rows (broadcast operand) x NR columns (vector operand).
constexpr int kGenericMR = 6, kGenericNR = 8;
constexpr int kAvx2MR = 6, kAvx2NR = 16;
constexpr int kAvx512MR = 14, kAvx512NR = 32;

// C[mr, nr] (ld ldc) = alpha * Ap·Bp + beta * C for a kc-deep pair of packed panels; mr <= MR,
// nr <= NR select the valid corner; beta == 0 never reads C.
using UkernelFn = void (*)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha,
                           float beta, int mr, int nr);
// The same with A read in place (no packed panel): element (i, k) of the tile at A[i * rs + k * cs].
// Used where every A element meets a single B micro-panel (N <= NR: the rank-r LoRA factors), so
// packing A cost about as much as the FMAs. Same FMA chain per element: identical results.
using UkernelDirectFn = void (*)(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C,
                                 int64_t ldc, float alpha, float beta, int mr, int nr);
// B panel from nr rows of a row-major [*, kc] source (gemm_nt: rows of W are columns of op(B)):
//   Bp[k * NR + j] = B[j * ldb + k]
using PackBTFn = void (*)(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
// B panel from kc rows of a row-major [kc, *] source: Bp[k * NR + j] = B[k * ldb + j]
using PackBNFn = void (*)(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
// A panel from mr rows of a row-major [*, kc] source: Ap[k * MR + i] = A[i * lda + k] (rows
// mr <= i < MR zero). Levels without one use the portable cpu/pack.hpp version.
using PackATFn = void (*)(const float* A, int64_t lda, int mr, int64_t kc, float* Ap);
// NF4 decode of the flat elements [j0, j0 + len) of a packed weight into out[len]:
//   out[t] = codes[nibble(j0 + t)] * scale[((j0 + t) >> bs_log2) - (j0 >> bs_log2)]
// codes: the 16 NF4 values; scale: decoded absmax of the blocks the run touches.
using Nf4DecodeFn = void (*)(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                             const float* codes, float* out);

void ukernel_generic(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
                     int mr, int nr);
void pack_b_t_generic(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void pack_b_n_generic(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void nf4_decode_generic(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                        const float* codes, float* out);

void ukernel_avx2(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
                  int mr, int nr);
void ukernel_direct_avx2(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C, int64_t ldc,
                         float alpha, float beta, int mr, int nr);
// tn_small_avx512's contract (below) for all mr <= kTnSmallRowsAvx2 rows of a strip of nr <=
// kTnSmallColsAvx2 columns (6 x 16 register tiles; B copied in k chunks that stay in L1).
constexpr int kTnSmallRowsAvx2 = 48, kTnSmallColsAvx2 = 64;
void tn_small_avx2(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                   float alpha, float beta, int mr, int nr, bool trans);
void pack_b_t_avx2(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void pack_b_n_avx2(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void pack_a_t_avx2(const float* A, int64_t lda, int mr, int64_t kc, float* Ap);
void nf4_decode_avx2(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                     const float* codes, float* out);
// NF4 gemm_nn B panel in one call: Bp[k * 16 + t] = codes[nibble(f0 + k * ld + t)] * scale[k] for
// t < 16, k < kc. f0 and ld are multiples of 16, so each row run is 8 whole bytes inside one block
// (blocksize >= 16). Same products as nf4_decode_avx2 row by row; two rows per step.
void nf4_panel_n_avx2(const uint8_t* packed, int64_t f0, int64_t ld, int64_t kc, const float* scale,
                      const float* codes, float* Bp);

void ukernel_avx512(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
                    int mr, int nr);
// gemm_tn with few rows (the rank-r LoRA gradients dA = dtᵀ·x, dBᵀ = tᵀ·dy): a tile of mr <= 8
// rows x nr <= 32 columns of Aᵀ·B over kc, both operands read in place (A [kc, *]: row i of the tile
// is column i of A; B [kc, *]), so the big operand streams once and nothing is packed. C[i, j] =
// alpha * acc + beta * C, or with trans C[j * ldc + i]. Per element the FMA chain of the packed
// micro-kernel (acc = fma(a_k, b_k, acc) from 0, then beta == 0 ? alpha * acc :
// fma(beta, C, alpha * acc)), so results equal gemm_tn's blocked way bit for bit.
constexpr int kTnSmallRows = 8, kTnSmallCols = 32;
void tn_small_avx512(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     float alpha, float beta, int mr, int nr, bool trans);
// The same contract for all mr <= kTnSmallRowsCopy rows of a strip of nr <= kTnSmallColsCopy
// columns: 8 x 32 tiles over 64-row chunks of B's strip copied contiguous (as tn_small_avx2).
constexpr int kTnSmallRowsCopy = 48, kTnSmallColsCopy = 64;
void tn_small_copy_avx512(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          float alpha, float beta, int mr, int nr, bool trans);
// gemm_nt with 32 < N <= 48 (LoRA's grouped q/k/v shrink, R = 48): C[i, j < nr] of mr <= 8
// rows from A read in place (row i at A + i * lda) and Bp [kc][48] (zero past nr); per element the
// packed micro-kernel's FMA chain and epilogue, so the bits of the blocked way (32 + 16 panels).
constexpr int kSkinny48Rows = 8;
// Bp[k][j] = B[j * ldb + k] for k < kc, j < nr <= 48 (0 for j >= nr); Bp 64-byte aligned.
void pack_b_t48_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void skinny48_avx512(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc, float alpha,
                     float beta, int mr, int nr);
void ukernel_direct_avx512(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C, int64_t ldc,
                           float alpha, float beta, int mr, int nr);
void pack_b_t_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void pack_b_n_avx512(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp);
void pack_a_t_avx512(const float* A, int64_t lda, int mr, int64_t kc, float* Ap);
void nf4_decode_avx512(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                       const float* codes, float* out);

}  // namespace qlora::cpu::gemm_k
