// KV-cache append: one thread per written element; consecutive threads write consecutive dims.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_kv_write.cuh"

namespace qlora::cuda {
namespace {
__global__ void kv_write_kernel(int64_t B, int64_t T, int64_t H, int64_t hd, const float* __restrict__ x, int64_t ldx,
                                float* __restrict__ cache, int64_t S_cap, int64_t start) {
  const int64_t n = B * T * H * hd, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t d = j % hd, r = j / hd, h = r % H, bt = r / H, t = bt % T, b = bt / T;
    cache[((b * H + h) * S_cap + start + t) * hd + d] = x[bt * ldx + h * hd + d];
  }
}
}  // namespace

void kv_write(cudaStream_t stream, int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache,
              int64_t S_cap, int64_t start) {
  const int64_t n = B * T * H * hd;
  if (n <= 0) return;
  kv_write_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(B, T, H, hd, x, ldx, cache, S_cap, start);
  QLORA_CUDA_CHECK_LAUNCH("kv_write");
}
}  // namespace qlora::cuda
