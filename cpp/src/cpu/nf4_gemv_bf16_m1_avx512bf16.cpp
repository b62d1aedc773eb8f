// M = 1 decode of the bf16-compute contract on fp32 FMAs (nf4_gemv.hpp's nf4_gemv_nt_many_bf16_fp32
// at M = 1, the default bf16 route there): nf4_gemv_avx512.cpp's row-pair kernel (row_pairs_m1 of
// cpu/nf4_gemv_m1_pairs_body.hpp: each X vector loaded once for two weight rows, four accumulators a
// row, its FMA order and reduction) with each block's table r(code * absmax) rounded by the
// hardware: one vcvtne2ps2bf16 for both rows' tables, widened back to fp32 by two ALU ops, instead
// of the 7-op integer emulation per table that the AVX-512F file needs (which made this route 7-15%
// slower than vdpbf16ps). Same values (RNE, denormal to signed zero) and the same FMAs: the bits of
// rows_avx512_m1 with round_bf16.
// Rules for this file: cpp/src/cpu/README.md (intrinsics + raw pointers only).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12: _mm512_undefined_ps in _mm512_permutexvar_ps
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_bf16_kernels.hpp"
#include "cpu/nf4_gemv_kernels.hpp"
#include "cpu/nf4_gemv_m1_pairs_body.hpp"

namespace qlora::cpu::nf4_gemv_bf16_detail {

namespace {

using nf4_gemv_detail::PairTables;

// A row pair's tables r(code * absmax) as fp32, from one convert: it takes the scaled codes
// interleaved by row (lane 2i: code i of row 0, 2i + 1: of row 1; codes [0, 8) in the low operand,
// [8, 16) in the high one), so word 2c holds row 0's entry c and word 2c + 1 row 1's; a shift left
// by 16 and a mask of the high words widen them (ALU ops, no shuffle: the decode's vpmovzxbd and
// vpermps keep the shuffle port busy; a vpermw widening measured ~1% slower).
struct ConvertedTables {
  __m512 c_lo, c_hi;  // codes doubled: lanes 2i, 2i + 1 = code i (c_lo, i < 8), code 8 + i (c_hi)
  explicit ConvertedTables(const float* c) {
    const __m512 codes = _mm512_loadu_ps(c);
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    c_lo = _mm512_permutexvar_ps(dup, codes);
    c_hi = _mm512_permutexvar_ps(_mm512_add_epi32(dup, _mm512_set1_epi32(8)), codes);
  }
  inline __attribute__((always_inline)) PairTables operator()(float am0, float am1) const {
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(am0), 0xAAAA, _mm512_set1_ps(am1));
    const __m512bh w = _mm512_cvtne2ps_pbh(_mm512_mul_ps(c_hi, s), _mm512_mul_ps(c_lo, s));
    const __m512i wi = reinterpret_cast<const __m512i&>(w);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wi, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(wi, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
};

}  // namespace

// Blocksize >= 64 dividing K: row pairs, an odd last row by the one-row kernel (its bits: the pairs'
// per row); else every row by it.
void rows_m1_fp32(const nf4_gemv_detail::Args& a, int64_t r0, int64_t r1) {
  nf4_gemv_detail::rows_m1_paired<ConvertedTables, nf4_gemv_detail::rows_avx512_m1>(a, r0, r1);
}

void round_x_bf16(float* x, int64_t n) {
  int64_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i));
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(h)), 16);
    _mm512_mask_storeu_ps(x + i, m, _mm512_castsi512_ps(w));
  }
}

// Four rows at a time (row_quads_m1), then a pair, then an odd row: the same bits.
void rows_m1_fp32_quads(const nf4_gemv_detail::Args& a, int64_t r0, int64_t r1) {
  nf4_gemv_detail::rows_m1_paired<ConvertedTables, nf4_gemv_detail::rows_avx512_m1, true>(a, r0, r1);
}

}  // namespace qlora::cpu::nf4_gemv_bf16_detail
