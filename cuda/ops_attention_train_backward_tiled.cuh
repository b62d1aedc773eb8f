// Tiled (FlashAttention-2 style) training attention backward, fp32 SIMT: the kernels behind
// attention_train_backward (ops_attention_train_backward.cuh) for head_dim <= 128. Same contract;
// `delta` [B, Hq, T] = dO·O must already be on the stream (the launcher's delta kernel).
// bf16: the products on bf16 tensor cores (the bf16 compute contract of
// Backend::attention_train_backward_bf16); only on sm_80+ (the caller checks).
// Launcher (host declaration; kernels in ops_attention_train_backward_tiled.cu): device pointers,
// arguments validated by the caller, asynchronous on `stream`, launches checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

constexpr int64_t kAttentionBwdTiledMaxHeadDim = 128;
// Whether the tiled kernels take this shape: hd <= 128, B within a grid's z limit, and the flat
// (query, group head) rows T * Hq/Hkv within 32-bit row arithmetic.
constexpr bool attention_train_backward_tiled_fits(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd) {
  return hd >= 1 && hd <= kAttentionBwdTiledMaxHeadDim && B >= 1 && B <= 65535 && Hkv >= 1 && Hq % Hkv == 0 &&
         T >= 1 && T * (Hq / Hkv) <= 0x7fffffffLL - 1024;
}
void attention_train_backward_tiled(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                    const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                                    int64_t ldv, const int32_t* key_mask, float scale, const float* lse,
                                    const float* dout, int64_t lddo, const float* delta, float* dq, int64_t lddq,
                                    float* dk, int64_t lddk, float* dv, int64_t lddv, bool bf16);

}  // namespace qlora::cuda
