// Causal GQA attention over the KV cache, two kernels:
//  - decode (T < kFlashMinT): one block per (query row b*T+t, query head h); kWarps warps split the
//    visible keys (key s goes to warp s % kWarps), each keeping an online softmax (running max m,
//    sum l, the weighted V sum with lane holding dims lane, lane+32, ...); the warps' states are
//    merged in shared memory at the end. Suits one query row against a long cache.
//  - prefill (T >= kFlashMinT): flash-tiled, one block per (tile of query rows, KV head, batch row).
//    The block's rows are (query t, query head) pairs of all Hq/Hkv heads sharing the KV head, so
//    each K/V tile is read from global memory once per query tile (not once per query and head).
//    Per key tile: [load] K, V tiles (and the key mask) into shared memory with cp.async on sm_80+
//    (V's copy in flight while the scores are computed); [scores] S = scale * Q·Kᵀ for the tile
//    into shared memory, causal and key masks applied (-inf); [softmax] per row online softmax
//    (running max and sum, rescale of the accumulator); [pv] acc += P·V, rows across warps, head
//    dims across lanes. The [T, T] score matrix never exists: only a rows x keys tile, on chip.
//    fp32 throughout (the compute-dtype contract: attention stays fp32 in bf16 mode too).
// Both kernels also read a bf16 KV cache (E = uint16_t, Backend::attention_kv_bf16: the cache of
// compute_dtype="bfloat16"): each element is widened exactly to fp32 as it is loaded (the flash
// kernel's shared tiles stay fp32; its bf16 tile loads are plain 16-byte loads, no cp.async), so
// the arithmetic is the fp32 kernels' on the widened values.
#include "attention_warp_merge.cuh"
#include "cuda_check.hpp"
#include "ops_attention.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {
constexpr int kWarps = 8;
constexpr int kPer = static_cast<int>(kAttentionMaxHeadDim / 32);  // dims per lane

// A cache element as fp32: fp32 as is, bf16 bits widened exactly.
__device__ __forceinline__ float ld_kv(const float* p) { return *p; }
__device__ __forceinline__ float ld_kv(const uint16_t* p) { return __uint_as_float(static_cast<uint32_t>(*p) << 16); }

template <class E>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* __restrict__ q, int64_t ldq,
                     const E* __restrict__ kc, const E* __restrict__ vc, int64_t S_cap, int64_t start,
                     const int32_t* __restrict__ key_mask, float scale, float* __restrict__ out, int64_t ldo) {
  __shared__ float qs[kAttentionMaxHeadDim];
  __shared__ WarpMergeSmem<kWarps, kAttentionMaxHeadDim> wsm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x, h = blockIdx.y;  // row = b*T + t
  const int64_t b = row / T, t = row - b * T, kvh = h / (Hq / Hkv);
  const float* qr = q + row * ldq + h * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qr[d];
  __syncthreads();

  const E* K = kc + (b * Hkv + kvh) * S_cap * hd;
  const E* V = vc + (b * Hkv + kvh) * S_cap * hd;
  const int32_t* mask = key_mask + b * S_cap;
  const int64_t last = start + t;  // inclusive
  float m = -INFINITY, l = 0.0f, acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  for (int64_t s = warp; s <= last; s += kWarps) {
    if (mask[s] == 0) continue;  // uniform across the warp
    const E* kr = K + s * hd;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) dot = fmaf(qs[d], ld_kv(kr + d), dot);
    }
    const float sc = warp_sum(dot) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = m == -INFINITY ? 0.0f : expf(m - mn), p = expf(sc - mn);
    l = l * corr + p;
    const E* vr = V + s * hd;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] = fmaf(p, ld_kv(vr + d), acc[i] * corr);
    }
    m = mn;
  }
  merge_warp_states(wsm, m, l, acc, hd, out + row * ldo + h * hd);
}

