// SwiGLU (Backend::swiglu): out[M, N] = silu(gate) * up, row strides ldg / ldu / ldo; out may alias gate or up.
// Launcher (host declaration; kernel in ops_swiglu.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void swiglu(cudaStream_t stream, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
            float* out, int64_t ldo);

}  // namespace qlora::cuda
