// RMSNorm: one block per row; mean of squares in fp32 (block reduction), then
// out = w * (x * rsqrt(var + eps)) as transformers computes it. out may alias x: each element is
// read before it is written, by the same thread.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_rmsnorm.cuh"

namespace qlora::cuda {
namespace {
__global__ void __launch_bounds__(kOpThreads)
    rmsnorm_kernel(int64_t D, const float* x, const float* __restrict__ w, float eps, float* out) {
  __shared__ float scratch[32];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * D;
  float* o = out + static_cast<int64_t>(blockIdx.x) * D;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = w[i] * (xr[i] * r);
}
}  // namespace

void rmsnorm(cudaStream_t stream, int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) {
  if (M <= 0 || D <= 0) return;
  rmsnorm_kernel<<<static_cast<unsigned>(M), kOpThreads, 0, stream>>>(D, x, w, eps, out);
  QLORA_CUDA_CHECK_LAUNCH("rmsnorm");
}
}  // namespace qlora::cuda
