// Q8_0 GEMM: one warp per output column n (a weight row) and group of up to kRows rows of X.
// Lane j takes element j of every 32-weight block, so a warp reads each 34-byte block once per
// row group and X coalesced; fp32 accumulation, warp-shuffle reduction at the end.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_q8_0_gemm.cuh"

namespace qlora::cuda {
namespace {
constexpr int kRows = 8;  // rows of X per warp: a decode batch of <= 8 reads W once
constexpr int kWarps = kOpThreads / 32;

__global__ void __launch_bounds__(kOpThreads)
    q8_0_gemm_kernel(int64_t M, int64_t N, int64_t K, const float* __restrict__ X, int64_t ldx,
                     const uint8_t* __restrict__ W, float* __restrict__ Y, int64_t ldy) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;  // whole warp; no barrier follows
  const int rows = M - m0 < kRows ? static_cast<int>(M - m0) : kRows;
  const uint8_t* wrow = W + n * (K / 32 * 34);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* blk = wrow + b * 34;
    const float w = half_bits_to_float(blk[0] | (static_cast<unsigned>(blk[1]) << 8)) *
                    static_cast<float>(static_cast<int8_t>(blk[2 + lane]));
    const float* x = X + m0 * ldx + b * 32 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) acc[r] = fmaf(w, x[r * ldx], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0 && r < rows) Y[(m0 + r) * ldy + n] = s;
  }
}
}  // namespace

void q8_0_gemm_nt(cudaStream_t stream, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                  float* Y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  // grid.y is at most 65535: rows of X beyond 65535 * kRows go in further launches on the same
  // stream (as half_gemm_nt). Each launch sees its chunk as rows 0.. of X / Y offset by m0 rows:
  // test_cuda_emu_gemm.py runs the kernel on one-chunk cases (524k rows are too slow for the
  // emulator); test_q8_0_gemm_launch_split.py checks the chunks' grids and offsets without running it.
  constexpr int64_t kMaxM = int64_t{65535} * kRows;
  const uint8_t* w = static_cast<const uint8_t*>(W);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t m = M - m0 < kMaxM ? M - m0 : kMaxM;
    const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>((m + kRows - 1) / kRows));
    q8_0_gemm_kernel<<<grid, kOpThreads, 0, stream>>>(m, N, K, X + m0 * ldx, ldx, w, Y + m0 * ldy, ldy);
    QLORA_CUDA_CHECK_LAUNCH("q8_0_gemm_nt");
  }
}
}  // namespace qlora::cuda
