// Tiled NF4 GEMM launchers (host declarations; kernels in nf4_gemm.cu): the fp32 tile kernel with
// B decoded from NF4 while each tile is loaded into shared memory, so W is never materialized in
// fp32. Semantics of Backend::nf4_gemm_nt / nf4_gemm_nn; pointers (including W's) are device
// memory; arguments validated by the caller; M >= 1. Asynchronous on `stream`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "tensor_types.hpp"

namespace qlora::cuda {

// Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y
void nf4_gemm_nt_tiled(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* X, int64_t ldx,
                       const Nf4Ref& W, float beta, float* Y, int64_t ldy);
// dX[M, W.cols] = alpha * dY[M, W.rows] · deq(W) + beta * dX
void nf4_gemm_nn_tiled(cudaStream_t stream, int sm_count, int64_t M, float alpha, const float* dY, int64_t lddy,
                       const Nf4Ref& W, float beta, float* dX, int64_t lddx);

}  // namespace qlora::cuda
