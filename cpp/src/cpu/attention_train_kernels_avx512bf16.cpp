// AVX512-BF16 kernels of the training attention (contract in cpu/attention_train_kernels.hpp):
// the bf16 micro-kernel with A read in place, and the converters that write the softmax weights /
// score gradients once as bf16 rows or row pairs, which that kernel then reads without packing.
// Compiled with -mavx512bf16 (CMake: *_avx512bf16.cpp); called only after cpu_has_avx512_bf16().
// Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/attention_train_kernels.hpp"
#include "cpu/bf16_tile_avx512bf16.hpp"
#include "cpu/simd_exp_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::attn_train_k {

using bf16_tile::tile_lane_mask;  // first n of 16 lanes

// The tile of bf16_k::ukernel_avx512bf16 (cpu/bf16_tile_avx512bf16.hpp) with A read in place.
void ukernel_direct_avx512bf16(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, float* C,
                               int64_t ldc, float alpha, float beta, int mr, int nr, bool half) {
  bf16_tile::tile_rows<false, false>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, mr, nr, half);
}

void rows_to_bf16_avx512bf16(const float* src, int64_t lds, int64_t rows, int64_t n, const float* scale,
                             uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    const __m512 sc = _mm512_set1_ps(scale ? scale[r] : 1.0f);
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(s + j), sc), hi = _mm512_mul_ps(_mm512_loadu_ps(s + j + 16), sc);
      _mm512_storeu_si512(d + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; j < n; j += 16) {  // tail, zero past n (one more bf16 written when n is odd)
      const __mmask16 m = tile_lane_mask(n - j);
      const __m512 x = _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, s + j), sc);
      const int64_t w = (n - j + 1) / 2 * 2;  // whole pairs
      _mm256_mask_storeu_epi16(d + j, static_cast<__mmask16>(tile_lane_mask(w)), (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

void probs_dscores_bf16_avx512bf16(int64_t rows, int64_t nk, int64_t t0, const float* S, const float* dP, int64_t ld,
                                   const float* lse, const float* delta, float scale, const int32_t* km,
                                   uint16_t* Db, int64_t ldb, uint32_t* D2, uint32_t* P2, int64_t ldp) {
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < rows; i0 += 2) {
    const int nr = rows - i0 >= 2 ? 2 : 1;
    int64_t nv[2] = {0, 0};
    bool dead[2] = {true, true};
    __m512 l[2], dl[2];
    for (int r = 0; r < 2; ++r) {
      if (r >= nr) continue;
      const int64_t t = t0 + i0 + r;
      nv[r] = t + 1 < 0 ? 0 : (t + 1 > nk ? nk : t + 1);
      dead[r] = !(lse[i0 + r] >= -__FLT_MAX__);  // lse = -inf: no visible key
      l[r] = _mm512_set1_ps(lse[i0 + r]);
      dl[r] = _mm512_set1_ps(delta[i0 + r]);
    }
    for (int64_t j = 0; j < nk; j += 16) {
      const __mmask16 in = tile_lane_mask(nk - j);
      const __mmask16 kon =
          km ? _mm512_mask_cmpneq_epi32_mask(in, _mm512_maskz_loadu_epi32(in, km + j), _mm512_setzero_si512()) : in;
      __m512 P[2], dS[2];
      for (int r = 0; r < 2; ++r) {
        P[r] = dS[r] = _mm512_setzero_ps();
        if (r >= nr) continue;
        const __mmask16 vis = tile_lane_mask(nv[r] - j);
        if (!vis) continue;
        const float* s = S + (i0 + r) * ld + j;
        if (!dead[r]) P[r] = _mm512_maskz_mov_ps(vis & kon, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(vis, s), l[r])));
        const __m512 d = _mm512_maskz_loadu_ps(vis, dP + (i0 + r) * ld + j);
        dS[r] = _mm512_maskz_mov_ps(vis, _mm512_mul_ps(_mm512_mul_ps(P[r], _mm512_sub_ps(d, dl[r])), sc));
      }
      for (int r = 0; r < nr; ++r)
        _mm256_mask_storeu_epi16(Db + (i0 + r) * ldb + j, in, (__m256i)_mm512_cvtneps_pbh(dS[r]));
      _mm512_mask_storeu_epi32(D2 + (i0 / 2) * ldp + j, in,
                               _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(dS[1], dS[0])));
      _mm512_mask_storeu_epi32(P2 + (i0 / 2) * ldp + j, in,
                               _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(P[1], P[0])));
    }
    if (nk % 2)
      for (int r = 0; r < nr; ++r) Db[(i0 + r) * ldb + nk] = 0;
  }
}

namespace {
// r[16] as a 16 x 16 matrix of 32-bit words (row i = r[i]) -> its transpose: unpack 32 / 64 within
// 128-bit lanes (4 x 4 blocks), then the 4 x 4 transpose of the lanes.
inline void transpose16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), b = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), e = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(a, d, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(a, d, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(b, e, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(b, e, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
}  // namespace

void pairs_t_avx512bf16(const float* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldd,
                        int64_t cols_pad, int64_t pairs_pad) {
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t p0 = 0; p0 < pairs_pad; p0 += 16) {  // 16 pairs x 16 columns: pair words, transposed
    const __mmask16 sm = tile_lane_mask(pairs_pad - p0);
    for (int64_t c = 0; c < cols_pad; c += 16) {
      const __mmask16 m = tile_lane_mask(cols - c);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 2 * (p0 + i);
        const __m512 lo = row < rows ? _mm512_maskz_loadu_ps(m, X + row * ldx + c) : _mm512_setzero_ps();
        const __m512 hi = row + 1 < rows ? _mm512_maskz_loadu_ps(m, X + (row + 1) * ldx + c) : _mm512_setzero_ps();
        r[i] = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      transpose16_epi32(r);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(dst + (c + j) * ldd + p0, sm, r[j]);
    }
  }
}

void transpose_f32_avx512bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 rm = tile_lane_mask(rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 cm = tile_lane_mask(cols - c0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = r0 + i < rows ? _mm512_maskz_loadu_epi32(cm, src + (r0 + i) * lds + c0) : _mm512_setzero_si512();
      transpose16_epi32(r);
      for (int j = 0; j < 16 && c0 + j < cols; ++j) _mm512_mask_storeu_epi32(dst + (c0 + j) * ldd + r0, rm, r[j]);
    }
  }
}

}  // namespace qlora::cpu::attn_train_k
