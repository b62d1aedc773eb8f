// Tiled training attention backward (FlashAttention-2 backward structure), fp32 SIMT tiles.
// With P = exp(scale q·kᵀ - lse) on visible keys and delta = rowsum(dO ⊙ O) (computed before):
//   dP = dO·Vᵀ,  dS = scale P ⊙ (dP - delta),  dV = Pᵀ·dO,  dK = dSᵀ·Q,  dQ = dS·K.
// Rows of a block are flat (query t, group head g) pairs fr = t*G + g of the G = Hq/Hkv query heads
// sharing one KV head, as in the flash forward (ops_attention.cu): every K/V tile serves the whole
// group, and dK/dV sum over the group inside one block.
// Two kernels, no atomics, every output element written once by one thread in a fixed order
// (deterministic, run to run and for any grid scheduling):
//  - dkdv: one block per (KT-key tile, KV head, batch row). dK, dV of the tile live in registers
//    (warp = keys warp, warp+8, ...; lane = dims lane, lane+32, ...). Loop over the R-row tiles
//    from the first row whose query sees the tile (causal tile skipping: t >= first key) to the
//    end: [load] Q, dO, lse, delta of the rows; [p] S and dP for the R x KT tile, P and dS into
//    shared memory; [acc] dV += Pᵀ·dO, dK += dSᵀ·Q. A tile whose keys are all masked skips the loop.
//  - dq: one block per (R-row tile, KV head, batch row), the same with roles swapped: loop over the
//    KT-key tiles up to the last row's query (causal), [acc] dQ += dS·K (warp = rows, lane = dims).
// Causal work is triangular: blocks are numbered so the longest run first (dkdv: the first keys;
// dq: the last rows), which shortens the tail of a launch.
// P is recomputed in both (a separate dQ pass instead of fp32 atomics: deterministic, at the cost
// of recomputing S and dP once more). No [T, T] matrix anywhere: only R x KT tiles on chip.
// Shared tiles use an odd row stride (HDM + 1) so the [p] stage's lanes, on consecutive keys, read
// distinct banks; Q/dO reads there are warp broadcasts. Sized for sm_75's 64 KiB (opt-in > 48 KiB).
// bf16 compute (sm_80+, Backend::attention_train_backward_bf16): the same tiles and stages; the
// four products dP = dO·Vᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K run as bf16 mma.sync m16n8k16
// (mma_tile.cuh) with fp32 accumulation, each operand rounded to bf16 (RNE) as its fragment is
// built from the fp32 shared tile; the scores S = q·kᵀ, P, dS, lse and delta stay fp32 (the CPU
// backend's bf16 contract, cpu/ops_backward_attention.cpp). Warps own 16 x 8 output tiles.
#include <algorithm>

#include "cuda_check.hpp"
#include "mma_tile.cuh"
#include "ops_attention_train_backward_tiled.cuh"

