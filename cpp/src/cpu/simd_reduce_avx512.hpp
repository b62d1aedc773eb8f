// Horizontal sums of many AVX-512 accumulators at once, for the GEMV kernels. Include only from
// *_avx512.cpp files: the functions have internal linkage (anonymous namespace), so no AVX-512
// code can be picked by the linker for another file (cpp/src/cpu/README.md).
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// out[i] = sum of the 16 lanes of v[i], i < 16. A transpose-and-add tree: 15 shuffles of 128-bit
// lanes or pairs, 15 adds and one permute for 16 sums, against 8 shuffle/add ops per sum for
// _mm512_reduce_add_ps (the reduction, not the FMAs, bounded the 8-row GEMV at K = 576).
inline __attribute__((always_inline)) __m512 hsum16(const __m512 (&v)[16]) {
  __m512 s[8];  // 128-bit lanes: [row i, row i, row i+8, row i+8] partial sums
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 r[4];  // lanes: [row i, row i+8, row i+4, row i+12]
  for (int i = 0; i < 4; ++i)
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[i], s[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[i], s[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 c[2];  // per lane: [r[i] (0+2), r[i+2] (0+2), r[i] (1+3), r[i+2] (1+3)]
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[i], r[i + 2]), _mm512_unpackhi_ps(r[i], r[i + 2]));
  const __m512 f = _mm512_add_ps(  // per lane: full sums of the rows of [r0, r2, r1, r3]
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
  // f holds rows [0,2,1,3, 8,10,9,11, 4,6,5,7, 12,14,13,15]; that permutation is its own inverse.
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0), f);
}

}  // namespace
}  // namespace qlora::cpu
