// Embedding gather: grid-stride over the M*D outputs, one thread per element (coalesced rows).
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_embedding.cuh"

namespace qlora::cuda {
namespace {
__global__ void embedding_kernel(int64_t M, int64_t D, const float* __restrict__ table, const int32_t* __restrict__ ids,
                                 float* __restrict__ out) {
  const int64_t n = M * D, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / D, d = j - m * D;
    out[j] = table[static_cast<int64_t>(ids[m]) * D + d];
  }
}
}  // namespace

void embedding(cudaStream_t stream, int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) {
  if (M <= 0 || D <= 0) return;
  embedding_kernel<<<grid_for(M * D), kOpThreads, 0, stream>>>(M, D, table, ids, out);
  QLORA_CUDA_CHECK_LAUNCH("embedding");
}
}  // namespace qlora::cuda
