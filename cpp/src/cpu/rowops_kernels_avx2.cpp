// AVX2+FMA row-op kernels (contract in cpu/rowops_kernels.hpp). Rules: cpu/README.md.
#include <immintrin.h>

#include <cstdint>

#include "cpu/rowops_kernels.hpp"
#include "cpu/simd_exp_avx2.hpp"

namespace qlora::cpu::rowk {

namespace {

// Lane mask of the first n of 8 lanes (n clamped to [0, 8]) for maskload / maskstore, which
// never fault on masked-off lanes.
inline __m256i lane_mask(int64_t n) {
  const int k = n >= 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
inline double hsum_pd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

float max_(const float* x, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  __m256 m0 = ninf, m1 = ninf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
  }
  for (; i < n; i += 8) {
    const __m256i k = lane_mask(n - i);
    m0 = _mm256_max_ps(m0, _mm256_blendv_ps(ninf, _mm256_maskload_ps(x + i, k), _mm256_castsi256_ps(k)));
  }
  m0 = _mm256_max_ps(m0, m1);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <bool Write>
double exp_sum_impl(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    if (Write) _mm256_storeu_ps(x + i, e);
    a0 = _mm256_add_pd(a0, lo_pd(e));
    a1 = _mm256_add_pd(a1, hi_pd(e));
  }
  if (i < n) {
    const __m256i k = lane_mask(n - i);
    const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(k), exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), s)));
    if (Write) _mm256_maskstore_ps(x + i, k, e);
    a0 = _mm256_add_pd(a0, lo_pd(e));
    a1 = _mm256_add_pd(a1, hi_pd(e));
  }
  return hsum_pd(_mm256_add_pd(a0, a1));
}
double exp_sum(float* x, int64_t n, float sub) { return exp_sum_impl<true>(x, n, sub); }
double exp_sum_ro(const float* x, int64_t n, float sub) { return exp_sum_impl<false>(const_cast<float*>(x), n, sub); }

void exp_scale(float* x, int64_t n, float sub, float scale) {
  const __m256 s = _mm256_set1_ps(sub), c = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(c, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s))));
  if (i < n) {
    const __m256i k = lane_mask(n - i);
    _mm256_maskstore_ps(x + i, k, _mm256_mul_ps(c, exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), s))));
  }
}

double sumsq(const float* x, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_maskload_ps(x + i, lane_mask(n - i));  // masked-off lanes read as 0
    const __m256d l = lo_pd(v), h = hi_pd(v);
    a0 = _mm256_fmadd_pd(l, l, a0);
    a1 = _mm256_fmadd_pd(h, h, a1);
  }
  return hsum_pd(_mm256_add_pd(a0, a1));
}

void sumsq_dot(const float* x, const float* w, const float* g, int64_t n, double* ss, double* dot) {
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, d0 = s0, d1 = s0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i k = lane_mask(n - i);
    const __m256 xv = _mm256_maskload_ps(x + i, k), wv = _mm256_maskload_ps(w + i, k), gv = _mm256_maskload_ps(g + i, k);
    const __m256d xl = lo_pd(xv), xh = hi_pd(xv);
    s0 = _mm256_fmadd_pd(xl, xl, s0);
    s1 = _mm256_fmadd_pd(xh, xh, s1);
    d0 = _mm256_fmadd_pd(_mm256_mul_pd(lo_pd(wv), lo_pd(gv)), xl, d0);
    d1 = _mm256_fmadd_pd(_mm256_mul_pd(hi_pd(wv), hi_pd(gv)), xh, d1);
  }
  *ss = hsum_pd(_mm256_add_pd(s0, s1));
  *dot = hsum_pd(_mm256_add_pd(d0, d1));
}

inline void swiglu_bwd8(__m256 gv, __m256 uv, __m256 dv, __m256* dg, __m256* du) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
  *du = _mm256_mul_ps(dv, _mm256_mul_ps(gv, s));
  *dg = _mm256_mul_ps(_mm256_mul_ps(dv, uv), _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one)));
}

void swiglu_bwd(int64_t n, const float* g, const float* u, const float* d, float* dg, float* du) {
  int64_t i = 0;
  __m256 a, b;
  for (; i + 8 <= n; i += 8) {
    swiglu_bwd8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), _mm256_loadu_ps(d + i), &a, &b);
    _mm256_storeu_ps(dg + i, a);
    _mm256_storeu_ps(du + i, b);
  }
  if (i < n) {
    const __m256i k = lane_mask(n - i);
    swiglu_bwd8(_mm256_maskload_ps(g + i, k), _mm256_maskload_ps(u + i, k), _mm256_maskload_ps(d + i, k), &a, &b);
    _mm256_maskstore_ps(dg + i, k, a);
    _mm256_maskstore_ps(du + i, k, b);
  }
}

}  // namespace

const Kernels kernels_avx2 = {max_, exp_sum, exp_sum_ro, exp_scale, sumsq, sumsq_dot, swiglu_bwd};

}  // namespace qlora::cpu::rowk
