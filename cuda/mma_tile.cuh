// Tensor-core GEMM tile (bf16 mma.sync, fp32 accumulation) for sm_80+, shared by gemm_tc.cu
// (fp32 operands) and nf4_gemm_tc.cu (B decoded from NF4). Include only from .cu files.
//
//   C[M, N] = alpha * sum_k r(a(m, k)) * r(b(n, k)) + beta * C     (beta == 0: C is not read)
//
// r() rounds to bf16 (round-to-nearest-even), the contract of Backend::*_bf16: both operands
// rounded, products summed in fp32. a's rows are C's M rows, b's rows are C's N columns.
//
// One block computes a BM x BN tile of C in steps of kBK = 32 along k. Stages of one step, in
// the flash-attention / CuTe style:
//   [load]    global -> registers: the next step's raw operand data (fp32 values, or packed NF4
//             bytes plus their absmax code and nested scale), issued before the MMAs so the
//             loads are in flight while the tensor cores work;
//   [mma]     shared (bf16, k-contiguous rows) -> fragments (32-bit shared loads laid out as the
//             PTX ISA's m16n8k16 fragments) -> mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32;
//   [dequant] registers -> bf16 -> the other shared buffer (NF4 decode with absmax and the
//             double-quant map folded in, fp32 -> bf16 rounding), then one __syncthreads;
//   [epilogue] accumulator fragments -> alpha * acc + beta * C, bounds-checked on ragged edges.
// Shared memory is double-buffered (one barrier per step). cp.async is not used: both operands
// are converted on the way into shared memory (fp32 -> bf16, NF4 -> bf16), and cp.async can only
// copy raw bytes, which would add a shared-memory round trip per element.
//
// Shared layout: S[row][kPadBK] bf16, 40 elements (80 bytes, 20 32-bit words) per row. The
// fragment loads of a warp read word (row0 + g) * 20 + t (+ const), g = lane / 4, t = lane % 4:
// g * 20 mod 32 = {0, 20, 8, 28, 16, 4, 24, 12} for g = 0..7, so the 32 lanes hit 32 distinct
// banks (conflict-free). The 16-byte stores of the dequant stage are conflict-free for rows
// stored by consecutive threads (k-strided sources) and 2-way on one bank quad of eight for the
// k-contiguous sources (4 threads per row).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4_decode.cuh"
#include "tile_gemm.cuh"

namespace qlora::cuda::mma {

constexpr int kBK = 32;          // k per pipeline step: two m16n8k16 MMAs deep
constexpr int kPadBK = kBK + 8;  // shared row stride in bf16 elements (see the bank note above)

// BM x BN block tile, WM x WN warp tile (WM/16 x WN/8 MMA tiles per warp).
template <int BM_, int BN_, int WM_, int WN_, int MIN_BLOCKS_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_;
  static constexpr int kWarpsM = BM / WM, kWarpsN = BN / WN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kMinBlocks = MIN_BLOCKS_;
  static constexpr int kTM = WM / 16, kTN = WN / 8;  // MMA tiles per warp along M and N
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 8 == 0, "whole warp / MMA tiles");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0, "whole 8-element chunks per thread");
};
using Big = Cfg<128, 128, 64, 32, 1>;  // 8 warps (2 x 4), 64 fp32 accumulators a thread
using Small = Cfg<64, 64, 32, 32, 2>;  // 4 warps (2 x 2), for grids the big tiles cannot fill

// ---- operand chunks: a slab of R rows x kBK is R*4 chunks of 8 consecutive k of one row, each
// converted to 8 bf16 and stored with one 16-byte shared store. Thread-to-chunk map of chunk i
// of a thread: k-contiguous sources put 4 consecutive threads on one row (a warp reads 8 rows x
// 128 bytes); k-strided sources put consecutive threads on consecutive rows (a warp reads 32
// consecutive elements of one k per load).
template <int R, int NT>
__host__ __device__ constexpr int chunks_per_thread() { return R * 4 / NT; }

template <int R, int NT, bool KContig>
__device__ __forceinline__ void chunk_rk(int i, int& r, int& k8) {
  const int c = static_cast<int>(threadIdx.x) + i * NT;
  r = KContig ? c >> 2 : c % R;
  k8 = KContig ? (c & 3) * 8 : (c / R) * 8;
}

