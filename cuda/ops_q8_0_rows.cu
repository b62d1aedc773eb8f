// Q8_0 embedding gather: one thread per output element; weight j of a block = float(d) * q[j].
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_q8_0_rows.cuh"

namespace qlora::cuda {
namespace {
__global__ void q8_0_rows_kernel(int64_t M, int64_t K, const uint8_t* __restrict__ W, const int32_t* __restrict__ ids,
                                 float* __restrict__ out) {
  const int64_t n = M * K, stride = static_cast<int64_t>(gridDim.x) * blockDim.x, row_bytes = K / 32 * 34;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / K, k = j - m * K;
    const uint8_t* blk = W + static_cast<int64_t>(ids[m]) * row_bytes + (k / 32) * 34;
    const float d = half_bits_to_float(blk[0] | (static_cast<unsigned>(blk[1]) << 8));
    out[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + k % 32]));
  }
}
}  // namespace

void q8_0_rows(cudaStream_t stream, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) {
  if (M <= 0 || K <= 0) return;
  q8_0_rows_kernel<<<grid_for(M * K), kOpThreads, 0, stream>>>(M, K, static_cast<const uint8_t*>(W), ids, out);
  QLORA_CUDA_CHECK_LAUNCH("q8_0_rows");
}
}  // namespace qlora::cuda
