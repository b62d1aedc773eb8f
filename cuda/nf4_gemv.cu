// NF4 GEMV kernels (M <= 4).
//   nt: one warp per output row n of W; lanes stride over 8-element (4-byte) groups of the row,
//       so a warp reads 128 contiguous packed bytes per step; warp-shuffle reduction.
//   nn: one lane per output column c of W (32 columns a block); the block's 8 warps split the
//       rows and combine their partial sums in shared memory.
#include "cuda_check.hpp"
#include "nf4_decode.cuh"
#include "nf4_gemv.cuh"

namespace qlora::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = static_cast<int>(kNf4GemvMaxM);

// y = alpha * acc + beta * y; beta == 0 never reads y.
__device__ __forceinline__ void store_out(float* y, float acc, float alpha, float beta) {
  const float v = alpha * acc;
  *y = beta == 0.0f ? v : fmaf(beta, *y, v);
}

__global__ void __launch_bounds__(kThreads)
    gemv_nt_kernel(int M, float alpha, const float* __restrict__ X, int64_t ldx, Nf4Dev w, float beta,
                   float* __restrict__ Y, int64_t ldy) {
  __shared__ float lut[kNf4LutSize];
  nf4_fill_lut(w, lut);
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (n >= w.rows) return;  // whole warp; no barrier follows
  const int64_t j0 = n * w.cols, j1 = j0 + w.cols;  // row n is W[j0, j1) in the flat index

  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;

  // Groups of 8 elements aligned in the flat index: a group never straddles a quantization block
  // (blocksize is a power of two >= 32); the first/last group may hold elements of other rows.
  for (int64_t g = (j0 >> 3) + lane; (g << 3) < j1; g += 32) {
    const int64_t jg = g << 3;
    float part[kMaxM];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) part[m] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      const int64_t j = jg + e;  // even: j is the byte's high nibble, j + 1 its low nibble
      if (j + 1 < j0 || j >= j1) continue;  // neither element is in row n
      const unsigned char byte = __ldg(w.packed + (j >> 1));
      if (j >= j0) {
        const float code = lut[byte >> 4];
        const float* x = X + (j - j0);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m)
          if (m < M) part[m] = fmaf(__ldg(x + m * ldx), code, part[m]);
      }
      if (j + 1 < j1) {
        const float code = lut[byte & 15];
        const float* x = X + (j + 1 - j0);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m)
          if (m < M) part[m] = fmaf(__ldg(x + m * ldx), code, part[m]);
      }
    }
    const float scale = nf4_block_scale(w, lut, jg >> w.log2_bs);
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[m] = fmaf(part[m], scale, acc[m]);
  }

#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  if (lane == 0)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) store_out(Y + m * ldy + n, acc[m], alpha, beta);
}

__global__ void __launch_bounds__(kThreads)
    gemv_nn_kernel(int M, float alpha, const float* __restrict__ dY, int64_t lddy, Nf4Dev w, float beta,
                   float* __restrict__ dX, int64_t lddx) {
  __shared__ float lut[kNf4LutSize];
  __shared__ float red[kWarps][kMaxM][32];  // per-warp partial sums
  nf4_fill_lut(w, lut);
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;  // output column = column of W
  const bool active = c < w.cols;

  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  if (active)
    for (int64_t r = warp; r < w.rows; r += kWarps) {
      const float wv = nf4_element(w, lut, r * w.cols + c);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
        if (m < M) acc[m] = fmaf(__ldg(dY + m * lddy + r), wv, acc[m]);
    }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) red[warp][m][lane] = acc[m];
  __syncthreads();

  if (warp == 0 && active)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) {
        float s = 0.0f;
#pragma unroll
        for (int v = 0; v < kWarps; ++v) s += red[v][m][lane];
        store_out(dX + m * lddx + c, s, alpha, beta);
      }
}

}  // namespace

void nf4_gemv_nt(cudaStream_t stream, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                 float* Y, int64_t ldy) {
  const unsigned blocks = static_cast<unsigned>((W.rows + kWarps - 1) / kWarps);
  gemv_nt_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<int>(M), alpha, X, ldx, make_nf4_dev(W), beta, Y, ldy);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nt (gemv)");
}

void nf4_gemv_nn(cudaStream_t stream, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                 float beta, float* dX, int64_t lddx) {
  const unsigned blocks = static_cast<unsigned>((W.cols + 31) / 32);
  gemv_nn_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<int>(M), alpha, dY, lddy, make_nf4_dev(W), beta, dX,
                                                  lddx);
  QLORA_CUDA_CHECK_LAUNCH("nf4_gemm_nn (gemv)");
}

}  // namespace qlora::cuda