// ---------------------------------------------------------------- prefill: flash-tiled
// HDM: head dims held (hd <= HDM, power of two, multiple of 32); R query rows and KT keys a tile.
// Shared: Qs[R][HDM], Ks[KT][HDM], Vs[KT][HDM], Ps[R][KT], Ms[KT] (key mask of the tile); sizes
// chosen to fit sm_75's 64 KiB of dynamic shared memory (opt-in above 48 KiB).
template <int HDM_, int R_, int KT_>
struct FlashCfg {
  static constexpr int HDM = HDM_, R = R_, KT = KT_;
  static constexpr int kThreads = 256, kWarps = 8;
  static constexpr int kRowGroups = kThreads / KT;       // scores: threads on one key share a key
  static constexpr int kRowsPerThread = R / kRowGroups;  // scores: rows per thread
  static constexpr int kRowsPerWarp = R / kWarps;        // softmax / pv: rows per warp
  static constexpr int kDimsPerLane = HDM / 32;
  static constexpr size_t kSmemBytes = sizeof(float) * (size_t(R) * HDM + 2 * size_t(KT) * HDM + size_t(R) * KT) +
                                       sizeof(int) * KT;
  static_assert(HDM % 32 == 0 && (HDM & (HDM - 1)) == 0, "HDM: a power of two, whole lanes");
  static_assert(KT <= 32 && kThreads % KT == 0 && R % kRowGroups == 0 && R % kWarps == 0, "whole tiles");
  static_assert(kSmemBytes <= 64 * 1024, "fits sm_75's shared memory");
};
using Flash64 = FlashCfg<64, 64, 32>;    // 41 KiB
using Flash128 = FlashCfg<128, 32, 32>;  // 52 KiB
using Flash256 = FlashCfg<256, 16, 16>;  // 49 KiB

// One 4- or 16-byte global -> shared copy; asynchronous (cp.async) on sm_80+, a plain load below.
__device__ __forceinline__ void copy_async4(float* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
#else
  *dst = __ldg(src);
#endif
}
__device__ __forceinline__ void copy_async16(float* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
  *reinterpret_cast<float4*>(dst) = __ldg(reinterpret_cast<const float4*>(src));
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are pending (then __syncthreads makes
// every thread's copies visible to the block).
template <int N>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows [0, n) of a key tile (n keys of hd floats, contiguous in the cache) into S[KT][HDM]; rows
// [n, KT) get zeros (their probabilities are 0, and 0 * garbage could be NaN). vec: hd % 4 == 0
// and src 16-byte aligned.
template <class C>
__device__ __forceinline__ void load_kv_tile(float* S, const float* src, int n, int hd, bool vec) {
  if (vec) {
    const int per = hd / 4;
    for (int i = threadIdx.x; i < n * per; i += C::kThreads) {
      const int j = i / per, d = (i - j * per) * 4;
      copy_async16(S + j * C::HDM + d, src + static_cast<int64_t>(j) * hd + d);
    }
  } else {
    for (int i = threadIdx.x; i < n * hd; i += C::kThreads) {
      const int j = i / hd, d = i - j * hd;
      copy_async4(S + j * C::HDM + d, src + static_cast<int64_t>(j) * hd + d);
    }
  }
  for (int i = threadIdx.x; i < (C::KT - n) * C::HDM; i += C::kThreads) S[n * C::HDM + i] = 0.0f;
}
// The same from a bf16 cache, widened on the way (synchronous loads: cp.async copies bytes only).
// vec: hd % 8 == 0 and src 16-byte aligned (8 bf16 per load).
template <class C>
__device__ __forceinline__ void load_kv_tile(float* S, const uint16_t* src, int n, int hd, bool vec) {
  if (vec) {
    const int per = hd / 8;
    for (int i = threadIdx.x; i < n * per; i += C::kThreads) {
      const int j = i / per, d = (i - j * per) * 8;
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(j) * hd + d));
      const uint32_t u[4] = {w.x, w.y, w.z, w.w};
      float* o = S + j * C::HDM + d;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        o[2 * e] = __uint_as_float(u[e] << 16);             // little-endian: element 2e is the low half
        o[2 * e + 1] = __uint_as_float(u[e] & 0xFFFF0000u);
      }
    }
  } else {
    for (int i = threadIdx.x; i < n * hd; i += C::kThreads) {
      const int j = i / hd, d = i - j * hd;
      S[j * C::HDM + d] = ld_kv(src + static_cast<int64_t>(j) * hd + d);
    }
  }
  for (int i = threadIdx.x; i < (C::KT - n) * C::HDM; i += C::kThreads) S[n * C::HDM + i] = 0.0f;
}
// Whether load_kv_tile may take its vector path for these caches.
__host__ __device__ inline bool kv_vec_ok(int hd, const float* k, const float* v) {
  return hd % 4 == 0 && ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) & 15u) == 0;
}
__host__ __device__ inline bool kv_vec_ok(int hd, const uint16_t* k, const uint16_t* v) {
  return hd % 8 == 0 && ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) & 15u) == 0;
}

