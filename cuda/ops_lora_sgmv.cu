// SGMV shrink / expand kernels (ops_lora_sgmv.cuh). fp32 throughout; t is rounded to fp32 between
// the two products, as the reference's two GEMMs do.
#include <cuda_runtime.h>

#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_lora_sgmv.cuh"

namespace qlora::cuda {
namespace {

constexpr int kShrinkThreads = 256;  // threads per shrink block: one rank row of one entry
constexpr int kExpandThreads = 256;  // output columns per expand block
constexpr int kRowGroup = 8;       // rows accumulated together (registers)

// The entry holding work item `item` (entries' first items ascending).
__device__ __forceinline__ int find_entry(const SgmvBatch& b, int32_t item, bool shrink) {
  int lo = 0, hi = b.n - 1;
  while (lo < hi) {  // last entry whose first item <= item
    const int mid = (lo + hi + 1) / 2;
    if ((shrink ? b.e[mid].shrink0 : b.e[mid].expand0) <= item) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// t[i, j] = x[i, :] · A[j, :] for every row i of the entry; one block per (entry, j): the threads
// split the `in` dimension (a decode step has few rank rows, so one warp each would leave most of
// the GPU idle), partial sums reduced in a fixed order (warp shuffles, then the warps' sums in
// warp order): deterministic.
__global__ void __launch_bounds__(kShrinkThreads) sgmv_shrink(const __grid_constant__ SgmvBatch b) {
  __shared__ float part[kShrinkThreads / 32][kRowGroup];
  const int32_t item = blockIdx.x;  // < shrink_items by the grid size
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const SgmvEntry& e = b.e[find_entry(b, item, true)];
  const int32_t j = item - e.shrink0;
  const float* a = e.A + static_cast<int64_t>(j) * e.in;
  for (int32_t i0 = 0; i0 < e.rows; i0 += kRowGroup) {  // uniform over the block
    const int32_t nr = e.rows - i0 < kRowGroup ? e.rows - i0 : kRowGroup;
    float acc[kRowGroup];
#pragma unroll
    for (int ii = 0; ii < kRowGroup; ++ii) acc[ii] = 0.0f;
    for (int32_t k = threadIdx.x; k < e.in; k += kShrinkThreads) {
      const float av = a[k];
#pragma unroll
      for (int ii = 0; ii < kRowGroup; ++ii)
        if (ii < nr) acc[ii] = fmaf(e.x[static_cast<int64_t>(i0 + ii) * e.ldx + k], av, acc[ii]);
    }
#pragma unroll
    for (int ii = 0; ii < kRowGroup; ++ii) {
      const float s = warp_sum(acc[ii]);
      if (lane == 0) part[warp][ii] = s;
    }
    __syncthreads();
    if (threadIdx.x < nr) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kShrinkThreads / 32; ++w) s += part[w][threadIdx.x];
      e.t[static_cast<int64_t>(i0 + threadIdx.x) * e.r + j] = s;
    }
    __syncthreads();  // part is rewritten by the next row group
  }
}

// y[i, o] += alpha * t[i, :] · B[o, :]; one block per (entry, tile of kExpandThreads columns).
__global__ void __launch_bounds__(kExpandThreads) sgmv_expand(const __grid_constant__ SgmvBatch b) {
  __shared__ float ts[kSgmvMaxTile];
  const int32_t item = blockIdx.x;  // < expand_items by the grid size
  const SgmvEntry& e = b.e[find_entry(b, item, false)];
  const int32_t n = e.rows * e.r;  // <= kSgmvMaxTile (checked on the host)
  for (int32_t i = threadIdx.x; i < n; i += blockDim.x) ts[i] = e.t[i];
  __syncthreads();
  const int32_t o = (item - e.expand0) * kExpandThreads + static_cast<int32_t>(threadIdx.x);
  if (o >= e.out) return;  // after the only barrier
  const float* bo = e.B + static_cast<int64_t>(o) * e.r;
  for (int32_t i0 = 0; i0 < e.rows; i0 += kRowGroup) {
    const int32_t nr = e.rows - i0 < kRowGroup ? e.rows - i0 : kRowGroup;
    float acc[kRowGroup];
#pragma unroll
    for (int ii = 0; ii < kRowGroup; ++ii) acc[ii] = 0.0f;
    for (int32_t j = 0; j < e.r; ++j) {
      const float bv = bo[j];
#pragma unroll
      for (int ii = 0; ii < kRowGroup; ++ii)
        if (ii < nr) acc[ii] = fmaf(ts[(i0 + ii) * e.r + j], bv, acc[ii]);
    }
#pragma unroll
    for (int ii = 0; ii < kRowGroup; ++ii)
      if (ii < nr) {
        float* yp = e.y + static_cast<int64_t>(i0 + ii) * e.ldy + o;
        *yp = fmaf(e.alpha, acc[ii], *yp);
      }
  }
}

}  // namespace

void lora_sgmv(cudaStream_t stream, const SgmvBatch& batch) {
  if (batch.n <= 0) return;
  if (batch.shrink_items > 0) {
    sgmv_shrink<<<static_cast<unsigned>(batch.shrink_items), kShrinkThreads, 0, stream>>>(batch);
    QLORA_CUDA_CHECK_LAUNCH("lora_segments_many");
  }
  if (batch.expand_items > 0) {
    sgmv_expand<<<static_cast<unsigned>(batch.expand_items), kExpandThreads, 0, stream>>>(batch);
    QLORA_CUDA_CHECK_LAUNCH("lora_segments_many");
  }
}

}  // namespace qlora::cuda
