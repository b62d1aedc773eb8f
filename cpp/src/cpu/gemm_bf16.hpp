// bf16-compute GEMMs (compute_dtype="bfloat16"): the same layouts and semantics as cpu/gemm.hpp,
// with both operands rounded to bf16 (round-to-nearest-even; NF4 weights decoded to fp32 as in
// the fp32 kernels, then rounded) and fp32 accumulation. Levels:
//   Scalar: the oracle (emulated rounding, products summed in double, no threads);
//   AVX512 on a CPU with AVX512-BF16: vdpbf16ps kernels (gemm_bf16_avx512bf16.cpp), or where the CPU and
//     OS allow AMX-BF16 tiles the AMX micro-kernel on the same B panels (gemm_bf16_amx.hpp; QLORA_AMX=0 off);
//   anything else: the fp32 kernels of that level (bf16_compute_available() is false; callers warn).
#pragma once
#include <cstdint>

#include "cpu/features.hpp"
#include "tensor_types.hpp"

namespace qlora::cpu {

bool bf16_compute_available(SimdLevel level);
// x rounded to bf16 (RNE; denormal inputs and results flushed to zero, NaN kept quiet, as
// vcvtne2ps2bf16 does), returned as fp32.
float bf16_round(float x);

void gemm_nt_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_nn_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_tn_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void nf4_gemm_nt_bf16(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W,
                      float beta, float* Y, int64_t ldy);
// Y_i = X · deq(W_i)ᵀ (alpha 1, beta 0) for n weights sharing X: each output bit-identical to
// nf4_gemm_nt_bf16's; for 2..kNf4ManyMax weights of the same in_features X's bf16 panels packed once.
constexpr int64_t kNf4ManyMax = 8;
void nf4_gemm_nt_many_bf16(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                           float* const* Y, const int64_t* ldy);
void nf4_gemm_nn_bf16(SimdLevel level, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                      float beta, float* dX, int64_t lddx);

}  // namespace qlora::cpu
