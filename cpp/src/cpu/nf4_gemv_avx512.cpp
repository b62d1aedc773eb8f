// AVX-512 NF4 GEMV kernel. Per 16 packed bytes (32 weights): a broadcast load (no shuffle uop)
// puts the bytes in all four 128-bit lanes; a per-lane variable shift by 8*lane moves byte
// 4*t + lane into bits 0..7 of dword 4*lane + t. vpermps reads index bits 0..3 only, so over a
// register table of the 16 codes pre-scaled by the block's absmax it decodes the low nibbles
// (odd columns) directly and the high nibbles (even columns) after 4 more bits of shift; the
// other bits are ignored. X comes regrouped in that order (nf4_gemv.cpp), so no shuffle of
// decoded weights is needed; every decoded vector is used for all M rows of X.
// Rules for this file: cpp/src/cpu/README.md (intrinsics + raw pointers only).
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/nf4_gemv_m1_pairs_body.hpp"
#include "cpu/simd_reduce_avx512.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

#define QLORA_AI inline __attribute__((always_inline))

// W ahead of the row pair being decoded (rows are contiguous: a pair is K bytes), called once per
// block of both rows of a pair: pf_l1 bytes ahead into L1, pf_l2 into L2 (Args: 4 and 16 pairs,
// capped at half the L1d and 1/16 of the L2, so a long row (K = 11008: 5.5 KB) is not prefetched
// past what L1 holds). The decode loop reads W slowly (~2 bytes a cycle at M = 8); inside a model
// the weights come from DRAM and, without this, every row pair waited on memory (the [576, 1536]
// down projection at M = 8 ran 1.75x slower than from cache).
QLORA_AI void prefetch_ahead(const uint8_t* p0, int64_t K, int64_t pf_l1, int64_t pf_l2) {
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l1), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l1 + K / 2), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l2), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p0 + pf_l2 + K / 2), _MM_HINT_T1);
}

// keep_in_register, SidePf, no_pf, pf_line: cpu/nf4_gemv_m1_pairs_body.hpp.

// The 16 codes scaled by a block's absmax; with R (the bf16-compute contract on these kernels,
// Args::round_bf16) each rounded to bf16 as vcvtne2ps2bf16 does for finite values (RNE, zero or
// denormal to signed zero), kept as fp32: a product with a bf16-rounded X is then exact in fp32.
template <bool R>
QLORA_AI __m512 scaled(__m512 codes, float absmax) {
  const __m512 t = _mm512_mul_ps(codes, _mm512_set1_ps(absmax));
  if (!R) return t;
  const __m512i u = _mm512_castps_si512(t);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
  r = _mm512_mask_and_epi32(r, tiny, u, _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_castsi512_ps(r);
}

// Dword q = 4*lane + t of a 16-byte broadcast, shifted by 8*lane (+4 for the high nibble).
struct Shifts {
  __m512i lo, hi;
};

QLORA_AI Shifts make_shifts() {
  Shifts sh;
  sh.lo = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
  sh.hi = _mm512_add_epi32(sh.lo, _mm512_set1_epi32(4));
  return sh;
}

// Decoded columns [k, k+32) of a row pair (packed rows p0, p1; scaled tables t0, t1): even and
// odd columns of each row, in the regrouped order of X.
struct PairW {
  __m512 w0e, w0o, w1e, w1o;
};
QLORA_AI PairW decode_pair(const uint8_t* p0, const uint8_t* p1, int64_t k, __m512 t0, __m512 t1, const Shifts& sh) {
  const __m512i b0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + k / 2)));
  const __m512i b1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + k / 2)));
  return {_mm512_permutexvar_ps(_mm512_srlv_epi32(b0, sh.hi), t0), _mm512_permutexvar_ps(_mm512_srlv_epi32(b0, sh.lo), t0),
          _mm512_permutexvar_ps(_mm512_srlv_epi32(b1, sh.hi), t1), _mm512_permutexvar_ps(_mm512_srlv_epi32(b1, sh.lo), t1)};
}

