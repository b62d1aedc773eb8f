// Entry points of the AVX512-BF16 NF4 GEMV kernel (nf4_gemv_bf16_avx512bf16.cpp), called by
// nf4_gemv_bf16.cpp. Plain declarations only (the kernel file is built with -mavx512bf16).
#pragma once
#include <cstdint>

namespace qlora::cpu::nf4_gemv_detail {
struct Args;
}

namespace qlora::cpu::nf4_gemv_bf16_detail {

// Rows [r0, r1) of Y[M, N] = alpha * Xb · Wᵀ + beta * Y (a plain aggregate: no inline constructor).
struct Args {
  int64_t M;               // 1..8
  int64_t K;               // W.cols, K % 64 == 0
  const uint8_t* packed;   // [(N*K)/2], element 2i in the high nibble of byte i
  const float* absmax;     // absmax[b - block0]: decoded scale of block b
  int64_t block0;
  int bs_shift;            // blocksize = 1 << bs_shift >= 64
  const float* codes;      // [16] NF4 code values
  const uint16_t* xb;      // [M, K] X rounded to bf16 and regrouped (regroup_x_bf16)
  float alpha, beta;
  float* y;
  int64_t ldy;
  int64_t pf_l1, pf_l2;    // software prefetch distances (bytes of packed W)
  // Other bytes to bring into L2 while rows [r0, r1) of this call are computed (the fused LoRA
  // factors, cpu::GemvTail::prefetch), spread evenly over the row pairs; null: none.
  const char* pf_lo;
  const char* pf_hi;
};

// X[M, K] -> xb[M, K]: bf16 (RNE) in the order the kernel looks weights up: per 64 columns,
// slot s < 32 holds column 2s + 1 (low nibbles), slot 32 + s column 2s (high nibbles).
void regroup_x_bf16(int64_t M, int64_t K, const float* X, int64_t ldx, uint16_t* xb);
void rows_bf16(const Args& a, int64_t r0, int64_t r1);

// M = 1, the bf16 contract on fp32 FMAs (nf4_gemv_bf16_m1_avx512bf16.cpp): bits of
// nf4_gemv_detail::rows_avx512_m1_pairs with round_bf16 set, a.x regrouped (m1 order) and rounded.
void rows_m1_fp32(const nf4_gemv_detail::Args& a, int64_t r0, int64_t r1);
void rows_m1_fp32_quads(const nf4_gemv_detail::Args& a, int64_t r0, int64_t r1);  // four rows a group, same bits
// x[0, n) <- bf16_round(x) in place (RNE, denormals to signed zero, NaN quieted), by vcvtneps2bf16:
// the fp32-FMA variant's X (the scalar loop cost ~3 ns a column per call, serial before the job).
void round_x_bf16(float* x, int64_t n);

}  // namespace qlora::cpu::nf4_gemv_bf16_detail
