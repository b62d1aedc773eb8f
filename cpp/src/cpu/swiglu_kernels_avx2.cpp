// AVX2+FMA SwiGLU forward (contract in cpu/swiglu_kernels.hpp). Rules: cpu/README.md.
#include <immintrin.h>

#include <cstdint>

#include "cpu/swiglu_kernels.hpp"

namespace qlora::cpu::swiglu_k {

namespace {

// As exp_ps in swiglu_kernels_avx512.cpp; 2^n is built in the exponent bits (n in [-151, 128]
// after the clamp, so it is applied in two halves to stay within the normal range).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(88.72283935546875f));
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
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

inline __m256 swiglu(__m256 g, __m256 u) {
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

}  // namespace

void rows_avx2(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
               float* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * ldg;
    const float* u = up + m * ldu;
    float* o = out + m * ldo;
    int64_t i = 0;
    for (; i + 8 <= N; i += 8) _mm256_storeu_ps(o + i, swiglu(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < N) {  // tail through a small buffer
      alignas(32) float gb[8] = {0}, ub[8] = {0}, ob[8];
      for (int64_t j = i; j < N; ++j) gb[j - i] = g[j], ub[j - i] = u[j];
      _mm256_store_ps(ob, swiglu(_mm256_load_ps(gb), _mm256_load_ps(ub)));
      for (int64_t j = i; j < N; ++j) o[j] = ob[j - i];
    }
  }
}

}  // namespace qlora::cpu::swiglu_k