// lse (optional, nullptr here): [B, Hq, T] natural-log sum of exp(scale * q·k) over visible keys,
// -inf for a row that sees none (the layout attention_train's backward reads).
template <class C, class E>
__global__ void __launch_bounds__(C::kThreads)
    flash_attention_kernel(int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* __restrict__ q, int64_t ldq,
                           const E* __restrict__ kc, const E* __restrict__ vc, int64_t S_cap, int64_t start,
                           const int32_t* __restrict__ key_mask, float scale, float* __restrict__ out, int64_t ldo,
                           float* __restrict__ lse) {
  constexpr int HDM = C::HDM, R = C::R, KT = C::KT;
  extern __shared__ __align__(16) float smem[];
  float* Qs = smem;             // [R][HDM]
  float* Ks = Qs + R * HDM;     // [KT][HDM]
  float* Vs = Ks + KT * HDM;    // [KT][HDM]
  float* Ps = Vs + KT * HDM;    // [R][KT]: scores, then probabilities
  int* Ms = reinterpret_cast<int*>(Ps + R * KT);  // [KT]

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t G = Hq / Hkv, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;  // block rows: flat (t, g) = t*G + g
  const int64_t t_last = min(T - 1, (row0 + R - 1) / G);
  const int64_t kv_end = min(S_cap, start + t_last + 1);  // keys any row of the block may see

  // Q tile: row rho = (t, g) -> query head kvh*G + g; zeros beyond hd and for rows past T.
  for (int i = tid; i < R * HDM; i += C::kThreads) {
    const int rho = i / HDM, d = i % HDM;
    const int64_t fr = row0 + rho, t = fr / G, h = kvh * G + fr % G;
    Qs[i] = (t < T && d < hd) ? __ldg(q + (b * T + t) * ldq + h * hd + d) : 0.0f;
  }

  float m[C::kRowsPerWarp], l[C::kRowsPerWarp], acc[C::kRowsPerWarp][C::kDimsPerLane];
#pragma unroll
  for (int i = 0; i < C::kRowsPerWarp; ++i) {
    m[i] = -INFINITY, l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < C::kDimsPerLane; ++c) acc[i][c] = 0.0f;
  }

  const E* Kb = kc + (b * Hkv + kvh) * S_cap * hd;
  const E* Vb = vc + (b * Hkv + kvh) * S_cap * hd;
  const int32_t* mask = key_mask + b * S_cap;
  const bool vec = kv_vec_ok(hd, kc, vc);

  for (int64_t s0 = 0; s0 < kv_end; s0 += KT) {
    const int n = static_cast<int>(min(static_cast<int64_t>(KT), kv_end - s0));
    // [load] K (+ mask) as group 0, V as group 1: V stays in flight during the scores
    load_kv_tile<C>(Ks, Kb + s0 * hd, n, hd, vec);
    for (int j = tid; j < KT; j += C::kThreads) Ms[j] = j < n ? __ldg(mask + s0 + j) : 0;
    copy_async_commit();
    load_kv_tile<C>(Vs, Vb + s0 * hd, n, hd, vec);
    copy_async_commit();
    copy_async_wait<1>();
    __syncthreads();  // K tile, mask (and Q on the first pass) visible

    // [scores] thread = (key j, row group): Ps[rho][j] = scale * q_rho · k_j or -inf. The dot
    // walks d rotated by j, so the lanes of a warp (consecutive keys) read distinct banks.
    {
      const int j = tid % KT, rg = tid / KT;
      const int64_t s = s0 + j;
      float dot[C::kRowsPerThread];
#pragma unroll
      for (int i = 0; i < C::kRowsPerThread; ++i) dot[i] = 0.0f;
      const float* kr = Ks + j * HDM;
      int d = j % hd;
      for (int e = 0; e < hd; ++e) {
        const float kv = kr[d];
#pragma unroll
        for (int i = 0; i < C::kRowsPerThread; ++i) dot[i] = fmaf(Qs[(rg + i * C::kRowGroups) * HDM + d], kv, dot[i]);
        d = d + 1 == hd ? 0 : d + 1;
      }
#pragma unroll
      for (int i = 0; i < C::kRowsPerThread; ++i) {
        const int rho = rg + i * C::kRowGroups;
        const int64_t t = (row0 + rho) / G;
        const bool vis = j < n && Ms[j] != 0 && s <= start + t;
        Ps[rho * KT + j] = vis ? dot[i] * scale : -INFINITY;
      }
    }
    copy_async_wait<0>();
    __syncthreads();  // scores and the V tile visible

    // [softmax] + [pv] warp = rows warp, warp + 8, ...; lane = dims lane, lane + 32, ...
#pragma unroll
    for (int i = 0; i < C::kRowsPerWarp; ++i) {
      const int rho = warp + i * C::kWarps;
      float* pr = Ps + rho * KT;
      const float sc = lane < KT ? pr[lane] : -INFINITY;
      const float mn = fmaxf(m[i], warp_max(sc));
      const float p = (mn == -INFINITY || sc == -INFINITY) ? 0.0f : __expf(sc - mn);
      const float corr = m[i] == -INFINITY ? 0.0f : __expf(m[i] - mn);  // acc and l are 0 until a key is seen
      l[i] = l[i] * corr + warp_sum(p);
      m[i] = mn;
      if (lane < KT) pr[lane] = p;
#pragma unroll
      for (int c = 0; c < C::kDimsPerLane; ++c) acc[i][c] *= corr;
    }
    __syncwarp();  // each warp reads back only its own rows' probabilities
    for (int j = 0; j < n; ++j) {
      float v[C::kDimsPerLane];
#pragma unroll
      for (int c = 0; c < C::kDimsPerLane; ++c) v[c] = Vs[j * HDM + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < C::kRowsPerWarp; ++i) {
        const float p = Ps[(warp + i * C::kWarps) * KT + j];
#pragma unroll
        for (int c = 0; c < C::kDimsPerLane; ++c) acc[i][c] = fmaf(p, v[c], acc[i][c]);
      }
    }
    __syncthreads();  // the next tile overwrites Ks, Vs, Ps, Ms
  }

  // [epilogue] out = acc / l (zeros for a row that saw no key); lse = m + log(l)
