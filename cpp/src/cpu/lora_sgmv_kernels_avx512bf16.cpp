// AVX512-BF16 kernels of the multi-adapter LoRA op on bf16 inference copies (vdpbf16ps: two k per
// instruction, fp32 accumulation). Compiled with -mavx512bf16 (CMake: *_avx512bf16.cpp); called only
// after cpu_has_avx512_bf16(). Layout and chain order: lora_sgmv_bf16_kernels.hpp. Rules:
// cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu/lora_sgmv_bf16_kernels.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::sgmv_bf16 {

namespace {

constexpr int kRows = 8;  // rows per expand register tile (8 x 3 blocks: 24 accumulators)

__mmask16 lanes(int64_t lo, int64_t hi) {  // lanes [lo, hi) of 16, clamped
  if (lo < 0) lo = 0;
  if (hi > 16) hi = 16;
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

__m512bh as_bh(__m512i v) { return (__m512bh)v; }
__m512bh bcast(const uint32_t* p) { return as_bh(_mm512_set1_epi32(static_cast<int>(*p))); }

// Rows [0, R) of the shrink for rank block nb: two chains per lane, over even and odd p, summed
// at the end. R <= 8 rows share each load of A (16 accumulators).
template <int R>
void shrink_tile(int64_t kp, const uint32_t* xp, int64_t ldxp, const uint32_t* W, uint32_t* tp, int64_t ldtp) {
  __m512 c[R][2];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= kp; p += 2) {
    // A streams from memory once per decode step: keep ~4 KiB of it in flight
    _mm_prefetch(reinterpret_cast<const char*>(W + (p + 64) * 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(W + (p + 65) * 16), _MM_HINT_T0);
    const __m512bh w0 = as_bh(_mm512_loadu_si512(W + p * 16));
    const __m512bh w1 = as_bh(_mm512_loadu_si512(W + (p + 1) * 16));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      c[i][0] = _mm512_dpbf16_ps(c[i][0], bcast(xp + i * ldxp + p), w0);
      c[i][1] = _mm512_dpbf16_ps(c[i][1], bcast(xp + i * ldxp + p + 1), w1);
    }
  }
  if (p < kp) {  // odd kp: the last pair continues chain 0
    const __m512bh w = as_bh(_mm512_loadu_si512(W + p * 16));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) c[i][0] = _mm512_dpbf16_ps(c[i][0], bcast(xp + i * ldxp + p), w);
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const __m512 s = _mm512_add_ps(c[i][0], c[i][1]);
    // 16 fp32 -> 16 bf16 (RNE) = 8 pairs of consecutive ranks, stored in order.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tp + i * ldtp), (__m256i)_mm512_cvtneps_pbh(s));
  }
}

// Rows [0, R) x column blocks [b, b + NB) of the expand: one chain per lane over p. FULL: every
// lane of the NB blocks is inside [n0, n1), so the epilogue uses plain loads and stores (masks
// only at a range's edges).
template <int R, int NB, bool FULL>
void expand_tile(int64_t b, int64_t n0, int64_t n1, int64_t kp, const uint32_t* tp, int64_t ldtp, const uint32_t* Bp,
                 float alpha, float* y, int64_t ldy) {
  __m512 c[R][NB];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) c[i][j] = _mm512_setzero_ps();
  const uint32_t* W = Bp + b * kp * 16;
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh w[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) w[j] = as_bh(_mm512_loadu_si512(W + (j * kp + p) * 16));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh a = bcast(tp + i * ldtp + p);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], a, w[j]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const int64_t col = (b + j) * 16;
    if (FULL) {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        float* yp = y + i * ldy + col;
        _mm512_storeu_ps(yp, _mm512_fmadd_ps(va, c[i][j], _mm512_loadu_ps(yp)));
      }
    } else {
      const __mmask16 m = lanes(n0 - col, n1 - col);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        float* yp = y + i * ldy + col;
        _mm512_mask_storeu_ps(yp, m, _mm512_fmadd_ps(va, c[i][j], _mm512_maskz_loadu_ps(m, yp)));
      }
    }
  }
}

