// One Philox4x32-10 block (Salmon et al., SC'11) and the LoRA-dropout keep rule, shared by the
// host RNG (train/rng.cpp, the CPU dropout op) and the CUDA dropout kernel (cuda/ops_lora_dropout.cu),
// so a seed gives the same stream, and the same masks, on every backend. Plain C++ with
// __host__ __device__ under nvcc; no std types in the signatures (device code cannot call them).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora::train {

// c[4] <- Philox4x32-10(counter c, key {k0, k1}).
QLORA_HD void philox4x32_10_block(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < 10; ++round) {
    if (round > 0) k0 += kW0, k1 += kW1;
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0, n1 = static_cast<uint32_t>(p1);
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1, n3 = static_cast<uint32_t>(p0);
    c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
  }
}

// Outputs 4*index .. 4*index+3 of the stream of `seed` (Philox's output k is word k%4 of the
// block with counter {k/4 lo, k/4 hi, 0, 0}, key {seed lo, seed hi}).
QLORA_HD void philox_stream_block(uint64_t seed, uint64_t index, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(index), out[1] = static_cast<uint32_t>(index >> 32), out[2] = 0u, out[3] = 0u;
  philox4x32_10_block(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Bernoulli(p_keep) from one 32-bit output, Philox::fill_bernoulli's rule: x * 2^-32 < p_keep in
// double (exact on host and device: the product is a power-of-two scaling, the compare IEEE).
QLORA_HD bool bernoulli_keep(uint32_t x, double p_keep) { return static_cast<double>(x) * 0x1p-32 < p_keep; }

}  // namespace qlora::train