#pragma unroll
  for (int i = 0; i < C::kRowsPerWarp; ++i) {
    const int64_t fr = row0 + warp + i * C::kWarps, t = fr / G, h = kvh * G + fr % G;
    if (t >= T) continue;
    float* o = out + (b * T + t) * ldo + h * hd;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
    for (int c = 0; c < C::kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) o[d] = acc[i][c] * inv;
    }
    if (lse != nullptr && lane == 0) lse[(b * Hq + h) * T + t] = l[i] > 0.0f ? m[i] + logf(l[i]) : -INFINITY;
  }
}

template <class C, class E>
void launch_flash(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int hd, const float* q,
                  int64_t ldq, const E* k_cache, const E* v_cache, int64_t S_cap, int64_t start,
                  const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse) {
  const int64_t rows = T * (Hq / Hkv);
  const dim3 grid(static_cast<unsigned>((rows + C::R - 1) / C::R), static_cast<unsigned>(Hkv), static_cast<unsigned>(B));
  if (C::kSmemBytes > 48 * 1024)  // opt in above the default 48 KiB (every arch >= sm_75 allows 64 KiB)
    QLORA_CUDA_CHECK(cudaFuncSetAttribute(flash_attention_kernel<C, E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(C::kSmemBytes)),
                     "attention");
  flash_attention_kernel<C, E><<<grid, C::kThreads, C::kSmemBytes, stream>>>(T, Hq, Hkv, hd, q, ldq, k_cache, v_cache,
                                                                          S_cap, start, key_mask, scale, out, ldo, lse);
}

template <class E>
void attention_impl(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                    int64_t ldq, const E* k_cache, const E* v_cache, int64_t S_cap, int64_t start,
                    const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  if (B <= 0 || T <= 0 || Hq <= 0 || hd <= 0) return;
  if (T >= kFlashMinT) {
    const int h = static_cast<int>(hd);
    if (h <= 64)
      launch_flash<Flash64>(stream, B, T, Hq, Hkv, h, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo,
                            nullptr);
    else if (h <= 128)
      launch_flash<Flash128>(stream, B, T, Hq, Hkv, h, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out,
                             ldo, nullptr);
    else
      launch_flash<Flash256>(stream, B, T, Hq, Hkv, h, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out,
                             ldo, nullptr);
    QLORA_CUDA_CHECK_LAUNCH("attention");
    return;
  }
  const dim3 grid(static_cast<unsigned>(B * T), static_cast<unsigned>(Hq));
  attention_kernel<E><<<grid, kWarps * 32, 0, stream>>>(T, Hq, Hkv, static_cast<int>(hd), q, ldq, k_cache, v_cache,
                                                        S_cap, start, key_mask, scale, out, ldo);
  QLORA_CUDA_CHECK_LAUNCH("attention");
}
}  // namespace

void attention(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
               int64_t ldq, const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start,
               const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  attention_impl(stream, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}

void attention_kv_bf16(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                       int64_t ldq, const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                       const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  attention_impl(stream, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}
}  // namespace qlora::cuda
