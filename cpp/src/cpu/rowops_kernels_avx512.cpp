// AVX-512 row-op kernels (contract in cpu/rowops_kernels.hpp). Rules: cpu/README.md.
#include <immintrin.h>

#include <cstdint>

#include "cpu/rowops_kernels.hpp"
#include "cpu/simd_exp_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::rowk {

namespace {

__mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }

inline __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d hi_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

float max_(const float* x, int64_t n) {
  __m512 m0 = _mm512_set1_ps(-__builtin_inff()), m1 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
  }
  for (; i < n; i += 16) m0 = _mm512_mask_max_ps(m0, lane_mask(n - i), m0, _mm512_maskz_loadu_ps(lane_mask(n - i), x + i));
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// Σ exp(x - sub) in 16 double lanes (two vectors); Write: store exp back into x.
template <bool Write>
double exp_sum_impl(float* x, int64_t n, float sub) {
  const __m512 s = _mm512_set1_ps(sub);
  __m512d a0 = _mm512_setzero_pd(), a1 = a0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lane_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), s)));
    if (Write) _mm512_mask_storeu_ps(x + i, k, e);
    a0 = _mm512_add_pd(a0, lo_pd(e));
    a1 = _mm512_add_pd(a1, hi_pd(e));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}
double exp_sum(float* x, int64_t n, float sub) { return exp_sum_impl<true>(x, n, sub); }
double exp_sum_ro(const float* x, int64_t n, float sub) { return exp_sum_impl<false>(const_cast<float*>(x), n, sub); }

void exp_scale(float* x, int64_t n, float sub, float scale) {
  const __m512 s = _mm512_set1_ps(sub), c = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(x + i, _mm512_mul_ps(c, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), s))));
  if (i < n) {
    const __mmask16 k = lane_mask(n - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(c, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), s))));
  }
}

double sumsq(const float* x, int64_t n) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lane_mask(n - i), x + i);
    const __m512d l = lo_pd(v), h = hi_pd(v);
    a0 = _mm512_fmadd_pd(l, l, a0);  // exact products (48-bit), double sums
    a1 = _mm512_fmadd_pd(h, h, a1);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

void sumsq_dot(const float* x, const float* w, const float* g, int64_t n, double* ss, double* dot) {
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, d0 = s0, d1 = s0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lane_mask(n - i);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + i), wv = _mm512_maskz_loadu_ps(k, w + i),
                 gv = _mm512_maskz_loadu_ps(k, g + i);
    const __m512d xl = lo_pd(xv), xh = hi_pd(xv);
    s0 = _mm512_fmadd_pd(xl, xl, s0);
    s1 = _mm512_fmadd_pd(xh, xh, s1);
    // (w·g)·x as the reference: w·g exact in double, then one rounding with the add
    d0 = _mm512_fmadd_pd(_mm512_mul_pd(lo_pd(wv), lo_pd(gv)), xl, d0);
    d1 = _mm512_fmadd_pd(_mm512_mul_pd(hi_pd(wv), hi_pd(gv)), xh, d1);
  }
  *ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  *dot = _mm512_reduce_add_pd(_mm512_add_pd(d0, d1));
}

inline void swiglu_bwd16(__m512 gv, __m512 uv, __m512 dv, __m512* dg, __m512* du) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
  *du = _mm512_mul_ps(dv, _mm512_mul_ps(gv, s));
  *dg = _mm512_mul_ps(_mm512_mul_ps(dv, uv), _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one)));
}

void swiglu_bwd(int64_t n, const float* g, const float* u, const float* d, float* dg, float* du) {
  int64_t i = 0;
  __m512 a, b;
  for (; i + 16 <= n; i += 16) {
    swiglu_bwd16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), _mm512_loadu_ps(d + i), &a, &b);
    _mm512_storeu_ps(dg + i, a);
    _mm512_storeu_ps(du + i, b);
  }
  if (i < n) {
    const __mmask16 k = lane_mask(n - i);
    swiglu_bwd16(_mm512_maskz_loadu_ps(k, g + i), _mm512_maskz_loadu_ps(k, u + i), _mm512_maskz_loadu_ps(k, d + i),
                 &a, &b);
    _mm512_mask_storeu_ps(dg + i, k, a);
    _mm512_mask_storeu_ps(du + i, k, b);
  }
}

}  // namespace

const Kernels kernels_avx512 = {max_, exp_sum, exp_sum_ro, exp_scale, sumsq, sumsq_dot, swiglu_bwd};

}  // namespace qlora::cpu::rowk
