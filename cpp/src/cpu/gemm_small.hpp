// gemm_nt / gemm_tn's few-column paths (the rank-r LoRA shapes): kernels that read the wide operand
// in place or in small copied chunks instead of the blocked driver's packing (cpu/gemm.cpp). Same
// depth blocks and FMA chains as the blocked way: the same bits.
#pragma once
#include <cstdint>

#include "cpu/features.hpp"

namespace qlora::cpu {

// C[M, N] = alpha * A·Bᵀ + beta * C when 32 < N <= 48 at AVX-512 (the grouped q/k/v LoRA shrink);
// false (nothing done) elsewhere.
bool gemm_nt_skinny48(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C[M, N] = alpha * Aᵀ·B + beta * C when one side has at most 48 rows / columns against at least 128
// of the other (the LoRA factor gradients dA = dtᵀ·x, dB = dyᵀ·t) at AVX-512 / AVX2; false elsewhere.
bool gemm_tn_small(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// LoRA's expand C[M, N] += s * t[M, r]·B[N, r]ᵀ applied by the base NF4 GEMM's driver to each C block
// right after that block's last depth block (cpu/gemm.cpp, cpu/gemm_bf16_drivers.hpp), while it is in
// cache, instead of a second pass over C by gemm_nt(M, N, r, s, t, ldt, B, ldb, 1, C, ldc). It runs
// that gemm_nt's micro-kernel (level `level`, one depth block of r, alpha s, beta 1) on the same
// elements: the same bits wherever lora_tail_fits (where gemm_nt would take the blocked driver).
struct LoraTail {
  SimdLevel level = SimdLevel::Scalar;
  const float* t = nullptr;  // [M, r] row stride ldt
  int64_t ldt = 0;
  const float* B = nullptr;  // [N, r] row stride ldb
  int64_t ldb = 0;
  int64_t r = 0;
  float s = 1.0f;
  // t's rows [i0, i0 + rows) packed as the fp32 kernel's A panels, in a thread-local buffer that the
  // next pack_rows on this thread reuses.
  const float* pack_rows(int64_t i0, int64_t rows) const;
  // c[rows, cols] += s * t·Bᵀ for the rows packed in At and C columns [j0, j0 + cols) (c: their
  // top-left element, row stride ldc).
  void apply(const float* At, int64_t rows, int64_t j0, int64_t cols, float* c, int64_t ldc) const;
  // The whole of C[M, N] (paths without a blocked driver, e.g. the GEMV of small M).
  void apply_all(int64_t M, int64_t N, float* C, int64_t ldc) const;
};
// True when gemm_nt(level, M, N, r, ...) runs the blocked driver's micro-kernel in one depth block.
bool lora_tail_fits(SimdLevel level, int64_t M, int64_t N, int64_t r);

}  // namespace qlora::cpu