namespace qlora::cuda {
namespace {

// HDM: head dims held (hd <= HDM, a multiple of 32); R rows and KT keys a tile; 256 threads.
template <int HDM_, int R_, int KT_>
struct BwdCfg {
  static constexpr int HDM = HDM_, R = R_, KT = KT_;
  static constexpr int kThreads = 256, kWarps = 8;
  static constexpr int LD = HDM + 1;                     // shared row stride of Q, dO, K, V (odd)
  static constexpr int kRowGroups = kThreads / KT;       // [p]: threads on one key
  static constexpr int kRowsPerThread = R / kRowGroups;  // [p]: rows per thread
  static constexpr int kDimsPerLane = HDM / 32;
  static constexpr size_t kSmemFloats = 2 * size_t(R) * LD + 2 * size_t(KT) * LD + 2 * size_t(R) * KT +
                                        3 * size_t(R) + size_t(KT);
  static constexpr size_t kSmemBytes = sizeof(float) * kSmemFloats;
  static_assert(HDM % 32 == 0, "whole lanes");
  static_assert(kThreads % KT == 0 && KT % kWarps == 0 && kRowGroups >= 1, "whole key groups");
  static_assert(R % kRowGroups == 0 && R % kWarps == 0 && kRowsPerThread >= 1, "whole row groups");
  static_assert(kSmemBytes <= 64 * 1024, "fits sm_75's shared memory");
};
// The shapes the benches train take the tiled path: Llama-3-8B (bench_cuda.py: head_dim 128, 32 query
// / 8 KV heads, seq 2048, batch 1 and 2) and SmolLM2-135M (head_dim 64, 9 / 3 heads).
static_assert(attention_train_backward_tiled_fits(1, 2048, 32, 8, 128) &&
                  attention_train_backward_tiled_fits(2, 2048, 32, 8, 128) &&
                  attention_train_backward_tiled_fits(1, 2048, 9, 3, 64),
              "bench shapes take the tiled attention backward");

// dkdv: many keys a block (its accumulators), few rows a step; dq: the reverse.
using DkdvCfg64 = BwdCfg<64, 16, 64>;    // 49 KiB
using DqCfg64 = BwdCfg<64, 64, 16>;      // 49 KiB
using DkdvCfg128 = BwdCfg<128, 16, 32>;  // 53 KiB
using DqCfg128 = BwdCfg<128, 32, 16>;    // 53 KiB

struct BwdArgs {
  int64_t T, Hq;
  int G, hd, rows;  // rows = T * G < 2^31 - 64 (attention_train_backward_tiled_fits): 32-bit row math
  float scale;
  const float* q;
  int64_t ldq;
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
  const int32_t* key_mask;
  const float* lse;
  const float* dout;
  int64_t lddo;
  const float* delta;
  float* dq;
  int64_t lddq;
  float* dk;
  int64_t lddk;
  float* dv;
  int64_t lddv;
};

// The block's shared tiles, carved from the dynamic shared memory.
template <class C>
struct Tiles {
  float* Q;      // [R][LD]
  float* dO;     // [R][LD]
  float* K;      // [KT][LD]
  float* V;      // [KT][LD]
  float* P;      // [R][KT]
  float* dS;     // [R][KT], scale included
  float* lse;    // [R], -inf for rows past T or seeing no key
  float* delta;  // [R]
  int* rowt;     // [R], the row's query t (>= T past the end)
  int* mask;     // [KT], 0 for keys past the tile's end
  __device__ explicit Tiles(float* s)
      : Q(s),
        dO(Q + C::R * C::LD),
        K(dO + C::R * C::LD),
        V(K + C::KT * C::LD),
        P(V + C::KT * C::LD),
        dS(P + C::R * C::KT),
        lse(dS + C::R * C::KT),
        delta(lse + C::R),
        rowt(reinterpret_cast<int*>(delta + C::R)),
        mask(rowt + C::R) {}
};

// [load] rows fr0 .. fr0+R-1 (flat (t, g)) of batch row b, KV head kvh: Q, dO (zeros beyond hd
// and past T), lse (-inf past T) and delta. Coalesced along the head dims.
template <class C>
__device__ __forceinline__ void load_rows(const Tiles<C>& s, const BwdArgs& a, int64_t b, int64_t kvh, int fr0) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < C::R * C::HDM; i += C::kThreads) {
    const int rho = i / C::HDM, d = i % C::HDM, fr = fr0 + rho, t = fr / a.G;
    const int64_t h = kvh * a.G + (fr - t * a.G), row = b * a.T + t;
    const bool ok = fr < a.rows && d < a.hd;
    s.Q[rho * C::LD + d] = ok ? __ldg(a.q + row * a.ldq + h * a.hd + d) : 0.0f;
    s.dO[rho * C::LD + d] = ok ? __ldg(a.dout + row * a.lddo + h * a.hd + d) : 0.0f;
  }
  for (int rho = tid; rho < C::R; rho += C::kThreads) {
    const int fr = fr0 + rho, t = fr / a.G;
    const int64_t h = kvh * a.G + (fr - t * a.G), r = (b * a.Hq + h) * a.T + t;
    const bool ok = fr < a.rows;
    s.lse[rho] = ok ? __ldg(a.lse + r) : -INFINITY;
    s.delta[rho] = ok ? __ldg(a.delta + r) : 0.0f;
    s.rowt[rho] = t;
  }
}

