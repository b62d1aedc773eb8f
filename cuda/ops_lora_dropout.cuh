// LoRA dropout (Backend::lora_dropout / lora_dropout_backward): inverted dropout whose keep mask
// is regenerated from a Philox4x32-10 stream instead of being stored. Element i = m*in + j of the
// [M, in] mask is kept when output offset + i of the stream of `seed` satisfies
// train::bernoulli_keep(x, p_keep) (train/philox_block.hpp: the same block and rule as the CPU op,
// so a seed gives the same mask on every backend).
//   forward:  out[M, in] (contiguous) = keep ? x[m*ldx + j] * s : 0
//   backward: dx[m*lddx + j] += keep ? g[M, in] (contiguous) * s : 0   (dropped elements untouched)
// s = 1 / (1 - p) is computed by the caller on the host (IEEE division, as the CPU op's); the
// products and sums are IEEE-exact (ieee_ops.cuh: no FMA, no FTZ), so results equal the CPU's bits.
// Launchers (host declarations; kernels in ops_lora_dropout.cu): device pointers, arguments
// validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void lora_dropout(cudaStream_t stream, uint64_t seed, uint64_t offset, double p_keep, float s, int64_t M, int64_t in, const float* x,
                  int64_t ldx, float* out);
void lora_dropout_backward(cudaStream_t stream, uint64_t seed, uint64_t offset, double p_keep, float s, int64_t M, int64_t in,
                           const float* g, float* dx, int64_t lddx);

}  // namespace qlora::cuda
