// Training attention backward: a delta kernel, then either the tiled kernels
// (ops_attention_train_backward_tiled.cu: FlashAttention-2 structure, the default for head_dim
// <= 128; bf16 tensor cores in bf16 compute) or the untiled fp32 reference kernels below (head_dim
// up to 256, and any shape with QLORA_CUDA_ATTN_BACKWARD=reference). QLORA_CUDA_ATTN_BACKWARD=simt
// keeps the tiled kernels on fp32 SIMT in bf16 compute too. The tests use both to check the paths
// against one another.
// All: no atomics, every output element written by exactly one thread.
//  1. delta_kernel: delta[b, h, t] = dO·O of one (query row, head), one warp each.
//  2. dq_kernel: one block per (query row b*T+t, head h); kWarps warps split the visible keys s <= t
//     (as the forward): p = exp(scale q·k_s - lse), dp = dO·v_s, dq += scale p (dp - delta) k_s,
//     per-warp register accumulators merged in shared memory.
//  3. dkdv_kernel: one block per (key row b*T+s, KV head kh); the warps split the (query head of
//     the group, query t >= s) pairs: dv += p dO_t, dk += scale p (dp - delta) q_t; merged the same way.
// Scores and probabilities live in registers only. fp32 throughout. The reference kernels are not
// tiled (each pair re-reads its rows from L2/HBM).
#include <cstdlib>
#include <cstring>

#include "cuda_check.hpp"
#include "ops_attention_train.cuh"
#include "ops_attention_train_backward.cuh"
#include "ops_attention_train_backward_tiled.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {
constexpr int kWarps = 8;
constexpr int kPer = static_cast<int>(kAttentionTrainMaxHeadDim / 32);  // dims per lane

// Loads dims lane, lane+32, ... of a row into registers (0 beyond hd).
__device__ __forceinline__ void load_row(const float* __restrict__ p, int hd, int lane, float (&r)[kPer]) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < hd ? p[d] : 0.0f;
  }
}
// Σ_d a[d] * p[d] over the warp (a in registers, p in memory); every lane gets it.
__device__ __forceinline__ float warp_dot(const float (&a)[kPer], const float* __restrict__ p, int hd, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) s = fmaf(a[i], p[d], s);
  }
  return warp_sum(s);
}

__global__ void __launch_bounds__(kWarps * 32)
    delta_kernel(int64_t rows, int64_t T, int64_t Hq, int hd, const float* __restrict__ out, int64_t ldo,
                 const float* __restrict__ dout, int64_t lddo, float* __restrict__ delta) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b * Hq + h) * T + t
  if (r >= rows) return;  // whole warp
  const int64_t t = r % T, h = (r / T) % Hq, b = r / (T * Hq), row = b * T + t;
  const float* o = out + row * ldo + h * hd;
  const float* g = dout + row * lddo + h * hd;
  float s = 0.0f;
  for (int d = lane; d < hd; d += 32) s = fmaf(g[d], o[d], s);
  s = warp_sum(s);
  if (lane == 0) delta[r] = s;
}

