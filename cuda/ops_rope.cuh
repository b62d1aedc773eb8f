// Rotate-half RoPE (Backend::rope), in place on x[M, n_heads * head_dim] (row stride ldx):
// angle = float(pos[m]) * inv_freq[i] (fp32, as transformers), sin/cos evaluated in fp64 so
// --use_fast_math cannot degrade large angles; inverse: the transposed rotation (rope_backward).
// Launcher (host declaration; kernel in ops_rope.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void rope(cudaStream_t stream, int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
          const float* inv_freq, bool inverse);

}  // namespace qlora::cuda
