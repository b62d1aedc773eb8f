// Training attention (Backend::attention_train): causal GQA self-attention over the sequence
// itself, no KV cache. q[B*T, Hq*hd], k/v[B*T, Hkv*hd] (row strides ldq/ldk/ldv); query t of row b
// attends to keys s <= t with key_mask[b*T + s] != 0 (int32 [B, T]); query head h reads KV head
// h / (Hq/Hkv). out[B*T, Hq*hd] (row stride ldo) = softmax(scale * q·kᵀ) · v and
// lse[B, Hq, T] = log Σ exp(scale * q·k) over the visible keys (kept for the backward); a query
// with no visible key gets out = 0 and lse = -inf. hd <= kAttentionTrainMaxHeadDim.
// Launcher (host declaration; kernel in ops_attention_train.cu): device pointers, arguments
// validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

constexpr int64_t kAttentionTrainMaxHeadDim = 256;
void attention_train(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                     float scale, float* out, int64_t ldo, float* lse);

}  // namespace qlora::cuda
