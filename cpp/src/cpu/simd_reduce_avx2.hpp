// Horizontal sums of many AVX2 accumulators at once, for the GEMV kernels. Include only from
// *_avx2.cpp files: the functions have internal linkage (anonymous namespace), so no AVX2 code
// can be picked by the linker for another file (cpp/src/cpu/README.md).
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// out[i] = sum of the 8 lanes of v[i], i < 8: one transpose-and-add tree (6 hadds, 2 lane
// permutes, 1 add for 8 sums). Every sum is ((v0+v1) + (v2+v3)) + ((v4+v5) + (v6+v7)) over its
// lanes whatever its slot i, so a dot product's result does not depend on which slot it used.
inline __attribute__((always_inline)) __m256 hsum8(const __m256 (&v)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // [0..3 | 0..3]
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // [4..7 | 4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

}  // namespace
}  // namespace qlora::cpu