// [load] keys s0 .. s0+n-1 of batch row b, KV head kvh: K, V (zeros beyond hd and n), key mask (0 beyond n).
template <class C>
__device__ __forceinline__ void load_keys(const Tiles<C>& s, const BwdArgs& a, int64_t b, int64_t kvh, int64_t s0,
                                          int n) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < C::KT * C::HDM; i += C::kThreads) {
    const int j = i / C::HDM, d = i % C::HDM;
    const int64_t row = b * a.T + s0 + j;
    const bool ok = j < n && d < a.hd;
    s.K[j * C::LD + d] = ok ? __ldg(a.k + row * a.ldk + kvh * a.hd + d) : 0.0f;
    s.V[j * C::LD + d] = ok ? __ldg(a.v + row * a.ldv + kvh * a.hd + d) : 0.0f;
  }
  for (int j = tid; j < C::KT; j += C::kThreads) s.mask[j] = j < n ? __ldg(a.key_mask + b * a.T + s0 + j) : 0;
}

// ---- bf16 mma.sync m16n8k16 fragments (layout: mma_tile.cuh) built from fp32 shared tiles, each
// element rounded to bf16 as it is packed. A(m, k) = a[m * am + k * ak], B(k, n) = b[k * bk + n * bn]
// (strides in floats), so a transposed operand is just other strides.
// (maybe_unused: below sm_80 the tensor-core kernels' bodies, their only callers, compile to a trap.)
[[maybe_unused]] __device__ __forceinline__ void frag_a(uint32_t (&f)[4], const float* a, int am, int ak, int m0,
                                                        int k0, int g, int t) {
  const float* r0 = a + (m0 + g) * am + (k0 + 2 * t) * ak;  // A[g][2t], A[g][2t+1]
  const float* r8 = r0 + 8 * am;                            // eight rows below
  f[0] = mma::pack_bf16x2(r0[0], r0[ak]);
  f[1] = mma::pack_bf16x2(r8[0], r8[ak]);
  f[2] = mma::pack_bf16x2(r0[8 * ak], r0[9 * ak]);  // k + 8
  f[3] = mma::pack_bf16x2(r8[8 * ak], r8[9 * ak]);
}
[[maybe_unused]] __device__ __forceinline__ void frag_b(uint32_t (&f)[2], const float* b, int bk, int bn, int k0,
                                                        int n0, int g, int t) {
  const float* c = b + (k0 + 2 * t) * bk + (n0 + g) * bn;  // B[2t][g], B[2t+1][g]
  f[0] = mma::pack_bf16x2(c[0], c[bk]);
  f[1] = mma::pack_bf16x2(c[8 * bk], c[9 * bk]);  // k + 8
}

// dP[R][KT] = dO·Vᵀ over the head dims (zero-padded to a multiple of 16) into the dS buffer; warp w
// takes the 16 x 8 tiles w, w + 8, ...
template <class C>
__device__ __forceinline__ void tc_dp(const Tiles<C>& s, int hd) {
  constexpr int TN = C::KT / 8, NTILE = (C::R / 16) * TN;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane >> 2, t = lane & 3, kend = (hd + 15) & ~15;  // <= HDM: the tiles are zero beyond hd
  for (int idx = warp; idx < NTILE; idx += C::kWarps) {
    const int m0 = (idx / TN) * 16, n0 = (idx % TN) * 8;
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < kend; k0 += 16) {
      uint32_t fa[4], fb[2];
      frag_a(fa, s.dO, C::LD, 1, m0, k0, g, t);  // A(row, d) = dO[row][d]
      frag_b(fb, s.V, 1, C::LD, k0, n0, g, t);   // B(d, key) = V[key][d]
      mma::mma_bf16_16816(c, fa, fb);
    }
    float* o = s.dS + (m0 + g) * C::KT + n0 + 2 * t;
    o[0] = c[0], o[1] = c[1], o[8 * C::KT] = c[2], o[8 * C::KT + 1] = c[3];
  }
}

