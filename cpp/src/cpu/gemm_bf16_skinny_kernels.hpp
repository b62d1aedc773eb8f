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

// Row-dot form for row-major op(A) (gemm_nt / gemm_nn: x·Aᵀ, dy·B): op(A) rows read once, in order,
// converted to bf16 pairs in registers (no packed copy: it streams from memory as the fp32 kernel
// does); lanes run over k, 2 rows x 8 columns per pass, one horizontal-sum tree per pass.
// W panel of 16 rows (columns of C) in k order: W[j * kq + q] = pair(w[j][2q], w[j][2q + 1]) in
// the order _mm512_cvtne2ps_pbh leaves a 32-k run (k 0..15 low half, 16..31 high half);
// kq = ceil(K / 32) * 16; zero past K and in rows j >= n. 64-byte aligned.
void pack_w16_avx512bf16(const float* src, int64_t ld, int n, int64_t K, int64_t kq, uint32_t* W);
// C[i, j] = alpha * sum_k r(X[i, k]) r(w[j][k]) + beta * C[i, j] for i < m, j < n <= 16
// (beta == 0 never reads C).
void rowdot16_avx512bf16(int64_t m, int64_t K, const float* X, int64_t ldx, const uint32_t* W, int64_t kq, float* C,
                         int64_t ldc, float alpha, float beta, int n);
// The same, one row x 16 columns per pass (16 W loads per 16 vdpbf16ps: for a W panel in L1).
void rowdot16x1_avx512bf16(int64_t m, int64_t K, const float* X, int64_t ldx, const uint32_t* W, int64_t kq, float* C,
                           int64_t ldc, float alpha, float beta, int n);

}  // namespace qlora::cpu::bf16_k
