// RMSNorm backward (Backend::rmsnorm_backward): for y = w ⊙ x r, r = (mean(x²) + eps)^-1/2,
// dx[M, D] = r (w ⊙ dy) - x r³/D Σ_j w_j dy_j x_j (no dw: norms are frozen); dx may alias dy.
// Launcher (host declaration; kernel in ops_rmsnorm_backward.cu): device pointers, arguments
// validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void rmsnorm_backward(cudaStream_t stream, int64_t M, int64_t D, const float* x, const float* w, float eps,
                      const float* dy, float* dx);

}  // namespace qlora::cuda
