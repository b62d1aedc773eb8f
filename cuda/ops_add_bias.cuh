// Bias add (Backend::add_bias): y[M, N] (row stride ldy) += bias[N].
// Launcher (host declaration; kernel in ops_add_bias.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void add_bias(cudaStream_t stream, int64_t M, int64_t N, const float* bias, float* y, int64_t ldy);

}  // namespace qlora::cuda