// [p] thread = (key j, row group rg), rows rg, rg + kRowGroups, ...: S = q·k and dP = dO·v over the
// head dims, then P = exp(scale S - lse) where the key is visible to the row (s <= t, key mask set,
// the row sees a key at all), else 0; dS = scale P (dP - delta). Reads Q, dO, K, V, lse, delta,
// mask; writes P, dS.
// kTc: dP from the tensor cores (tc_dp, bf16 operands) instead of the SIMT dot (fp32).
template <class C, bool kTc>
__device__ __forceinline__ void tile_p_ds(const Tiles<C>& s, const BwdArgs& a, int64_t s0) {
  constexpr int RPT = C::kRowsPerThread, RG = C::kRowGroups;
  const int tid = static_cast<int>(threadIdx.x), j = tid % C::KT, rg = tid / C::KT;
  if constexpr (kTc) tc_dp<C>(s, a.hd);
  float sd[RPT], pd[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) sd[i] = 0.0f, pd[i] = 0.0f;
  const float* kr = s.K + j * C::LD;
#pragma unroll 4
  for (int d = 0; d < a.hd; ++d) {
    const float kv = kr[d];
#pragma unroll
    for (int i = 0; i < RPT; ++i) sd[i] = fmaf(s.Q[(rg + i * RG) * C::LD + d], kv, sd[i]);
    if constexpr (!kTc) {
      const float vv = s.V[j * C::LD + d];
#pragma unroll
      for (int i = 0; i < RPT; ++i) pd[i] = fmaf(s.dO[(rg + i * RG) * C::LD + d], vv, pd[i]);
    }
  }
  if constexpr (kTc) {
    __syncthreads();  // tc_dp's dP visible; each thread then reads and rewrites only its own elements
#pragma unroll
    for (int i = 0; i < RPT; ++i) pd[i] = s.dS[(rg + i * RG) * C::KT + j];
  }
  const int64_t key = s0 + j;
  const bool key_on = s.mask[j] != 0;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int rho = rg + i * RG;
    const float l = s.lse[rho];
    const bool vis = key_on && key <= s.rowt[rho] && l != -INFINITY;
    const float p = vis ? expf(sd[i] * a.scale - l) : 0.0f;
    s.P[rho * C::KT + j] = p;
    s.dS[rho * C::KT + j] = vis ? p * (pd[i] - s.delta[rho]) * a.scale : 0.0f;
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads) dkdv_tiled_kernel(BwdArgs a) {
  constexpr int KPW = C::KT / C::kWarps, DPL = C::kDimsPerLane;  // keys per warp, dims per lane
  extern __shared__ __align__(16) float smem[];
  const Tiles<C> s(smem);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t kvh = blockIdx.y, b = blockIdx.z, s0 = static_cast<int64_t>(blockIdx.x) * C::KT;
  const int n = static_cast<int>(min(static_cast<int64_t>(C::KT), a.T - s0));
  load_keys<C>(s, a, b, kvh, s0, n);
  float ak[KPW][DPL], av[KPW][DPL];
#pragma unroll
  for (int i = 0; i < KPW; ++i)
#pragma unroll
    for (int c = 0; c < DPL; ++c) ak[i][c] = 0.0f, av[i][c] = 0.0f;
  __syncthreads();  // the key mask visible
  // Keys all masked (e.g. left padding): gradient 0 without visiting any row.
  const bool any_key = __syncthreads_or(tid < C::KT && s.mask[tid] != 0) != 0;
  // Causal tile skipping: rows before the first one whose query t >= s0 see none of these keys.
  for (int fr0 = any_key ? (static_cast<int>(s0) * a.G / C::R) * C::R : a.rows; fr0 < a.rows; fr0 += C::R) {
    load_rows<C>(s, a, b, kvh, fr0);
    __syncthreads();  // Q, dO, lse, delta visible
    tile_p_ds<C, false>(s, a, s0);
    __syncthreads();  // P, dS visible
    for (int rho = 0; rho < C::R; ++rho) {
      float qv[DPL], gv[DPL];
#pragma unroll
      for (int c = 0; c < DPL; ++c) qv[c] = s.Q[rho * C::LD + lane + 32 * c], gv[c] = s.dO[rho * C::LD + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < KPW; ++i) {
        const int j = warp + C::kWarps * i;
        const float p = s.P[rho * C::KT + j], ds = s.dS[rho * C::KT + j];  // warp broadcasts
#pragma unroll
        for (int c = 0; c < DPL; ++c) av[i][c] = fmaf(p, gv[c], av[i][c]), ak[i][c] = fmaf(ds, qv[c], ak[i][c]);
      }
    }
    __syncthreads();  // the next row tile overwrites Q, dO, P, dS, lse, delta
  }
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    const int j = warp + C::kWarps * i;
    if (j >= n) continue;
    const int64_t row = b * a.T + s0 + j;
    float* okp = a.dk + row * a.lddk + kvh * a.hd;
    float* ovp = a.dv + row * a.lddv + kvh * a.hd;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < a.hd) okp[d] = ak[i][c], ovp[d] = av[i][c];
    }
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads) dq_tiled_kernel(BwdArgs a) {
  constexpr int RPW = C::R / C::kWarps, DPL = C::kDimsPerLane;  // rows per warp, dims per lane
  extern __shared__ __align__(16) float smem[];
  const Tiles<C> s(smem);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t kvh = blockIdx.y, b = blockIdx.z;
  const int fr0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * C::R;  // the longest (last) rows first
  load_rows<C>(s, a, b, kvh, fr0);
  float aq[RPW][DPL];
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int c = 0; c < DPL; ++c) aq[i][c] = 0.0f;
  __syncthreads();  // lse visible
  // Rows that all see no key (lse = -inf: left padding, rows past T): gradient 0, no key visited.
  const bool any_row = __syncthreads_or(tid < C::R && s.lse[tid] != -INFINITY) != 0;
  const int64_t kv_end = any_row ? min(a.T - 1, static_cast<int64_t>((fr0 + C::R - 1) / a.G)) + 1 : 0;  // causal
  for (int64_t s0 = 0; s0 < kv_end; s0 += C::KT) {
    const int n = static_cast<int>(min(static_cast<int64_t>(C::KT), kv_end - s0));
    load_keys<C>(s, a, b, kvh, s0, n);
    __syncthreads();  // K, V, mask visible
    tile_p_ds<C, false>(s, a, s0);
    __syncthreads();  // dS visible
    for (int j = 0; j < n; ++j) {
      float kv[DPL];
#pragma unroll
      for (int c = 0; c < DPL; ++c) kv[c] = s.K[j * C::LD + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const float ds = s.dS[(warp + C::kWarps * i) * C::KT + j];  // warp broadcast
#pragma unroll
        for (int c = 0; c < DPL; ++c) aq[i][c] = fmaf(ds, kv[c], aq[i][c]);
      }
    }
    __syncthreads();  // the next key tile overwrites K, V, mask, P, dS
  }
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int fr = fr0 + warp + C::kWarps * i, t = fr / a.G;
    if (fr >= a.rows) continue;
    const int64_t h = kvh * a.G + (fr - t * a.G);
    float* o = a.dq + (b * a.T + t) * a.lddq + h * a.hd;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < a.hd) o[d] = aq[i][c];
    }
  }
}

