// 16-bit-row GEMM (Backend::half_gemm_nt, the lm_head of head_format "f16" / "bf16"): Y[M, N] (row stride
// ldy) = X[M, K] (row stride ldx) · wide(W)ᵀ, W [N rows of K fp16 values, or bf16 when bf16], fp32
// accumulation. Launcher (host declaration; kernel in ops_half_gemm.cu): device pointers, arguments
// validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void half_gemm_nt(cudaStream_t stream, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                  const void* W, float* Y, int64_t ldy);

}  // namespace qlora::cuda
