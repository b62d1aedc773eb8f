// 16-bit-row GEMM: one warp per output column n (a weight row) and group of up to kRows rows of X (the
// structure of ops_q8_0_gemm.cu). Where K, ldx and the pointers allow, lane j reads 4 weights (8 bytes)
// and 4 values of X (16 bytes) per step, so a warp streams 256 bytes of W at a time; otherwise one
// weight per lane per step. Weights widen exactly to fp32 (fp16: converted at load; bf16: a shift),
// fp32 accumulation, warp-shuffle reduction at the end.
#include <cstdint>

#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_half_gemm.cuh"

namespace qlora::cuda {
namespace {
constexpr int kRows = 8;  // rows of X per warp: a decode batch of <= 8 reads W once
constexpr int kWarps = kOpThreads / 32;

template <bool BF>
__device__ __forceinline__ float wide(unsigned h) {
  return BF ? __uint_as_float(h << 16) : half_bits_to_float(h);
}

template <bool BF, bool VEC>
__global__ void __launch_bounds__(kOpThreads)
    half_gemm_kernel(int64_t M, int64_t N, int64_t K, const float* __restrict__ X, int64_t ldx,
                     const uint16_t* __restrict__ W, float* __restrict__ Y, int64_t ldy) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;  // whole warp; no barrier follows
  const int rows = M - m0 < kRows ? static_cast<int>(M - m0) : kRows;
  const uint16_t* wrow = W + n * K;
  const float* x0 = X + m0 * ldx;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  if (VEC) {  // K % 4 == 0, ldx % 4 == 0, W and X 8- / 16-byte aligned (checked by the launcher)
    for (int64_t k = 4 * lane; k < K; k += 128) {
      const uint2 p = __ldg(reinterpret_cast<const uint2*>(wrow + k));
      const float w0 = wide<BF>(p.x & 0xFFFFu), w1 = wide<BF>(p.x >> 16), w2 = wide<BF>(p.y & 0xFFFFu),
                  w3 = wide<BF>(p.y >> 16);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) {
          const float4 x = *reinterpret_cast<const float4*>(x0 + r * ldx + k);
          acc[r] = fmaf(w3, x.w, fmaf(w2, x.z, fmaf(w1, x.y, fmaf(w0, x.x, acc[r]))));
        }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float w = wide<BF>(wrow[k]);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] = fmaf(w, x0[r * ldx + k], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0 && r < rows) Y[(m0 + r) * ldy + n] = s;
  }
}

template <bool BF>
void launch(cudaStream_t stream, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const uint16_t* W,
            float* Y, int64_t ldy) {
  const bool vec = K % 4 == 0 && ldx % 4 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(W) % 8 == 0;
  // grid.y is at most 65535: rows of X beyond 65535 * kRows go in further launches.
  constexpr int64_t kMaxM = int64_t{65535} * kRows;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t m = M - m0 < kMaxM ? M - m0 : kMaxM;
    const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>((m + kRows - 1) / kRows));
    const float* x = X + m0 * ldx;
    float* y = Y + m0 * ldy;
    if (vec) half_gemm_kernel<BF, true><<<grid, kOpThreads, 0, stream>>>(m, N, K, x, ldx, W, y, ldy);
    else half_gemm_kernel<BF, false><<<grid, kOpThreads, 0, stream>>>(m, N, K, x, ldx, W, y, ldy);
    QLORA_CUDA_CHECK_LAUNCH("half_gemm_nt");
  }
}
}  // namespace

void half_gemm_nt(cudaStream_t stream, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                  const void* W, float* Y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  const uint16_t* w = static_cast<const uint16_t*>(W);
  if (bf16) launch<true>(stream, M, N, K, X, ldx, w, Y, ldy);
  else launch<false>(stream, M, N, K, X, ldx, w, Y, ldy);
}
}  // namespace qlora::cuda
