// RMSNorm backward: one block per row. The two row sums (Σ x², Σ w dy x) are accumulated in
// double, as the CPU op does, then r and the correction term in fp32 exactly as the CPU writes
// them. dx may alias dy: the sums finish (block_sum ends with a barrier) before any write, and
// each element is read and written by the same thread.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_rmsnorm_backward.cuh"

namespace qlora::cuda {
namespace {
__global__ void __launch_bounds__(kOpThreads)
    rmsnorm_backward_kernel(int64_t D, const float* __restrict__ x, const float* __restrict__ w, float eps,
                            const float* dy, float* dx) {
  __shared__ double scratch[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * D;
  const float* g = dy + row * D;
  float* o = dx + row * D;
  double ss = 0.0, dot = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double xi = xr[i];
    ss += xi * xi;
    dot += static_cast<double>(w[i]) * g[i] * xi;
  }
  ss = block_sum(ss, scratch);
  dot = block_sum(dot, scratch);
  const float var = static_cast<float>(ss / static_cast<double>(D));
  const float r = 1.0f / sqrtf(var + eps);
  const float c = static_cast<float>(dot / static_cast<double>(D)) * r * r * r;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = r * (w[i] * g[i]) - c * xr[i];
}
}  // namespace

void rmsnorm_backward(cudaStream_t stream, int64_t M, int64_t D, const float* x, const float* w, float eps,
                      const float* dy, float* dx) {
  if (M <= 0 || D <= 0) return;
  rmsnorm_backward_kernel<<<static_cast<unsigned>(M), kOpThreads, 0, stream>>>(D, x, w, eps, dy, dx);
  QLORA_CUDA_CHECK_LAUNCH("rmsnorm_backward");
}
}  // namespace qlora::cuda