// Two floats -> one 32-bit word of two bf16 (RNE), `lo` in the low half (the lower k index, as
// the mma fragments and little-endian shared memory expect).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__device__ __forceinline__ void store_chunk(__nv_bfloat16 (*S)[kPadBK], int r, int k8, const float (&v)[8]) {
  uint4 u;
  u.x = pack_bf16x2(v[0], v[1]);
  u.y = pack_bf16x2(v[2], v[3]);
  u.z = pack_bf16x2(v[4], v[5]);
  u.w = pack_bf16x2(v[6], v[7]);
  *reinterpret_cast<uint4*>(&S[r][k8]) = u;  // 16-byte aligned: row stride 80 bytes, k8 * 2 in {0, 16, 32, 48}
}

// ---- sources. Each has prepare(lut) (block setup, before a barrier), a Stage<R, NT> register
// type, load() (the load stage: global -> Stage, zeros outside [rows) x [K)) and store() (the
// dequant stage: Stage -> bf16 shared).

// Any element source of tile_gemm.cuh (tile::F32Src, tile::Nf4Src: fp32 value by (row, k)),
// element by element: the general path (any strides, alignment, ragged shapes).
template <class E>
struct ElemSrc {
  static constexpr bool kKContig = E::kKContig;
  E e;
  template <int R, int NT>
  struct Stage {
    float v[chunks_per_thread<R, NT>()][8];
  };
  __device__ __forceinline__ void prepare(float* lut) { e.prepare(lut); }
  template <int R, int NT>
  __device__ __forceinline__ void load(Stage<R, NT>& st, int64_t r0, int64_t rows, int64_t k0, int64_t K) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, kKContig>(i, r, k8);
      const int64_t gr = r0 + r, gk = k0 + k8;
#pragma unroll
      for (int j = 0; j < 8; ++j) st.v[i][j] = (gr < rows && gk + j < K) ? e(gr, gk + j) : 0.0f;
    }
  }
  template <int R, int NT>
  __device__ __forceinline__ void store(const Stage<R, NT>& st, __nv_bfloat16 (*S)[kPadBK]) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, kKContig>(i, r, k8);
      store_chunk(S, r, k8, st.v[i]);
    }
  }
};

// Row-major fp32, k contiguous, two float4 loads per chunk. Requires (host-checked) p 16-byte
// aligned, ld % 4 == 0 and K % 4 == 0, so each float4 lies wholly inside or outside [0, K).
struct F32VecSrc {
  static constexpr bool kKContig = true;
  const float* p;
  int64_t ld;
  template <int R, int NT>
  struct Stage {
    float4 v[chunks_per_thread<R, NT>()][2];
  };
  __device__ __forceinline__ void prepare(float*) {}
  template <int R, int NT>
  __device__ __forceinline__ void load(Stage<R, NT>& st, int64_t r0, int64_t rows, int64_t k0, int64_t K) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, true>(i, r, k8);
      const int64_t gr = r0 + r, gk = k0 + k8;
      const float4* q = reinterpret_cast<const float4*>(p + gr * ld + gk);
      const float4 z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      st.v[i][0] = (gr < rows && gk < K) ? __ldg(q) : z;
      st.v[i][1] = (gr < rows && gk + 4 < K) ? __ldg(q + 1) : z;
    }
  }
  template <int R, int NT>
  __device__ __forceinline__ void store(const Stage<R, NT>& st, __nv_bfloat16 (*S)[kPadBK]) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, true>(i, r, k8);
      const float4 a = st.v[i][0], b = st.v[i][1];
      const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      store_chunk(S, r, k8, v);
    }
  }
};

