// Training attention forward with the logsumexp kept for the backward.
// Grid: one block per (query row b*T+t, query head h); kWarps warps split the visible keys
// (key s goes to warp s % kWarps). Each warp keeps an online softmax (running max m, sum l, the
// weighted V sum with lane holding dims lane, lane+32, ...), so scores never reach global memory;
// the warps' states are merged in shared memory, then out = acc / L and lse = M + log L.
// fp32 throughout. Correct on every arch, not yet tiled: each query re-reads its keys from L2/HBM
// (a flash-tiled version can replace the kernel behind the same launcher).
#include "attention_warp_merge.cuh"
#include "cuda_check.hpp"
#include "ops_attention_train.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {
constexpr int kWarps = 8;
constexpr int kPer = static_cast<int>(kAttentionTrainMaxHeadDim / 32);  // dims per lane

__global__ void __launch_bounds__(kWarps * 32)
    attention_train_kernel(int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* __restrict__ q, int64_t ldq,
                           const float* __restrict__ k, int64_t ldk, const float* __restrict__ v, int64_t ldv,
                           const int32_t* __restrict__ key_mask, float scale, float* __restrict__ out, int64_t ldo,
                           float* __restrict__ lse) {
  __shared__ WarpMergeSmem<kWarps, kAttentionTrainMaxHeadDim> wsm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x, h = blockIdx.y;  // row = b*T + t
  const int64_t b = row / T, t = row - b * T, kvh = h / (Hq / Hkv);
  float qr[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < hd ? q[row * ldq + h * hd + d] : 0.0f;
  }
  const float* K = k + b * T * ldk + kvh * hd;  // key s at K + s * ldk
  const float* V = v + b * T * ldv + kvh * hd;
  const int32_t* mask = key_mask + b * T;
  float m = -INFINITY, l = 0.0f, acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  for (int64_t s = warp; s <= t; s += kWarps) {
    if (mask[s] == 0) continue;  // uniform across the warp
    const float* kr = K + s * ldk;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) dot = fmaf(qr[i], kr[d], dot);
    }
    const float sc = warp_sum(dot) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = m == -INFINITY ? 0.0f : expf(m - mn), p = expf(sc - mn);
    l = l * corr + p;
    const float* vr = V + s * ldv;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] = fmaf(p, vr[d], acc[i] * corr);
    }
    m = mn;
  }
  const float lse_row = merge_warp_states(wsm, m, l, acc, hd, out + row * ldo + h * hd);
  if (threadIdx.x == 0) lse[(b * Hq + h) * T + t] = lse_row;
}
}  // namespace

void attention_train(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                     float scale, float* out, int64_t ldo, float* lse) {
  if (B <= 0 || T <= 0 || Hq <= 0 || hd <= 0) return;
  const dim3 grid(static_cast<unsigned>(B * T), static_cast<unsigned>(Hq));
  attention_train_kernel<<<grid, kWarps * 32, 0, stream>>>(T, Hq, Hkv, static_cast<int>(hd), q, ldq, k, ldk, v, ldv,
                                                           key_mask, scale, out, ldo, lse);
  QLORA_CUDA_CHECK_LAUNCH("attention_train");
}
}  // namespace qlora::cuda
