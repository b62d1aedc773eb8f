// Bias add over a row-strided matrix: grid-stride over the M*N elements.
#include "cuda_check.hpp"
#include "ops_add_bias.cuh"
#include "ops_common.cuh"

namespace qlora::cuda {
namespace {
__global__ void add_bias_kernel(int64_t M, int64_t N, const float* __restrict__ bias, float* __restrict__ y,
                                int64_t ldy) {
  const int64_t n = M * N, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / N, c = j - m * N;
    y[m * ldy + c] += bias[c];
  }
}
}  // namespace

void add_bias(cudaStream_t stream, int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) {
  if (M <= 0 || N <= 0) return;
  add_bias_kernel<<<grid_for(M * N), kOpThreads, 0, stream>>>(M, N, bias, y, ldy);
  QLORA_CUDA_CHECK_LAUNCH("add_bias");
}
}  // namespace qlora::cuda