// NF4 W[rows, cols] as b(n, k) = W[n, k] (Y = X·Wᵀ), the fast path: one 32-bit load of 8 packed
// nibbles per chunk. Requires (host-checked) cols % 8 == 0 and `packed` 4-byte aligned: then a
// chunk's first flat index j = n * cols + k is a multiple of 8, its 4 bytes are aligned, and
// (blocksize >= 32, a power of two) all 8 elements share one quantization block. The load stage
// keeps the raw bits, the absmax code and the nested scale (or the fp32 absmax); the dequant
// stage decodes them exactly as nf4_element (nf4_decode.cuh) does: lut[nibble] * scale with
// scale = map[code] * nested + offset, so the bf16 operand is r(dequantize(W)) bit for bit.
struct Nf4RowSrc {
  static constexpr bool kKContig = true;
  Nf4Dev w;
  const float* lut;  // shared, set by prepare()
  template <int R, int NT>
  struct Stage {
    uint32_t bits[chunks_per_thread<R, NT>()];
    uint32_t code[chunks_per_thread<R, NT>()];  // absmax code (double quant); > 255: chunk outside W
    float s[chunks_per_thread<R, NT>()];        // nested absmax (double quant) or the fp32 absmax
  };
  __device__ __forceinline__ void prepare(float* shared_lut) {
    nf4_fill_lut(w, shared_lut);
    lut = shared_lut;
  }
  template <int R, int NT>
  __device__ __forceinline__ void load(Stage<R, NT>& st, int64_t r0, int64_t rows, int64_t k0, int64_t K) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, true>(i, r, k8);
      const int64_t gr = r0 + r, gk = k0 + k8;
      st.bits[i] = 0, st.code[i] = 256, st.s[i] = 0.0f;
      if (gr < rows && gk < K) {  // K == cols, a multiple of 8: the chunk is wholly inside
        const int64_t j = gr * w.cols + gk, blk = j >> w.log2_bs;
        st.bits[i] = __ldg(reinterpret_cast<const uint32_t*>(w.packed) + (j >> 3));
        if (w.double_quant) {
          st.code[i] = __ldg(static_cast<const unsigned char*>(w.absmax) + blk);
          st.s[i] = __ldg(w.nested_absmax + (blk >> 8));
        } else {
          st.code[i] = 0;
          st.s[i] = __ldg(static_cast<const float*>(w.absmax) + blk);
        }
      }
    }
  }
  template <int R, int NT>
  __device__ __forceinline__ void store(const Stage<R, NT>& st, __nv_bfloat16 (*S)[kPadBK]) const {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<R, NT>(); ++i) {
      int r, k8;
      chunk_rk<R, NT, true>(i, r, k8);
      const uint32_t code = st.code[i];
      const float scale = code > 255u ? 0.0f : (w.double_quant ? lut[16 + code] * st.s[i] + w.offset : st.s[i]);
      float v[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {  // byte b (little-endian) holds elements 2b (high nibble), 2b+1
        const uint32_t byte = (st.bits[i] >> (8 * b)) & 0xFFu;
        v[2 * b] = lut[byte >> 4] * scale;
        v[2 * b + 1] = lut[byte & 15u] * scale;
      }
      store_chunk(S, r, k8, v);
    }
  }
};

// ---- fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane
// = 4 * g + t: A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]; B (16x8, col, stored as Bs[n][k]): b0 = B[k=2t..2t+1][n=g], b1 =
// B[2t+8..][g]; C (16x8 fp32): c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1].
// The lower k index sits in the low 16 bits of each 32-bit register.
__device__ __forceinline__ uint32_t lds32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // never launched below sm_80 (the host checks the device's compute capability)
#endif
}

