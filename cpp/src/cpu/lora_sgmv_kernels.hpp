// Per-SIMD-level expand kernels of the multi-adapter LoRA op (lora_sgmv.cpp dispatches to them).
// Plain declarations only (no inline functions): the *_avx2.cpp / *_avx512.cpp files include this.
#pragma once
#include <cstdint>

namespace qlora::cpu::sgmv_detail {

// Expand: y[m, n] += alpha * sum_{j < r} t[m, j] * B[n, j] for m < M, n in [n0, n1); t[M, r] (row
// stride ldt), B[out, r] (row stride ldb), y (row stride ldy). Every level computes each output as
// one fused multiply-add chain over j = 0..r-1 (acc = fma(t[m, j], B[n, j], acc)), then
// y = fma(alpha, acc, y), so a row's result depends neither on M nor on the column split. The SIMD
// levels read a [16 or 8 columns x 16 or 8 ranks] block of B once and transpose it in registers,
// so B is streamed once for all M rows.
void expand_generic(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                    const float* B, int64_t ldb, float* y, int64_t ldy);
void expand_avx2(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                 const float* B, int64_t ldb, float* y, int64_t ldy);
void expand_avx512(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                   const float* B, int64_t ldb, float* y, int64_t ldy);

}  // namespace qlora::cpu::sgmv_detail