// Rows [0, M) x column blocks [b, b + NB) of the expand with KP (compile-time) pairs: the group's
// B (NB x KP registers) stays in registers and the rows go one after another, NB chains each.
// The out-of-order core overlaps the rows' chains, and each row's stores come right after its own
// FMAs: with all rows in one register tile, the tile's 24 stores came in a burst at its end and
// cost ~25% of the expand on Zen 4 (a 512-bit store every 2 cycles). Same chain per output as
// expand_tile.
template <int KP, int NB, bool FULL>
void expand_rows(int64_t b, int64_t n0, int64_t n1, int64_t M, const uint32_t* tp, int64_t ldtp, const uint32_t* Bp,
                 float alpha, float* y, int64_t ldy) {
  const uint32_t* W = Bp + b * KP * 16;
  __m512bh w[NB][KP];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 16
    for (int p = 0; p < KP; ++p) w[j][p] = as_bh(_mm512_loadu_si512(W + (j * KP + p) * 16));
  const __m512 va = _mm512_set1_ps(alpha);
  __mmask16 m[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) m[j] = FULL ? static_cast<__mmask16>(0xFFFF) : lanes(n0 - (b + j) * 16, n1 - (b + j) * 16);
  for (int64_t i = 0; i < M; ++i) {
    const uint32_t* t = tp + i * ldtp;
    __m512 c[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) c[j] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int p = 0; p < KP; ++p) {
      const __m512bh a = bcast(t + p);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) c[j] = _mm512_dpbf16_ps(c[j], a, w[j][p]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      float* yp = y + i * ldy + (b + j) * 16;
      if (FULL) _mm512_storeu_ps(yp, _mm512_fmadd_ps(va, c[j], _mm512_loadu_ps(yp)));
      else _mm512_mask_storeu_ps(yp, m[j], _mm512_fmadd_ps(va, c[j], _mm512_maskz_loadu_ps(m[j], yp)));
    }
  }
}

// Column blocks [b, b + nb) (nb <= 3) of the expand at KP = 8 (r = 15 or 16), every row.
void expand_rows8(int64_t b, int64_t nb, int64_t n0, int64_t n1, int64_t M, const uint32_t* tp, int64_t ldtp,
                  const uint32_t* Bp, float alpha, float* y, int64_t ldy) {
  if (b * 16 >= n0 && (b + nb) * 16 <= n1) {
    switch (nb) {
      case 1: expand_rows<8, 1, true>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
      case 2: expand_rows<8, 2, true>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
      default: expand_rows<8, 3, true>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
    }
  } else {
    switch (nb) {
      case 1: expand_rows<8, 1, false>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
      case 2: expand_rows<8, 2, false>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
      default: expand_rows<8, 3, false>(b, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy); break;
    }
  }
}

// Rows [0, R) x column blocks [b, b + nb) (nb <= kNb) of the expand.
template <int R>
void expand_group(int64_t b, int64_t nb, int64_t n0, int64_t n1, int64_t kp, const uint32_t* tp, int64_t ldtp,
                  const uint32_t* Bp, float alpha, float* y, int64_t ldy) {
  const bool full = b * 16 >= n0 && (b + nb) * 16 <= n1;
  if (full) {
    switch (nb) {
      case 1: expand_tile<R, 1, true>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
      case 2: expand_tile<R, 2, true>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
      default: expand_tile<R, 3, true>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
    }
  } else {
    switch (nb) {
      case 1: expand_tile<R, 1, false>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
      case 2: expand_tile<R, 2, false>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
      default: expand_tile<R, 3, false>(b, n0, n1, kp, tp, ldtp, Bp, alpha, y, ldy); break;
    }
  }
}

// In-register 16 x 16 transpose of 32-bit words: on return v[j] lane i holds what v[i] lane j held.
void transpose16(__m512 (&v)[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
    b[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
  }
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < 4; ++c) {
      a[8 * h + c] = _mm512_shuffle_f32x4(b[8 * h + c], b[8 * h + 4 + c], 0x88);
      a[8 * h + 4 + c] = _mm512_shuffle_f32x4(b[8 * h + c], b[8 * h + 4 + c], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    v[c] = _mm512_shuffle_f32x4(a[c], a[8 + c], 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(a[c], a[8 + c], 0xdd);
  }
}

}  // namespace

void pack_lanes_avx512bf16(int64_t n, int64_t k, const float* src, uint32_t* dst) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t nb = 0; nb * 16 < n; ++nb)
    for (int64_t c = 0; c * 16 < kp; ++c) {
      __m512 v[16];
      const int64_t k0 = 32 * c;
      for (int i = 0; i < 16; ++i) {
        const int64_t row = nb * 16 + i;
        if (row >= n) {
          v[i] = _mm512_setzero_ps();
          continue;
        }
        const float* s = src + row * k + k0;
        const __m512 lo = _mm512_maskz_loadu_ps(lanes(0, k - k0), s);
        const __m512 hi = _mm512_maskz_loadu_ps(lanes(0, k - k0 - 16), s + 16);
        v[i] = _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      transpose16(v);  // v[j] = pair 16c + j of the 16 rows
      for (int64_t j = 0; j < 16 && 16 * c + j < kp; ++j)
        _mm512_storeu_ps(reinterpret_cast<float*>(dst + (nb * kp + 16 * c + j) * 16), v[j]);
    }
}

