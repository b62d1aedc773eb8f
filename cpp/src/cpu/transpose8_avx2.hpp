// In-register 8x8 transpose of 32-bit lanes for AVX2 kernel files (include only from a TU compiled
// with -mavx2 or wider). Internal linkage, as transpose16_avx512.hpp: each kernel TU keeps its own copy.
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// On return v[j] lane i holds what v[i] lane j held.
inline __attribute__((always_inline)) void transpose8(__m256 (&v)[8]) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    a[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // b[4q + c] lane L element e = row 4q + e, column 4L + c
    b[i] = _mm256_shuffle_ps(a[i], a[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    b[i + 1] = _mm256_shuffle_ps(a[i], a[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    b[i + 2] = _mm256_shuffle_ps(a[i + 1], a[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    b[i + 3] = _mm256_shuffle_ps(a[i + 1], a[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x20);
    v[4 + c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x31);
  }
}

}  // namespace
}  // namespace qlora::cpu
