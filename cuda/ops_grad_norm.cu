// Global gradient norm (sum of squares in double), clipping scale and the non-finite scan.
#include "cuda_check.hpp"
#include "ieee_ops.cuh"
#include "ops_common.cuh"
#include "ops_grad_norm.cuh"

namespace qlora::cuda {
namespace {

// Pass 1: block c sums x[bounds[c], bounds[c+1])². Squares of floats are exact in double, so a
// contraction of `s += xi * xi` into a double FMA gives the same value.
__global__ void chunk_sum_squares_kernel(const int64_t* __restrict__ bounds, const float* __restrict__ x,
                                         double* __restrict__ partial) {
  __shared__ double scratch[32];
  const int64_t c = blockIdx.x;
  const int64_t b = bounds[c], e = bounds[c + 1];
  double s = 0.0;
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const double xi = static_cast<double>(x[i]);
    s += xi * xi;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[c] = s;
}

// Pass 2: one thread, the partials in chunk order (8 loads in flight, the additions in order).
__global__ void sum_partials_kernel(int64_t n, const double* __restrict__ partial, double* __restrict__ out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0.0;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    double t[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) t[j] = partial[c + j];
#pragma unroll
    for (int j = 0; j < 8; ++j) s += t[j];
  }
  for (; c < n; ++c) s += partial[c];
  *out = s;
}

__global__ void scale_kernel(int64_t n, float* __restrict__ x, float s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = ieee_mul(x[i], s);
}

// Each thread's first hit in its grid-stride order is its smallest; the minimum over threads is the answer.
__global__ void nonfinite_kernel(int64_t n, const float* __restrict__ x, unsigned long long* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if (is_nonfinite_bits(x[i])) {
      atomicMin(out, static_cast<unsigned long long>(i));
      return;
    }
}

}  // namespace

void sum_squares(cudaStream_t stream, int64_t n_chunks, const int64_t* bounds, const float* x, double* partial,
                 double* out) {
  if (n_chunks > 0) {
    chunk_sum_squares_kernel<<<static_cast<unsigned>(n_chunks), kOpThreads, 0, stream>>>(bounds, x, partial);
    QLORA_CUDA_CHECK_LAUNCH("sum_squares");
  }
  sum_partials_kernel<<<1, 32, 0, stream>>>(n_chunks, partial, out);  // n_chunks == 0: out = 0
  QLORA_CUDA_CHECK_LAUNCH("sum_squares");
}

void scale_inplace(cudaStream_t stream, int64_t n, float* x, float s) {
  if (n <= 0) return;
  scale_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(n, x, s);
  QLORA_CUDA_CHECK_LAUNCH("scale_inplace");
}

void find_nonfinite(cudaStream_t stream, int64_t n, const float* x, int64_t* out) {
  QLORA_CUDA_CHECK(cudaMemsetAsync(out, 0xFF, sizeof(int64_t), stream), "find_nonfinite");  // -1
  if (n <= 0) return;
  nonfinite_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(n, x, reinterpret_cast<unsigned long long*>(out));
  QLORA_CUDA_CHECK_LAUNCH("find_nonfinite");
}

}  // namespace qlora::cuda
