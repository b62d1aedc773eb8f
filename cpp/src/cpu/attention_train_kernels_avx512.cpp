// AVX-512 kernels of the training attention (contract in cpu/attention_train_kernels.hpp).
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_train_kernels.hpp"
#include "cpu/simd_exp_avx512.hpp"
#include "cpu/transpose16_avx512.hpp"

// GCC 12 reports the intrinsics' internal _mm512_undefined_ps() operands as uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::attn_train_k {

void delta_rows_avx512(int64_t n, int64_t hd, const float* go, int64_t ldg, const float* o, int64_t ldo,
                       float* delta) {
  int64_t r0 = 0;
  // 16 rows per step: the products of 16 columns of each row (rounded as the scalar loop rounds
  // them), transposed so lane j holds row j, then added column by column in order.
  for (; r0 + 16 <= n; r0 += 16) {
    __m512 d = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; c += 16) {
      const int64_t w = hd - c < 16 ? hd - c : 16;
      const __mmask16 m = w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
      __m512 p[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        p[j] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, go + (r0 + j) * ldg + c),
                             _mm512_maskz_loadu_ps(m, o + (r0 + j) * ldo + c));
      transpose16(p);
      for (int j = 0; j < w; ++j) d = _mm512_add_ps(d, p[j]);
    }
    _mm512_storeu_ps(delta + r0, d);
  }
  for (; r0 < n; ++r0) {  // the rest one row at a time, scalar (same order)
    const float* g = go + r0 * ldg;
    const float* p = o + r0 * ldo;
    __m128 d = _mm_setzero_ps();
    for (int64_t i = 0; i < hd; ++i) d = _mm_add_ss(d, _mm_mul_ss(_mm_load_ss(g + i), _mm_load_ss(p + i)));
    delta[r0] = _mm_cvtss_f32(d);
  }
}

namespace {
inline __mmask16 first(int64_t n) {  // the first min(n, 16) lanes (n >= 0)
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
}  // namespace

void probs_dscores_avx512(int64_t rows, int64_t nk, int64_t t0, float* S, float* dP, int64_t ld, const float* lse,
                          const float* delta, float scale, const int32_t* km) {
  const __m512 vs = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    float* d = dP + i * ld;
    const int64_t t = t0 + i, n_vis = t + 1 < 0 ? 0 : (t + 1 > nk ? nk : t + 1);
    const bool dead = lse[i] == -__builtin_inff();  // no visible key: P = 0 (dS = 0 * (dP - delta) * scale)
    const __m512 l = _mm512_set1_ps(lse[i]), dl = _mm512_set1_ps(delta[i]);
    for (int64_t j = 0; j < n_vis; j += 16) {
      const __mmask16 m = first(n_vis - j);
      __m512 p = zero;
      if (!dead) {
        p = _mm512_mul_ps(one, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), l)));  // exp_scale(.., 1)
        if (km) {
          const __mmask16 vis = _mm512_mask_cmpneq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, km + j),
                                                              _mm512_setzero_si512());
          p = _mm512_maskz_mov_ps(vis, p);
        }
      }
      _mm512_mask_storeu_ps(s + j, m, p);
      const __m512 g = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, d + j), dl)), vs);
      _mm512_mask_storeu_ps(d + j, m, g);
    }
    for (int64_t j = n_vis; j < nk; j += 16) {
      const __mmask16 m = first(nk - j);
      _mm512_mask_storeu_ps(s + j, m, zero);
      _mm512_mask_storeu_ps(d + j, m, zero);
    }
  }
}

void scale_fill_avx512(float* r, int64_t n, int64_t nk, float inv) {
  const __m512 c = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first(n - j);
    _mm512_mask_storeu_ps(r + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, r + j), c));
  }
  for (int64_t j = n; j < nk; j += 16) _mm512_mask_storeu_ps(r + j, first(nk - j), _mm512_setzero_ps());
}

}  // namespace qlora::cpu::attn_train_k