__global__ void __launch_bounds__(kWarps * 32)
    dq_kernel(int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* __restrict__ q, int64_t ldq,
              const float* __restrict__ k, int64_t ldk, const float* __restrict__ v, int64_t ldv,
              const int32_t* __restrict__ key_mask, float scale, const float* __restrict__ lse,
              const float* __restrict__ dout, int64_t lddo, const float* __restrict__ delta, float* __restrict__ dq,
              int64_t lddq) {
  __shared__ float wacc[kWarps][kAttentionTrainMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x, h = blockIdx.y;  // row = b*T + t
  const int64_t b = row / T, t = row - b * T, kvh = h / (Hq / Hkv), r = (b * Hq + h) * T + t;
  const float l = lse[r], dl = delta[r];
  float qr[kPer], gr[kPer], acc[kPer];
  load_row(q + row * ldq + h * hd, hd, lane, qr);
  load_row(dout + row * lddo + h * hd, hd, lane, gr);
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  const float* K = k + b * T * ldk + kvh * hd;
  const float* V = v + b * T * ldv + kvh * hd;
  const int32_t* mask = key_mask + b * T;
  if (l != -INFINITY) {  // uniform over the block; -inf: no visible key, gradient 0
    for (int64_t s = warp; s <= t; s += kWarps) {
      if (mask[s] == 0) continue;  // uniform across the warp
      const float* kr = K + s * ldk;
      const float p = expf(warp_dot(qr, kr, hd, lane) * scale - l);
      const float ds = p * (warp_dot(gr, V + s * ldv, hd, lane) - dl) * scale;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) acc[i] = fmaf(ds, kr[d], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) wacc[warp][d] = acc[i];
  }
  __syncthreads();
  float* o = dq + row * lddq + h * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += wacc[w][d];
    o[d] = s;
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    dkdv_kernel(int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* __restrict__ q, int64_t ldq,
                const float* __restrict__ k, int64_t ldk, const float* __restrict__ v, int64_t ldv,
                const int32_t* __restrict__ key_mask, float scale, const float* __restrict__ lse,
                const float* __restrict__ dout, int64_t lddo, const float* __restrict__ delta, float* __restrict__ dk,
                int64_t lddk, float* __restrict__ dv, int64_t lddv) {
  __shared__ float wk[kWarps][kAttentionTrainMaxHeadDim];
  __shared__ float wv[kWarps][kAttentionTrainMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t krow = blockIdx.x, kvh = blockIdx.y;  // krow = b*T + s
  const int64_t b = krow / T, s = krow - b * T, group = Hq / Hkv, nq = T - s;  // queries t = s .. T-1 see key s
  float kr[kPer], vr[kPer], ak[kPer], av[kPer];
  load_row(k + krow * ldk + kvh * hd, hd, lane, kr);
  load_row(v + krow * ldv + kvh * hd, hd, lane, vr);
#pragma unroll
  for (int i = 0; i < kPer; ++i) ak[i] = 0.0f, av[i] = 0.0f;
  if (key_mask[krow] != 0) {  // uniform over the block; a masked key gets gradient 0
    for (int64_t j = warp; j < group * nq; j += kWarps) {
      const int64_t h = kvh * group + j / nq, t = s + j % nq, r = (b * Hq + h) * T + t;
      const float l = lse[r];
      if (l == -INFINITY) continue;  // uniform across the warp (cannot happen for a visible key; kept for safety)
      const float* qt = q + (b * T + t) * ldq + h * hd;
      const float* gt = dout + (b * T + t) * lddo + h * hd;
      const float p = expf(warp_dot(kr, qt, hd, lane) * scale - l);
      const float ds = p * (warp_dot(vr, gt, hd, lane) - delta[r]) * scale;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) {
          av[i] = fmaf(p, gt[d], av[i]);
          ak[i] = fmaf(ds, qt[d], ak[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) wk[warp][d] = ak[i], wv[warp][d] = av[i];
  }
  __syncthreads();
  float* ok = dk + krow * lddk + kvh * hd;
  float* ov = dv + krow * lddv + kvh * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float sk = 0.0f, sv = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sk += wk[w][d], sv += wv[w][d];
    ok[d] = sk, ov[d] = sv;
  }
}
}  // namespace

void attention_train_backward(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                              const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                              const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                              float* dv, int64_t lddv, float* delta, bool bf16) {
  if (B <= 0 || T <= 0 || Hq <= 0 || hd <= 0) return;
  const int h = static_cast<int>(hd);
  const int64_t rows = B * Hq * T;
  delta_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(rows, T, Hq, h, out,
                                                                                               ldo, dout, lddo, delta);
  QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (delta)");
  const char* force = std::getenv("QLORA_CUDA_ATTN_BACKWARD");
  const bool reference = force != nullptr && std::strcmp(force, "reference") == 0;
  const bool simt = force != nullptr && std::strcmp(force, "simt") == 0;
  if (!reference && attention_train_backward_tiled_fits(B, T, Hq, Hkv, hd)) {
    attention_train_backward_tiled(stream, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, lse, dout, lddo,
                                   delta, dq, lddq, dk, lddk, dv, lddv, bf16 && !simt);
    return;
  }
  dq_kernel<<<dim3(static_cast<unsigned>(B * T), static_cast<unsigned>(Hq)), kWarps * 32, 0, stream>>>(
      T, Hq, Hkv, h, q, ldq, k, ldk, v, ldv, key_mask, scale, lse, dout, lddo, delta, dq, lddq);
  QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (dq)");
  dkdv_kernel<<<dim3(static_cast<unsigned>(B * T), static_cast<unsigned>(Hkv)), kWarps * 32, 0, stream>>>(
      T, Hq, Hkv, h, q, ldq, k, ldk, v, ldv, key_mask, scale, lse, dout, lddo, delta, dk, lddk, dv, lddv);
  QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (dk, dv)");
}
}  // namespace qlora::cuda
