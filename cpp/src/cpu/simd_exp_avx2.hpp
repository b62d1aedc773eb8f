// The vector exp shared by the AVX2+FMA kernels (SwiGLU, cross-entropy, softmax, SwiGLU backward).
// Include only from *_avx2.cpp files: internal linkage (anonymous namespace), so no AVX2+FMA code can be
// picked by the linker for another file (cpp/src/cpu/README.md).
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// exp(x): the AVX-512 version's algorithm (simd_exp_avx512.hpp); 2^n is built in the exponent bits
// (n in [-151, 128] after the clamp, so it is applied in two halves to stay within the normal range).
// x <= -104 (and -inf) gives exactly 0; a NaN x stays NaN.
inline __m256 exp_ps(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_NLE_UQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.72283935546875f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);  // n = n1 + n2
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(live, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

}  // namespace
}  // namespace qlora::cpu