// ---- bf16 tensor-core kernels (sm_80+; the host launches them only there). The same loops as
// dkdv_tiled_kernel / dq_tiled_kernel; the accumulators are m16n8 C fragments: warp w owns output
// tiles w, w + 8, w + 16, w + 24 of 16 (keys or rows) x 8 (head dims); c0, c1 at (g, 2t), (g, 2t+1),
// c2, c3 eight below.
template <class C>
__global__ void __launch_bounds__(C::kThreads) dkdv_tc_kernel(BwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int TN = C::HDM / 8, TPW = (C::KT / 16) * TN / C::kWarps;  // tiles per warp
  static_assert((C::KT / 16) * TN % C::kWarps == 0 && C::KT % 16 == 0 && C::R % 16 == 0, "whole mma tiles");
  extern __shared__ __align__(16) float smem[];
  const Tiles<C> s(smem);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t kvh = blockIdx.y, b = blockIdx.z, s0 = static_cast<int64_t>(blockIdx.x) * C::KT;
  const int n = static_cast<int>(min(static_cast<int64_t>(C::KT), a.T - s0));
  load_keys<C>(s, a, b, kvh, s0, n);
  float ck[TPW][4], cv[TPW][4];
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) ck[i][r] = 0.0f, cv[i][r] = 0.0f;
  __syncthreads();  // the key mask visible
  const bool any_key = __syncthreads_or(tid < C::KT && s.mask[tid] != 0) != 0;
  for (int fr0 = any_key ? (static_cast<int>(s0) * a.G / C::R) * C::R : a.rows; fr0 < a.rows; fr0 += C::R) {
    load_rows<C>(s, a, b, kvh, fr0);
    __syncthreads();  // Q, dO, lse, delta visible
    tile_p_ds<C, true>(s, a, s0);
    __syncthreads();  // P, dS visible
#pragma unroll
    for (int i = 0; i < TPW; ++i) {
      const int idx = warp + C::kWarps * i, m0 = (idx / TN) * 16, n0 = (idx % TN) * 8;  // keys m0.., dims n0..
      if (n0 >= a.hd) continue;  // warp-uniform: the tile lies past the head dims
#pragma unroll
      for (int k0 = 0; k0 < C::R; k0 += 16) {
        uint32_t fa[4], fb[2];
        frag_a(fa, s.P, 1, C::KT, m0, k0, g, t);   // A(key, row) = P[row][key]
        frag_b(fb, s.dO, C::LD, 1, k0, n0, g, t);  // B(row, d) = dO[row][d]
        mma::mma_bf16_16816(cv[i], fa, fb);
        frag_a(fa, s.dS, 1, C::KT, m0, k0, g, t);  // A(key, row) = dS[row][key]
        frag_b(fb, s.Q, C::LD, 1, k0, n0, g, t);   // B(row, d) = Q[row][d]
        mma::mma_bf16_16816(ck[i], fa, fb);
      }
    }
    __syncthreads();  // the next row tile overwrites Q, dO, P, dS, lse, delta
  }
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int idx = warp + C::kWarps * i, m0 = (idx / TN) * 16, n0 = (idx % TN) * 8;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = m0 + g + 8 * (r >> 1), d = n0 + 2 * t + (r & 1);
      if (j >= n || d >= a.hd) continue;
      const int64_t row = b * a.T + s0 + j;
      a.dk[row * a.lddk + kvh * a.hd + d] = ck[i][r];
      a.dv[row * a.lddv + kvh * a.hd + d] = cv[i][r];
    }
  }