// Accumulates 32 columns [k, k+32) (16 packed bytes at p) into acc[u], acc[u+1] for every row of X.
template <int M>
QLORA_AI void group32(__m512 (&acc)[4][M], int u, const uint8_t* p, const float* x, int64_t ldx, __m512 t,
                      const Shifts& sh) {
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 we = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, sh.hi), t);  // even columns
  const __m512 wo = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, sh.lo), t);  // odd columns
  for (int m = 0; m < M; ++m) {  // x regrouped: [16 even | 16 odd]
    acc[u][m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x + m * ldx), acc[u][m]);
    acc[u + 1][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + m * ldx + 16), acc[u + 1][m]);
  }
}

// Columns [k, end) of one row, all in one block (scaled table t); a whole number of groups.
template <int M>
QLORA_AI void segment(__m512 (&acc)[4][M], const uint8_t* p, const float* x, int64_t ldx, int64_t k, int64_t end,
                      __m512 t, const Shifts& sh) {
  for (; k + 64 <= end; k += 64) {
    group32<M>(acc, 0, p + k / 2, x + k, ldx, t, sh);
    group32<M>(acc, 2, p + k / 2 + 16, x + k + 32, ldx, t, sh);
  }
  if (k < end) group32<M>(acc, 0, p + k / 2, x + k, ldx, t, sh);
}

template <int M, bool R>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [M, ldx] regrouped
  const __m512 codes = _mm512_loadu_ps(a.codes);
  const Shifts sh = make_shifts();
  SidePf side(a, r0, r1);
  for (int64_t n = r0; n < r1; ++n) {
    side.upto(n + 1);
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 32 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);  // scale of the block holding W[n, 0]
    __m512 acc[4][M];                      // [2 groups x (even, odd)][m]
    for (int u = 0; u < 4; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    // Block edges fall on 32-column groups: a head up to the first edge, whole blocks, a tail.
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    if (head) {
      k = head < K ? head : K;
      segment<M>(acc, p, x, ldx, 0, k, scaled<R>(codes, *am++), sh);
    }
    if (bs >= 64) {
      for (; k + bs <= K; k += bs) {
        const __m512 t = scaled<R>(codes, *am++);  // [16] codes * absmax
        for (int64_t i = 0; i < bs; i += 64) {
          group32<M>(acc, 0, p + (k + i) / 2, x + k + i, ldx, t, sh);
          group32<M>(acc, 2, p + (k + i) / 2 + 16, x + k + i + 32, ldx, t, sh);
        }
      }
    } else {
      for (; k + 64 <= K; k += 64, am += 2) {  // blocksize 32: two blocks a step
        group32<M>(acc, 0, p + k / 2, x + k, ldx, scaled<R>(codes, am[0]), sh);
        group32<M>(acc, 2, p + k / 2 + 16, x + k + 32, ldx, scaled<R>(codes, am[1]), sh);
      }
      if (k + 32 <= K) {
        group32<M>(acc, 0, p + k / 2, x + k, ldx, scaled<R>(codes, *am++), sh);
        k += 32;
      }
    }
    if (k < K) segment<M>(acc, p, x, ldx, k, K, scaled<R>(codes, *am), sh);
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m]));
      const float dot = _mm512_reduce_add_ps(sum);
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

