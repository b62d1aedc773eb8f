// KV-cache append: one thread per written element; consecutive threads write consecutive dims.
// fp32 caches store x; bf16 caches (compute_dtype="bfloat16") store x rounded to bf16 by the CPU's
// rule (cpu/gemm_bf16.cpp bf16_round: nearest even, denormals to signed zero, NaN quieted), so a
// CUDA cache holds the same bits as a CPU one.
#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_kv_write.cuh"

namespace qlora::cuda {
namespace {
__device__ __forceinline__ float store_as(float v, const float*) { return v; }
__device__ __forceinline__ uint16_t store_as(float v, const uint16_t*) {
  uint32_t b = __float_as_uint(v);
  if ((b & 0x7F800000u) == 0)
    b &= 0x80000000u;  // zero or denormal: signed zero
  else if ((b & 0x7FFFFFFFu) > 0x7F800000u)
    b = (b | 0x00400000u) & 0xFFFF0000u;  // NaN: quiet, payload truncated
  else
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;  // nearest even (overflow rounds to inf)
  return static_cast<uint16_t>(b >> 16);
}

template <class E>
__global__ void kv_write_kernel(int64_t B, int64_t T, int64_t H, int64_t hd, const float* __restrict__ x, int64_t ldx,
                                E* __restrict__ cache, int64_t S_cap, int64_t start) {
  const int64_t n = B * T * H * hd, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t d = j % hd, r = j / hd, h = r % H, bt = r / H, t = bt % T, b = bt / T;
    cache[((b * H + h) * S_cap + start + t) * hd + d] = store_as(x[bt * ldx + h * hd + d], cache);
  }
}
}  // namespace

void kv_write(cudaStream_t stream, int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache,
              int64_t S_cap, int64_t start) {
  const int64_t n = B * T * H * hd;
  if (n <= 0) return;
  kv_write_kernel<float><<<grid_for(n), kOpThreads, 0, stream>>>(B, T, H, hd, x, ldx, cache, S_cap, start);
  QLORA_CUDA_CHECK_LAUNCH("kv_write");
}

void kv_write_bf16(cudaStream_t stream, int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx,
                   uint16_t* cache, int64_t S_cap, int64_t start) {
  const int64_t n = B * T * H * hd;
  if (n <= 0) return;
  kv_write_kernel<uint16_t><<<grid_for(n), kOpThreads, 0, stream>>>(B, T, H, hd, x, ldx, cache, S_cap, start);
  QLORA_CUDA_CHECK_LAUNCH("kv_write_bf16");
}
}  // namespace qlora::cuda
