// NF4 GEMV launchers for small M (decode; host declarations, kernels in nf4_gemv.cu): each byte of
// the packed weight is read once (by one warp) and decoded in registers. Semantics of
// Backend::nf4_gemm_nt / nf4_gemm_nn for 1 <= M <= kNf4GemvMaxM; device pointers; arguments
// validated by the caller. Deterministic (no atomics). Asynchronous on `stream`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "tensor_types.hpp"

namespace qlora::cuda {

// nf4_gemm_nt / nf4_gemm_nn route M <= this to the GEMV kernels.
constexpr int64_t kNf4GemvMaxM = 4;

// Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y
void nf4_gemv_nt(cudaStream_t stream, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy);
// dX[M, W.cols] = alpha * dY[M, W.rows] · deq(W) + beta * dX
void nf4_gemv_nn(cudaStream_t stream, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                 float beta, float* dX, int64_t lddx);

}  // namespace qlora::cuda
