// M = 1 decode of the bf16-compute contract on fp32 FMAs (nf4_gemv.hpp's nf4_gemv_nt_many_bf16_fp32
// at M = 1, the default bf16 route there): nf4_gemv_avx512.cpp's row-pair kernel (row_pairs_1:
// each X vector loaded once for two weight rows, four accumulators a row, its FMA order and
// reduction) with each block's table r(code * absmax) rounded by the hardware: one vcvtne2ps2bf16
// for both rows' tables, widened back to fp32 by two ALU ops, instead of the 7-op integer emulation
// per table that the AVX-512F file needs (which made this route 7-15% slower than vdpbf16ps). Same
// values (RNE, denormal to signed zero) and the same FMAs: the bits of rows_avx512_m1 with round_bf16.
// Rules for this file: cpp/src/cpu/README.md (intrinsics + raw pointers only).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_bf16_kernels.hpp"
#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_bf16_detail {

namespace {

#define QLORA_AI inline __attribute__((always_inline))

using A1 = nf4_gemv_detail::Args;  // (this namespace's Args is the vdpbf16ps kernel's)

struct Tables {
  __m512 t0, t1;
};

// A row pair's tables r(code * absmax) as fp32, from one convert: it takes the scaled codes
// interleaved by row (lane 2i: code i of row 0, 2i + 1: of row 1; codes [0, 8) in the low operand,
// [8, 16) in the high one), so word 2c holds row 0's entry c and word 2c + 1 row 1's; a shift left
// by 16 and a mask of the high words widen them (ALU ops, no shuffle: the decode's vpmovzxbd and
// vpermps keep the shuffle port busy; a vpermw widening measured ~1% slower).
QLORA_AI Tables tables(__m512 c_lo, __m512 c_hi, float am0, float am1) {
  const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(am0), 0xAAAA, _mm512_set1_ps(am1));
  const __m512bh w = _mm512_cvtne2ps_pbh(_mm512_mul_ps(c_hi, s), _mm512_mul_ps(c_lo, s));
  const __m512i wi = reinterpret_cast<const __m512i&>(w);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wi, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(wi, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

// 32 columns of both rows (regroup_x_avx512_m1 order: even columns = high nibbles, then odd ones).
QLORA_AI void pair32(__m512 (&acc0)[4], __m512 (&acc1)[4], int u, const uint8_t* p0, const uint8_t* p1,
                     const float* x, __m512 t0, __m512 t1) {
  __m512 xe = _mm512_loadu_ps(x), xo = _mm512_loadu_ps(x + 16);
  asm("" : "+v"(xe), "+v"(xo));  // loaded once for both rows (GCC would fold the load into each FMA)
  const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0)));
  const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
  acc0[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), t0), xe, acc0[u]);
  acc0[u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, t0), xo, acc0[u + 1]);
  acc1[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), t1), xe, acc1[u]);
  acc1[u + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, t1), xo, acc1[u + 1]);
}

QLORA_AI void pf_line(const uint8_t* p, int64_t pf1, int64_t pf2) {
  if (pf2 <= 0) return;
  _mm_prefetch(reinterpret_cast<const char*>(p + pf1), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + pf2), _MM_HINT_T1);
}

// Rows [r0, r1), r1 - r0 even, blocksize >= 64 and K % blocksize == 0 (rows start on a block edge).
void row_pairs(const A1& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s, nb = K >> s;
  const float* x = a.x;  // [K] regrouped, rounded to bf16
  const __m512 codes = _mm512_loadu_ps(a.codes);
  // codes doubled: c_lo lanes 2i, 2i + 1 = code i (i < 8), c_hi = code 8 + i
  const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512 c_lo = _mm512_permutexvar_ps(dup, codes);
  const __m512 c_hi = _mm512_permutexvar_ps(_mm512_add_epi32(dup, _mm512_set1_epi32(8)), codes);
  const int64_t pf1 = a.pf_l1, pf2 = a.pf_l2;
  // Args::pf_lo/pf_hi (the tail's bytes) spread over the row pairs, as the AVX-512 kernels do.
  const char* side = a.pf_lo;
  const int64_t side_bytes = a.pf_hi - a.pf_lo;
  for (int64_t n = r0; n < r1; n += 2) {
    if (side) {
      const char* t = a.pf_lo + side_bytes * (n + 2 - r0) / (r1 - r0);
      for (; side < t; side += 64) _mm_prefetch(side, _MM_HINT_T1);
    }
    const uint8_t* p0 = a.packed + n * K / 2;  // [K/2] bytes of rows n, n + 1
    const uint8_t* p1 = p0 + K / 2;
    const float* am0 = a.absmax + ((n * K) >> s) - a.block0;
    const float* am1 = am0 + nb;
    __m512 acc0[4], acc1[4];
    for (int u = 0; u < 4; ++u) acc0[u] = acc1[u] = _mm512_setzero_ps();
    for (int64_t blk = 0, k = 0; blk < nb; ++blk, k += bs) {
      const Tables t = tables(c_lo, c_hi, am0[blk], am1[blk]);
      for (int64_t i = 0; i < bs; i += 64) {
        if (((k + i) & 127) == 0) {
          pf_line(p0 + (k + i) / 2, pf1, pf2);
          pf_line(p1 + (k + i) / 2, pf1, pf2);
        }
        pair32(acc0, acc1, 0, p0 + (k + i) / 2, p1 + (k + i) / 2, x + k + i, t.t0, t.t1);
        pair32(acc0, acc1, 2, p0 + (k + i) / 2 + 16, p1 + (k + i) / 2 + 16, x + k + i + 32, t.t0, t.t1);
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

}  // namespace

void rows_m1_fp32(const nf4_gemv_detail::Args& a, int64_t r0, int64_t r1) {
  if (a.bs_shift < 6 || (a.K & ((int64_t{1} << a.bs_shift) - 1)) != 0) return nf4_gemv_detail::rows_avx512_m1(a, r0, r1);
  const int64_t pairs_end = r0 + ((r1 - r0) & ~int64_t{1});
  row_pairs(a, r0, pairs_end);
  if (pairs_end < r1) {  // the odd last row: the one-row kernel (its bits: the pairs' per row)
    nf4_gemv_detail::Args b = a;
    if (pairs_end > r0) b.pf_lo = b.pf_hi = nullptr;
    nf4_gemv_detail::rows_avx512_m1(b, pairs_end, r1);
  }
}

}  // namespace qlora::cpu::nf4_gemv_bf16_detail
