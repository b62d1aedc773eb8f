// SwiGLU backward (Backend::swiglu_backward): for out = silu(gate) * up [M, N],
// dgate = dout * up * silu'(gate), dup = dout * silu(gate). An output may alias an input (same
// element and stride), not the other output.
// Launcher (host declaration; kernel in ops_swiglu_backward.cu): device pointers, arguments
// validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void swiglu_backward(cudaStream_t stream, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up,
                     int64_t ldu, const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup,
                     int64_t lddu);

}  // namespace qlora::cuda