// Two rows of W at a time, sharing every X load (M >= 2 is bound by X loads, not by W):
// requires K % blocksize == 0, so both rows start on a block edge and have K / blocksize blocks.
template <int M, bool R>
void row_pairs_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s, nb = K >> s;  // blocks per row
  const float* x = a.x;                             // [M, ldx] regrouped
  const __m512 codes = _mm512_loadu_ps(a.codes);
  const Shifts sh = make_shifts();
  SidePf side(a, r0, r1);
  for (int64_t n = r0; n < r1; n += 2) {
    side.upto(n + 2);
    const uint8_t* p0 = a.packed + n * K / 2;  // [K/2] bytes of rows n, n+1
    const uint8_t* p1 = p0 + K / 2;
    const float* am0 = a.absmax + ((n * K) >> s) - a.block0;
    const float* am1 = am0 + nb;
    __m512 acc0[2][M], acc1[2][M];  // [(even, odd)][m] for rows n, n+1
    for (int u = 0; u < 2; ++u)
      for (int m = 0; m < M; ++m) acc0[u][m] = acc1[u][m] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < nb; ++blk) {
      const __m512 t0 = scaled<R>(codes, am0[blk]);
      const __m512 t1 = scaled<R>(codes, am1[blk]);
      prefetch_ahead(p0 + blk * bs / 2, K, a.pf_l1, a.pf_l2);
      for (int64_t k = blk * bs, end = k + bs; k < end; k += 32) {
        const PairW w = decode_pair(p0, p1, k, t0, t1, sh);
        for (int m = 0; m < M; ++m) {
          __m512 xe = _mm512_loadu_ps(x + m * ldx + k), xo = _mm512_loadu_ps(x + m * ldx + k + 16);
          keep_in_register(xe, xo);
          acc0[0][m] = _mm512_fmadd_ps(w.w0e, xe, acc0[0][m]);
          acc0[1][m] = _mm512_fmadd_ps(w.w0o, xo, acc0[1][m]);
          acc1[0][m] = _mm512_fmadd_ps(w.w1e, xe, acc1[0][m]);
          acc1[1][m] = _mm512_fmadd_ps(w.w1o, xo, acc1[1][m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const float dot0 = _mm512_reduce_add_ps(_mm512_add_ps(acc0[0][m], acc0[1][m]));
      const float dot1 = _mm512_reduce_add_ps(_mm512_add_ps(acc1[0][m], acc1[1][m]));
      float* y = a.y + m * a.ldy + n;
      y[0] = a.beta == 0.0f ? a.alpha * dot0 : a.alpha * dot0 + a.beta * y[0];  // beta == 0: Y not read
      y[1] = a.beta == 0.0f ? a.alpha * dot1 : a.alpha * dot1 + a.beta * y[1];
    }
  }
}

// Rows [m0, m0 + M) of X only (the kernels above are register-tiled for M <= 4).
inline Args rows_of(const Args& a, int64_t m0, int64_t M) {
  Args b = a;
  b.M = M;
  b.x = a.x + m0 * a.ldx;
  b.y = a.y + m0 * a.ldy;
  return b;
}

// 5 <= M <= 8, two rows of W at a time: 16 accumulators (even and odd columns share one, so
// 2 rows x 8 rows of X fit the 32 registers), one decode of W for all M rows of X, and one
// tree reduction of the 16 accumulators. Requires K % blocksize == 0 (as row_pairs_m).
// When M rows of X exceed 3/4 of L1d (K = 1536 at M = 8: 48 KiB > 24 KiB), the columns go in
// chunks that stay in L1, each chunk over all the row pairs, summed into Y: X loads from L2
// (one per FMA pair) had saturated L2 bandwidth. The chunking depends on K and M only.
template <int M, bool R>
void row_pairs_wide(const Args& a, int64_t r0, int64_t r1) {
  static_assert(M > 4 && M <= 8, "row_pairs_wide is for 5..8 rows of X");
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s, nb = K >> s;  // blocks per row
  const float* x = a.x;                             // [M, ldx] regrouped
  const __m512 codes = _mm512_loadu_ps(a.codes);
  const Shifts sh = make_shifts();
  const int64_t fit = (a.x_chunk / (4 * M)) >> s;  // blocks of M rows of X in 3/4 of L1d (24 KiB of 32)
  const int64_t max_cb = fit > 1 ? fit : 1;
  const int64_t n_chunks = (nb + max_cb - 1) / max_cb, cb = (nb + n_chunks - 1) / n_chunks;
  alignas(64) float dots[16];  // [W row n + (i >= 8)][X row i % 8]
  SidePf side(a, r0, r1);       // over the first column chunk's pass
  for (int64_t c0 = 0; c0 < nb; c0 += cb) {
    const int64_t c1 = c0 + cb < nb ? c0 + cb : nb;  // blocks [c0, c1) of every row
    for (int64_t n = r0; n < r1; n += 2) {
      side.upto(n + 2);
      const uint8_t* p0 = a.packed + n * K / 2;  // [K/2] bytes of rows n, n+1
      const uint8_t* p1 = p0 + K / 2;
      const float* am0 = a.absmax + ((n * K) >> s) - a.block0;
      const float* am1 = am0 + nb;
      __m512 acc[16];  // [8 * (row n+1) + m]; lanes m >= M stay zero
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t blk = c0; blk < c1; ++blk) {
        const __m512 t0 = scaled<R>(codes, am0[blk]);
        const __m512 t1 = scaled<R>(codes, am1[blk]);
        prefetch_ahead(p0 + blk * bs / 2, K, a.pf_l1, a.pf_l2);
        for (int64_t k = blk * bs, end = k + bs; k < end; k += 32) {
          const PairW w = decode_pair(p0, p1, k, t0, t1, sh);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) {
            __m512 xe = _mm512_loadu_ps(x + m * ldx + k), xo = _mm512_loadu_ps(x + m * ldx + k + 16);
            keep_in_register(xe, xo);
            acc[m] = _mm512_fmadd_ps(w.w0o, xo, _mm512_fmadd_ps(w.w0e, xe, acc[m]));
            acc[8 + m] = _mm512_fmadd_ps(w.w1o, xo, _mm512_fmadd_ps(w.w1e, xe, acc[8 + m]));
          }
        }
      }
      _mm512_store_ps(dots, hsum16(acc));
      for (int m = 0; m < M; ++m) {
        float* y = a.y + m * a.ldy + n;
        if (c0 > 0) {  // later chunks add to the first one's result
          y[0] += a.alpha * dots[m];
          y[1] += a.alpha * dots[8 + m];
        } else {  // beta == 0: Y not read
          y[0] = a.beta == 0.0f ? a.alpha * dots[m] : a.alpha * dots[m] + a.beta * y[0];
          y[1] = a.beta == 0.0f ? a.alpha * dots[8 + m] : a.alpha * dots[8 + m] + a.beta * y[1];
        }
      }
    }
  }
}

