// AdamW on one contiguous fp32 buffer (Backend::adamw_update): p, m, v updated in place from g
// over n elements, per element the float operations of train::adamw_update in the same order,
// each IEEE-rounded (ieee_ops.cuh), so the result equals the CPU backend's bit for bit.
// Launcher (host declaration; kernel in ops_adamw.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "train/optimizer.hpp"

namespace qlora::cuda {

void adamw_update(cudaStream_t stream, int64_t n, float* p, const float* g, float* m, float* v,
                  const train::AdamWScalars& s);

}  // namespace qlora::cuda
