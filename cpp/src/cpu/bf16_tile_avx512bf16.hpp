// The register tile of the bf16 GEMM's micro-kernel (R <= kMR rows x kNR = 32 fp32 columns, one
// vdpbf16ps per row and 16 columns per bf16 pair of k), for AVX512-BF16 kernel files only (include
// only from a TU compiled with -mavx512bf16): the chain and the store of bf16_k::ukernel_avx512bf16
// (gemm_bf16_avx512bf16.cpp still has its own copy; tile_rows<true, true>(kp, Ap, 0, 0, ...) is that
// kernel), so a product gives the same bits whether A is a packed panel or read in place. Internal
// linkage: each kernel TU keeps its own copy, compiled with its own target flags (cpu/README.md).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_bf16_kernels.hpp"

#if defined(__GNUC__) && !defined(__clang__)  // c0, c1 of a tile: GCC warns spuriously
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::bf16_tile {
namespace {
static_assert(bf16_k::kNR == 32, "two zmm of 16 fp32 columns per row");
static_assert(bf16_k::kMR <= 14, "tile_rows dispatches mr = 1..14");

inline __mmask16 tile_lane_mask(int64_t n) {  // first n of 16 lanes (n clamped to [0, 16])
  if (n >= 16) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// One row of a tile's output: c[lanes m] = alpha * acc (beta == 0: C not read) or
// fma(beta, c, alpha * acc). tile and tile_half store every row through it (same ops, same bits).
inline __attribute__((always_inline)) void store_tile_row(float* c, __mmask16 m, __m512 acc, __m512 va, float beta, __m512 vb) {
  if (beta == 0.0f)
    _mm512_mask_storeu_ps(c, m, _mm512_mul_ps(va, acc));
  else
    _mm512_mask_storeu_ps(c, m, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c), _mm512_mul_ps(va, acc)));
}

// tile (below) for nr <= 16: only the first 16 columns of the panel, one vdpbf16ps per row and pair
// (the chain of those columns unchanged, so the same bits; half the work on a panel's last columns).
template <int R, bool PackedA>
void tile_half(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, float* C, int64_t ldc,
               float alpha, float beta, int nr) {
  __m512 c0[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) c0[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i)
      c0[i] = _mm512_dpbf16_ps(c0[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(PackedA ? A[i] : A[i * rs])), b0);
    A += PackedA ? bf16_k::kMR : cs;
    Bp += bf16_k::kNR;
  }
  const __mmask16 m0 = tile_lane_mask(nr);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) store_tile_row(C + i * ldc, m0, c0[i], va, beta, vb);
}

// C[R, nr] (ld ldc) = alpha * A·Bp + beta * C over kp pairs; Bp: kp rows of kNR pair words, 64-byte
// aligned. Per element: vdpbf16ps from 0, p in order; then beta == 0 ? alpha * acc :
// fma(beta, C, alpha * acc). A: pair (i, p) at A[i * rs + p * cs], or with PackedA a packed panel
// (bf16_k::pack_*: [pairs of k][kMR], rs and cs unused). PrefetchC: touch the R rows of C first.
template <int R, bool PackedA, bool PrefetchC>
void tile(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, float* C, int64_t ldc,
          float alpha, float beta, int nr) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) {
    c0[i] = c1[i] = _mm512_setzero_ps();
    if (PrefetchC) {
      _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 31), _MM_HINT_T0);
    }
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp), b1 = (__m512bh)_mm512_load_si512(Bp + 16);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(PackedA ? A[i] : A[i * rs]));
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
    A += PackedA ? bf16_k::kMR : cs;
    Bp += bf16_k::kNR;
  }
  const __mmask16 m0 = tile_lane_mask(nr), m1 = tile_lane_mask(nr - 16);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) {
    store_tile_row(C + i * ldc, m0, c0[i], va, beta, vb);
    store_tile_row(C + i * ldc + 16, m1, c1[i], va, beta, vb);
  }
}

// tile<mr> for a run-time mr = 1..14 (others: nothing); half: tile_half<mr> where nr <= 16 (same bits).
template <bool PackedA, bool PrefetchC>
inline void tile_rows(int64_t kp, const uint32_t* A, int64_t rs, int64_t cs, const uint32_t* Bp, float* C, int64_t ldc,
                      float alpha, float beta, int mr, int nr, bool half = false) {
  if (half && nr <= 16) switch (mr) {
      case 14: return tile_half<14, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 13: return tile_half<13, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 12: return tile_half<12, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 11: return tile_half<11, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 10: return tile_half<10, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 9: return tile_half<9, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 8: return tile_half<8, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 7: return tile_half<7, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 6: return tile_half<6, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 5: return tile_half<5, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 4: return tile_half<4, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 3: return tile_half<3, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 2: return tile_half<2, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      case 1: return tile_half<1, PackedA>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
      default: return;
    }
  switch (mr) {
    case 14: return tile<14, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 13: return tile<13, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 12: return tile<12, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 11: return tile<11, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 10: return tile<10, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 9: return tile<9, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 8: return tile<8, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 7: return tile<7, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 6: return tile<6, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 5: return tile<5, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 4: return tile<4, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 3: return tile<3, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 2: return tile<2, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    case 1: return tile<1, PackedA, PrefetchC>(kp, A, rs, cs, Bp, C, ldc, alpha, beta, nr);
    default: return;
  }
}
}  // namespace
}  // namespace qlora::cpu::bf16_tile
