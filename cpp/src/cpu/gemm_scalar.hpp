// Scalar reference GEMMs: plain loops with double accumulation, no blocking, no threads.
// They are the oracle the optimized kernels are tested against (with numpy float64).
#pragma once
#include <cstdint>

#include "tensor_types.hpp"

namespace qlora::cpu::scalar {

void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc);

// Decodes element j of W (flat row-major index) to float32: code[nibble] * absmax[block].
float nf4_element(const Nf4Ref& W, int64_t j);
// Decodes the absmax of block b (double quant: map[code] * nested[b / 256] + offset).
float nf4_block_absmax(const Nf4Ref& W, int64_t b);

void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                 int64_t ldy);
void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                 int64_t lddx);

}  // namespace qlora::cpu::scalar
