// SwiGLU: grid-stride over the M*N elements; silu(g) = g / (1 + exp(-g)) as the CPU writes it.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_swiglu.cuh"

namespace qlora::cuda {
namespace {
__global__ void swiglu_kernel(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                              float* out, int64_t ldo) {
  const int64_t n = M * N, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / N, c = j - m * N;
    const float g = gate[m * ldg + c], u = up[m * ldu + c];
    out[m * ldo + c] = g / (1.0f + expf(-g)) * u;
  }
}
}  // namespace

void swiglu(cudaStream_t stream, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
            float* out, int64_t ldo) {
  if (M <= 0 || N <= 0) return;
  swiglu_kernel<<<grid_for(M * N), kOpThreads, 0, stream>>>(M, N, gate, ldg, up, ldu, out, ldo);
  QLORA_CUDA_CHECK_LAUNCH("swiglu");
}
}  // namespace qlora::cuda
