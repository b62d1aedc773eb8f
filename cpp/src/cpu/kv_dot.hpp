// KV-cache element helpers of the level-neutral attention loops (ops_attention.cpp's scalar
// reference and attention_kernels_generic.cpp). Internal linkage (anonymous namespace): safe to
// include from level-neutral files only, never from a *_avx2 / *_avx512 file (cpu/README.md).
#pragma once
#include <cstdint>
#include <cstring>

namespace qlora::cpu {
namespace {

// A KV-cache element as fp32: bf16 (uint16 bit pattern) widened exactly.
inline float wide(float x) { return x; }
inline float wide(uint16_t x) {
  const uint32_t b = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// 8 independent partial sums: vectorizable without -ffast-math, and more accurate than one chain.
template <class T>
float dot(const float* a, const T* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * wide(b[i + j]);
  float d = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) d += a[i] * wide(b[i]);
  return d;
}

}  // namespace
}  // namespace qlora::cpu
