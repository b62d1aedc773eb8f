// AVX2 expand kernel of the multi-adapter LoRA op (compiled with AVX2 flags only; plain function,
// see cpu/README.md and lora_sgmv_kernels.hpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/lora_sgmv_kernels.hpp"

namespace qlora::cpu::sgmv_detail {

namespace {

// In-register 8 x 8 transpose: on return v[j] lane i holds what v[i] lane j held.
inline __attribute__((always_inline)) void transpose8(__m256 (&v)[8]) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    a[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // b[4q + c] lane L element e = row 4q + e, column 4L + c
    b[i] = _mm256_shuffle_ps(a[i], a[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    b[i + 1] = _mm256_shuffle_ps(a[i], a[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    b[i + 2] = _mm256_shuffle_ps(a[i + 1], a[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    b[i + 3] = _mm256_shuffle_ps(a[i + 1], a[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x20);
    v[4 + c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x31);
  }
}

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
