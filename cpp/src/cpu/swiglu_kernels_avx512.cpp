// AVX-512 SwiGLU forward (contract in cpu/swiglu_kernels.hpp). Rules: cpu/README.md.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/swiglu_kernels.hpp"

namespace qlora::cpu::swiglu_k {

namespace {

// exp(x) = 2^n * e^r, n = round(x * log2(e)), r = x - n * ln2 in two steps (Cody-Waite), |r| <= ln2/2.
// Inputs are clamped to [-104, 88.72]: above, exp overflows fp32 anyway (1 + exp(-g) stays
// finite, so silu(g) rounds to the same -0-ish tiny value); below, scalef underflows to 0.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.72283935546875f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 swiglu(__m512 g, __m512 u) {
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

}  // namespace

void rows_avx512(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                 float* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * ldg;
    const float* u = up + m * ldu;
    float* o = out + m * ldo;
    int64_t i = 0;
    for (; i + 16 <= N; i += 16) _mm512_storeu_ps(o + i, swiglu(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    if (i < N) {  // masked tail: loads of masked-off lanes never fault
      const __mmask16 k = static_cast<__mmask16>((1u << (N - i)) - 1);
      _mm512_mask_storeu_ps(o + i, k, swiglu(_mm512_maskz_loadu_ps(k, g + i), _mm512_maskz_loadu_ps(k, u + i)));
    }
  }
}

}  // namespace qlora::cpu::swiglu_k
