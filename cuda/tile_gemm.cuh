// The tiled fp32 GEMM kernel shared by gemm.cu (fp32 operands) and nf4_gemm.cu (B decoded from
// NF4 while it is loaded). Include only from .cu files.
//
//   C[M, N] = alpha * sum_k a(m, k) * b(n, k) + beta * C     (beta == 0: C is not read)
//
// a and b are "sources": functors returning one fp32 element by (row, k) index, where the rows of
// a are the M rows of C and the rows of b are its N columns. Each source says whether k is its
// contiguous dimension (kKContig), which picks the thread-to-element map that keeps global loads
// coalesced. Each block computes a BM x BN tile of C in steps of kBK along k: global -> registers
// (next step, in flight during the math) -> shared memory stored k-major (As[k][m], Bs[k][n]) ->
// each thread accumulates a TM x TN register tile with plain fp32 FMAs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_decode.cuh"

namespace qlora::cuda::tile {

constexpr int kThreads = 256;
constexpr int kBK = 16;

template <int BM_, int BN_, int TM_, int TN_, int MIN_BLOCKS_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, TM = TM_, TN = TN_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;  // per SM (__launch_bounds__): caps registers
  static constexpr int TX = BN / TN;  // threads along N
  static constexpr int TY = BM / TM;  // threads along M
  static_assert(TX * TY == kThreads, "one register tile per thread");
  static_assert(TM % 4 == 0 && TN % 4 == 0, "register tiles are read from shared memory as float4");
  static_assert(BM * kBK % kThreads == 0 && BN * kBK % kThreads == 0, "whole load passes");
};
using Big = Cfg<128, 128, 8, 8, 1>;  // large problems: 64 accumulators a thread
using Small = Cfg<64, 64, 4, 4, 2>;  // small grids: 4x more blocks to fill the SMs

// ---- sources
// Row-major fp32 matrix; element (r, k) at p[r*ld + k] (kKContig) or p[k*ld + r].
template <bool KContig>
struct F32Src {
  static constexpr bool kKContig = KContig;
  const float* p;
  int64_t ld;
  __device__ __forceinline__ void prepare(float*) {}
  __device__ __forceinline__ float operator()(int64_t r, int64_t k) const {
    return __ldg(KContig ? p + r * ld + k : p + k * ld + r);
  }
};

// NF4 weight W[rows, cols]; element (r, k) is W[r, k] (kKContig: Y = X·Wᵀ) or W[k, r] (dX = dY·W).
template <bool KContig>
struct Nf4Src {
  static constexpr bool kKContig = KContig;
  Nf4Dev w;
  const float* lut;  // shared memory, set by prepare()
  __device__ __forceinline__ void prepare(float* shared_lut) {
    nf4_fill_lut(w, shared_lut);
    lut = shared_lut;
  }
  __device__ __forceinline__ float operator()(int64_t r, int64_t k) const {
    return nf4_element(w, lut, KContig ? r * w.cols + k : k * w.cols + r);
  }
};

// ---- global -> registers -> shared memory for one R x kBK slab of a source
template <int R>
__host__ __device__ constexpr int passes() { return R * kBK / kThreads; }

// Thread-to-element map of pass p: consecutive threads walk the source's contiguous dimension.
template <int R, bool KContig>
__device__ __forceinline__ void slab_coords(int p, int& r, int& k) {
  const int idx = static_cast<int>(threadIdx.x) + p * kThreads;
  r = KContig ? idx / kBK : idx % R;
  k = KContig ? idx % kBK : idx / R;
}

template <int R, class Src>
__device__ __forceinline__ void load_slab(const Src& src, int64_t r0, int64_t r_total, int64_t k0, int64_t K,
                                          float (&reg)[passes<R>()]) {
#pragma unroll
  for (int p = 0; p < passes<R>(); ++p) {
    int r, k;
    slab_coords<R, Src::kKContig>(p, r, k);
    const int64_t gr = r0 + r, gk = k0 + k;
    reg[p] = (gr < r_total && gk < K) ? src(gr, gk) : 0.0f;  // zero padding outside the matrix
  }
}

template <int R, bool KContig>
__device__ __forceinline__ void store_slab(float (*S)[R + 4], const float (&reg)[passes<R>()]) {
#pragma unroll
  for (int p = 0; p < passes<R>(); ++p) {
    int r, k;
    slab_coords<R, KContig>(p, r, k);
    S[k][r] = reg[p];
  }
}

// Register-tile element i of a thread at position t (tx or ty) along a dimension with T threads:
// float4 chunks strided by T*4, so a warp's float4 reads of a shared row are contiguous.
template <int T>
__device__ __forceinline__ int frag_pos(int t, int i) { return (i / 4) * (T * 4) + t * 4 + (i % 4); }

