// Q8_0 embedding gather (Backend::q8_0_rows): out[M, K] = deq(W)[ids[m], :]; W rows of K/32 blocks {fp16 d, int8 q[32]} (34 bytes), K % 32 == 0.
// Launcher (host declaration; kernel in ops_q8_0_rows.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void q8_0_rows(cudaStream_t stream, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out);

}  // namespace qlora::cuda
