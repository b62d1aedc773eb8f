// Residual add (Backend::add_inplace): y[n] += x[n].
// Launcher (host declaration; kernel in ops_add_inplace.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void add_inplace(cudaStream_t stream, int64_t n, const float* x, float* y);

}  // namespace qlora::cuda
