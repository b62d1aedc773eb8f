// Dequantization of GGUF tensor data to float32, bit-exact with the gguf package's numpy
// reference (gguf.quants.dequantize): same products and sums in the same order, in fp32, with no
// fused multiply-add (dequant.cpp turns contraction off).
#pragma once
#include <cstdint>

namespace qlora::gguf {

// Types dequantize() handles: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
bool dequant_supported(uint32_t type);
// Writes n float32 values decoded from `src` (n / block_size blocks, little-endian as GGUF stores
// them). n must be a multiple of the type's block size; ValueError for an unsupported type.
void dequantize(uint32_t type, const uint8_t* src, float* dst, int64_t n);
// IEEE half -> float, every bit pattern (NaN payloads kept), as numpy's astype(float32).
float half_to_float(uint16_t h);

}  // namespace qlora::gguf
