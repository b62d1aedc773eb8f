// The vector exp shared by the AVX2+FMA kernels (SwiGLU, cross-entropy, softmax, SwiGLU backward).
// Include only from *_avx2.cpp files: internal linkage (anonymous namespace), so no AVX2+FMA code can be
// picked by the linker for another file (cpp/src/cpu/README.md).
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// exp(x): the AVX-512 version's algorithm (simd_exp_avx512.hpp), with the same bits. x <= -104 (and
// -inf) gives exactly 0; a NaN x stays NaN.
//
// 2^n is built in the exponent bits. Over the clamped range n lies in [-151, 128], so the general
// form (exp_ps_wide) applies it in two normal halves. Nearly every input of the callers (softmax
// logits minus the row max, SwiGLU gates) has |x| <= 87, where n = round(x log2e) lies in
// [-126, 126]: there 2^n is one normal float, the clamp and the zero mask are no-ops, and p * 2^n is
// the same single rounding of the same exact product as (p * 2^n1) * 2^n2 (p * 2^n1 is exact), so the
// short form gives identical bits. One range test per vector picks the form (NaN lanes: the wide one).
// The short form has about half the instructions: at AVX2 these kernels are bound by instruction
// throughput (twice the instructions per element of the AVX-512 version), not by the FMA pipes.
inline __m256 exp_poly(__m256 x, __m256 n) {
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  return _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
}

inline __m256 exp_ps_wide(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_NLE_UQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.72283935546875f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_poly(x, n);
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);  // n = n1 + n2
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(live, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

inline __m256 exp_ps(__m256 x) {
  // |x| > 87 in any lane (n from -87 rounds to -126, from 87 to 126; NaN compares true): the wide form
  const __m256 big = _mm256_cmp_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))),
                                   _mm256_set1_ps(87.0f), _CMP_NLE_UQ);
  if (__builtin_expect(!_mm256_testz_ps(big, big), 0)) return exp_ps_wide(x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_poly(x, n);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace
}  // namespace qlora::cpu
