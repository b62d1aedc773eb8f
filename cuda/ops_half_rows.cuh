// 16-bit-row embedding gather (Backend::half_rows, head_format "f16" / "bf16"): out[M, K] = wide(W)[ids[m], :];
// W rows of K IEEE fp16 values, or bf16 when bf16. Launcher (host declaration; kernel in ops_half_rows.cu):
// device pointers, arguments validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch
// errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void half_rows(cudaStream_t stream, bool bf16, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out);

}  // namespace qlora::cuda
