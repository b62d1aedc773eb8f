// AVX-512 expand kernel of the multi-adapter LoRA op (compiled with AVX-512 flags only; plain
// function, see cpu/README.md and lora_sgmv_kernels.hpp).
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/lora_sgmv_kernels.hpp"

namespace qlora::cpu::sgmv_detail {

namespace {

// In-register 16 x 16 transpose: on return v[j] lane i holds what v[i] lane j held.
inline __attribute__((always_inline)) void transpose16(__m512 (&v)[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit interleave of row pairs
    a[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit interleave of pair pairs
    b[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
    b[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
  }
  // b[4q + c] lane (128-bit lane L, element e) = row 4q + e, column 4L + c.
  for (int h = 0; h < 2; ++h)  // 128-bit lanes: rows 8h..8h+3 with 8h+4..8h+7
    for (int c = 0; c < 4; ++c) {
      a[8 * h + c] = _mm512_shuffle_f32x4(b[8 * h + c], b[8 * h + 4 + c], 0x88);
      a[8 * h + 4 + c] = _mm512_shuffle_f32x4(b[8 * h + c], b[8 * h + 4 + c], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {  // then rows 0..7 with 8..15
    v[c] = _mm512_shuffle_f32x4(a[c], a[8 + c], 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(a[c], a[8 + c], 0xdd);
  }
}

// Columns [n, n + nn) (nn <= 16) of MB rows: B's [nn x 16] blocks are loaded (masked: never past
// a row's r ranks or the last column) and transposed once, then each row accumulates
// acc += t[m, j] * column j over j in order.
constexpr int64_t PF = 2;  // blocks ahead

template <int MB>
inline __attribute__((always_inline)) void block(int64_t n, int nn, int64_t r, float alpha, const float* t,
                                                 int64_t ldt, const float* B, int64_t ldb, float* y, int64_t ldy) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < r; j0 += 16) {
    const int jj = r - j0 < 16 ? static_cast<int>(r - j0) : 16;
    const __mmask16 jm = static_cast<__mmask16>(jj == 16 ? 0xffffu : (1u << jj) - 1);
    __m512 b[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      // B streams from memory once per step. With several rows the FMAs between loads left the
      // stream waiting (8 rows: 1.39 -> 0.98 ms per SmolLM2 step with the rows PF blocks ahead
      // requested); one row is faster without (0.65 vs 0.83 ms), as in the fp32 GEMV.
      if constexpr (MB >= 4)  // prefetches past the end of B never fault
        _mm_prefetch(reinterpret_cast<const char*>(B + (n + PF * 16 + i) * ldb + j0), _MM_HINT_T0);
      b[i] = i < nn ? _mm512_maskz_loadu_ps(jm, B + (n + i) * ldb + j0) : _mm512_setzero_ps();
    }
    transpose16(b);
    const float* tj = t + j0;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= jj) break;
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(tj[m * ldt + j]), b[j], acc[m]);
    }
  }
  const __mmask16 nm = static_cast<__mmask16>(nn == 16 ? 0xffffu : (1u << nn) - 1);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int m = 0; m < MB; ++m) {
    float* ym = y + m * ldy + n;
    _mm512_mask_storeu_ps(ym, nm, _mm512_fmadd_ps(va, acc[m], _mm512_maskz_loadu_ps(nm, ym)));
  }
}

template <int MB>
void rows(int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt, const float* B, int64_t ldb,
          float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; n += 16)
    block<MB>(n, n1 - n < 16 ? static_cast<int>(n1 - n) : 16, r, alpha, t, ldt, B, ldb, y, ldy);
}

}  // namespace

void expand_avx512(int64_t M, int64_t n0, int64_t n1, int64_t r, float alpha, const float* t, int64_t ldt,
                   const float* B, int64_t ldb, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float* tm = t + m0 * ldt;
    float* ym = y + m0 * ldy;
    switch (M - m0 < 8 ? M - m0 : 8) {
      case 1: rows<1>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 2: rows<2>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 3: rows<3>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 4: rows<4>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 5: rows<5>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 6: rows<6>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      case 7: rows<7>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
      default: rows<8>(n0, n1, r, alpha, tm, ldt, B, ldb, ym, ldy); break;
    }
  }
}

}  // namespace qlora::cpu::sgmv_detail
