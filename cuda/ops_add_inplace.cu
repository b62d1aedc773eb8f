// Residual add: grid-stride, one element per thread per step.
#include "cuda_check.hpp"
#include "ops_add_inplace.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {
__global__ void add_inplace_kernel(int64_t n, const float* __restrict__ x, float* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) y[j] += x[j];
}
}  // namespace

void add_inplace(cudaStream_t stream, int64_t n, const float* x, float* y) {
  if (n <= 0) return;
  add_inplace_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(n, x, y);
  QLORA_CUDA_CHECK_LAUNCH("add_inplace");
}
}  // namespace qlora::cuda
