// LoRA dropout: grid-stride over the Philox blocks that cover stream outputs offset .. offset+n-1;
// thread b computes block first_blk + b (outputs 4(first_blk+b) .. +3, one Philox4x32-10
// evaluation) and handles the mask elements among them, so each 32-bit output is generated once.
#include "cuda_check.hpp"
#include "ieee_ops.cuh"
#include "ops_common.cuh"
#include "ops_lora_dropout.cuh"
#include "train/philox_block.hpp"

namespace qlora::cuda {
namespace {
template <bool kBackward>
__global__ void lora_dropout_kernel(uint64_t seed, uint64_t offset, double p_keep, float s, int64_t in, int64_t n,
                                    const float* src, int64_t lds, float* dst, int64_t ldd) {
  const uint64_t first_blk = offset / 4, last_blk = (offset + static_cast<uint64_t>(n) - 1) / 4;
  const int64_t nblk = static_cast<int64_t>(last_blk - first_blk + 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t bi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; bi < nblk; bi += stride) {
    const uint64_t blk = first_blk + static_cast<uint64_t>(bi);
    uint32_t r[4];
    train::philox_stream_block(seed, blk, r);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t k = 4 * blk + lane;  // stream output
      if (k < offset) continue;
      const int64_t i = static_cast<int64_t>(k - offset);  // mask element
      if (i >= n) break;
      const int64_t m = i / in, j = i - m * in;
      const bool keep = train::bernoulli_keep(r[lane], p_keep);
      if (kBackward) {
        // g contiguous [M, in]; ieee_ops: the CPU's separate roundings of * and +, subnormals kept
        if (keep) dst[m * ldd + j] = ieee_add(dst[m * ldd + j], ieee_mul(src[i], s));
      } else {
        dst[i] = keep ? ieee_mul(src[m * lds + j], s) : 0.0f;  // out contiguous [M, in]
      }
    }
  }
}

unsigned blocks_for(uint64_t offset, int64_t n) {
  return grid_for(static_cast<int64_t>((offset + static_cast<uint64_t>(n) - 1) / 4 - offset / 4 + 1));
}
}  // namespace

void lora_dropout(cudaStream_t stream, uint64_t seed, uint64_t offset, double p_keep, float s, int64_t M, int64_t in,
                  const float* x, int64_t ldx, float* out) {
  const int64_t n = M * in;
  if (n <= 0) return;
  lora_dropout_kernel<false><<<blocks_for(offset, n), kOpThreads, 0, stream>>>(seed, offset, p_keep, s, in, n, x, ldx,
                                                                               out, in);
  QLORA_CUDA_CHECK_LAUNCH("lora_dropout");
}

void lora_dropout_backward(cudaStream_t stream, uint64_t seed, uint64_t offset, double p_keep, float s, int64_t M,
                           int64_t in, const float* g, float* dx, int64_t lddx) {
  const int64_t n = M * in;
  if (n <= 0) return;
  lora_dropout_kernel<true><<<blocks_for(offset, n), kOpThreads, 0, stream>>>(seed, offset, p_keep, s, in, n, g, in,
                                                                              dx, lddx);
  QLORA_CUDA_CHECK_LAUNCH("lora_dropout_backward");
}
}  // namespace qlora::cuda
