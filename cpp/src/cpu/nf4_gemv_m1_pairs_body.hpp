// The M = 1 NF4 GEMV over row pairs (nf4_gemv_kernels.hpp's rows_avx512_m1_pairs): one source for the
// two translation units that run it, nf4_gemv_avx512.cpp (AVX-512F: each row's table r(code * absmax)
// in fp32, or rounded to bf16 by integer ops) and nf4_gemv_bf16_m1_avx512bf16.cpp (both rows' tables
// rounded by one vcvtne2ps2bf16), which differ only in a table policy TP:
//   explicit TP(const float* codes);                        // the 16 NF4 code values
//   PairTables operator()(float absmax0, float absmax1);    // a block's tables of rows n, n + 1
// Each X vector is loaded once for both rows (row_quads_m1: for four rows, rows_avx512_m1_quads);
// each row keeps the single-row kernel's four
// accumulators, FMA sequence and reduction, so its bits are those of the single-row kernel given
// the same tables. Also the software prefetch helpers both files use. Internal linkage (anonymous
// namespace): each file keeps its own copy compiled with its own flags (cpu/README.md); include only
// from AVX-512 files, after <immintrin.h>.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_detail {
namespace {

// An X vector used by both rows of a pair is loaded once: without this GCC folds the load into
// each FMA, doubling the loads of the row-pair kernels (the bound at M >= 4).
inline __attribute__((always_inline)) void keep_in_register(__m512& a, __m512& b) { asm("" : "+v"(a), "+v"(b)); }

// Args::pf_lo/pf_hi spread over the rows [r0, r1) of a call: after row r0 + done, the first
// (pf_hi - pf_lo) * done / (r1 - r0) bytes are prefetched to L2, a few lines per row pair.
struct SidePf {
  const char* p;
  const char* lo;
  int64_t bytes, r0, rows;
  SidePf(const Args& a, int64_t r0_, int64_t r1) : p(a.pf_lo), lo(a.pf_lo), bytes(a.pf_hi - a.pf_lo), r0(r0_), rows(r1 - r0_) {}
  inline __attribute__((always_inline)) void upto(int64_t n_end) {  // rows [r0, n_end) done
    if (!p || p >= lo + bytes) return;
    const char* t = lo + bytes * (n_end - r0) / rows;
    for (; p < t; p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};
inline Args no_pf(const Args& a) {
  Args b = a;
  b.pf_lo = b.pf_hi = nullptr;
  return b;
}

// The line pf1 bytes ahead into L1, pf2 ahead into L2 (pf2 == 0: none; W rows are contiguous, so
// this runs ahead through the task's whole row range).
inline __attribute__((always_inline)) void pf_line(const uint8_t* p, int64_t pf1, int64_t pf2) {
  if (pf2 <= 0) return;
  _mm_prefetch(reinterpret_cast<const char*>(p + pf1), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + pf2), _MM_HINT_T1);
}

struct PairTables {
  __m512 t0, t1;  // rows n, n + 1: [16] scaled codes each
};

// 32 columns of both rows (regroup_x_avx512_m1 order: per 16 packed bytes vpmovzxbd puts byte q in
// dword q, whose low nibble is odd column 2q + 1 and, shifted by 4, whose high nibble is even
// column 2q; vpermps reads index bits 0..3 only).
inline __attribute__((always_inline)) void pair32_m1(__m512 (&acc0)[4], __m512 (&acc1)[4], int u, const uint8_t* p0,
                                                     const uint8_t* p1, const float* x, __m512 t0, __m512 t1) {
  __m512 xe = _mm512_loadu_ps(x), xo = _mm512_loadu_ps(x + 16);
  keep_in_register(xe, xo);
  const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0)));
  const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
  acc0[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), t0), xe, acc0[u]);
  acc0[u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, t0), xo, acc0[u + 1]);
  acc1[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), t1), xe, acc1[u]);
  acc1[u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, t1), xo, acc1[u + 1]);
}

