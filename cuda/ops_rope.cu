// RoPE: one thread per (token m, head h, pair i); the pair (x_i, x_{i+half}) is read and written
// by that thread only, so the op is in place without barriers.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_rope.cuh"

namespace qlora::cuda {
namespace {
__global__ void rope_kernel(int64_t M, int64_t H, int64_t hd, float* __restrict__ x, int64_t ldx,
                            const int32_t* __restrict__ pos, const float* __restrict__ inv_freq, bool inverse) {
  const int64_t half = hd / 2, n = M * H * half, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t i = j % half, mh = j / half, h = mh % H, m = mh / H;
    const float ang = static_cast<float>(pos[m]) * inv_freq[i];  // fp32 product, as the CPU and transformers
    double s, c;
    sincos(static_cast<double>(ang), &s, &c);
    const float co = static_cast<float>(c), sn = inverse ? -static_cast<float>(s) : static_cast<float>(s);
    float* v = x + m * ldx + h * hd;
    const float x1 = v[i], x2 = v[half + i];
    v[i] = x1 * co - x2 * sn;
    v[half + i] = x2 * co + x1 * sn;
  }
}
}  // namespace

void rope(cudaStream_t stream, int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
          const float* inv_freq, bool inverse) {
  const int64_t n = M * n_heads * (head_dim / 2);
  if (n <= 0) return;
  rope_kernel<<<grid_for(n), kOpThreads, 0, stream>>>(M, n_heads, head_dim, x, ldx, pos, inv_freq, inverse);
  QLORA_CUDA_CHECK_LAUNCH("rope");
}
}  // namespace qlora::cuda
