// Causal GQA attention over the KV cache (Backend::attention), decode and flash-tiled prefill:
// q[B*T, Hq*hd] (row stride ldq); query t of row b sits in slot start+t and sees slots s <= start+t
// with key_mask[b*S_cap + s] != 0 (int32 [B, S_cap]); query head h reads KV head h / (Hq/Hkv);
// k/v caches [B, Hkv, S_cap, hd]; out[B*T, Hq*hd] (row stride ldo) = softmax(scale * q·kᵀ) · v,
// zeros for a query that sees no key. hd <= kAttentionMaxHeadDim.
// Launcher (host declaration; kernel in ops_attention.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

constexpr int64_t kAttentionMaxHeadDim = 256;
// Queries per call from which the flash-tiled prefill kernel runs (below: the decode kernel, which
// splits one query's keys across warps). Grid limits: B <= 65535, Hkv <= 65535.
constexpr int64_t kFlashMinT = 16;
void attention(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
               int64_t ldq, const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start,
               const int32_t* key_mask, float scale, float* out, int64_t ldo);
// Backend::attention_kv_bf16: the same over bf16 caches (bit patterns), each element widened exactly.
void attention_kv_bf16(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                       int64_t ldq, const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                       const int32_t* key_mask, float scale, float* out, int64_t ldo);

}  // namespace qlora::cuda