// Rows [r0, r1), r1 - r0 even, blocksize >= 64 and K % blocksize == 0 (both rows of a pair start on
// a block edge).
template <class TP>
void row_pairs_m1(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s, nb = K >> s;
  const float* x = a.x;  // [K] regrouped (regroup_x_avx512_m1)
  const TP tables(a.codes);
  const int64_t pf1 = a.pf_l1, pf2 = a.pf_l2;
  SidePf side(a, r0, r1);
  for (int64_t n = r0; n < r1; n += 2) {
    side.upto(n + 2);
    const uint8_t* p0 = a.packed + n * K / 2;  // [K/2] bytes of rows n, n + 1
    const uint8_t* p1 = p0 + K / 2;
    const float* am0 = a.absmax + ((n * K) >> s) - a.block0;
    const float* am1 = am0 + nb;
    __m512 acc0[4], acc1[4];
    for (int u = 0; u < 4; ++u) acc0[u] = acc1[u] = _mm512_setzero_ps();
    for (int64_t blk = 0, k = 0; blk < nb; ++blk, k += bs) {
      const PairTables t = tables(am0[blk], am1[blk]);
      for (int64_t i = 0; i < bs; i += 64) {
        if (((k + i) & 127) == 0) {
          pf_line(p0 + (k + i) / 2, pf1, pf2);
          pf_line(p1 + (k + i) / 2, pf1, pf2);
        }
        pair32_m1(acc0, acc1, 0, p0 + (k + i) / 2, p1 + (k + i) / 2, x + k + i, t.t0, t.t1);
        pair32_m1(acc0, acc1, 2, p0 + (k + i) / 2 + 16, p1 + (k + i) / 2 + 16, x + k + i + 32, t.t0, t.t1);
      }
    }
    const float dot0 =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[0], acc0[1]), _mm512_add_ps(acc0[2], acc0[3])));
    const float dot1 =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc1[0], acc1[1]), _mm512_add_ps(acc1[2], acc1[3])));
    float* y = a.y + n;
    y[0] = a.beta == 0.0f ? a.alpha * dot0 : a.alpha * dot0 + a.beta * y[0];  // beta == 0: Y not read
    y[1] = a.beta == 0.0f ? a.alpha * dot1 : a.alpha * dot1 + a.beta * y[1];
  }
}

// 32 columns of four rows (packed row r at p + r * half), each X vector loaded once for all four;
// per row the FMAs of pair32_m1.
inline __attribute__((always_inline)) void quad32_m1(__m512 (&acc)[4][4], int u, const uint8_t* p, int64_t half,
                                                     const float* x, const __m512 (&t)[4]) {
  __m512 xe = _mm512_loadu_ps(x), xo = _mm512_loadu_ps(x + 16);
  keep_in_register(xe, xo);
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * half)));
    acc[r][u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t[r]), xe, acc[r][u]);
    acc[r][u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t[r]), xo, acc[r][u + 1]);
  }
}

// Rows [r0, r1) four at a time, (r1 - r0) % 4 == 0, under row_pairs_m1's conditions: X read once
// per four rows instead of two (at K = 11008 the regrouped X, 43 KiB, comes from L2 for every group;
// per 32 columns a pair loaded 128 bytes of X beside 32 of W). Each row keeps the single-row
// kernel's accumulators, FMA sequence and reduction: its bits.
template <class TP>
void row_quads_m1(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, half = K / 2;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s, nb = K >> s;
  const float* x = a.x;  // [K] regrouped (regroup_x_avx512_m1)
  const TP tables(a.codes);
  const int64_t pf1 = a.pf_l1, pf2 = a.pf_l2;
  SidePf side(a, r0, r1);
  for (int64_t n = r0; n < r1; n += 4) {
    side.upto(n + 4);
    const uint8_t* p0 = a.packed + n * half;  // [4][K/2] bytes of rows n .. n + 3
    const float* am0 = a.absmax + ((n * K) >> s) - a.block0;
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t blk = 0, k = 0; blk < nb; ++blk, k += bs) {
      const PairTables ta = tables(am0[blk], am0[nb + blk]), tb = tables(am0[2 * nb + blk], am0[3 * nb + blk]);
      const __m512 t[4] = {ta.t0, ta.t1, tb.t0, tb.t1};
      for (int64_t i = 0; i < bs; i += 64) {
        const uint8_t* p = p0 + (k + i) / 2;
        if (((k + i) & 127) == 0) {
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) pf_line(p + r * half, pf1, pf2);
        }
        quad32_m1(acc, 0, p, half, x + k + i, t);
        quad32_m1(acc, 2, p + 16, half, x + k + i + 32, t);
      }
    }
    float* y = a.y + n;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const float dot =
          _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
      y[r] = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * y[r];  // beta == 0: Y not read
    }
  }
}

// Rows [r0, r1) in groups (kQuads: fours, then a pair; else pairs) where the blocksize is >= 64 and
// divides K, an odd last row by the single-row kernel Row (the bits of a row: the group kernels');
// else all rows by Row.
template <class TP, void (*Row)(const Args&, int64_t, int64_t), bool kQuads = false>
void rows_m1_paired(const Args& a, int64_t r0, int64_t r1) {
  if (a.bs_shift < 6 || (a.K & ((int64_t{1} << a.bs_shift) - 1)) != 0) return Row(a, r0, r1);
  const int64_t quads_end = kQuads ? r0 + ((r1 - r0) & ~int64_t{3}) : r0;
  const int64_t pairs_end = r0 + ((r1 - r0) & ~int64_t{1});
  if (quads_end > r0) row_quads_m1<TP>(a, r0, quads_end);
  // The side prefetch goes with the first kernel that runs rows of this call.
  if (pairs_end > quads_end) row_pairs_m1<TP>(quads_end > r0 ? no_pf(a) : a, quads_end, pairs_end);
  if (pairs_end < r1) Row(pairs_end > r0 ? no_pf(a) : a, pairs_end, r1);
}

}  // namespace
}  // namespace qlora::cpu::nf4_gemv_detail
