// AVX2 kernels of the training attention (contract in cpu/attention_train_kernels.hpp).
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_train_kernels.hpp"
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

}  // namespace qlora::cpu::attn_train_k