// M >= 2 with whole blocks per row: row pairs, and the single-row kernel for an odd last row.
template <int M, bool R>
void rows_dispatch(const Args& a, int64_t r0, int64_t r1) {
  if (M >= 2 && (a.K & ((int64_t{1} << a.bs_shift) - 1)) == 0) {
    const int64_t pairs_end = r0 + ((r1 - r0) & ~int64_t{1});
    row_pairs_m<M, R>(a, r0, pairs_end);
    if (pairs_end < r1) rows_m<M, R>(pairs_end > r0 ? no_pf(a) : a, pairs_end, r1);
  } else {
    rows_m<M, R>(a, r0, r1);
  }
}

// 5 <= M <= 8: the wide row-pair kernel; an odd last row (or blocks straddling rows) runs the
// 4-row kernels on rows [0, 4) and [4, M) of X.
template <int M, bool R>
void rows_dispatch_wide(const Args& a, int64_t r0, int64_t r1) {
  int64_t pairs_end = r0;
  if ((a.K & ((int64_t{1} << a.bs_shift) - 1)) == 0) {
    pairs_end = r0 + ((r1 - r0) & ~int64_t{1});
    row_pairs_wide<M, R>(a, r0, pairs_end);
  }
  if (pairs_end < r1) {  // the prefetch goes with the first of the calls that cover these rows
    rows_dispatch<4, R>(rows_of(pairs_end > r0 ? no_pf(a) : a, 0, 4), pairs_end, r1);
    rows_dispatch<M - 4, R>(rows_of(no_pf(a), 4, M - 4), pairs_end, r1);
  }
}

