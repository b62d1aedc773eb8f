// RMSNorm (Backend::rmsnorm): out[M, D] = w[D] * (x / sqrt(mean_row(x²) + eps)); out may alias x.
// Launcher (host declaration; kernel in ops_rmsnorm.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void rmsnorm(cudaStream_t stream, int64_t M, int64_t D, const float* x, const float* w, float eps, float* out);

}  // namespace qlora::cuda