// ---- the kernel. Grid: M tiles on x, N tiles on y.
template <class C, class ASrc, class BSrc>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    tc_gemm_kernel(int64_t M, int64_t N, int64_t K, float alpha, ASrc a, BSrc b, float beta, float* __restrict__ Cp,
                   int64_t ldc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = C::BM, BN = C::BN, NT = C::kThreads, TM = C::kTM, TN = C::kTN;
  __shared__ __align__(16) __nv_bfloat16 As[2][BM][kPadBK];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][BN][kPadBK];
  __shared__ float lut[kNf4LutSize];

  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp / C::kWarpsN) * C::WM, wn0 = (warp % C::kWarpsN) * C::WN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;

  a.prepare(lut);  // at most one source (B) is NF4 and owns lut
  b.prepare(lut);
  __syncthreads();

  float acc[TM][TN][4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  typename ASrc::template Stage<BM, NT> ra;
  typename BSrc::template Stage<BN, NT> rb;
  const int64_t steps = (K + kBK - 1) / kBK;
  if (steps > 0) {  // prologue: step 0 into buffer 0
    a.template load<BM, NT>(ra, m0, M, 0, K);
    b.template load<BN, NT>(rb, n0, N, 0, K);
    a.template store<BM, NT>(ra, As[0]);
    b.template store<BN, NT>(rb, Bs[0]);
  }
  __syncthreads();

  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    const bool more = s + 1 < steps;
    // [load] the next step's operands, in flight during the MMAs below
    if (more) {
      a.template load<BM, NT>(ra, m0, M, (s + 1) * kBK, K);
      b.template load<BN, NT>(rb, n0, N, (s + 1) * kBK, K);
    }
    // [mma] two k16 steps over this buffer
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t fa[TM][4], fb[TN][2];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const __nv_bfloat16* r0 = &As[buf][wm0 + 16 * i + g][kk + 2 * t];
        const __nv_bfloat16* r8 = &As[buf][wm0 + 16 * i + g + 8][kk + 2 * t];
        fa[i][0] = lds32(r0);
        fa[i][1] = lds32(r8);
        fa[i][2] = lds32(r0 + 8);
        fa[i][3] = lds32(r8 + 8);
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const __nv_bfloat16* bn = &Bs[buf][wn0 + 8 * j + g][kk + 2 * t];
        fb[j][0] = lds32(bn);
        fb[j][1] = lds32(bn + 8);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) mma_bf16_16816(acc[i][j], fa[i], fb[j]);
    }
    // [dequant] the next step into the other buffer: every thread finished reading it before
    // the barrier that ended the previous step.
    if (more) {
      a.template store<BM, NT>(ra, As[buf ^ 1]);
      b.template store<BN, NT>(rb, Bs[buf ^ 1]);
    }
    __syncthreads();
  }

  // [epilogue] c0, c1 at (g, 2t), (g, 2t+1); c2, c3 eight rows below. Adjacent pairs go out as
  // one float2 when C's rows keep 8-byte alignment.
  const bool pair_ok = ((reinterpret_cast<uintptr_t>(Cp) | static_cast<uintptr_t>(ldc * 4)) & 7u) == 0;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wm0 + 16 * i + g + 8 * h;
      if (row >= M) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t col = n0 + wn0 + 8 * j + 2 * t;  // even
        if (col >= N) continue;
        float* c = Cp + row * ldc + col;
        float v0 = alpha * acc[i][j][2 * h], v1 = alpha * acc[i][j][2 * h + 1];
        if (pair_ok && col + 1 < N) {
          if (beta != 0.0f) {  // beta == 0: C is never read (may hold NaN)
            const float2 old = *reinterpret_cast<const float2*>(c);
            v0 = fmaf(beta, old.x, v0), v1 = fmaf(beta, old.y, v1);
          }
          *reinterpret_cast<float2*>(c) = make_float2(v0, v1);
        } else {
          c[0] = beta == 0.0f ? v0 : fmaf(beta, c[0], v0);
          if (col + 1 < N) c[1] = beta == 0.0f ? v1 : fmaf(beta, c[1], v1);
        }
      }
    }
  }
#else
  __trap();  // sm_75 and older: the host never launches this kernel there
#endif
}

// ---- launch helpers
template <class C>
inline dim3 grid_for(int64_t M, int64_t N) {
  return dim3(static_cast<unsigned>((M + C::BM - 1) / C::BM), static_cast<unsigned>((N + C::BN - 1) / C::BN));
}
// Same limits as the SIMT kernel (its small tile is 64 x 64 too).
inline bool grid_ok(int64_t M, int64_t N) {
  return (M + Small::BM - 1) / Small::BM <= 0x7fffffffLL && (N + Small::BN - 1) / Small::BN <= 65535;
}

template <class ASrc, class BSrc>
inline void launch(cudaStream_t stream, int sm_count, int64_t M, int64_t N, int64_t K, float alpha, ASrc a, BSrc b,
                   float beta, float* C, int64_t ldc) {
  const int64_t big_blocks = ((M + Big::BM - 1) / Big::BM) * ((N + Big::BN - 1) / Big::BN);
  if (big_blocks >= sm_count)
    tc_gemm_kernel<Big><<<grid_for<Big>(M, N), Big::kThreads, 0, stream>>>(M, N, K, alpha, a, b, beta, C, ldc);
  else
    tc_gemm_kernel<Small><<<grid_for<Small>(M, N), Small::kThreads, 0, stream>>>(M, N, K, alpha, a, b, beta, C, ldc);
}

// True when p is 16-byte aligned and ld, K are multiples of 4 (F32VecSrc's requirement).
inline bool f32_vec_ok(const float* p, int64_t ld, int64_t K) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0 && ld % 4 == 0 && K % 4 == 0;
}

}  // namespace qlora::cuda::mma