// M = 1 (the decode step), its own X order (regroup_x_avx512_m1): per 16 packed bytes vpmovzxbd
// puts byte q in dword q, whose bits 0..3 are its low nibble (odd column 2q + 1) and, after one
// immediate shift by 4, its high nibble (even column 2q); vpermps reads index bits 0..3 only.
// One shuffle and one shift per 32 weights instead of rows_m's two variable shifts (measured on a
// Zen 4: ~5-15% more weights per CPU second in cache), and software prefetch of the row stream
// (rows_m<1> had none): pf_l1 ahead into L1 and pf_l2 into L2, once per 64-byte line.
QLORA_AI void group32_m1(__m512 (&acc)[4], int u, const uint8_t* p, const float* x, __m512 t) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  acc[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t), _mm512_loadu_ps(x), acc[u]);
  acc[u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t), _mm512_loadu_ps(x + 16), acc[u + 1]);
}

QLORA_AI void segment_m1(__m512 (&acc)[4], const uint8_t* p, const float* x, int64_t k, int64_t end, __m512 t) {
  for (; k + 64 <= end; k += 64) {
    group32_m1(acc, 0, p + k / 2, x + k, t);
    group32_m1(acc, 2, p + k / 2 + 16, x + k + 32, t);
  }
  if (k < end) group32_m1(acc, 0, p + k / 2, x + k, t);
}

template <bool R>
void rows_1(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [K] regrouped (regroup_x_avx512_m1)
  const __m512 codes = _mm512_loadu_ps(a.codes);
  const int64_t pf1 = a.pf_l1, pf2 = a.pf_l2;
  SidePf side(a, r0, r1);
  for (int64_t n = r0; n < r1; ++n) {
    side.upto(n + 1);
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 32 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_ps();
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    if (head) {
      k = head < K ? head : K;
      segment_m1(acc, p, x, 0, k, scaled<R>(codes, *am++));
    }
    if (bs >= 64) {
      for (; k + bs <= K; k += bs) {
        const __m512 t = scaled<R>(codes, *am++);  // [16] codes * absmax
        for (int64_t i = 0; i < bs; i += 64) {
          if (((k + i) & 127) == 0) pf_line(p + (k + i) / 2, pf1, pf2);
          group32_m1(acc, 0, p + (k + i) / 2, x + k + i, t);
          group32_m1(acc, 2, p + (k + i) / 2 + 16, x + k + i + 32, t);
        }
      }
    } else {
      for (; k + 64 <= K; k += 64, am += 2) {  // blocksize 32: two blocks a step
        if ((k & 127) == 0) pf_line(p + k / 2, pf1, pf2);
        group32_m1(acc, 0, p + k / 2, x + k, scaled<R>(codes, am[0]));
        group32_m1(acc, 2, p + k / 2 + 16, x + k + 32, scaled<R>(codes, am[1]));
      }
      if (k + 32 <= K) {
        group32_m1(acc, 0, p + k / 2, x + k, scaled<R>(codes, *am++));
        k += 32;
      }
    }
    if (k < K) segment_m1(acc, p, x, k, K, scaled<R>(codes, *am));
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    const float dot = _mm512_reduce_add_ps(sum);
    float* y = a.y + n;
    *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
  }
}

// M = 1, two rows of W at a time (row_pairs_m1, cpu/nf4_gemv_m1_pairs_body.hpp): each X vector is
// loaded once for both rows (rows_1 reads all of X once per row; at K = 11008 the regrouped X, 43
// KiB, does not stay in a 48 KiB L1d beside the weight stream, so rows_1 re-reads it from L2 for
// every row). Each row keeps rows_1's accumulators, FMA sequence and reduction, so its bits are
// rows_1's. Its tables: scaled<R> per row, as rows_1's.
template <bool R>
struct ScaledTables {
  __m512 codes;
  explicit ScaledTables(const float* c) : codes(_mm512_loadu_ps(c)) {}
  QLORA_AI PairTables operator()(float am0, float am1) const { return {scaled<R>(codes, am0), scaled<R>(codes, am1)}; }
};

}  // namespace

