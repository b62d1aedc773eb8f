// Emulator stand-in for cuda/mma_tile.cuh (see emu.hpp): bf16 RNE packing and the warp-collective
// m16n8k16 bf16 mma.
#pragma once
#include "emu.hpp"
namespace qlora::cuda::mma {
inline uint32_t bf16_rn(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return u >> 16;
}
inline uint32_t pack_bf16x2(float lo, float hi) { return bf16_rn(lo) | (bf16_rn(hi) << 16); }
inline void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { emu::mma(c, a, b); }
}  // namespace qlora::cuda::mma
