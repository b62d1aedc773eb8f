// AVX2 kernels of the training attention (contract in cpu/attention_train_kernels.hpp).
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_train_kernels.hpp"
#include "cpu/simd_exp_avx2.hpp"
#include "cpu/transpose8_avx2.hpp"

namespace qlora::cpu::attn_train_k {

void delta_rows_avx2(int64_t n, int64_t hd, const float* go, int64_t ldg, const float* o, int64_t ldo, float* delta) {
  int64_t r0 = 0;
  // 8 rows per step: the products of 8 columns of each row (rounded as the scalar loop rounds
  // them), transposed so lane j holds row j, then added column by column in order.
  for (; r0 + 8 <= n; r0 += 8) {
    __m256 d = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= hd; c += 8) {
      __m256 p[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        p[j] = _mm256_mul_ps(_mm256_loadu_ps(go + (r0 + j) * ldg + c), _mm256_loadu_ps(o + (r0 + j) * ldo + c));
      transpose8(p);  // p[i] lane j = product of row j, column c + i
      for (int i = 0; i < 8; ++i) d = _mm256_add_ps(d, p[i]);  // columns c .. c + 7 in order
    }
    for (; c < hd; ++c) {  // a ragged last column block: one column of the 8 rows at a time
      // Products by mulss (a builtin GCC never contracts): a vector mul feeding the add would be
      // fused into one FMA under -ffp-contract=fast, rounding once instead of twice.
      alignas(32) float x[8];
      for (int j = 0; j < 8; ++j)
        x[j] = _mm_cvtss_f32(_mm_mul_ss(_mm_load_ss(go + (r0 + j) * ldg + c), _mm_load_ss(o + (r0 + j) * ldo + c)));
      d = _mm256_add_ps(d, _mm256_load_ps(x));
    }
    _mm256_storeu_ps(delta + r0, d);
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
inline __m256i first(int64_t n) {  // the first min(n, 8) lanes (n >= 0), for maskload / maskstore
  const int k = n >= 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
}  // namespace

void probs_dscores_avx2(int64_t rows, int64_t nk, int64_t t0, float* S, float* dP, int64_t ld, const float* lse,
                        const float* delta, float scale, const int32_t* km) {
  const __m256 vs = _mm256_set1_ps(scale), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    float* d = dP + i * ld;
    const int64_t t = t0 + i, n_vis = t + 1 < 0 ? 0 : (t + 1 > nk ? nk : t + 1);
    const bool dead = lse[i] == -__builtin_inff();  // no visible key: P = 0 (dS = 0 * (dP - delta) * scale)
    const __m256 l = _mm256_set1_ps(lse[i]), dl = _mm256_set1_ps(delta[i]);
    for (int64_t j = 0; j < n_vis; j += 8) {
      const bool full = j + 8 <= n_vis;
      const __m256i m = first(n_vis - j);
      __m256 p = zero;
      if (!dead) {
        const __m256 x = full ? _mm256_loadu_ps(s + j) : _mm256_maskload_ps(s + j, m);
        p = _mm256_mul_ps(one, exp_ps(_mm256_sub_ps(x, l)));  // exp_scale(.., 1)
        if (km) {
          const __m256i kv = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(km + j))
                                  : _mm256_maskload_epi32(km + j, m);
          p = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(kv, _mm256_setzero_si256())), p);
        }
      }
      const __m256 dv = full ? _mm256_loadu_ps(d + j) : _mm256_maskload_ps(d + j, m);
      const __m256 g = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(dv, dl)), vs);
      if (full) {
        _mm256_storeu_ps(s + j, p);
        _mm256_storeu_ps(d + j, g);
      } else {
        _mm256_maskstore_ps(s + j, m, p);
        _mm256_maskstore_ps(d + j, m, g);
      }
    }
    for (int64_t j = n_vis; j < nk; j += 8) {
      const __m256i m = first(nk - j);
      _mm256_maskstore_ps(s + j, m, zero);
      _mm256_maskstore_ps(d + j, m, zero);
    }
  }
}

void scale_fill_avx2(float* r, int64_t n, int64_t nk, float inv) {
  const __m256 c = _mm256_set1_ps(inv);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_loadu_ps(r + j), c));
  if (j < n) {
    const __m256i m = first(n - j);
    _mm256_maskstore_ps(r + j, m, _mm256_mul_ps(_mm256_maskload_ps(r + j, m), c));
  }
  for (j = n; j < nk; j += 8) _mm256_maskstore_ps(r + j, first(nk - j), _mm256_setzero_ps());
}

}  // namespace qlora::cpu::attn_train_k
