// Softmax cross-entropy: one block per row; max (fp32) and the exp sum (fp64, as the CPU) by
// block reductions, then the loss and, with want_grad, the gradient written over the row.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_cross_entropy.cuh"

namespace qlora::cuda {
namespace {
__global__ void __launch_bounds__(kOpThreads)
    cross_entropy_kernel(int64_t V, float* __restrict__ logits, int64_t ldl, const int32_t* __restrict__ labels,
                         float grad_scale, bool want_grad, float* __restrict__ loss) {
  __shared__ float fs[32];
  __shared__ double ds[32];
  const int64_t m = blockIdx.x;
  float* row = logits + m * ldl;
  const int32_t y = labels[m];
  if (y == -100) {  // uniform over the block: no barrier is skipped by part of it
    if (threadIdx.x == 0) loss[m] = 0.0f;
    if (want_grad)
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) row[i] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, row[i]);
  mx = block_max(mx, fs);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) sum += exp(static_cast<double>(row[i] - mx));
  sum = block_sum(sum, ds);
  const double lse = static_cast<double>(mx) + log(sum);
  const float target = row[y];
  __syncthreads();  // every thread read row[y] before the gradient overwrites it
  if (threadIdx.x == 0) loss[m] = static_cast<float>(lse - static_cast<double>(target));
  if (want_grad) {
    const float l = static_cast<float>(lse);
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float g = grad_scale * expf(row[i] - l);
      row[i] = i == y ? g - grad_scale : g;
    }
  }
}
}  // namespace

void cross_entropy_rows(cudaStream_t stream, int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                        float grad_scale, bool want_grad, float* loss) {
  if (M <= 0) return;
  cross_entropy_kernel<<<static_cast<unsigned>(M), kOpThreads, 0, stream>>>(V, logits, ldl, labels, grad_scale,
                                                                            want_grad, loss);
  QLORA_CUDA_CHECK_LAUNCH("cross_entropy_rows");
}
}  // namespace qlora::cuda