#else
  __trap();  // below sm_80: never launched (the host checks the compute capability)
#endif
}

template <class C>
__global__ void __launch_bounds__(C::kThreads) dq_tc_kernel(BwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int TN = C::HDM / 8, TPW = (C::R / 16) * TN / C::kWarps;  // tiles per warp
  static_assert((C::R / 16) * TN % C::kWarps == 0 && C::KT % 16 == 0 && C::R % 16 == 0, "whole mma tiles");
  extern __shared__ __align__(16) float smem[];
  const Tiles<C> s(smem);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t kvh = blockIdx.y, b = blockIdx.z;
  const int fr0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * C::R;  // the longest (last) rows first
  load_rows<C>(s, a, b, kvh, fr0);
  float cq[TPW][4];
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) cq[i][r] = 0.0f;
  __syncthreads();  // lse visible
  const bool any_row = __syncthreads_or(tid < C::R && s.lse[tid] != -INFINITY) != 0;
  const int64_t kv_end = any_row ? min(a.T - 1, static_cast<int64_t>((fr0 + C::R - 1) / a.G)) + 1 : 0;  // causal
  for (int64_t s0 = 0; s0 < kv_end; s0 += C::KT) {
    const int n = static_cast<int>(min(static_cast<int64_t>(C::KT), kv_end - s0));
    load_keys<C>(s, a, b, kvh, s0, n);
    __syncthreads();  // K, V, mask visible
    tile_p_ds<C, true>(s, a, s0);
    __syncthreads();  // dS visible
#pragma unroll
    for (int i = 0; i < TPW; ++i) {
      const int idx = warp + C::kWarps * i, m0 = (idx / TN) * 16, n0 = (idx % TN) * 8;  // rows m0.., dims n0..
      if (n0 >= a.hd) continue;  // warp-uniform
#pragma unroll
      for (int k0 = 0; k0 < C::KT; k0 += 16) {
        uint32_t fa[4], fb[2];
        frag_a(fa, s.dS, C::KT, 1, m0, k0, g, t);  // A(row, key) = dS[row][key]
        frag_b(fb, s.K, C::LD, 1, k0, n0, g, t);   // B(key, d) = K[key][d]
        mma::mma_bf16_16816(cq[i], fa, fb);
      }
    }
    __syncthreads();  // the next key tile overwrites K, V, mask, P, dS
  }
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int idx = warp + C::kWarps * i, m0 = (idx / TN) * 16, n0 = (idx % TN) * 8;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int rho = m0 + g + 8 * (r >> 1), d = n0 + 2 * t + (r & 1), fr = fr0 + rho, tq = fr / a.G;
      if (fr >= a.rows || d >= a.hd) continue;
      const int64_t h = kvh * a.G + (fr - tq * a.G);
      a.dq[(b * a.T + tq) * a.lddq + h * a.hd + d] = cq[i][r];
    }
  }
