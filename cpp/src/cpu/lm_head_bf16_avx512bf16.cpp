// AVX-512 kernel of cpu/lm_head_bf16.cpp: an NN B panel of the lm_head backward (dh = dlogits · E,
// k = vocabulary rows in pairs) rebuilt from the NT panels packed once for the logits (k = D in
// pairs), so the backward reads 2-byte values that are already rounded instead of rounding fp32 E
// again for every chunk. Pure data movement: the same bf16 values as packing E's fp32 rows.
// Compiled with the AVX512-BF16 flags (CMake: *_avx512bf16.cpp); called only after
// cpu_has_avx512_bf16(). Rules: cpu/README.md (plain functions on raw pointers only).
#include <immintrin.h>

#include <cstdint>

#include "cpu/lm_head_bf16_kernels.hpp"
#include "cpu/transpose16_avx512.hpp"

#if defined(__GNUC__) && !defined(__clang__)  // GCC's false positives on the intrinsics' undefined vectors
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::lm_head_k {

void nt_to_nn_panel_avx512(const uint32_t* Q, int64_t kpd, int64_t pd0, int np, uint32_t* out) {
  // Q[pd * 32 + v] = {E[v, 2pd], E[v, 2pd + 1]} (v < 32 rows of this NT panel). Transposing the
  // 16 x 32 block of dwords at pd0.. gives, per row v, its 32 bf16 of columns 2 pd0 ..; output pair
  // row pv interleaves rows 2pv and 2pv + 1 column by column.
  __m512 lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    const int64_t pd = pd0 + i;
    if (pd < kpd) {
      lo[i] = _mm512_castsi512_ps(_mm512_load_si512(Q + pd * 32));
      hi[i] = _mm512_castsi512_ps(_mm512_load_si512(Q + pd * 32 + 16));
    } else {
      lo[i] = hi[i] = _mm512_setzero_ps();  // columns past D: the zero padding of the last panel
    }
  }
  transpose16(lo);  // lo[v]: row v (v < 16), 32 bf16 columns
  transpose16(hi);  // hi[v - 16]
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i il = _mm512_load_si512(kLo), ih = _mm512_load_si512(kHi);
  for (int pv = 0; pv < np; ++pv) {
    const __m512i a = _mm512_castps_si512(2 * pv < 16 ? lo[2 * pv] : hi[2 * pv - 16]);
    const __m512i b = _mm512_castps_si512(2 * pv + 1 < 16 ? lo[2 * pv + 1] : hi[2 * pv + 1 - 16]);
    _mm512_store_si512(out + pv * 32, _mm512_permutex2var_epi16(a, il, b));
    _mm512_store_si512(out + pv * 32 + 16, _mm512_permutex2var_epi16(a, ih, b));
  }
}

namespace {
__mmask16 lane_mask(int n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u); }

// bf16_k::ukernel_avx512bf16's loop (the same vdpbf16ps chain per element, so the same bits) with
// alpha 1, beta 0 and the tile stored by streaming stores where whole.
template <int R>
void ukr_stream(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int nr) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp), b1 = (__m512bh)_mm512_load_si512(Bp + 16);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(Ap[i]));
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
    Ap += 14;
    Bp += 32;
  }
  const bool whole = nr == 32 && (reinterpret_cast<uintptr_t>(C) & 63) == 0 && ((ldc * 4) & 63) == 0;
  if (whole) {
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      _mm512_stream_ps(C + i * ldc, c0[i]);
      _mm512_stream_ps(C + i * ldc + 16, c1[i]);
    }
  } else {
    const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) {
      _mm512_mask_storeu_ps(C + i * ldc, m0, c0[i]);
      _mm512_mask_storeu_ps(C + i * ldc + 16, m1, c1[i]);
    }
  }
}
}  // namespace

void ukernel_stream_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, int mr,
                               int nr) {
  switch (mr) {
    case 14: return ukr_stream<14>(kp, Ap, Bp, C, ldc, nr);
    case 13: return ukr_stream<13>(kp, Ap, Bp, C, ldc, nr);
    case 12: return ukr_stream<12>(kp, Ap, Bp, C, ldc, nr);
    case 11: return ukr_stream<11>(kp, Ap, Bp, C, ldc, nr);
    case 10: return ukr_stream<10>(kp, Ap, Bp, C, ldc, nr);
    case 9: return ukr_stream<9>(kp, Ap, Bp, C, ldc, nr);
    case 8: return ukr_stream<8>(kp, Ap, Bp, C, ldc, nr);
    case 7: return ukr_stream<7>(kp, Ap, Bp, C, ldc, nr);
    case 6: return ukr_stream<6>(kp, Ap, Bp, C, ldc, nr);
    case 5: return ukr_stream<5>(kp, Ap, Bp, C, ldc, nr);
    case 4: return ukr_stream<4>(kp, Ap, Bp, C, ldc, nr);
    case 3: return ukr_stream<3>(kp, Ap, Bp, C, ldc, nr);
    case 2: return ukr_stream<2>(kp, Ap, Bp, C, ldc, nr);
    case 1: return ukr_stream<1>(kp, Ap, Bp, C, ldc, nr);
    default: return;
  }
}

void stream_tile_avx512(const float* T, int64_t ldt, float* C, int64_t ldc, int mr, int nr) {
  const bool whole = nr == 32 && (reinterpret_cast<uintptr_t>(C) & 63) == 0 && ((ldc * 4) & 63) == 0;
  const __mmask16 m0 = lane_mask(nr), m1 = lane_mask(nr - 16);
  for (int i = 0; i < mr; ++i) {
    const __m512 a = _mm512_maskz_loadu_ps(m0, T + i * ldt), b = _mm512_maskz_loadu_ps(m1, T + i * ldt + 16);
    if (whole) {
      _mm512_stream_ps(C + i * ldc, a);
      _mm512_stream_ps(C + i * ldc + 16, b);
    } else {
      _mm512_mask_storeu_ps(C + i * ldc, m0, a);
      _mm512_mask_storeu_ps(C + i * ldc + 16, m1, b);
    }
  }
}

void store_fence() { _mm_sfence(); }

}  // namespace qlora::cpu::lm_head_k
