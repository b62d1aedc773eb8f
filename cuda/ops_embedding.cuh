// Embedding gather (Backend::embedding): out[M, D] = table[ids[m], :], ids int32 [M] in [0, V).
// Launcher (host declaration; kernel in ops_embedding.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void embedding(cudaStream_t stream, int64_t M, int64_t D, const float* table, const int32_t* ids, float* out);

}  // namespace qlora::cuda
