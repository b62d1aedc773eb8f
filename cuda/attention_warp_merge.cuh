// The end of the one-query attention kernels (ops_attention.cu's decode kernel, ops_attention_train.cu):
// each of kWarps warps has an online-softmax state over its share of the keys (running max m, sum l,
// the weighted V sum acc with lane holding dims lane, lane+32, ...); merge_warp_states combines them
// through shared memory into out = Σ acc·f / L (zeros when no key was visible) and returns the
// logsumexp M + log L (-inf when no key was visible) to every thread. Include from .cu files only.
#pragma once
#include <cuda_runtime.h>

namespace qlora::cuda {

// Shared scratch of merge_warp_states, declared by the kernel.
template <int kWarps, int kMaxHd>
struct WarpMergeSmem {
  float m[kWarps], l[kWarps];
  float acc[kWarps][kMaxHd];
};

// Called by every thread of the block (it contains a barrier); o points at the query's output row.
template <int kWarps, int kMaxHd, int kPer>
__device__ __forceinline__ float merge_warp_states(WarpMergeSmem<kWarps, kMaxHd>& sm, float m, float l,
                                                   const float (&acc)[kPer], int hd, float* __restrict__ o) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) sm.m[warp] = m, sm.l[warp] = l;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) sm.acc[warp][d] = acc[i];
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm.m[w]);
  float L = 0.0f, f[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    f[w] = sm.m[w] == -INFINITY ? 0.0f : expf(sm.m[w] - M);
    L += sm.l[w] * f[w];
  }
  for (int d = static_cast<int>(threadIdx.x); d < hd; d += static_cast<int>(blockDim.x)) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s = fmaf(sm.acc[w][d], f[w], s);
    o[d] = L > 0.0f ? s / L : 0.0f;  // no visible key: zeros
  }
  return L > 0.0f ? M + logf(L) : -INFINITY;
}

}  // namespace qlora::cuda
