// The vector exp shared by the AVX-512 kernels (SwiGLU, cross-entropy, softmax, SwiGLU backward).
// Include only from *_avx512.cpp files: internal linkage (anonymous namespace), so no AVX-512 code can be
// picked by the linker for another file (cpp/src/cpu/README.md).
#pragma once
#include <immintrin.h>

namespace qlora::cpu {
namespace {

// exp(x) = 2^n * e^r, n = round(x * log2(e)), r = x - n * ln2 in two steps (Cody-Waite), |r| <= ln2/2,
// Cephes' degree-6 polynomial: within 2 ulp of exp on fp32 inputs. Inputs are clamped to [-104, 88.72]
// (above, exp overflows fp32 anyway); x <= -104 (and -inf) gives exactly 0, the correctly rounded value;
// the clamp is written min(hi, max(lo, x)) so a NaN x stays NaN.
inline __m512 exp_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_NLE_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.72283935546875f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
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
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

}  // namespace
}  // namespace qlora::cpu