template <class C, class ASrc, class BSrc>
__global__ void __launch_bounds__(kThreads, C::kMinBlocks)
    gemm_kernel(int64_t M, int64_t N, int64_t K, float alpha, ASrc a, BSrc b, float beta, float* __restrict__ Cp,
                int64_t ldc) {
  constexpr int BM = C::BM, BN = C::BN, TM = C::TM, TN = C::TN, TX = C::TX, TY = C::TY;
  // +4 floats of padding per row: fewer bank conflicts on the transposing stores, float4 alignment kept.
  __shared__ __align__(16) float As[kBK][BM + 4];  // [k][m]
  __shared__ __align__(16) float Bs[kBK][BN + 4];  // [k][n]
  __shared__ float lut[kNf4LutSize];

  const int tid = static_cast<int>(threadIdx.x), tx = tid % TX, ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;

  a.prepare(lut);  // no-op for fp32 sources; at most one source (B) is NF4 and owns lut
  b.prepare(lut);
  __syncthreads();

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  float ra[passes<BM>()], rb[passes<BN>()];
  const int64_t steps = (K + kBK - 1) / kBK;
  if (steps > 0) {
    load_slab<BM>(a, m0, M, 0, K, ra);
    load_slab<BN>(b, n0, N, 0, K, rb);
    store_slab<BM, ASrc::kKContig>(As, ra);
    store_slab<BN, BSrc::kKContig>(Bs, rb);
  }
  __syncthreads();

  for (int64_t s = 0; s < steps; ++s) {
    const bool more = s + 1 < steps;
    if (more) {  // next slab into registers; the loads overlap the FMAs below
      load_slab<BM>(a, m0, M, (s + 1) * kBK, K, ra);
      load_slab<BN>(b, n0, N, (s + 1) * kBK, K, rb);
    }
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float fa[TM], fb[TN];
#pragma unroll
      for (int c = 0; c < TM / 4; ++c) {
        const float4 v = *reinterpret_cast<const float4*>(&As[kk][frag_pos<TY>(ty, c * 4)]);
        fa[c * 4 + 0] = v.x, fa[c * 4 + 1] = v.y, fa[c * 4 + 2] = v.z, fa[c * 4 + 3] = v.w;
      }
#pragma unroll
      for (int c = 0; c < TN / 4; ++c) {
        const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][frag_pos<TX>(tx, c * 4)]);
        fb[c * 4 + 0] = v.x, fb[c * 4 + 1] = v.y, fb[c * 4 + 2] = v.z, fb[c * 4 + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // everyone is done reading this slab
    if (more) {
      store_slab<BM, ASrc::kKContig>(As, ra);
      store_slab<BN, BSrc::kKContig>(Bs, rb);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = m0 + frag_pos<TY>(ty, i);
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = n0 + frag_pos<TX>(tx, j);
      if (col >= N) continue;
      float* c = Cp + row * ldc + col;
      const float v = alpha * acc[i][j];
      *c = beta == 0.0f ? v : fmaf(beta, *c, v);  // beta == 0: C is never read (may hold NaN)
    }
  }
}

// Grid: M tiles on x (up to 2^31 - 1), N tiles on y (up to 65535).
template <class C>
inline dim3 grid_for(int64_t M, int64_t N) {
  return dim3(static_cast<unsigned>((M + C::BM - 1) / C::BM), static_cast<unsigned>((N + C::BN - 1) / C::BN));
}

// Big tiles only when they alone fill every SM at least once; small problems get more, smaller blocks.
inline bool use_big_tiles(int64_t M, int64_t N, int sm_count) {
  const int64_t big_blocks = ((M + Big::BM - 1) / Big::BM) * ((N + Big::BN - 1) / Big::BN);
  return big_blocks >= sm_count;
}

// Throws (via the caller's check) when the grid exceeds CUDA's limits.
inline bool grid_ok(int64_t M, int64_t N) {
  return (M + Small::BM - 1) / Small::BM <= 0x7fffffffLL && (N + Small::BN - 1) / Small::BN <= 65535;
}

template <class ASrc, class BSrc>
inline void launch(cudaStream_t stream, int sm_count, int64_t M, int64_t N, int64_t K, float alpha, ASrc a, BSrc b,
                   float beta, float* C, int64_t ldc) {
  if (use_big_tiles(M, N, sm_count))
    gemm_kernel<Big><<<grid_for<Big>(M, N), kThreads, 0, stream>>>(M, N, K, alpha, a, b, beta, C, ldc);
  else
    gemm_kernel<Small><<<grid_for<Small>(M, N), kThreads, 0, stream>>>(M, N, K, alpha, a, b, beta, C, ldc);
}

}  // namespace qlora::cuda::tile