void regroup_x_avx512(int64_t M, int64_t K, const float* X, int64_t ldx, float* Xg) {
  // Slot q < 16 of a group takes column 2p, slot 16 + q column 2p + 1, p = 4 * (q % 4) + q / 4
  // (regroup_x in nf4_gemv.cpp): two two-source permutes per 32 columns.
  const __m512i even = _mm512_set_epi32(30, 22, 14, 6, 28, 20, 12, 4, 26, 18, 10, 2, 24, 16, 8, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * ldx;
    float* xg = Xg + m * K;
    for (int64_t g = 0; g < K; g += 32) {
      const __m512 lo = _mm512_loadu_ps(x + g), hi = _mm512_loadu_ps(x + g + 16);
      _mm512_storeu_ps(xg + g, _mm512_permutex2var_ps(lo, even, hi));
      _mm512_storeu_ps(xg + g + 16, _mm512_permutex2var_ps(lo, odd, hi));
    }
  }
}

void regroup_x_avx512_m1(int64_t K, const float* X, float* Xg) {
  // Per 32 columns: slot q < 16 takes column 2q (the high nibble of byte q), slot 16 + q column 2q + 1.
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t g = 0; g < K; g += 32) {
    const __m512 lo = _mm512_loadu_ps(X + g), hi = _mm512_loadu_ps(X + g + 16);
    _mm512_storeu_ps(Xg + g, _mm512_permutex2var_ps(lo, even, hi));
    _mm512_storeu_ps(Xg + g + 16, _mm512_permutex2var_ps(lo, odd, hi));
  }
}

void rows_avx512_m1(const Args& a, int64_t r0, int64_t r1) {
  if (a.round_bf16)
    rows_1<true>(a, r0, r1);
  else
    rows_1<false>(a, r0, r1);
}

void rows_avx512_m1_pairs(const Args& a, int64_t r0, int64_t r1) {
  if (a.round_bf16)
    rows_m1_paired<ScaledTables<true>, rows_1<true>>(a, r0, r1);
  else
    rows_m1_paired<ScaledTables<false>, rows_1<false>>(a, r0, r1);
}

void rows_avx512_m1_quads(const Args& a, int64_t r0, int64_t r1) {
  if (a.round_bf16)
    rows_m1_paired<ScaledTables<true>, rows_1<true>, true>(a, r0, r1);
  else
    rows_m1_paired<ScaledTables<false>, rows_1<false>, true>(a, r0, r1);
}

void decode_scales_avx512(const uint8_t* code, const float* map, const float* nested, float offset, int64_t b0,
                          int64_t b1, float* out) {
  const __m512 off = _mm512_set1_ps(offset);
  int64_t b = b0;
  for (; b + 16 <= b1 && (b >> 8) == ((b + 15) >> 8); b += 16) {  // 16 blocks under one nested scale
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + b)));
    __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(idx, map, 4), _mm512_set1_ps(nested[b >> 8]));
    asm("" : "+v"(v));  // GCC would contract the multiply and the add into an FMA
    _mm512_storeu_ps(out + (b - b0), _mm512_add_ps(v, off));
  }
  for (; b < b1; ++b) {  // a head or tail not aligned to 16 blocks of one nested scale
    float v = map[code[b]] * nested[b >> 8];
    asm("" : "+v"(v));
    out[b - b0] = v + offset;
  }
}

namespace {

template <bool R>
void rows_avx512_r(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: rows_m<1, R>(a, r0, r1); break;
    case 2: rows_dispatch<2, R>(a, r0, r1); break;
    case 3: rows_dispatch<3, R>(a, r0, r1); break;
    case 4: rows_dispatch<4, R>(a, r0, r1); break;
    case 5: rows_dispatch_wide<5, R>(a, r0, r1); break;
    case 6: rows_dispatch_wide<6, R>(a, r0, r1); break;
    case 7: rows_dispatch_wide<7, R>(a, r0, r1); break;
    default: rows_dispatch_wide<8, R>(a, r0, r1); break;
  }
}

}  // namespace

void rows_avx512(const Args& a, int64_t r0, int64_t r1) {
  if (a.round_bf16)
    rows_avx512_r<true>(a, r0, r1);
  else
    rows_avx512_r<false>(a, r0, r1);
}

}  // namespace qlora::cpu::nf4_gemv_detail
