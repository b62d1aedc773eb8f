// Kernels of the training attention (cpu/ops_attention_train.cpp, ops_attention_train_bf16.cpp drive
// them). Declarations only (cpu/README.md), so the *_avx512.cpp / *_avx512bf16.cpp files may include it.
#pragma once
#include <cstdint>

namespace qlora::cpu::attn_train_k {

// delta[r] = Σ_i go_r[i] * o_r[i] over i = 0..hd-1 in order, each product rounded to fp32 and added
// to the fp32 running sum (no FMA), for the rows go_r = go + r * ldg, o_r = o + r * ldo, r < n:
// bit for bit the plain loop `d += go[i] * o[i]` compiled without FMA contraction (one row per lane).
void delta_rows_avx512(int64_t n, int64_t hd, const float* go, int64_t ldg, const float* o, int64_t ldo,
                       float* delta);
// The same at AVX2 (8 rows per vector).
void delta_rows_avx2(int64_t n, int64_t hd, const float* go, int64_t ldg, const float* o, int64_t ldo, float* delta);

// ---- fp32 (the scalar ops of ops_attention_train.cpp in one SIMD pass each; same bits).

// The backward's probabilities and score gradients of one (query block, head) in fp32, in place:
// row i (query t0 + i) of S / dP (row stride ld, columns j < nk; n_vis = clamp(t0 + i + 1, 0, nk)):
//   S  <- P  = exp(S - lse[i]) (the level's SIMD exp, as rowk exp_scale with scale 1) for j < n_vis,
//         0 for a masked key (km[j] == 0; km nullptr: all visible), on a row with lse = -inf, and past n_vis;
//   dP <- dS = P * (dP - delta[i]) * scale (two fp32 products, in that order) for j < n_vis, +0 past it.
// Bit for bit probs_from_lse + dscores_causal.
void probs_dscores_avx512(int64_t rows, int64_t nk, int64_t t0, float* S, float* dP, int64_t ld, const float* lse,
                          const float* delta, float scale, const int32_t* km);
void probs_dscores_avx2(int64_t rows, int64_t nk, int64_t t0, float* S, float* dP, int64_t ld, const float* lse,
                        const float* delta, float scale, const int32_t* km);
// r[j] *= inv for j < n, r[j] = 0 for n <= j < nk (the forward softmax's normalization, one fp32 product).
void scale_fill_avx512(float* r, int64_t n, int64_t nk, float inv);
void scale_fill_avx2(float* r, int64_t n, int64_t nk, float inv);

// ---- AVX512-BF16 (call only after cpu_has_avx512_bf16()). Pair words as cpu/gemm_bf16_kernels.hpp:
// one uint32 = {bf16 of the even k (low half), bf16 of the odd k (high half)}, RNE as vcvtne2ps2bf16.

// C[mr, nr] (ld ldc) = alpha * A·Bp + beta * C over kp pairs, A read in place: pair (i, p) at
// A[i * rs + p * cs]; Bp a packed B panel (bf16_k::kNR columns, 64-byte aligned). Per element the
// vdpbf16ps chain of bf16_k::ukernel_avx512bf16 (from 0, p in order; beta == 0 ? alpha * acc :
// fma(beta, C, alpha * acc)): identical results to packing A first. mr <= bf16_k::kMR, nr <= kNR.
// half: where nr <= 16, only the panel's first 16 columns are computed (same bits, half the work).
void ukernel_direct_avx512bf16(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, float* C,
                               int64_t ldc, float alpha, float beta, int mr, int nr, bool half = false);
// dst[r * ldd + j] = bf16(src[r * lds + j] * (scale ? scale[r] : 1)) for r < rows, j < n, and
// dst[r * ldd + n] = 0 when n is odd (so the row reads as ceil(n / 2) whole pairs). ldd even.
void rows_to_bf16_avx512bf16(const float* src, int64_t lds, int64_t rows, int64_t n, const float* scale,
                             uint16_t* dst, int64_t ldd);

// The backward's probabilities and score gradients of one (query block, head), written only as the
// bf16 operands of the three products that read them. Row i (query t0 + i) of S / dP (row stride
// ld, read at the columns j < n_vis = clamp(t0 + i + 1, 0, nk) only): the scores scale q·kᵀ and
// dout·vᵀ; lse[i], delta[i] of that query; km: key mask over the nk keys, or nullptr (all visible).
//   P  = exp(S - lse) (the SIMD exp of cpu/simd_exp_avx512.hpp, as rowk exp_scale), 0 for a masked key,
//        past n_vis, or on a row with lse = -inf;
//   dS = P * (dP - delta) * scale (two fp32 products, in that order) for j < n_vis, +0 past it;
//   Db[i * ldb + j] = bf16(dS) (+ a 0 at j = nk for odd nk), D2[p * ldp + j] = pair(dS[2p][j],
//   dS[2p+1][j]), P2 likewise of P (an odd last row pairs with 0).
// Bit for bit probs_from_lse + dscores_causal, then the bf16 conversion (vcvtne2ps2bf16 rounding) as
// the packing way does it, in one pass. D2 / P2 (rows = pairs of queries) are read in place as the A
// of dSᵀ·q and Pᵀ·dout (A(i, p) at D2[p * ldp + i]).
void probs_dscores_bf16_avx512bf16(int64_t rows, int64_t nk, int64_t t0, const float* S, const float* dP, int64_t ld,
                                   const float* lse, const float* delta, float scale, const int32_t* km,
                                   uint16_t* Db, int64_t ldb, uint32_t* D2, uint32_t* P2, int64_t ldp);

// The transposed pair layout of rows of X (the A of dk / dv on AMX tiles, cpu/attention_amx.hpp):
// dst[c * ldd + p] = pair(bf16(X[2p][c]), bf16(X[2p + 1][c])) for c < cols_pad, p < pairs_pad, with
// X[r][c] = 0 for r >= rows or c >= cols (the same pair words as bf16_k::pack_cols_avx512bf16's panels,
// transposed). cols_pad a multiple of 16.
void pairs_t_avx512bf16(const float* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldd,
                        int64_t cols_pad, int64_t pairs_pad);

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (fp32 words moved, no arithmetic).
void transpose_f32_avx512bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);

}  // namespace qlora::cpu::attn_train_k
