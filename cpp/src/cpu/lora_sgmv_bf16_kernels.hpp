// bf16 kernels of the multi-adapter LoRA op (the serving path's bf16 inference copies of A and B,
// Backend::lora_pack_bf16). Declarations and constants only: lora_sgmv_kernels_avx512bf16.cpp
// includes this (cpu/README.md rules).
//
// Packed module (uint32 words, each a pair {bf16 of k = 2p (low half), bf16 of k = 2p + 1 (high
// half)}, as vdpbf16ps reads them; odd tails pair with zero, missing lanes are zero):
//   A part: rank block nb < ceil(r / 16), pair p < ceil(in / 2), lane i < 16:
//           word (nb * ceil(in / 2) + p) * 16 + i = pair(A[16 nb + i, 2p], A[16 nb + i, 2p + 1])
//   B part (right after A): column block nb < ceil(out / 16), pair p < ceil(r / 2), lane i:
//           word (nb * ceil(r / 2) + p) * 16 + i = pair(B[16 nb + i, 2p], B[16 nb + i, 2p + 1])
// Both kernels broadcast one pair of a row (x or t) against 16 lanes of packed words, so no
// transpose or horizontal sum is needed. Every output lane is ONE fixed chain of fp32 accumulations
// (the shrink: two chains over p mod 2, summed c0 + c1; the expand: one chain over p), whatever M or the column range: a row's result does not depend on the rows sharing its call.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qlora::cpu::sgmv_bf16 {

// Layout helpers (sgmv_bf16::pairs, blocks, a_words, ...): cpu/lora_sgmv.hpp (inline functions stay
// out of the per-level files).

// The packed layout above of src[n, k] (row stride k; n rows become lanes): the copy's A part
// (n = r, k = in) or B part (n = out, k = r). Same bits as the scalar packer (RNE, denormals flushed).
void pack_lanes_avx512bf16(int64_t n, int64_t k, const float* src, uint32_t* dst);
// xp[m * ldxp + p] = pair(x[m, 2p], x[m, 2p + 1]) for p < ceil(K / 2) (RNE, as vcvtne2ps2bf16).
void round_pairs_avx512bf16(int64_t M, int64_t K, const float* x, int64_t ldx, uint32_t* xp, int64_t ldxp);
// Shrink of rank blocks [nb0, nb1): tp[m * ldtp + 8 nb + q] = pair of bf16(t[m, 16 nb + 2q]),
// bf16(t[m, 16 nb + 2q + 1]) with t[m, j] = sum_k x[m, k] A[j, k] (kp = ceil(in / 2) pairs).
void shrink_avx512bf16(int64_t M, int64_t nb0, int64_t nb1, int64_t kp, const uint32_t* xp, int64_t ldxp,
                       const uint32_t* Ap, uint32_t* tp, int64_t ldtp);
// Expand of output columns [n0, n1): y[m, n] = fma(alpha, sum_j t[m, j] B[n, j], y[m, n]) with
// kp = ceil(r / 2) pairs of the rounded t (tp, row stride ldtp) and the B part Bp.
void expand_avx512bf16(int64_t M, int64_t n0, int64_t n1, int64_t kp, const uint32_t* tp, int64_t ldtp,
                       const uint32_t* Bp, float alpha, float* y, int64_t ldy);

}  // namespace qlora::cpu::sgmv_bf16
