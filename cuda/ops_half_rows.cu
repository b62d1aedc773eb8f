// 16-bit-row embedding gather: one thread per output element, each weight widened exactly to fp32.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_half_rows.cuh"

namespace qlora::cuda {
namespace {
template <bool BF>
__global__ void half_rows_kernel(int64_t M, int64_t K, const uint16_t* __restrict__ W, const int32_t* __restrict__ ids,
                                 float* __restrict__ out) {
  const int64_t n = M * K, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t m = j / K, k = j - m * K;
    const unsigned h = W[static_cast<int64_t>(ids[m]) * K + k];
    out[j] = BF ? __uint_as_float(h << 16) : half_bits_to_float(h);
  }
}
}  // namespace

void half_rows(cudaStream_t stream, bool bf16, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) {
  if (M <= 0 || K <= 0) return;
  const uint16_t* w = static_cast<const uint16_t*>(W);
  if (bf16) half_rows_kernel<true><<<grid_for(M * K), kOpThreads, 0, stream>>>(M, K, w, ids, out);
  else half_rows_kernel<false><<<grid_for(M * K), kOpThreads, 0, stream>>>(M, K, w, ids, out);
  QLORA_CUDA_CHECK_LAUNCH("half_rows");
}
}  // namespace qlora::cuda