void round_pairs_avx512bf16(int64_t M, int64_t K, const float* x, int64_t ldx, uint32_t* xp, int64_t ldxp) {
  for (int64_t m = 0; m < M; ++m) {
    const float* s = x + m * ldx;
    uint32_t* d = xp + m * ldxp;
    int64_t k = 0;
    // Whole 32-column groups with plain loads and stores, masks only for the tail (Zen 4's masked
    // stores are slow; not measured apart). Same bits.
    for (; k + 32 <= K; k += 32)
      _mm512_storeu_si512(d + k / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + k + 16), _mm512_loadu_ps(s + k)));
    for (; k < K; k += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(lanes(0, K - k), s + k);
      const __m512 hi = _mm512_maskz_loadu_ps(lanes(0, K - k - 16), s + k + 16);
      // 32 bf16 in k order = 16 pairs {k even (low half), k odd (high half)}
      _mm512_mask_storeu_epi32(d + k / 2, lanes(0, (K - k + 1) / 2), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

void shrink_avx512bf16(int64_t M, int64_t nb0, int64_t nb1, int64_t kp, const uint32_t* xp, int64_t ldxp,
                       const uint32_t* Ap, uint32_t* tp, int64_t ldtp) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint32_t* W = Ap + nb * kp * 16;
    for (int64_t m = 0; m < M; m += 8) {
      const uint32_t* x = xp + m * ldxp;
      uint32_t* t = tp + m * ldtp + nb * 8;
      switch (M - m) {
        case 1: shrink_tile<1>(kp, x, ldxp, W, t, ldtp); break;
        case 2: shrink_tile<2>(kp, x, ldxp, W, t, ldtp); break;
        case 3: shrink_tile<3>(kp, x, ldxp, W, t, ldtp); break;
        case 4: shrink_tile<4>(kp, x, ldxp, W, t, ldtp); break;
        case 5: shrink_tile<5>(kp, x, ldxp, W, t, ldtp); break;
        case 6: shrink_tile<6>(kp, x, ldxp, W, t, ldtp); break;
        case 7: shrink_tile<7>(kp, x, ldxp, W, t, ldtp); break;
        default: shrink_tile<8>(kp, x, ldxp, W, t, ldtp); break;
      }
    }
  }
}

void expand_avx512bf16(int64_t M, int64_t n0, int64_t n1, int64_t kp, const uint32_t* tp, int64_t ldtp,
                       const uint32_t* Bp, float alpha, float* y, int64_t ldy) {
  if (n1 <= n0) return;
  // Column groups of kNb blocks outside, tiles of up to 8 rows inside: 8 rows x 3 blocks is 24
  // accumulators, so at decode (M <= 8) each block of B is read once. Each output is the same
  // chain whatever the loop order or tile.
  constexpr int64_t kNb = 3;
  const int64_t b1 = (n1 + 15) / 16;
  for (int64_t b = n0 / 16; b < b1; b += kNb) {
    const int64_t nb = b1 - b < kNb ? b1 - b : kNb;
    if (kp == 8) {
      expand_rows8(b, nb, n0, n1, M, tp, ldtp, Bp, alpha, y, ldy);
      continue;
    }
    for (int64_t m = 0; m < M; m += kRows) {
      const uint32_t* t = tp + m * ldtp;
      float* yr = y + m * ldy;
      switch (M - m) {
        case 1: expand_group<1>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 2: expand_group<2>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 3: expand_group<3>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 4: expand_group<4>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 5: expand_group<5>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 6: expand_group<6>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        case 7: expand_group<7>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
        default: expand_group<8>(b, nb, n0, n1, kp, t, ldtp, Bp, alpha, yr, ldy); break;
      }
    }
  }
}

}  // namespace qlora::cpu::sgmv_bf16
