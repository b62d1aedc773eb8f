// Training attention backward (Backend::attention_train_backward), flash style: the
// probabilities are recomputed from q, k and the forward's logsumexp, so no [T, T] matrix exists
// in global memory. With P = exp(scale q·kᵀ - lse) on visible keys, O = P·V, delta_t = dO_t·O_t:
//   dV = Pᵀ·dO,  dS = P ⊙ (dO·Vᵀ - delta),  dQ = scale dS·K,  dK = scale dSᵀ·Q.
// Overwrites dq[B*T, Hq*hd] and dk/dv[B*T, Hkv*hd] (summed over the query heads sharing a KV
// head); rows with lse = -inf and masked keys get gradient 0. Shapes as attention_train
// (ops_attention_train.cuh), hd <= kAttentionTrainMaxHeadDim.
// `delta` is caller-provided device scratch of B*Hq*T floats. head_dim <= 128 runs the tiled kernels
// (ops_attention_train_backward_tiled.cuh), else, or with QLORA_CUDA_ATTN_BACKWARD=reference, the
// untiled fp32 reference kernels; all deterministic (no atomics). bf16 (sm_80+ only, the caller
// checks): Backend::attention_train_backward_bf16, the tiled kernels' products on bf16 tensor
// cores (fp32 where the tiled kernels do not apply, as the Backend contract allows).
// Launcher (host declaration; kernels in ops_attention_train_backward.cu): device pointers,
// arguments validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launches checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void attention_train_backward(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                              const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                              const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                              float* dv, int64_t lddv, float* delta, bool bf16 = false);

}  // namespace qlora::cuda
