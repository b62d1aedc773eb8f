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

// The double sums run in four 4-lane accumulators over 16-element steps, A0..A3 holding elements
// 0-3, 4-7, 8-11, 12-15 of each step, folded as (A0 + A2) + (A1 + A3) and then lanes (0 + 2) + (1 + 3):
// the AVX-512 kernels' 2 x 8 lanes and _mm512_reduce_add_pd in the same order, so both levels give the
// same bits (and four chains instead of two hide the add / FMA latency).
inline double fold4(__m256d a0, __m256d a1, __m256d a2, __m256d a3) {
  return hsum_pd(_mm256_add_pd(_mm256_add_pd(a0, a2), _mm256_add_pd(a1, a3)));
}

// exp(x - sub) of the 8 elements at x + i (lanes at or past n: 0, not loaded); Write: stored back.
template <bool Write>
inline __m256 exp_step(float* x, int64_t i, int64_t n, __m256 s) {
  if (i + 8 <= n) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    if (Write) _mm256_storeu_ps(x + i, e);
    return e;
  }
  const __m256i k = lane_mask(n - i);
  const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(k), exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), s)));
  if (Write) _mm256_maskstore_ps(x + i, k, e);
  return e;
}

template <bool Write>
double exp_sum_impl(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 e0 = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    const __m256 e1 = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), s));
    if (Write) {
      _mm256_storeu_ps(x + i, e0);
      _mm256_storeu_ps(x + i + 8, e1);
    }
    a0 = _mm256_add_pd(a0, lo_pd(e0));
    a1 = _mm256_add_pd(a1, hi_pd(e0));
    a2 = _mm256_add_pd(a2, lo_pd(e1));
    a3 = _mm256_add_pd(a3, hi_pd(e1));
  }
  if (i < n) {  // masked-off lanes add +0, as the AVX-512 masked step
    const __m256 e0 = exp_step<Write>(x, i, n, s);
    const __m256 e1 = i + 8 < n ? exp_step<Write>(x, i + 8, n, s) : _mm256_setzero_ps();
    a0 = _mm256_add_pd(a0, lo_pd(e0));
    a1 = _mm256_add_pd(a1, hi_pd(e0));
    a2 = _mm256_add_pd(a2, lo_pd(e1));
    a3 = _mm256_add_pd(a3, hi_pd(e1));
  }
  return fold4(a0, a1, a2, a3);
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
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 16) {
    // tail: masked-off lanes read as 0 (a whole 8 past the end: an all-zero mask, nothing read)
    const bool full = i + 16 <= n;
    const __m256 v0 = full ? _mm256_loadu_ps(x + i) : _mm256_maskload_ps(x + i, lane_mask(n - i));
    const __m256 v1 = full ? _mm256_loadu_ps(x + i + 8) : _mm256_maskload_ps(x + i + 8, lane_mask(n - i - 8));
    const __m256d l0 = lo_pd(v0), h0 = hi_pd(v0), l1 = lo_pd(v1), h1 = hi_pd(v1);
    a0 = _mm256_fmadd_pd(l0, l0, a0);  // exact products (48-bit), double sums
    a1 = _mm256_fmadd_pd(h0, h0, a1);
    a2 = _mm256_fmadd_pd(l1, l1, a2);
    a3 = _mm256_fmadd_pd(h1, h1, a3);
  }
  return fold4(a0, a1, a2, a3);
}

void sumsq_dot(const float* x, const float* w, const float* g, int64_t n, double* ss, double* dot) {
  __m256d s[4], d[4];
  for (int j = 0; j < 4; ++j) s[j] = d[j] = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 16) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int64_t o = i + 8 * h;
      __m256 xv, wv, gv;
      if (i + 16 <= n) {
        xv = _mm256_loadu_ps(x + o), wv = _mm256_loadu_ps(w + o), gv = _mm256_loadu_ps(g + o);
      } else {  // tail: masked-off lanes read as 0
        const __m256i k = lane_mask(n - o);
        xv = _mm256_maskload_ps(x + o, k), wv = _mm256_maskload_ps(w + o, k), gv = _mm256_maskload_ps(g + o, k);
      }
      const __m256d xl = lo_pd(xv), xh = hi_pd(xv);
      s[2 * h] = _mm256_fmadd_pd(xl, xl, s[2 * h]);
      s[2 * h + 1] = _mm256_fmadd_pd(xh, xh, s[2 * h + 1]);
      // (w·g)·x as the reference: w·g exact in double, then one rounding with the add
      d[2 * h] = _mm256_fmadd_pd(_mm256_mul_pd(lo_pd(wv), lo_pd(gv)), xl, d[2 * h]);
      d[2 * h + 1] = _mm256_fmadd_pd(_mm256_mul_pd(hi_pd(wv), hi_pd(gv)), xh, d[2 * h + 1]);
    }
  }
  *ss = fold4(s[0], s[1], s[2], s[3]);
  *dot = fold4(d[0], d[1], d[2], d[3]);
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
