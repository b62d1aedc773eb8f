// Q8_0 GEMM (Backend::q8_0_gemm_nt, the lm_head of a GGUF with a Q8_0 tied embedding): Y[M, N] (row stride ldy) = X[M, K] (row stride ldx) · deq(W)ᵀ, W [N rows of K/32 34-byte blocks].
// Launcher (host declaration; kernel in ops_q8_0_gemm.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void q8_0_gemm_nt(cudaStream_t stream, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                  float* Y, int64_t ldy);

}  // namespace qlora::cuda
