// bf16 tensor-core GEMM launchers (host declarations; kernels in gemm_tc.cu and nf4_gemm_tc.cu,
// the tile in mma_tile.cuh). Semantics of Backend::gemm_*_bf16 / nf4_gemm_*_bf16: both operands
// rounded to bf16 (RNE; NF4 decoded, then rounded), fp32 accumulation, fp32 in and out. sm_80+
// only (mma.sync bf16): the caller checks the device (kTcMinMajor) and otherwise runs the fp32
// kernels. Pointers are device memory, arguments validated by the caller; asynchronous on `stream`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "gemm.cuh"
#include "tensor_types.hpp"

namespace qlora::cuda {

constexpr int kTcMinMajor = 8;  // compute capability major of the first bf16 mma.sync (sm_80)

// False when M or N is too large for one launch's grid.
bool gemm_bf16_tc_fits(int64_t M, int64_t N);

void gemm_bf16_tc(cudaStream_t stream, int sm_count, GemmLayout layout, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Y[M, W.rows] = alpha * r(X[M, W.cols]) · r(deq(W))ᵀ + beta * Y
void nf4_gemm_nt_bf16_tc(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* X, int64_t ldx,
                         const Nf4Ref& W, float beta, float* Y, int64_t ldy);
// dX[M, W.cols] = alpha * r(dY[M, W.rows]) · r(deq(W)) + beta * dX
void nf4_gemm_nn_bf16_tc(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* dY, int64_t lddy,
                         const Nf4Ref& W, float beta, float* dX, int64_t lddx);

}  // namespace qlora::cuda
