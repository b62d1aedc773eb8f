// SwiGLU backward: grid-stride over the M*N elements, the CPU's formulas
// (s = 1 / (1 + exp(-g)); dup = dout (g s); dgate = dout u (s (1 + g (1 - s)))). Each element is
// read completely before its outputs are written, by one thread, so outputs may alias inputs.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_swiglu_backward.cuh"

namespace qlora::cuda {
namespace {
__global__ void swiglu_backward_kernel(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up,
                                       int64_t ldu, const float* dout, int64_t ldd, float* dgate, int64_t lddg,
                                       float* dup, int64_t lddu) {
  const int64_t n = M * N, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / N, c = j - m * N;
    const float g = gate[m * ldg + c], u = up[m * ldu + c], d = dout[m * ldd + c];
    const float s = 1.0f / (1.0f + expf(-g));
    dup[m * lddu + c] = d * (g * s);
    dgate[m * lddg + c] = d * u * (s * (1.0f + g * (1.0f - s)));
  }
}
}  // namespace

void swiglu_backward(cudaStream_t stream, int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up,
                     int64_t ldu, const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup,
                     int64_t lddu) {
  if (M <= 0 || N <= 0) return;
  swiglu_backward_kernel<<<grid_for(M * N), kOpThreads, 0, stream>>>(M, N, gate, ldg, up, ldu, dout, ldd, dgate,
                                                                     lddg, dup, lddu);
  QLORA_CUDA_CHECK_LAUNCH("swiglu_backward");
}
}  // namespace qlora::cuda
