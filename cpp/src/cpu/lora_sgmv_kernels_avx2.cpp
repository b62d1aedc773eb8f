// AVX2 expand kernel of the multi-adapter LoRA op (compiled with AVX2 flags only; plain function,
// see cpu/README.md and lora_sgmv_kernels.hpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/lora_sgmv_kernels.hpp"
#include "cpu/transpose8_avx2.hpp"

namespace qlora::cpu::sgmv_detail {

namespace {

inline __attribute__((always_inline)) __m256i lanes_below(int k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Columns [n, n + nn) (nn <= 8) of MB rows, as the AVX-512 kernel with 8 x 8 blocks.
template <int MB>
inline __attribute__((always_inline)) void block(int64_t n, int nn, int64_t r, float alpha, const float* t,
                                                 int64_t ldt, const float* B, int64_t ldb, float* y, int64_t ldy) {
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < r; j0 += 8) {
    const int jj = r - j0 < 8 ? static_cast<int>(r - j0) : 8;
    const __m256i jm = lanes_below(jj);
    __m256 b[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      b[i] = i < nn ? (jj == 8 ? _mm256_loadu_ps(B + (n + i) * ldb + j0) : _mm256_maskload_ps(B + (n + i) * ldb + j0, jm))
                    : _mm256_setzero_ps();
    transpose8(b);
    const float* tj = t + j0;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= jj) break;
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(tj + m * ldt + j), b[j], acc[m]);
    }
  }
  const __m256i nm = lanes_below(nn);
  const __m256 va = _mm256_set1_ps(alpha);
  for (int m = 0; m < MB; ++m) {
    float* ym = y + m * ldy + n;
    if (nn == 8)
      _mm256_storeu_ps(ym, _mm256_fmadd_ps(va, acc[m], _mm256_loadu_ps(ym)));
    else
      _mm256_maskstore_ps(ym, nm, _mm256_fmadd_ps(va, acc[m], _mm256_maskload_ps(ym, nm)));
  }
}

template <int MB>
void rows(int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt, const float* B, int64_t ldb,
          float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; n += 8)
    block<MB>(n, n1 - n < 8 ? static_cast<int>(n1 - n) : 8, r, alpha, t, ldt, B, ldb, y, ldy);
}

}  // namespace

void expand_avx2(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                 const float* B, int64_t ldb, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* tm = t + m0 * ldt;
    float* ym = y + m0 * ldy;
    switch (M - m0 < 4 ? M - m0 : 4) {
      case 1: rows<1>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 2: rows<2>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 3: rows<3>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      default: rows<4>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
    }
  }
}

}  // namespace qlora::cpu::sgmv_detail
