// Host Q8_0 quantization (cpu/q8_0.hpp): a model's embedding / lm_head kept as Q8_0 on the device
// (LlamaWeights::set_head_q8_0) is quantized here, slab by slab, before its upload.
#include <cmath>
#include <cstring>

#include "cpu/q8_0.hpp"

namespace qlora::cpu {

uint16_t q8_0_float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, |f| * 2^24 rounded to nearest even
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  // Rebias the exponent (-112 << 23) and round the 13 dropped mantissa bits to nearest even.
  const uint32_t r = ax + 0xc8000fffu + ((ax >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

void q8_0_quantize_rows(const float* x, int64_t rows, int64_t K, uint8_t* out) {
  const int64_t nb = rows * (K / kQ8_0Block);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQ8_0Block;
    uint8_t* ob = out + b * kQ8_0BlockBytes;
    float amax = 0.0f;
    for (int j = 0; j < kQ8_0Block; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = q8_0_float_to_half(d);
    ob[0] = static_cast<uint8_t>(h & 0xff), ob[1] = static_cast<uint8_t>(h >> 8);
    for (int j = 0; j < kQ8_0Block; ++j)
      ob[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(xb[j] * id)));  // |x*id| <= 127
  }
}

}  // namespace qlora::cpu