#else
  __trap();  // below sm_80: never launched
#endif
}

template <class Kernel>
void opt_in_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)  // above the default 48 KiB (every arch >= sm_75 allows 64 KiB)
    QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                     "attention_train_backward");
}

template <class Dkdv, class Dq>
void launch(cudaStream_t stream, int64_t B, const BwdArgs& a, int64_t Hkv, bool bf16) {
  static_assert(Dkdv::HDM == Dq::HDM, "one head-dim class");
  const dim3 gk(static_cast<unsigned>((a.T + Dkdv::KT - 1) / Dkdv::KT), static_cast<unsigned>(Hkv),
                static_cast<unsigned>(B));
  const dim3 gq(static_cast<unsigned>((a.rows + Dq::R - 1) / Dq::R), static_cast<unsigned>(Hkv),
                static_cast<unsigned>(B));
  if (bf16) {
    opt_in_smem(dkdv_tc_kernel<Dkdv>, Dkdv::kSmemBytes);
    dkdv_tc_kernel<Dkdv><<<gk, Dkdv::kThreads, Dkdv::kSmemBytes, stream>>>(a);
    QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (tiled bf16 dk, dv)");
    opt_in_smem(dq_tc_kernel<Dq>, Dq::kSmemBytes);
    dq_tc_kernel<Dq><<<gq, Dq::kThreads, Dq::kSmemBytes, stream>>>(a);
    QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (tiled bf16 dq)");
    return;
  }
  opt_in_smem(dkdv_tiled_kernel<Dkdv>, Dkdv::kSmemBytes);
  dkdv_tiled_kernel<Dkdv><<<gk, Dkdv::kThreads, Dkdv::kSmemBytes, stream>>>(a);
  QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (tiled dk, dv)");
  opt_in_smem(dq_tiled_kernel<Dq>, Dq::kSmemBytes);
  dq_tiled_kernel<Dq><<<gq, Dq::kThreads, Dq::kSmemBytes, stream>>>(a);
  QLORA_CUDA_CHECK_LAUNCH("attention_train_backward (tiled dq)");
}
}  // namespace

void attention_train_backward_tiled(cudaStream_t stream, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                    const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                                    int64_t ldv, const int32_t* key_mask, float scale, const float* lse,
                                    const float* dout, int64_t lddo, const float* delta, float* dq, int64_t lddq,
                                    float* dk, int64_t lddk, float* dv, int64_t lddv, bool bf16) {
  if (B <= 0 || T <= 0 || Hq <= 0 || hd <= 0) return;
  BwdArgs a{};
  a.T = T, a.Hq = Hq, a.G = static_cast<int>(Hq / Hkv), a.hd = static_cast<int>(hd), a.scale = scale;
  a.rows = static_cast<int>(T * (Hq / Hkv));
  a.q = q, a.ldq = ldq, a.k = k, a.ldk = ldk, a.v = v, a.ldv = ldv, a.key_mask = key_mask;
  a.lse = lse, a.dout = dout, a.lddo = lddo, a.delta = delta;
  a.dq = dq, a.lddq = lddq, a.dk = dk, a.lddk = lddk, a.dv = dv, a.lddv = lddv;
  if (hd <= 64)
    launch<DkdvCfg64, DqCfg64>(stream, B, a, Hkv, bf16);
  else
    launch<DkdvCfg128, DqCfg128>(stream, B, a, Hkv, bf16);
}
}  // namespace qlora::cuda
