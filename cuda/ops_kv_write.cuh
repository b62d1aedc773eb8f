// KV-cache append (Backend::kv_write): cache[b, h, start + t, :] = x[b*T + t, h*hd : (h+1)*hd];
// cache [B, H, S_cap, hd], x row stride ldx.
// Launcher (host declaration; kernel in ops_kv_write.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void kv_write(cudaStream_t stream, int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache,
              int64_t S_cap, int64_t start);
// Backend::kv_write_bf16: the same into a bf16 cache (bit patterns), rounded as the CPU rounds.
void kv_write_bf16(cudaStream_t stream, int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx,
                   uint16_t* cache, int64_t S_cap, int64_t start);

}  // namespace qlora::cuda
