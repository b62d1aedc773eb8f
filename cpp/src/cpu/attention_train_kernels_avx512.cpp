// AVX-512 kernels of the training attention (contract in cpu/attention_train_kernels.hpp).
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_train_kernels.hpp"
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

}  // namespace qlora::cpu::attn_train_k
